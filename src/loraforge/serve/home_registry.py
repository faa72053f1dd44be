"""The registry a home uses, opened once per process; a home from before the registry is imported.

Keys, adapter registrations and usage used to live in files of the home (``keys.json``,
``adapters/NAME/registration.json``, ``usage.jsonl``). The first time a registry is opened for such
a home, each file is imported in one transaction that also records it (its path and sha256) in
``home_migrations``; then it is moved to ``HOME/backup/file-home-<time>/`` and the import is
written to the audit log. A process stopped between the two finds the file again with a recorded
hash and only moves it: nothing is imported twice or lost. Keys keep working (their hashes move as
they are), registrations keep their names, owners and checksums, usage keeps every line.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import weakref
from pathlib import Path
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from loraforge.errors import ConfigError, ModelError
from loraforge.files import private_directory, sha256_file
from loraforge.govern.audit_witness import audit_log
from loraforge.models.manifest import AdapterManifest
from loraforge.registry.database import Registry, database_url, open_registry
from loraforge.registry.schema import Adapter, ApiKey, Migration, UsageRecord, ensure_tenant

KEYS_FILE = "keys.json"
USAGE_FILE = "usage.jsonl"
REGISTRATION_FILE = "registration.json"

_open: weakref.WeakValueDictionary[str, Registry] = weakref.WeakValueDictionary()
_lock = threading.Lock()


def home_registry(home: Path, url: str | None = None, *, upgrade_schema: bool = True) -> Registry:
    """The registry of ``home`` (or at ``url``): opened and upgraded once per process, shared by the
    stores that use it, with the home's old files imported first (see the module's docstring).

    Args:
        upgrade_schema: apply pending migrations; with False, a schema behind the code is refused.

    Raises:
        ConfigError: the registry cannot be opened (or is behind and ``upgrade_schema`` is False),
            or an old file is damaged (it names the file).
    """
    chosen = database_url(home, url)
    with _lock:
        registry = _open.get(chosen)
        if registry is None:
            registry = open_registry(home, url, upgrade_schema=upgrade_schema)
            _open[chosen] = registry
        import_file_home(home, registry)
    return registry


def import_file_home(home: Path, registry: Registry) -> list[dict[str, Any]]:
    """Import what a file-based ``home`` holds into ``registry``; returns one entry per file imported."""
    found = [home / n for n in (KEYS_FILE, USAGE_FILE) if (home / n).is_file()]
    if (home / "adapters").is_dir():
        found += sorted(p for p in (home / "adapters").glob(f"*/{REGISTRATION_FILE}") if p.is_file())
    if not found:
        return []
    now = time.time()
    backup = home / "backup" / f"file-home-{time.strftime('%Y%m%d-%H%M%S', time.gmtime(now))}"
    digests = {path: sha256_file(path) for path in found}
    with registry.reading() as s:
        recorded = {(m.source, m.sha256): m.backup for m in s.scalars(select(Migration))}
    pending = [p for p in found if (str(p.relative_to(home)), digests[p]) not in recorded]
    imported: list[dict[str, Any]] = []
    if not pending:  # imported before a process stopped: only the moves are left
        _move(home, found, recorded, digests, backup)
        return imported
    # audited like an admin action: if the intent cannot be recorded, nothing is imported
    names = [str(p.relative_to(home)) for p in pending]
    with audit_log(home, registry).action(
        "loraforge", "registry.import_home", str(home), files=names, backup=str(backup)
    ) as act:
        with registry.session() as s:
            for path in pending:
                source, digest = str(path.relative_to(home)), digests[path]
                if s.scalar(select(Migration.id).where(Migration.source == source, Migration.sha256 == digest)):
                    continue  # another process imported it meanwhile
                records = _IMPORTERS[path.name](s, path, now)
                s.add(
                    Migration(
                        source=source, sha256=digest, backup=str(backup / source), records=records, created_at=now
                    )
                )
                recorded[(source, digest)] = str(backup / source)
                imported.append({"file": source, "sha256": digest, "records": records})
        _move(home, found, recorded, digests, backup)
        act.outcome.update(files=imported, backup=str(backup))
    return imported


def _move(
    home: Path, found: list[Path], recorded: dict[tuple[str, str], str], digests: dict[Path, str], backup: Path
) -> None:
    """Move each imported file to where its migration row says it was kept."""
    for path in found:
        source = str(path.relative_to(home))
        target = Path(recorded.get((source, digests[path])) or backup / source)
        private_directory(target.parent)
        with contextlib.suppress(FileNotFoundError):  # moved by another process opening the same home
            os.replace(path, target)
    if not (home / KEYS_FILE).exists():
        (home / "keys.lock").unlink(missing_ok=True)  # the old key store's lock file


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"{path} cannot be imported into the registry ({e}); restore it from a backup, or move it away "
            "to start without it"
        ) from e


def _import_keys(s: Session, path: Path, now: float) -> int:
    data = _read_json(path)
    try:
        records = [dict(r) for r in data["keys"]]
        count = 0
        for r in records:
            if s.get(ApiKey, r["id"]) is not None:
                continue
            ensure_tenant(s, r["tenant"], now)
            s.add(
                ApiKey(
                    id=r["id"],
                    hash=r["hash"],
                    tenant=r["tenant"],
                    role=r["role"],
                    all_tenants=bool(r.get("all_tenants", False)),
                    created_at=float(r["created_at"]),
                    revoked_at=r.get("revoked_at"),
                )
            )
            count += 1
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{path} is not a valid key file ({e!r}); restore it from a backup") from e
    s.flush()
    return count


def _import_usage(s: Session, path: Path, _now: float) -> int:
    rows = []
    fields = ("ts", "request_id", "tenant", "key_id", "model", "prompt_tokens", "completion_tokens", "cost")
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                entry = json.loads(line)
                rows.append({k: entry[k] for k in fields})
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a crash, as the ledger always skipped
    for start in range(0, len(rows), 1000):
        s.execute(insert(UsageRecord), rows[start : start + 1000])
    return len(rows)


def _import_registration(s: Session, path: Path, now: float) -> int:
    data = _read_json(path)
    try:
        name = str(data["name"])
        if s.get(Adapter, name) is not None:
            return 0
        tenant = data.get("tenant")
        if tenant is not None:
            ensure_tenant(s, tenant, now)
        lineage: dict[str, Any] = {}
        config_sha256 = data.get("config_sha256") or ""
        manifest = path.parent / "manifest.json"
        with contextlib.suppress(OSError, ModelError):  # the registration is kept; its lineage stays empty
            stored = AdapterManifest.parse(manifest.read_bytes(), manifest)
            lineage = stored.lineage()
            # registrations of older versions have no config hash: the stored manifest's is the one
            config_sha256 = config_sha256 or stored.checksums.get("adapter_config.json", "")
        s.add(
            Adapter(
                name=name,
                tenant=tenant,
                base_model=data["base_model"],
                base_sha256=data.get("base_sha256") or "",
                weights_sha256=data["weights_sha256"],
                config_sha256=config_sha256,
                source=data.get("source") or "",
                lineage=lineage,
                governance_flags=list(data.get("governance_flags") or ()),
                governance_override=data.get("governance_override"),
                added_at=float(data.get("added_at") or now),
            )
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{path} is not a valid registration ({e!r}); restore it from a backup") from e
    s.flush()
    return 1


_IMPORTERS = {KEYS_FILE: _import_keys, USAGE_FILE: _import_usage, REGISTRATION_FILE: _import_registration}
