"""The adapter store: which adapters are registered, for whom, on which base.

A registered adapter is a row of the registry's ``adapters`` table — its owner (a tenant, or
public), the base model it needs, the sha256 of its weights and config, its lineage, taken from the
adapter's own manifest — and, for one registered by hand, a copy of its directory under
``HOME/adapters/NAME``. A fine-tuning job's model (``ft:…``) is registered by the worker and read
from the job's own output directory. Files are checked on the way in (``adapter_checks.py``);
reading the weights into memory (checksum first, safetensors only, refused for other base weights
than the served ones) is ``adapter_cache.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select

from loraforge.errors import ConfigError, ModelError
from loraforge.files import atomic_directory, write_bytes_atomic
from loraforge.govern.release import creator, register_step
from loraforge.models.manifest import AdapterManifest, read_manifest
from loraforge.models.sources import DEFAULT_BASE_MODEL, PACKAGED_MODELS
from loraforge.registry.database import Registry
from loraforge.registry.schema import Adapter as AdapterRow
from loraforge.registry.schema import Evaluation, Route, ensure_tenant
from loraforge.serve.adapter_checks import (
    CONFIG,
    EVIDENCE_FILES,
    MAX_ADAPTER_BYTES,
    MAX_LORA_RANK,
    WEIGHTS,
    check_adapter_config,
    check_adapter_weights,
    publication_problems,
    read_regular,
    valid_name,
)
from loraforge.serve.home_registry import home_registry


@dataclass(frozen=True)
class Registration:
    name: str
    tenant: str | None  # None = public
    base_model: str
    base_sha256: str
    weights_sha256: str
    added_at: float
    source: str
    config_sha256: str = ""  # "" in registrations of older versions: the stored manifest's is used
    governance_flags: tuple[str, ...] = ()  # exceptions to the data-governance rules taken in training
    governance_override: str | None = None  # why it was published without a passed governance record
    state: str = "draft"  # the release lifecycle (``govern.release``)
    release_override: str | None = None  # why it was approved although its evaluation failed the gate

    @property
    def servable(self) -> bool:
        """Whether it is served at all: a retired adapter never is."""
        return self.state != "retired"

    @property
    def public(self) -> bool:
        return self.tenant is None

    def visible_to(self, tenant: str) -> bool:
        return self.tenant is None or self.tenant == tenant


FINE_TUNED = "ft:"  # the names of fine-tuning jobs' models (registered in the registry by the worker)


class AdapterStore:
    """Registered adapters: rows in the registry, files under ``HOME/adapters`` (one directory each,
    written atomically before the row that makes them visible is committed).

    Args:
        reserved_names: names an adapter may not take (the base models a server serves).
        max_rank: the highest LoRA rank accepted.
        max_bytes: the largest adapter file accepted.
        registry: the registry to use (default: ``home``'s).
    """

    def __init__(
        self,
        home: Path,
        *,
        reserved_names: Iterable[str] = (),
        max_rank: int = MAX_LORA_RANK,
        max_bytes: int = MAX_ADAPTER_BYTES,
        registry: Registry | None = None,
    ) -> None:
        self.root = home / "adapters"
        self.registry = registry if registry is not None else home_registry(home)
        self.reserved_names = {DEFAULT_BASE_MODEL, *PACKAGED_MODELS, *reserved_names}
        self.max_rank = max_rank
        self.max_bytes = max_bytes

    def add(
        self,
        source: Path,
        name: str,
        *,
        tenant: str | None,
        replace: bool = False,
        governance_override: str | None = None,
        created_by: dict[str, Any] | None = None,
    ) -> Registration:
        """Copy a trained adapter directory into the store under ``name``.

        Every file is checked on the way in: regular files only (no links, FIFOs, devices), each
        under the size limit, both checksums of the manifest matching, a LoRA config the engine
        runs with a rank under the limit, finite weights.

        Args:
            tenant: the owner; None publishes it to every tenant, which needs a passed
                data-governance record (``publication_problems``) or ``governance_override``.
            governance_override: why it may be published anyway (recorded in the registration).
            created_by: who registers it (``govern.release.creator``): they cannot approve it.

        The adapter starts as ``draft``, or ``evaluated`` when its manifest carries an evaluation
        verdict (``loraforge eval``), which is recorded in ``evaluations``. An approved or deployed
        adapter cannot be replaced: the weights approved are the weights served.

        Raises:
            ConfigError: a bad name or tenant, a name taken (without ``replace``), a base model's
                name, or publishing without a passed governance record or an override.
            ModelError: the directory or a file in it is refused (see above).
        """
        if not valid_name(name):
            raise ConfigError(
                f"adapter name {name!r} is not allowed: use 1-64 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        if tenant is not None and not valid_name(tenant):
            raise ConfigError(f"tenant name {tenant!r} is not allowed: use 1-64 letters, digits, '.', '_' or '-'")
        if self.get(name) is not None and not replace:
            raise ConfigError(f"an adapter named {name!r} is already registered; pick another name or pass --replace")
        if source.is_symlink():
            raise ModelError(f"{source} is a symbolic link; give the adapter's directory itself")
        if not source.exists():
            raise ModelError(f"adapter directory {source} does not exist")
        if not source.is_dir():
            raise ModelError(f"{source} is not a directory; give the adapter's directory (from `loraforge train`)")
        # Read every file once, refusing links and special files, before anything is parsed.
        files = {
            item: read_regular(source / item, self.max_bytes)
            for item in (CONFIG, WEIGHTS, "manifest.json")
            if os.path.lexists(source / item)
        }
        read_manifest(source)  # says which file is missing, or what the manifest lacks
        # the bytes read above are the ones registered, so they are the ones checked
        manifest = AdapterManifest.parse(files["manifest.json"], source / "manifest.json")
        base_name = manifest.base_model.name
        reserved = self.reserved_names | {base_name, Path(base_name).name, Path(base_name).stem}
        if name in reserved:
            raise ConfigError(f"{name!r} is the name of a base model; clients would reach the base model. Pick another")
        for pickled in sorted(source.glob("*.bin")) + sorted(source.glob("*.pt")) + sorted(source.glob("*.pkl")):
            raise ModelError(f"{pickled} is a pickle file; loraforge only loads safetensors. Remove it and retry")
        checksums = manifest.checksums
        digests = {item: hashlib.sha256(files[item]).hexdigest() for item in (CONFIG, WEIGHTS)}
        for item, digest in digests.items():
            expected = checksums.get(item)
            if expected is None:
                raise ModelError(
                    f"{source / 'manifest.json'} records no checksum of {item}; only adapters whose manifest "
                    "checksums both files (as `loraforge train` writes) can be registered"
                )
            if expected != digest:
                raise ModelError(
                    f"{source / item} has sha256 {digest[:12]}…, but its manifest records {expected[:12]}…; "
                    "the file was changed after training"
                )
        try:
            config = json.loads(files[CONFIG])
        except ValueError as e:
            raise ModelError(f"{source / CONFIG} is not valid JSON ({e})") from e
        check_adapter_config(config, str(source), max_rank=self.max_rank)
        check_adapter_weights(files[WEIGHTS], str(source), max_rank=self.max_rank)
        if tenant is None:
            problems = publication_problems(manifest)
            if problems and not (governance_override or "").strip():
                raise ConfigError(
                    f"{source} cannot be published to every tenant: "
                    + "; ".join(problems)
                    + ". Register it for one tenant (--tenant), or publish it anyway with --override-governance REASON "
                    "(the reason is recorded and shown with the adapter)"
                )
            if not problems:
                governance_override = None
        else:
            governance_override = None
        row = AdapterRow(
            name=name,
            tenant=tenant,
            base_model=base_name,
            base_sha256=manifest.base_model.sha256,
            weights_sha256=digests[WEIGHTS],
            config_sha256=digests[CONFIG],
            source=str(source.resolve()),
            lineage=manifest.lineage(),
            governance_flags=[f["flag"] for f in manifest.flags()],
            governance_override=governance_override.strip() if governance_override else None,
            added_at=time.time(),
            created_by=created_by or creator(None, "unknown"),
        )
        verdict = (manifest.evaluation or {}).get("verdict")
        self.root.mkdir(parents=True, exist_ok=True)
        # The files are written first, outside any transaction (they may be large: the registry's
        # writers — a server recording usage — never wait for the copy). A short transaction then
        # checks the name and records the row; the directory is renamed into place right after it
        # commits. A directory left by a stopped process, with no row, is replaced.
        with atomic_directory(self.root / name, replace=True) as tmp:
            for item, data in files.items():
                write_bytes_atomic(tmp / item, data)
            for extra in EVIDENCE_FILES:
                if (source / extra).is_file() and not (source / extra).is_symlink():
                    write_bytes_atomic(tmp / extra, read_regular(source / extra, self.max_bytes))
            _copy_tree(source / "eval", tmp / "eval", self.max_bytes)
            with self.registry.session() as s:
                existing = s.get(AdapterRow, name)
                if existing is not None and not replace:
                    raise ConfigError(
                        f"an adapter named {name!r} is already registered; pick another name or pass --replace"
                    )
                if existing is not None and existing.job_id is not None:
                    raise ConfigError(f"{name!r} is a fine-tuning job's model; it cannot be replaced by hand")
                if existing is not None and existing.state in ("approved", "deployed"):
                    raise ConfigError(
                        f"{name!r} is {existing.state}: the weights approved are the weights served, so it cannot be "
                        "replaced; register the new adapter under another name and take it through approval"
                    )
                if s.get(Route, name) is not None:
                    raise ConfigError(f"{name!r} is the name of a route; pick another name")
                if tenant is not None:
                    ensure_tenant(s, tenant, row.added_at)
                merged = s.merge(row)
                eval_id = None
                if verdict:
                    evaluation = manifest.evaluation or {}
                    eval_id = f"eval-{name}-{int(row.added_at * 1000)}"
                    s.add(
                        Evaluation(
                            id=eval_id[:64],
                            adapter=name,
                            verdict=str(verdict),
                            policy=evaluation.get("policy") or {},
                            headline=evaluation.get("headline") or {},
                            report_path=(evaluation.get("report") or {}).get("html"),
                            created_at=row.added_at,
                        )
                    )
                s.flush()
                register_step(
                    s,
                    merged,
                    str(verdict) if verdict else None,
                    actor=(row.created_by or {})["actor"],
                    evaluation_id=eval_id,
                )
                return _registration(merged)

    def get(self, name: str) -> Registration | None:
        if not (name.startswith(FINE_TUNED) or valid_name(name)):
            return None
        with self.registry.reading() as s:
            row = s.get(AdapterRow, name)
            return _registration(row) if row is not None else None

    def registrations(self) -> list[Registration]:
        with self.registry.reading() as s:
            return [_registration(r) for r in s.scalars(select(AdapterRow).order_by(AdapterRow.name))]

    def remove(self, name: str) -> bool:
        """Unregister ``name`` (False if there is no such adapter); a copy in the store is deleted,
        a fine-tuning job's output directory is kept with its job."""
        with self.registry.session() as s:
            row = s.get(AdapterRow, name)
            if row is None:
                return False
            hand_registered = row.job_id is None
            s.delete(row)
        path = self.root / name
        if hand_registered and valid_name(name) and path.is_dir():
            trash = self.root / f".removed-{name}-{time.time_ns()}"
            path.rename(trash)  # atomic: the name disappears at once
            shutil.rmtree(trash, ignore_errors=True)
        return True

    def path(self, name: str) -> Path:
        """Where the adapter's files are: the store's copy, or a fine-tuning job's output directory."""
        if name.startswith(FINE_TUNED):
            reg = self.get(name)
            if reg is not None:
                return Path(reg.source)  # the job's own output directory, checked on every load
        return self.root / name


def _registration(row: AdapterRow) -> Registration:
    return Registration(
        name=row.name,
        tenant=row.tenant,
        base_model=row.base_model,
        base_sha256=row.base_sha256,
        weights_sha256=row.weights_sha256,
        added_at=row.added_at,
        source=row.source,
        config_sha256=row.config_sha256,
        governance_flags=tuple(str(f) for f in row.governance_flags or ()),
        governance_override=row.governance_override,
        state=row.state or "draft",
        release_override=row.release_override,
    )


def _copy_tree(source: Path, target: Path, max_bytes: int) -> None:
    """Copy a directory of evidence (an evaluation report), regular files and directories only."""
    if source.is_symlink() or not source.is_dir():
        return
    target.mkdir(mode=0o700)
    for child in sorted(source.iterdir()):
        if child.is_symlink():
            raise ModelError(f"{child} is a symbolic link; an adapter directory holds real files only")
        if child.is_dir():
            _copy_tree(child, target / child.name, max_bytes)
        else:
            write_bytes_atomic(target / child.name, read_regular(child, max_bytes))
