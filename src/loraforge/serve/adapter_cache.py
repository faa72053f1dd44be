"""Adapters ready to run: weights read (checksum first, safetensors only) into LoRA layers, and their LRU.

The cache keeps the most recently used adapters in memory, each tenant within its quota of places,
and loads a missing one on the engine's thread (``LocalEngine.call``).
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loraforge.errors import ModelError
from loraforge.serve.adapter_checks import (
    CONFIG,
    KEY_RE,
    MAX_ADAPTER_BYTES,
    MAX_LORA_RANK,
    WEIGHTS,
    check_adapter_config,
    read_regular,
)
from loraforge.serve.adapters import AdapterStore, Registration
from loraforge.serve.lora_batching import GROUP_OF, GROUPS, LoraGroup, LoraLayers


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
    data = read_regular(directory / WEIGHTS, max_bytes)
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected_sha256:
        raise ModelError(
            f"{directory / WEIGHTS} has sha256 {digest[:12]}… but was registered as {expected_sha256[:12]}…; "
            "re-register it"
        )
    config_bytes = read_regular(directory / CONFIG, max_bytes)
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
        m = KEY_RE.search(key)
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
