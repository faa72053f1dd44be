"""LoRA batching: applying many adapters to one batch of rows, each row with its own (or none).

Rows that share an adapter are contiguous *segments*. Per fused projection, a step adds each
segment's delta ``x ↦ out + (x·Aᵀ)·(s·Bᵀ)`` in one of three ways:

- ``PerSegmentLora``: two small GEMMs per segment (one adapter in the step, PyTorch);
- ``StackedLora``: every adapter at once with batched products over stacked weights (PyTorch);
- ``FusedLora``: one call of the native kernel (``kernels/lora_cpu.cpp``) for all segments.

``LoraPlanner`` picks one per step and keeps the stacks it reuses.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from loraforge.errors import ModelError
from loraforge.serve.kernels import load_kernels, native_supported

# LoRA target names → (fused group, index of the part inside the group).
GROUP_OF = {
    "q_proj": ("qkv", 0),
    "k_proj": ("qkv", 1),
    "v_proj": ("qkv", 2),
    "o_proj": ("o", 0),
    "gate_proj": ("gu", 0),
    "up_proj": ("gu", 1),
    "down_proj": ("down", 0),
}
GROUPS = ("qkv", "o", "gu", "down")
STACK_CACHE = 2  # combinations of adapters whose stacked weights are kept (PyTorch path)
KERNEL_ARENA = 8  # adapters kept stacked for the native kernel (more if one step runs more)


@dataclass
class LoraGroup:
    """One adapter's delta on one fused projection: ``out += (x @ a) @ b``.

    ``a`` is (in, R) — the A matrices of the group's parts side by side — and ``b`` is (R, out),
    block-diagonal over the parts, with the LoRA scale folded in. ``parts`` says where each part's
    block is: (first row, end row, first column, end column) of ``b``.
    """

    a: torch.Tensor
    b: torch.Tensor
    parts: tuple[tuple[int, int, int, int], ...]


# One adapter, ready to run: per layer, the groups it touches.
LoraLayers = list[dict[str, LoraGroup]]


@dataclass
class Segment:
    """Rows ``start:end`` of a batch that share one adapter (``None`` = the base model)."""

    start: int
    end: int
    lora: LoraLayers | None


class PerSegmentLora:
    """``out[s] += (x[s] @ A) @ B`` for each segment's adapter: two small GEMMs per segment."""

    def __init__(self, segments: Sequence[Segment]) -> None:
        self.segments = [s for s in segments if s.lora is not None]

    def __call__(self, out: torch.Tensor, x: torch.Tensor, layer: int, group: str) -> None:
        for seg in self.segments:
            assert seg.lora is not None
            g = seg.lora[layer].get(group)
            if g is not None:
                out[seg.start : seg.end].addmm_(x[seg.start : seg.end] @ g.a, g.b)


@dataclass
class StackedGroup:
    """One projection's adapters stacked: ``a`` (S, in, R) and, per part, a B stack.

    A part (q, k or v; gate or up) holds ranks ``rows`` of ``a``'s last dimension and writes output
    columns ``cols``: ``b`` is (S, rank, columns). Keeping parts apart, instead of one
    block-diagonal B, halves the bytes read per step for q|k|v and gate|up.
    """

    a: torch.Tensor
    parts: list[tuple[tuple[int, int], tuple[int, int], torch.Tensor]]  # (rows, cols, b)
    whole: bool  # the parts' columns tile the output in order: deltas concatenated, one add


# One layer's stacked adapters, per group.
Stack = dict[str, StackedGroup]


class StackedLora:
    """All adapters of a step at once: ``(S, m, in) @ (S, in, R)``, then ``@ (S, r, out)`` per part.

    The S segments' rows are viewed as an (S, m) grid when the segments are contiguous and equally
    long; otherwise they are gathered into a padded grid (padding rows masked to zero) and the
    results added back with ``index_add_``. Ranks are padded to the largest one with zeros.
    """

    def __init__(self, segments: list[Segment], stacks: list[Stack]) -> None:
        self.stacks = stacks
        lengths = [s.end - s.start for s in segments]
        self.rows = len(segments)
        self.width = max(lengths)
        contiguous = all(a.end == b.start for a, b in itertools.pairwise(segments))
        self.start, self.end = segments[0].start, segments[-1].end
        self.view = contiguous and len(set(lengths)) == 1
        if not self.view:
            index: list[int] = []
            mask: list[float] = []
            for s in segments:
                rows = list(range(s.start, s.end))
                index += rows + [s.start] * (self.width - len(rows))
                mask += [1.0] * len(rows) + [0.0] * (self.width - len(rows))
            self.index = torch.tensor(index)
            self.mask = torch.tensor(mask).view(self.rows, self.width, 1)

    def __call__(self, out: torch.Tensor, x: torch.Tensor, layer: int, group: str) -> None:
        g = self.stacks[layer].get(group)
        if g is None:
            return
        if self.view:
            xs = x[self.start : self.end].view(self.rows, self.width, -1)
            h = torch.bmm(xs, g.a)
            o = out[self.start : self.end].view(self.rows, self.width, -1)
            if len(g.parts) == 1 and g.whole:
                o.baddbmm_(h, g.parts[0][2])
            elif g.whole:
                o.add_(torch.cat([torch.bmm(h[:, :, r0:r1], b) for (r0, r1), _, b in g.parts], dim=-1))
            else:
                for (r0, r1), (c0, c1), b in g.parts:
                    o[:, :, c0:c1].baddbmm_(h[:, :, r0:r1], b)
            return
        xs = x.index_select(0, self.index).view(self.rows, self.width, -1)
        h = torch.bmm(xs, g.a).mul_(self.mask.to(x.dtype))
        delta = torch.zeros(self.rows, self.width, out.shape[1], dtype=out.dtype)
        for (r0, r1), (c0, c1), b in g.parts:
            delta[:, :, c0:c1] = torch.bmm(h[:, :, r0:r1], b)
        out.index_add_(0, self.index, delta.view(self.rows * self.width, -1))


@dataclass
class FusedGroup:
    """One projection's adapters for the native kernel: ``a`` (S, R, in) fp16; ``b`` every part's
    (S, ranks, width) fp16 block, flattened; ``parts`` (P, 5): first rank, ranks, first column,
    width and offset in ``b`` of each part."""

    a: torch.Tensor
    b: torch.Tensor
    parts: torch.Tensor


def fuse_layer(stack: Stack) -> dict[str, FusedGroup]:
    """A layer's stacks (fp32, from ``stack_layer``) in the native kernel's layout."""
    out = {}
    for group, g in stack.items():
        blocks, rows, offset = [], [], 0
        for (r0, r1), (c0, c1), b in g.parts:
            blocks.append(b.half().reshape(-1))
            rows.append([r0, r1 - r0, c0, c1 - c0, offset])
            offset += blocks[-1].numel()
        a = g.a.transpose(1, 2).half().contiguous()
        out[group] = FusedGroup(a, torch.cat(blocks), torch.tensor(rows, dtype=torch.long))
    return out


class FusedLora:
    """All adapters of a step through the native kernel: one call per projection, any segments."""

    def __init__(
        self, kernel: Any, segments: list[Segment], stacks: list[dict[str, FusedGroup]], index: list[int]
    ) -> None:
        self.kernel = kernel
        self.stacks = stacks  # per layer; adapter ``index[i]`` of the stack is segment i's
        self.segments = torch.tensor(
            [[s.start, s.end, i] for s, i in zip(segments, index, strict=True)], dtype=torch.long
        )

    def __call__(self, out: torch.Tensor, x: torch.Tensor, layer: int, group: str) -> None:
        g = self.stacks[layer].get(group)
        if g is not None:
            self.kernel.lora_delta(out, x.contiguous(), g.a, g.b, g.parts, self.segments)


LORA_KERNELS = ("auto", "native", "torch")


def resolve_lora_kernel(choice: str, dtype: torch.dtype) -> Any | None:
    """The compiled kernel module for ``choice``, or ``None`` for PyTorch operations.

    Raises:
        ModelError: ``choice`` is unknown, or ``native`` where the kernel cannot work.
    """
    if choice not in LORA_KERNELS:
        raise ModelError(f"lora kernel must be one of {', '.join(LORA_KERNELS)}, got {choice!r}")
    if choice == "torch" or (choice == "auto" and (dtype != torch.float32 or not native_supported())):
        return None
    kernel = load_kernels() if dtype == torch.float32 else None
    if kernel is None and choice == "native":
        raise ModelError(
            f"the native LoRA kernel needs float32 model weights (this runner has {dtype}) and an x86 CPU with"
            f" AVX2 (this one: {torch.backends.cpu.get_cpu_capability()}), g++ and ninja to build it"
            " (see the server log for the build error); use lora_kernel: torch"
        )
    return kernel


def stack_layer(layer: int, loras: list[LoraLayers]) -> Stack:
    """One layer's stacks for ``loras``; a part an adapter lacks is zeros for it."""
    out = {}
    for group in GROUPS:
        groups = [lora[layer].get(group) for lora in loras]
        present = [g for g in groups if g is not None]
        if not present:
            continue
        columns = sorted({(c0, c1) for g in present for _, _, c0, c1 in g.parts})
        ranks = [max(r1 - r0 for g in present for r0, r1, c0, c1 in g.parts if (c0, c1) == col) for col in columns]
        offsets = [sum(ranks[:i]) for i in range(len(ranks))]
        fan_in = present[0].a.shape[0]
        a = present[0].a.new_zeros(len(loras), fan_in, sum(ranks))
        bs = [present[0].b.new_zeros(len(loras), rank, c1 - c0) for rank, (c0, c1) in zip(ranks, columns, strict=True)]
        for i, g in enumerate(groups):
            if g is None:
                continue
            for r0, r1, c0, c1 in g.parts:
                p = columns.index((c0, c1))
                a[i, :, offsets[p] : offsets[p] + r1 - r0] = g.a[:, r0:r1]
                bs[p][i, : r1 - r0] = g.b[r0:r1, c0:c1]
        edges = [c for span in columns for c in span]  # the parts tile 0..out in order
        whole = edges[0] == 0 and edges[-1] == present[0].b.shape[1] and edges[1:-1:2] == edges[2:-1:2]
        parts = [((o, o + r), col, b) for o, r, col, b in zip(offsets, ranks, columns, bs, strict=True)]
        out[group] = StackedGroup(a, parts, whole)
    return out


# How a step's adapters are applied: one of the three strategies below, called per projection.
LoraPlan = PerSegmentLora | StackedLora | FusedLora


class LoraPlanner:
    """Chooses each step's strategy and keeps what it reuses across steps.

    - The PyTorch path keeps the stacked weights of the last ``STACK_CACHE`` combinations of
      adapters (holding the adapters alive, so their ids stay unique while cached).
    - The native kernel reads any segments' adapters out of one stack (the *arena*), so the adapters
      of recent steps stay stacked together and a new combination of them costs nothing; the arena
      is rebuilt only when an adapter joins or leaves it.
    """

    def __init__(self, kernel: Any | None, n_layers: int) -> None:
        self.kernel = kernel
        self.n_layers = n_layers
        self._stack_cache: OrderedDict[tuple[int, ...], tuple[list[LoraLayers], list[Stack]]] = OrderedDict()
        self.arena: list[LoraLayers] = []
        self._used: dict[int, int] = {}  # id → the step that last used it
        self.arena_stacks: list[dict[str, FusedGroup]] = []
        self._steps = 0

    def plan(self, segments: Sequence[Segment]) -> LoraPlan:
        """How to apply the adapters of a step: the native kernel where there is one; else per
        segment for one adapter, stacked for several."""
        with_lora = [s for s in segments if s.lora is not None]
        if not with_lora or (self.kernel is None and len(with_lora) < 2):
            return PerSegmentLora(with_lora)
        if self.kernel is not None:
            return FusedLora(self.kernel, with_lora, self._stacks_for(with_lora), self._index(with_lora))
        key = tuple(id(s.lora) for s in with_lora)
        entry = self._stack_cache.get(key)
        if entry is None:
            loras = [s.lora for s in with_lora if s.lora is not None]
            entry = (loras, [stack_layer(layer, loras) for layer in range(self.n_layers)])
            self._stack_cache[key] = entry
            while len(self._stack_cache) > STACK_CACHE:
                self._stack_cache.popitem(last=False)
        self._stack_cache.move_to_end(key)
        return StackedLora(with_lora, entry[1])

    def _stacks_for(self, with_lora: list[Segment]) -> list[dict[str, FusedGroup]]:
        """The kernel's stack holding every adapter of this step (rebuilt when its members change)."""
        self._steps += 1
        needed = {id(s.lora): s.lora for s in with_lora if s.lora is not None}
        for key in needed:
            self._used[key] = self._steps
        members = {id(a) for a in self.arena}
        missing = [lora for key, lora in needed.items() if key not in members]
        if not missing and self.arena_stacks:
            return self.arena_stacks
        arena = self.arena + missing
        while len(arena) > max(KERNEL_ARENA, len(needed)):  # drop the least recently used that is not needed
            oldest = min((a for a in arena if id(a) not in needed), key=lambda a: self._used.get(id(a), 0))
            arena.remove(oldest)
            self._used.pop(id(oldest), None)
        self.arena = arena
        self.arena_stacks = [fuse_layer(stack_layer(layer, arena)) for layer in range(self.n_layers)]
        return self.arena_stacks

    def _index(self, with_lora: list[Segment]) -> list[int]:
        position = {id(a): i for i, a in enumerate(self.arena)}
        return [position[id(s.lora)] for s in with_lora]
