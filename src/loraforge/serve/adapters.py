"""The adapter store (``HOME/adapters/NAME``) and the in-memory LRU of adapters ready to run.

A registered adapter is a copy of a trained adapter directory plus ``registration.json``: its
owner (a tenant, or public), the base model it needs and the sha256 of its weights, taken from
the adapter's own manifest. Weights are read with safetensors only, after their checksum has
been verified; an adapter for other base weights than the served ones is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from loraforge.errors import ConfigError, ModelError
from loraforge.files import atomic_directory, write_bytes_atomic, write_text_atomic
from loraforge.models.manifest import AdapterManifest, read_manifest
from loraforge.models.sources import DEFAULT_BASE_MODEL, PACKAGED_MODELS
from loraforge.serve.runner import GROUP_OF, GROUPS, LoraGroup, LoraLayers

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # matched in full (``fullmatch``)
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
MAX_LORA_RANK = 64
MAX_ADAPTER_BYTES = 1 << 30  # one file of an adapter (a rank-64 adapter of an 8B model is ~0.7 GB)
EVIDENCE_FILES = ("loss.png", "metrics.jsonl")  # copied beside the adapter for a reviewer of the store
_KEY_RE = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


def valid_name(name: str) -> bool:
    """Whether ``name`` is a usable adapter or tenant name, all of it (no trailing newline)."""
    return isinstance(name, str) and NAME_RE.fullmatch(name) is not None


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

    @property
    def public(self) -> bool:
        return self.tenant is None

    def visible_to(self, tenant: str) -> bool:
        return self.tenant is None or self.tenant == tenant


def publication_problems(manifest: AdapterManifest) -> list[str]:
    """Why an adapter's data-governance record does not allow publishing it to every tenant.

    It passes when the licence check of its training data passed, personal data found in it was
    redacted or dropped (not only reported), and no governance exception was taken
    (``governance_flags``: unlicensed data allowed, secrets kept, a non-default policy, …).
    """
    problems = []
    licensing = manifest.licensing
    if not isinstance(licensing, dict):
        problems.append("its manifest has no licence record (it was not trained by `loraforge train`)")
    elif licensing.get("ok") is not True:
        problems.append("the licence check of its training data did not pass (trained with --allow-unlicensed)")
    pii = (manifest.data_governance or {}).get("pii")
    if not isinstance(pii, dict):
        problems.append("its manifest has no personal-data record")
    elif pii.get("action") not in ("redact", "drop") and pii.get("examples_with_pii"):
        problems.append(
            f"{pii.get('examples_with_pii')} training examples with personal data were trained on as they were "
            "(--pii report); retrain with --pii redact or --pii drop"
        )
    for flag in manifest.flags():
        if flag["flag"] != "allow_unlicensed" or (isinstance(licensing, dict) and licensing.get("ok") is True):
            problems.append(f"governance exception {flag['flag']}: {flag['detail']}")
    return problems


def _read_regular(path: Path, max_bytes: int) -> bytes:
    """The bytes of ``path``, which must be a regular file (not a link, FIFO or device) of at most
    ``max_bytes``; checked on the opened file, so that it cannot be swapped between check and read.

    Raises:
        ModelError: what ``path`` is instead, or its size.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError as e:
        raise ModelError(f"{path} is missing") from e
    except OSError as e:  # ELOOP: a symbolic link
        if path.is_symlink():
            raise ModelError(f"{path} is a symbolic link; copy the real file into the adapter directory") from e
        raise ModelError(f"{path} cannot be read: {e.strerror}") from e
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ModelError(f"{path} is not a regular file (a FIFO, socket or device); an adapter holds files only")
        if info.st_size > max_bytes:
            raise ModelError(
                f"{path} is {_size(info.st_size)}, more than the limit of {_size(max_bytes)} for one adapter file "
                "(--max-size-mb)"
            )
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ModelError(f"{path} grew past {_size(max_bytes)} while it was read")
    return data


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n} bytes"


def check_adapter_config(config: Any, where: str, *, max_rank: int = MAX_LORA_RANK) -> None:
    """Refuse an ``adapter_config.json`` the engine cannot or must not run.

    Raises:
        ModelError: not a LoRA config, a rank above ``max_rank``, a non-finite or non-positive
            ``lora_alpha``, or a LoRA variant the engine cannot run (DoRA, modules_to_save, alpha_pattern).
    """
    if not isinstance(config, dict):
        raise ModelError(f"{where}: adapter_config.json must be a JSON object")
    ranks = [config.get("r", 8), *dict(config.get("rank_pattern") or {}).values()]
    for r in ranks:
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise ModelError(f"{where}: LoRA rank {r!r} is not a positive integer")
        if r > max_rank:
            raise ModelError(f"{where}: LoRA rank {r} is above this server's limit of {max_rank} (max_lora_rank)")
    alpha = config.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha) or alpha <= 0:
        raise ModelError(f"{where}: lora_alpha must be a finite positive number, got {alpha!r}")
    if config.get("use_dora"):
        raise ModelError(f"{where} is a DoRA adapter; the serving engine runs plain LoRA and rsLoRA only")
    if config.get("modules_to_save"):
        raise ModelError(f"{where} trains whole modules ({config['modules_to_save']}); the engine cannot serve it")
    if config.get("alpha_pattern"):
        raise ModelError(f"{where} uses alpha_pattern, which the serving engine does not support")


def check_adapter_weights(weights: bytes, where: str, *, max_rank: int = MAX_LORA_RANK) -> None:
    """Refuse weights that are not finite LoRA matrices of rank at most ``max_rank``.

    Raises:
        ModelError: unreadable safetensors, a tensor that is not a LoRA weight, a rank above the
            limit, or a value that is inf or nan.
    """
    from safetensors.torch import load

    try:
        tensors = load(weights)
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise ModelError(f"{where}: {WEIGHTS} is not a readable safetensors file ({e})") from e
    for key, tensor in tensors.items():
        if tensor.dim() != 2 or ".lora_" not in key:
            raise ModelError(f"{where}: tensor {key!r} is not a LoRA weight matrix")
        rank = tensor.shape[0] if ".lora_A" in key else tensor.shape[1]
        if rank > max_rank:
            raise ModelError(f"{where}: {key} has rank {rank}, above this server's limit of {max_rank} (max_lora_rank)")
        if not bool(torch.isfinite(tensor).all()):
            raise ModelError(f"{where}: {key} holds values that are inf or nan; the adapter is damaged")


class AdapterStore:
    """Registered adapters under ``HOME/adapters``: one directory each, written atomically.

    Args:
        reserved_names: names an adapter may not take (the base models a server serves).
        max_rank: the highest LoRA rank accepted.
        max_bytes: the largest adapter file accepted.
    """

    def __init__(
        self,
        home: Path,
        *,
        reserved_names: Iterable[str] = (),
        max_rank: int = MAX_LORA_RANK,
        max_bytes: int = MAX_ADAPTER_BYTES,
    ) -> None:
        self.root = home / "adapters"
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
    ) -> Registration:
        """Copy a trained adapter directory into the store under ``name``.

        Every file is checked on the way in: regular files only (no links, FIFOs, devices), each
        under the size limit, both checksums of the manifest matching, a LoRA config the engine
        runs with a rank under the limit, finite weights.

        Args:
            tenant: the owner; None publishes it to every tenant, which needs a passed
                data-governance record (``publication_problems``) or ``governance_override``.
            governance_override: why it may be published anyway (recorded in the registration).

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
        if (self.root / name).exists() and not replace:
            raise ConfigError(f"an adapter named {name!r} is already registered; pick another name or pass --replace")
        if source.is_symlink():
            raise ModelError(f"{source} is a symbolic link; give the adapter's directory itself")
        if not source.exists():
            raise ModelError(f"adapter directory {source} does not exist")
        if not source.is_dir():
            raise ModelError(f"{source} is not a directory; give the adapter's directory (from `loraforge train`)")
        # Read every file once, refusing links and special files, before anything is parsed.
        files = {
            item: _read_regular(source / item, self.max_bytes)
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
        reg = Registration(
            name=name,
            tenant=tenant,
            base_model=base_name,
            base_sha256=manifest.base_model.sha256,
            weights_sha256=digests[WEIGHTS],
            added_at=time.time(),
            source=str(source.resolve()),
            config_sha256=digests[CONFIG],
            governance_flags=tuple(f["flag"] for f in manifest.flags()),
            governance_override=governance_override.strip() if governance_override else None,
        )
        self.root.mkdir(parents=True, exist_ok=True)
        with atomic_directory(self.root / name, replace=replace) as tmp:
            for item, data in files.items():
                write_bytes_atomic(tmp / item, data)
            for extra in EVIDENCE_FILES:
                if (source / extra).is_file() and not (source / extra).is_symlink():
                    write_bytes_atomic(tmp / extra, _read_regular(source / extra, self.max_bytes))
            _copy_tree(source / "eval", tmp / "eval", self.max_bytes)
            write_text_atomic(tmp / "registration.json", json.dumps(asdict(reg), indent=2))
        return reg

    def get(self, name: str) -> Registration | None:
        if not valid_name(name):
            return None
        path = self.root / name / "registration.json"
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        data["governance_flags"] = tuple(data.get("governance_flags") or ())
        return Registration(**data)

    def registrations(self) -> list[Registration]:
        if not self.root.is_dir():
            return []
        regs = (self.get(p.name) for p in sorted(self.root.iterdir()) if not p.name.startswith("."))
        return [r for r in regs if r is not None]

    def remove(self, name: str) -> bool:
        path = self.root / name
        if self.get(name) is None:
            return False
        trash = self.root / f".removed-{name}-{time.time_ns()}"
        path.rename(trash)  # atomic: the name disappears at once
        shutil.rmtree(trash, ignore_errors=True)
        return True

    def path(self, name: str) -> Path:
        return self.root / name


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
            write_bytes_atomic(target / child.name, _read_regular(child, max_bytes))


@dataclass
class AdapterFiles:
    """An adapter's checked configuration and the bytes of its weights, read without tensor work."""

    name: str
    alpha: float
    rslora: bool
    weights: bytes


def read_adapter(
    directory: Path,
    expected_sha256: str,
    config_sha256: str = "",
    *,
    max_rank: int = MAX_LORA_RANK,
    max_bytes: int = MAX_ADAPTER_BYTES,
) -> AdapterFiles:
    """Read an adapter's weights and config once, check both checksums and the LoRA variant.

    Args:
        config_sha256: the registered checksum of ``adapter_config.json`` ("" for registrations
            of older versions: the one in the stored ``manifest.json`` is used).

    Raises:
        ModelError: a missing file, a checksum mismatch, or a LoRA variant the engine cannot run
            (DoRA, modules_to_save, alpha_pattern, a rank above the limit).
    """
    name = directory.name
    for item in (WEIGHTS, CONFIG):
        if not (directory / item).is_file():
            raise ModelError(
                f"{directory / item} is missing from the adapter store; "
                "re-register the adapter (loraforge adapters add)"
            )
    data = _read_regular(directory / WEIGHTS, max_bytes)
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected_sha256:
        raise ModelError(
            f"{directory / WEIGHTS} has sha256 {digest[:12]}… but was registered as {expected_sha256[:12]}…; "
            "re-register it"
        )
    config_bytes = _read_regular(directory / CONFIG, max_bytes)
    if not config_sha256:
        try:
            config_sha256 = json.loads((directory / "manifest.json").read_text())["checksums"][CONFIG]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ModelError(
                f"{name} was registered without a checksum of {CONFIG}; re-register it (loraforge adapters add)"
            ) from e
    if hashlib.sha256(config_bytes).hexdigest() != config_sha256:
        raise ModelError(f"{directory / CONFIG} was changed after the adapter was registered; re-register it")
    try:
        config = json.loads(config_bytes)
    except ValueError as e:
        raise ModelError(f"{directory / CONFIG} is not valid JSON ({e})") from e
    check_adapter_config(config, name, max_rank=max_rank)
    return AdapterFiles(name, float(config.get("lora_alpha", 8)), bool(config.get("use_rslora")), data)


def load_lora(directory: Path, expected_sha256: str, runner: Any) -> LoraLayers:
    """Read an adapter's weights into the runner's fused layout (scale folded into ``b``).

    Raises:
        ModelError: checksum mismatch, a LoRA variant the engine cannot run (DoRA, embeddings,
            modules_to_save), or shapes that do not fit the served base model.
    """
    return build_lora(read_adapter(directory, expected_sha256), runner)


def build_lora(files: AdapterFiles, runner: Any) -> LoraLayers:
    """The tensor half of ``load_lora``: weights → the runner's fused layout."""
    from safetensors.torch import load

    name, alpha, rslora = files.name, files.alpha, files.rslora
    tensors = load(files.weights)
    parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = _KEY_RE.search(key)
        if m is None or m.group(2) not in GROUP_OF:
            raise ModelError(f"{name}: tensor {key!r} is not a LoRA weight of an attention or MLP projection")
        parts.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = tensor
    sizes = {
        "qkv": [runner.heads * runner.head_dim, runner.kv_heads * runner.head_dim, runner.kv_heads * runner.head_dim],
        "o": [runner.hidden],
        "gu": [runner.intermediate] * 2,
        "down": [runner.hidden],
    }
    inputs = {"qkv": runner.hidden, "o": runner.heads * runner.head_dim, "gu": runner.hidden}
    inputs["down"] = sizes["gu"][0]
    # The native kernel holds adapter weights in fp16: round them once here, so that prefill (fp32
    # products) and decoding (the kernel) use the same values.
    half_precision = getattr(runner, "kernel", None) is not None
    layers: LoraLayers = [{} for _ in runner.layers]
    for layer in range(len(runner.layers)):
        for group in GROUPS:
            names = [n for n, (g, _) in GROUP_OF.items() if g == group]
            present = [(n, parts.get((layer, n))) for n in names]
            if all(p is None for _, p in present):
                continue
            a_cols: list[torch.Tensor] = []
            b_blocks: list[tuple[torch.Tensor | None, int]] = []
            for (name, ab), size in zip(present, sizes[group], strict=True):
                if ab is None:
                    b_blocks.append((None, size))
                    continue
                if "A" not in ab or "B" not in ab:
                    raise ModelError(f"{name}: layer {layer} {name} lacks lora_A or lora_B")
                a, b = ab["A"], ab["B"]  # (r, in), (out, r)
                r = a.shape[0]
                if a.shape[1] != inputs[group] or b.shape != (size, r):
                    raise ModelError(
                        f"{name}: layer {layer} {name} has shapes A{tuple(a.shape)} B{tuple(b.shape)}, "
                        f"which do not fit the served base model; was it trained on another base?"
                    )
                scale = alpha / (r**0.5 if rslora else r)
                a_cols.append(a.t())
                b_blocks.append((b.t() * scale, size))
            a_all = torch.cat(a_cols, dim=1).to(runner.dtype).contiguous()  # (in, R)
            if half_precision:  # the values the native kernel multiplies with, for prefill too
                a_all = a_all.half().to(runner.dtype)
            b_all = torch.zeros(a_all.shape[1], sum(sizes[group]), dtype=runner.dtype)
            row = col = 0
            spans = []
            for block, size in b_blocks:
                if block is not None:
                    b_all[row : row + block.shape[0], col : col + size] = block
                    spans.append((row, row + block.shape[0], col, col + size))
                    row += block.shape[0]
                col += size
            if half_precision:
                b_all = b_all.half().to(runner.dtype)
            layers[layer][group] = LoraGroup(a_all, b_all, tuple(spans))
    if len(runner.layers) <= max((layer for layer, _ in parts), default=-1):
        raise ModelError(f"{name} has weights for more layers than the served base model")
    return layers


@dataclass
class LoadedAdapter:
    registration: Registration
    lora: LoraLayers


class AdapterCache:
    """At most ``capacity`` adapters in memory; the least recently used one is dropped first.

    Each loaded adapter is charged to the tenant whose request loaded it. A tenant that already
    holds ``per_tenant`` of the places makes room among its own adapters only, so that a tenant
    cycling through many adapters cannot push out the ones other tenants are using.

    A dropped adapter stays alive for the rows that still run on it (they hold a reference).
    ``run`` executes the loading (the adapter's tensor work); the server passes the engine's
    ``call`` so that it happens on the engine's thread.
    """

    def __init__(
        self,
        store: AdapterStore,
        runner: Any,
        *,
        base_sha256: str,
        capacity: int,
        per_tenant: int | None = None,
        max_rank: int = MAX_LORA_RANK,
        run: Callable[[Callable[[], LoraLayers]], LoraLayers] | None = None,
    ) -> None:
        self.max_rank = max_rank
        self.store = store
        self.runner = runner
        self.run = run or (lambda fn: fn())
        self.base_sha256 = base_sha256
        self.capacity = capacity
        self.per_tenant = per_tenant or max(1, capacity // 2)
        self._loaded: OrderedDict[str, LoadedAdapter] = OrderedDict()
        self._charged: dict[str, str | None] = {}  # name → the tenant that loaded it
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}

    def is_loaded(self, reg: Registration) -> bool:
        with self._lock:
            hit = self._loaded.get(reg.name)
            return hit is not None and hit.registration == reg

    def get(self, reg: Registration, tenant: str | None = None) -> LoadedAdapter:
        """The adapter ready to run, loading it if needed (thread-safe; one load per name).

        Args:
            tenant: whose request needs it (charged with the place it takes if it is loaded now).
        """
        with self._lock:
            hit = self._loaded.get(reg.name)
            if hit is not None and hit.registration == reg:
                self._loaded.move_to_end(reg.name)
                return hit
            name_lock = self._loading.setdefault(reg.name, threading.Lock())
        with name_lock:
            with self._lock:
                hit = self._loaded.get(reg.name)
                if hit is not None and hit.registration == reg:
                    return hit
            if reg.base_sha256 != self.base_sha256:
                raise ModelError(
                    f"adapter {reg.name!r} was trained on base weights {reg.base_sha256[:12]}…, "
                    f"but this server runs {self.base_sha256[:12]}…"
                )
            # Reading and hashing here; only the tensor work goes through ``run``.
            files = read_adapter(
                self.store.path(reg.name), reg.weights_sha256, reg.config_sha256, max_rank=self.max_rank
            )
            loaded = LoadedAdapter(reg, self.run(lambda: build_lora(files, self.runner)))
            with self._lock:
                self._loaded.pop(reg.name, None)
                own = [n for n in self._loaded if self._charged.get(n) == tenant]  # least recently used first
                while True:
                    over_quota = tenant is not None and len(own) >= self.per_tenant
                    if not over_quota and len(self._loaded) < self.capacity:
                        break
                    victim = own[0] if over_quota else next(iter(self._loaded))
                    if victim in own:
                        own.remove(victim)
                    self._loaded.pop(victim)
                    self._charged.pop(victim, None)
                self._loaded[reg.name] = loaded
                self._charged[reg.name] = tenant
            return loaded

    def unload(self, name: str) -> bool:
        with self._lock:
            self._charged.pop(name, None)
            return self._loaded.pop(name, None) is not None

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._loaded)
