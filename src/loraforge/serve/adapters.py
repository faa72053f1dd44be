"""The adapter store (``HOME/adapters/NAME``) and the in-memory LRU of adapters ready to run.

A registered adapter is a copy of a trained adapter directory plus ``registration.json``: its
owner (a tenant, or public), the base model it needs and the sha256 of its weights, taken from
the adapter's own manifest. Weights are read with safetensors only, after their checksum has
been verified; an adapter for other base weights than the served ones is refused.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from loraforge._atomic import atomic_directory, write_text_atomic
from loraforge.errors import ConfigError, ModelError
from loraforge.models.generate import read_adapter_manifest
from loraforge.models.sources import sha256_file
from loraforge.serve.runner import GROUP_OF, GROUPS, LoraGroup, LoraLayers

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
WEIGHTS = "adapter_model.safetensors"
_KEY_RE = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


@dataclass(frozen=True)
class Registration:
    name: str
    tenant: str | None  # None = public
    base_model: str
    base_sha256: str
    weights_sha256: str
    added_at: float
    source: str

    @property
    def public(self) -> bool:
        return self.tenant is None

    def visible_to(self, tenant: str) -> bool:
        return self.tenant is None or self.tenant == tenant


class AdapterStore:
    """Registered adapters under ``HOME/adapters``: one directory each, written atomically."""

    def __init__(self, home: Path) -> None:
        self.root = home / "adapters"

    def add(self, source: Path, name: str, *, tenant: str | None, replace: bool = False) -> Registration:
        """Copy a trained adapter directory into the store under ``name``.

        Raises:
            ConfigError: a bad name, or the name is taken and ``replace`` is false.
            ModelError: the directory is not a complete adapter, or its weights do not match
                the checksum in its manifest.
        """
        if not NAME_RE.match(name):
            raise ConfigError(
                f"adapter name {name!r} is not allowed: use 1-64 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        if tenant is not None and not NAME_RE.match(tenant):
            raise ConfigError(f"tenant name {tenant!r} is not allowed: use 1-64 letters, digits, '.', '_' or '-'")
        if (self.root / name).exists() and not replace:
            raise ConfigError(f"an adapter named {name!r} is already registered; pick another name or pass --replace")
        manifest = read_adapter_manifest(source)
        for pickled in sorted(source.glob("*.bin")) + sorted(source.glob("*.pt")) + sorted(source.glob("*.pkl")):
            raise ModelError(f"{pickled} is a pickle file; loraforge only loads safetensors. Remove it and retry")
        digest = sha256_file(source / WEIGHTS)
        expected = manifest.get("checksums", {}).get(WEIGHTS)
        if expected is not None and expected != digest:
            raise ModelError(
                f"{source / WEIGHTS} has sha256 {digest[:12]}…, but its manifest records {expected[:12]}…; "
                "the weights were changed after training"
            )
        reg = Registration(
            name=name,
            tenant=tenant,
            base_model=str(manifest["base_model"]["name"]),
            base_sha256=str(manifest["base_model"].get("sha256", "")),
            weights_sha256=digest,
            added_at=time.time(),
            source=str(source.resolve()),
        )
        self.root.mkdir(parents=True, exist_ok=True)
        with atomic_directory(self.root / name, replace=replace) as tmp:
            for item in ("adapter_config.json", WEIGHTS, "manifest.json"):
                shutil.copy2(source / item, tmp / item)
            for extra in ("loss.png", "metrics.jsonl"):  # evidence a reviewer of the store may want
                if (source / extra).is_file():
                    shutil.copy2(source / extra, tmp / extra)
            if (source / "eval").is_dir():
                shutil.copytree(source / "eval", tmp / "eval")
            write_text_atomic(tmp / "registration.json", json.dumps(asdict(reg), indent=2))
        return reg

    def get(self, name: str) -> Registration | None:
        if not NAME_RE.match(name):
            return None
        path = self.root / name / "registration.json"
        if not path.is_file():
            return None
        return Registration(**json.loads(path.read_text()))

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


@dataclass
class AdapterFiles:
    """An adapter's checked configuration and the bytes of its weights, read without tensor work."""

    name: str
    alpha: float
    rslora: bool
    weights: bytes


def read_adapter(directory: Path, expected_sha256: str) -> AdapterFiles:
    """Read an adapter's weights once, check their sha256 and the LoRA variant.

    Raises:
        ModelError: a missing file, a checksum mismatch, or a LoRA variant the engine cannot run
            (DoRA, modules_to_save, alpha_pattern).
    """
    name = directory.name
    weights = directory / WEIGHTS
    for path in (weights, directory / "adapter_config.json"):
        if not path.is_file():
            raise ModelError(
                f"{path} is missing from the adapter store; re-register the adapter (loraforge adapters add)"
            )
    data = weights.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected_sha256:
        raise ModelError(
            f"{weights} has sha256 {digest[:12]}… but was registered as {expected_sha256[:12]}…; re-register it"
        )
    config = json.loads((directory / "adapter_config.json").read_text())
    if config.get("use_dora"):
        raise ModelError(f"{name} is a DoRA adapter; the serving engine runs plain LoRA and rsLoRA only")
    if config.get("modules_to_save"):
        raise ModelError(f"{name} trains whole modules ({config['modules_to_save']}); the engine cannot serve it")
    if config.get("alpha_pattern"):
        raise ModelError(f"{name} uses alpha_pattern, which the serving engine does not support")
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
        run: Callable[[Callable[[], LoraLayers]], LoraLayers] | None = None,
    ) -> None:
        self.store = store
        self.runner = runner
        self.run = run or (lambda fn: fn())
        self.base_sha256 = base_sha256
        self.capacity = capacity
        self._loaded: OrderedDict[str, LoadedAdapter] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}

    def get(self, reg: Registration) -> LoadedAdapter:
        """The adapter ready to run, loading it if needed (thread-safe; one load per name)."""
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
            files = read_adapter(self.store.path(reg.name), reg.weights_sha256)
            loaded = LoadedAdapter(reg, self.run(lambda: build_lora(files, self.runner)))
            with self._lock:
                self._loaded[reg.name] = loaded
                self._loaded.move_to_end(reg.name)
                while len(self._loaded) > self.capacity:
                    self._loaded.popitem(last=False)
            return loaded

    def unload(self, name: str) -> bool:
        with self._lock:
            return self._loaded.pop(name, None) is not None

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._loaded)
