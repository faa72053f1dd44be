"""Forward passes of a Llama-family decoder for serving: one KV pool, many adapters per batch.

The Hugging Face model is only read for its weights. They are regrouped into fused matrices
(``q|k|v`` and ``gate|up`` become one GEMM each) and the model object is dropped, so the base
weights are in memory once. Each running request owns one *slot* of the KV pool::

    kv: (layers, 2, slots, kv_heads, capacity, head_dim)   # 2 = keys, values

The scheduler keeps the running rows in slots ``0..n-1``, grouped so that rows using the same
adapter are contiguous ("segments"). A decode step then costs one GEMM per fused projection for
the whole batch, plus, per segment with an adapter, ``x ↦ out + (x·Aᵀ)·(s·Bᵀ)`` on a contiguous
slice — the LoRA delta of that adapter only, with no gather of weights per row.

How the base projections and the output head are held is the *weight format*:

- ``gguf``: each projection and the head in the GGUF block format that holds its values exactly
  (Q4_1, else Q8_0; see ``blocks.py``), multiplied with float32 activations by
  ``kernels/blocks_cpu.cpp``. A model loaded from a GGUF file is these values, so this serves the
  very weights the adapters were trained on from 5–8.5 bits per weight: the default model's
  weights take 96 MB instead of 540, and batch-1 decoding is ~1.7× faster than ``fp16``.
- ``fp16``: half-precision weights in fbgemm's packed layout, multiplied with float32 activations
  (``quantized::linear_dynamic_fp16``; the activations are never rounded). Decoding streams half
  the bytes per token: 1.6× faster at batch 1 than ``onednn`` on two AVX2 cores, and no slower at
  prompt sizes. Next-token choices agree with float32 weights on 99.8% of positions.
- ``onednn``: float32 weights in oneDNN's blocked layout, chosen for the batch size: 1.5× faster
  than ``row-major`` for the small-M GEMMs of decoding, the same numbers as PEFT within 1e-4.
- ``row-major``: the model's own tensors (any dtype; the only format for bf16 weights).

``auto`` takes ``gguf`` where the native kernels build and every weight is block-exact, else the
first of the others that works here for a float32 model (each is checked against ``F.linear``
once per process) and ``row-major`` otherwise.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from loraforge.errors import ModelError
from loraforge.serve.blocks import Blocks, dequantize, exact_blocks
from loraforge.serve.kernels import load_kernels, native_supported

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")
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
WEIGHT_FORMATS = ("auto", "gguf", "fp16", "onednn", "row-major")
PACKED_FORMATS = ("fp16", "onednn", "row-major")  # the formats that any float32 weight can take
MKLDNN = getattr(torch, "_mkldnn", None)  # the layout of oneDNN-packed tensors
_FORMAT_WORKS: dict[str, bool] = {}

# A projection's weight as the runner holds it: a tensor (row-major or oneDNN-packed), fbgemm's
# packed fp16 matrix (a TorchScript object, without tensor methods), or ``Blocks``.
Weight = Any


def _pack(weight: torch.Tensor, fmt: str, max_slots: int) -> Weight:
    """``weight`` (out, in) in the layout of ``fmt``; the result replaces it."""
    if fmt == "fp16":
        return torch.ops.quantized.linear_prepack_fp16(weight, None)
    if fmt == "onednn":
        return torch.ops.mkldnn._reorder_linear_weight(weight, max_slots)
    return weight


def format_available(fmt: str, dtype: torch.dtype) -> bool:
    """Whether weights of ``dtype`` can be held as ``fmt`` here (checked once against ``F.linear``)."""
    if fmt == "row-major":
        return True
    if dtype != torch.float32:
        return False
    if fmt == "onednn" and not torch.backends.mkldnn.is_available():  # type: ignore[no-untyped-call]
        return False
    if fmt == "fp16" and "fbgemm" not in torch.backends.quantized.supported_engines:
        return False
    if fmt not in _FORMAT_WORKS:
        try:
            generator = torch.Generator().manual_seed(0)
            w = torch.randn(64, 32, generator=generator)
            x = torch.randn(3, 32, generator=generator)
            bias = torch.randn(64, generator=generator)
            exact = w.half().float() if fmt == "fp16" else w  # what the format stores
            got = linear(x, _pack(w, fmt, 4), bias)
            _FORMAT_WORKS[fmt] = bool(torch.allclose(got, F.linear(x, exact, bias), atol=1e-5, rtol=1e-5))
        except (RuntimeError, AttributeError):  # an operator missing from this build of torch
            _FORMAT_WORKS[fmt] = False
    return _FORMAT_WORKS[fmt]


def resolve_weight_format(fmt: str, dtype: torch.dtype) -> str:
    """The format to use for ``fmt`` (``auto`` resolved to one of ``PACKED_FORMATS``) with weights
    of ``dtype``; ``gguf`` is checked against the weights themselves by ``LlamaRunner``.

    Raises:
        ModelError: ``fmt`` is unknown, or cannot work for ``dtype`` on this machine.
    """
    if fmt == "auto":
        return next(f for f in PACKED_FORMATS if format_available(f, dtype))
    if fmt not in WEIGHT_FORMATS:
        raise ModelError(f"weight format must be one of {', '.join(WEIGHT_FORMATS)}, got {fmt!r}")
    if fmt == "gguf":
        return fmt
    if not format_available(fmt, dtype):
        needs = {"fp16": "fbgemm (x86 with AVX2)", "onednn": "oneDNN"}[fmt]
        raise ModelError(
            f"the {fmt} weight format needs float32 model weights and {needs}; this runner has {dtype} weights"
            f" and this PyTorch has {', '.join(torch.backends.quantized.supported_engines)}"
            f" (oneDNN {'available' if torch.backends.mkldnn.is_available() else 'missing'}), or the format"  # type: ignore[no-untyped-call]
            " failed its check against F.linear; use precision: fp32, or weight_format: row-major"
        )
    return fmt


def linear(x: torch.Tensor, weight: Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` for a weight in any of the runner's formats."""
    if isinstance(weight, Blocks):
        held = _blocks_linear(x.contiguous(), weight)
        return held if bias is None else held.add_(bias)
    if not isinstance(weight, torch.Tensor):  # fbgemm's packed fp16 matrix (packed without bias)
        out: torch.Tensor = torch.ops.quantized.linear_dynamic_fp16(x, weight)
        return out if bias is None else out.add_(bias)
    if weight.layout == MKLDNN:
        out = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
        return out
    return F.linear(x, weight, bias)


# From this many rows of x on (long prompts), dequantizing the weight for PyTorch's GEMM is faster
# than the block kernel (measured on two AVX2 cores: equal at ~100 rows, 1.5× faster at 600).
DEQUANTIZE_FROM = 128
_SCRATCH_FLOATS = 1 << 21  # 8 MB per thread for dequantized weight rows
_scratch = threading.local()


def _blocks_linear(x: torch.Tensor, weight: Blocks) -> torch.Tensor:
    kernel: Any = load_kernels()  # loaded: blocks are only made where it is
    if x.shape[0] < DEQUANTIZE_FROM:
        if weight.kind == "q4_1":
            out: torch.Tensor = kernel.q4_1_linear(x, weight.qs, weight.scales, weight.mins)
            return out
        out = kernel.q8_0_linear(x, weight.qs, weight.scales)
        return out
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None:
        buffer = _scratch.buffer = torch.empty(_SCRATCH_FLOATS)
    n, k = weight.shape
    step = max(1, _SCRATCH_FLOATS // k)
    if step * k > buffer.numel():  # a row longer than the buffer
        buffer = _scratch.buffer = torch.empty(step * k)
    none = torch.empty(0, dtype=torch.float16)
    out = torch.empty(x.shape[0], n, dtype=x.dtype)
    for n0 in range(0, n, step):
        n1 = min(n, n0 + step)
        rows = buffer[: (n1 - n0) * k].view(n1 - n0, k)
        mins = weight.mins[n0:n1] if weight.mins is not None else none
        kernel.dequantize_blocks(weight.qs[n0:n1], weight.scales[n0:n1], mins, rows)
        if n1 - n0 == n:
            torch.mm(x, rows.t(), out=out)
        else:
            out[:, n0:n1] = x @ rows.t()
    return out


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


@dataclass
class _Layer:
    ln1: torch.Tensor
    ln2: torch.Tensor
    qkv: Weight  # (q + 2·kv, hidden)
    qkv_bias: torch.Tensor | None
    o: Weight  # (hidden, q)
    gu: Weight  # (2·intermediate, hidden)
    down: Weight  # (hidden, intermediate)


class LlamaRunner:
    """The decoder's forward pass over a slot KV pool.

    Args:
        model: a loaded ``*ForCausalLM`` of a supported architecture; its weights are taken over.
        max_slots: rows that can run at once (the max batch size).
        weight_format: one of ``WEIGHT_FORMATS`` (see the module's docstring).
        lora_kernel: how decode steps apply adapters: ``native`` (one compiled call per projection
            for all adapters, fp16 adapter weights; see ``kernels/lora_cpu.cpp``), ``torch``
            (batched PyTorch products, fp32), or ``auto`` (native where it builds, for fp32 models).

    Raises:
        ModelError: an unsupported architecture, or a weight format or LoRA kernel that cannot work here.
    """

    def __init__(self, model: Any, max_slots: int, *, weight_format: str = "auto", lora_kernel: str = "auto") -> None:
        config = model.config
        if config.model_type not in SUPPORTED_ARCHITECTURES:
            raise ModelError(
                f"the serving engine runs {', '.join(SUPPORTED_ARCHITECTURES)} models; "
                f"this base model is {config.model_type!r}"
            )
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ModelError(f"the serving engine needs a SiLU MLP; the model uses {config.hidden_act!r}")
        self.hidden = int(config.hidden_size)
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(config.num_key_value_heads or self.heads)
        self.head_dim = int(getattr(config, "head_dim", None) or self.hidden // self.heads)
        self.eps = float(config.rms_norm_eps)
        self.context_length = int(config.max_position_embeddings)
        self.vocab_size = int(config.vocab_size)
        self.intermediate = int(config.intermediate_size)
        self.max_slots = max_slots
        self.dtype = next(model.parameters()).dtype
        fallback = resolve_weight_format(weight_format, self.dtype)  # refuses an unknown format first
        self.kernel = _resolve_lora_kernel(lora_kernel, self.dtype)
        # The native norms (kernels/norm_cpu.cpp) wherever the kernels build, for float32 models.
        self.native: Any = load_kernels() if self.dtype == torch.float32 else None
        inner = model.model
        with torch.no_grad():
            self.embed: torch.Tensor | Blocks = inner.embed_tokens.weight.detach()
            self.lm_head: Weight = model.lm_head.weight.detach()
            tied = self.lm_head.data_ptr() == self.embed.data_ptr()
            self.norm = inner.norm.weight.detach()
            self.layers: list[_Layer] = []
            for block in inner.layers:
                att, mlp = block.self_attn, block.mlp
                bias = None
                if att.q_proj.bias is not None:
                    bias = torch.cat([att.q_proj.bias, att.k_proj.bias, att.v_proj.bias]).detach()
                self.layers.append(
                    _Layer(
                        ln1=block.input_layernorm.weight.detach(),
                        ln2=block.post_attention_layernorm.weight.detach(),
                        qkv=torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight]).detach(),
                        qkv_bias=bias,
                        o=att.o_proj.weight.detach(),
                        gu=torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach(),
                        down=mlp.down_proj.weight.detach(),
                    )
                )
                # Free the unfused copies as we go: the base weights stay in memory once.
                for proj in (att.q_proj, att.k_proj, att.v_proj, mlp.gate_proj, mlp.up_proj):
                    proj.weight = None
            self.weight_format = self._hold_weights(weight_format, fallback, tied, max_slots)
            positions = torch.arange(self.context_length)[None]
            cos, sin = inner.rotary_emb(torch.zeros(1, self.hidden, dtype=self.dtype), positions)
        half = self.head_dim // 2
        self.cos = cos[0].to(self.dtype).contiguous()  # (context, head_dim)
        # rotate_half(x)·sin == roll(x, half)·[-sin₁, sin₂]: one op fewer per layer.
        self.sin = torch.cat([-sin[0, :, :half], sin[0, :, half:]], dim=-1).to(self.dtype).contiguous()
        self.capacity = 0
        self.max_capacity = self.context_length
        self.kv = torch.empty(0)
        # Stacked adapter weights per combination of adapters in a step (holding the adapters alive,
        # so their ids stay unique while cached).
        self._stack_cache: OrderedDict[tuple[int, ...], tuple[list[LoraLayers], list[_Stack]]] = OrderedDict()
        # The native kernel reads any segments' adapters out of one stack, so the adapters of recent
        # steps stay stacked together and a new combination of them costs nothing; the stack is
        # rebuilt only when an adapter joins or leaves it.
        self._arena: list[LoraLayers] = []
        self._arena_used: dict[int, int] = {}  # id → the step that last used it
        self._arena_stacks: list[dict[str, _FusedGroup]] = []
        self._steps = 0

    def _hold_weights(self, choice: str, fallback: str, tied: bool, max_slots: int) -> str:
        """Replace the row-major projections and head with the format for ``choice``; returns it.

        With ``gguf`` the head is held as blocks too where it is block-valued, else in ``fallback``
        (GGUF files often keep it in a format of their own). The head is tied to the embedding in
        many small models, so the embedding stays for the lookup: the head's blocks when tied,
        else in fp16 with fp16 weights (a looked-up row is widened back to the activations' dtype).
        """
        if choice in ("auto", "gguf"):
            found = self._exact_blocks()
            if not isinstance(found, str):
                layers, head = found
                for layer, blocks in zip(self.layers, layers, strict=True):
                    for name, weight in blocks.items():
                        setattr(layer, name, weight)
                self.lm_head = head if head is not None else _pack(self.lm_head, fallback, max_slots)
                if tied and head is not None:
                    self.embed = head
                elif not tied and isinstance(self.embed, torch.Tensor):
                    self.embed = exact_blocks(self.embed) or self.embed  # else float32: its exact values
                return "gguf"
            if choice == "gguf":
                raise ModelError(f"the gguf weight format cannot hold this model: {found}; use weight_format: auto")
        for layer in self.layers:
            for name in ("qkv", "o", "gu", "down"):
                setattr(layer, name, _pack(getattr(layer, name), fallback, max_slots))
        self.lm_head = _pack(self.lm_head, fallback, max_slots)
        if fallback == "fp16" and isinstance(self.embed, torch.Tensor):
            self.embed = self.embed.half()
        return fallback

    def _exact_blocks(self) -> tuple[list[dict[str, Blocks]], Blocks | None] | str:
        """Every projection (per layer) as exact blocks, and the head where it is block-valued;
        or why the projections cannot be."""
        if self.dtype != torch.float32:
            return f"it needs float32 weights; these are {self.dtype}"
        layers: list[dict[str, Blocks]] = []
        for i, layer in enumerate(self.layers):
            layers.append({})
            for name in ("qkv", "o", "gu", "down"):
                blocks = exact_blocks(getattr(layer, name))
                if blocks is None:
                    return f"layer {i}'s {name} weights are not Q4_1 or Q8_0 values (as a GGUF file's are)"
                layers[-1][name] = blocks
        if load_kernels() is None:  # built only for block-exact weights
            return (
                "it needs the native kernels, which need an x86 CPU with AVX2 (this one:"
                f" {torch.backends.cpu.get_cpu_capability()}), g++ and ninja (see the log)"
            )
        return layers, exact_blocks(self.lm_head)

    # -- the KV pool --------------------------------------------------------------------------

    @property
    def kv_bytes_per_position(self) -> int:
        """Bytes of keys and values one position of one slot takes in the pool."""
        return len(self.layers) * 2 * self.kv_heads * self.head_dim * int(self.dtype.itemsize)

    def limit_kv_pool(self, max_bytes: int) -> int:
        """Let the pool grow to at most ``max_bytes``; returns the positions per slot that fit."""
        self.max_capacity = min(self.context_length, max_bytes // (self.max_slots * self.kv_bytes_per_position))
        return self.max_capacity

    @torch.inference_mode()
    def reserve(self, length: int) -> None:
        """Make every slot hold at least ``length`` positions (grows in steps of 256).

        Raises:
            MemoryError: more positions than the pool's memory budget allows (``limit_kv_pool``).
        """
        if length <= self.capacity:
            return
        if length > self.max_capacity:
            raise MemoryError(f"{length} positions per slot exceed the KV pool's budget of {self.max_capacity}")
        capacity = min(self.max_capacity, -(-length // 256) * 256)
        kv = torch.zeros(len(self.layers), 2, self.max_slots, self.kv_heads, capacity, self.head_dim, dtype=self.dtype)
        if self.capacity:
            kv[..., : self.capacity, :] = self.kv
        self.kv, self.capacity = kv, capacity

    def release(self) -> None:
        """Drop the KV pool (when nothing runs) so one long request does not hold memory for ever."""
        self.kv, self.capacity = torch.empty(0), 0

    @torch.inference_mode()
    def move(self, moves: Sequence[tuple[int, int]]) -> None:
        """Copy the KV of slot ``src`` to slot ``dst`` for each pair, in order."""
        if not self.capacity:  # nothing prefilled yet (rows placed before their first prefill)
            return
        for src, dst in moves:
            self.kv[:, :, dst] = self.kv[:, :, src]

    @torch.inference_mode()
    def copy_prefix(self, src: int, dst: int, length: int) -> None:
        """Give slot ``dst`` the first ``length`` positions of slot ``src`` (sibling choices)."""
        self.kv[:, :, dst, :, :length] = self.kv[:, :, src, :, :length]

    # -- forward ------------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(
        self, slot: int, tokens: Sequence[int], lora: LoraLayers | None, *, all_logits: bool = False
    ) -> torch.Tensor:
        """Run a prompt through the model, filling ``slot``'s KV at positions ``0..T-1``.

        Returns:
            logits (T, vocab) if ``all_logits`` else (1, vocab) for the last position.
        """
        t = len(tokens)
        self.reserve(t)
        ids = torch.tensor(tokens, dtype=torch.long)
        segments = [Segment(0, t, lora)]
        cos, sin = self.cos[:t], self.sin[:t]

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            # q (T, H, D), k/v (T, KV, D) → (T, H·D)
            self.kv[layer, 0, slot, :, :t] = k.transpose(0, 1)
            self.kv[layer, 1, slot, :, :t] = v.transpose(0, 1)
            out = F.scaled_dot_product_attention(
                q.transpose(0, 1)[None],
                k.transpose(0, 1)[None],
                v.transpose(0, 1)[None],
                is_causal=True,
                enable_gqa=self.heads != self.kv_heads,
            )  # (1, H, T, D)
            return out[0].transpose(0, 1).reshape(t, self.heads * self.head_dim)

        h = self._layers(self._embed(ids), cos, sin, _PerSegment(segments), attend)
        if not all_logits:
            h = h[-1:]
        return linear(h, self.lm_head)

    @torch.inference_mode()
    def prefill_many(
        self,
        slots: Sequence[int],
        prompts: Sequence[Sequence[int]],
        loras: Sequence[LoraLayers | None],
        past: Sequence[int] | None = None,
        *,
        all_logits: bool = False,
    ) -> torch.Tensor:
        """Several prompts in one forward pass (their tokens side by side, attention kept within
        each prompt), filling each one's slot. Prompts of one adapter should be adjacent, so that
        each adapter's delta runs once over all of its tokens.

        Args:
            past: per prompt, how many positions its slot already holds (a cached prefix, see
                ``write_prefix``); its tokens then continue from that position and attend to them.

        Returns:
            logits (P, vocab) at each prompt's last position.
        """
        past = list(past) if past is not None else [0] * len(prompts)
        lengths = [len(p) for p in prompts]
        self.reserve(max(p + n for p, n in zip(past, lengths, strict=True)))
        starts = [0]
        for n in lengths:
            starts.append(starts[-1] + n)
        ids = torch.tensor([t for p in prompts for t in p], dtype=torch.long)
        positions = torch.cat([torch.arange(p, p + n) for p, n in zip(past, lengths, strict=True)])
        token_slots = torch.cat([torch.full((n,), s, dtype=torch.long) for s, n in zip(slots, lengths, strict=True)])
        # A prompt after a cached prefix: its token at p + j sees the slot's positions 0..p + j.
        masks = [
            torch.arange(p + n)[None, :] <= torch.arange(p, p + n)[:, None] if p else None
            for p, n in zip(past, lengths, strict=True)
        ]
        segments: list[Segment] = []
        for i, lora in enumerate(loras):
            if segments and segments[-1].lora is lora:
                segments[-1].end = starts[i + 1]
            else:
                segments.append(Segment(starts[i], starts[i + 1], lora))
        width = self.heads * self.head_dim

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            # q (M, H, D), k/v (M, KV, D) over all prompts' tokens → (M, H·D)
            self.kv[layer, 0][token_slots, :, positions] = k
            self.kv[layer, 1][token_slots, :, positions] = v
            out = torch.empty(q.shape[0], width, dtype=q.dtype)
            for i, (a, b) in enumerate(itertools.pairwise(starts)):
                if masks[i] is None:
                    keys, values = k[a:b].transpose(0, 1), v[a:b].transpose(0, 1)  # (KV, T, D)
                else:
                    keys = self.kv[layer, 0, slots[i], :, : past[i] + b - a]  # (KV, p + T, D)
                    values = self.kv[layer, 1, slots[i], :, : past[i] + b - a]
                out[a:b] = (
                    F.scaled_dot_product_attention(
                        q[a:b].transpose(0, 1)[None],
                        keys[None],
                        values[None],
                        attn_mask=masks[i],
                        is_causal=masks[i] is None,
                        enable_gqa=self.heads != self.kv_heads,
                    )[0]
                    .transpose(0, 1)
                    .reshape(b - a, width)
                )
            return out

        h = self._layers(self._embed(ids), self.cos[positions], self.sin[positions], _PerSegment(segments), attend)
        return linear(h if all_logits else h[torch.tensor(starts[1:]) - 1], self.lm_head)

    @torch.inference_mode()
    def read_prefix(self, slot: int, start: int, end: int) -> torch.Tensor:
        """A copy of ``slot``'s keys and values at positions ``start..end-1``: (layers, 2, kv_heads, end-start, D)."""
        return self.kv[:, :, slot, :, start:end].clone()

    @torch.inference_mode()
    def write_prefix(self, slot: int, blocks: Sequence[torch.Tensor]) -> int:
        """Put ``blocks`` (from ``read_prefix``, in order) at ``slot``'s first positions; returns their length."""
        length = sum(b.shape[3] for b in blocks)
        self.reserve(length)
        start = 0
        for block in blocks:
            self.kv[:, :, slot, :, start : start + block.shape[3]] = block
            start += block.shape[3]
        return length

    @torch.inference_mode()
    def decode(self, tokens: Sequence[int], positions: Sequence[int], segments: Sequence[Segment]) -> torch.Tensor:
        """One step for rows ``0..n-1``: row i has token ``tokens[i]`` at ``positions[i]``.

        Returns:
            logits (n, vocab).
        """
        n = len(tokens)
        pos = torch.tensor(positions, dtype=torch.long)
        length = int(max(positions)) + 1
        self.reserve(length)
        rows = torch.arange(n)
        mask = None  # every row sees all L positions when all rows are at the same one (batch 1)
        if min(positions) != max(positions):
            mask = (torch.arange(length)[None, :] <= pos[:, None])[:, None, None, :]  # (n, 1, 1, L)
        group = self.heads // self.kv_heads

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            # q (n, H, D), k/v (n, KV, D) → (n, H·D); the H query heads of one KV head attend together.
            keys, values = self.kv[layer, 0], self.kv[layer, 1]
            keys[rows, :, pos] = k
            values[rows, :, pos] = v
            out = F.scaled_dot_product_attention(
                q.view(n, self.kv_heads, group, self.head_dim),
                keys[:n, :, :length],
                values[:n, :, :length],
                attn_mask=mask,
            )  # (n, KV, group, D)
            return out.reshape(n, self.heads * self.head_dim)

        h = self._layers(
            self._embed(torch.tensor(tokens, dtype=torch.long)),
            self.cos[pos],
            self.sin[pos],
            self._lora_plan(segments),
            attend,
        )
        return linear(h, self.lm_head)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Embedding rows (N, hidden) in the activations' dtype."""
        if isinstance(self.embed, Blocks):
            return dequantize(self.embed, ids)
        return self.embed[ids].to(self.dtype)

    def _lora_plan(self, segments: Sequence[Segment]) -> _PerSegment | _Stacked | _Fused:
        """How to apply the adapters of a step: the native kernel where there is one; else per
        segment for one adapter, stacked for several."""
        with_lora = [s for s in segments if s.lora is not None]
        if not with_lora or (self.kernel is None and len(with_lora) < 2):
            return _PerSegment(with_lora)
        if self.kernel is not None:
            return _Fused(self.kernel, with_lora, self._arena_stacks_for(with_lora), self._arena_index(with_lora))
        key = tuple(id(s.lora) for s in with_lora)
        entry = self._stack_cache.get(key)
        if entry is None:
            loras = [s.lora for s in with_lora if s.lora is not None]
            entry = (loras, [_stack_layer(layer, loras) for layer in range(len(self.layers))])
            self._stack_cache[key] = entry
            while len(self._stack_cache) > STACK_CACHE:
                self._stack_cache.popitem(last=False)
        self._stack_cache.move_to_end(key)
        return _Stacked(with_lora, entry[1])

    def _arena_stacks_for(self, with_lora: list[Segment]) -> list[dict[str, _FusedGroup]]:
        """The kernel's stack holding every adapter of this step (rebuilt when its members change)."""
        self._steps += 1
        needed = {id(s.lora): s.lora for s in with_lora if s.lora is not None}
        for key in needed:
            self._arena_used[key] = self._steps
        members = {id(a) for a in self._arena}
        missing = [lora for key, lora in needed.items() if key not in members]
        if not missing and self._arena_stacks:
            return self._arena_stacks
        arena = self._arena + missing
        while len(arena) > max(KERNEL_ARENA, len(needed)):  # drop the least recently used that is not needed
            oldest = min((a for a in arena if id(a) not in needed), key=lambda a: self._arena_used.get(id(a), 0))
            arena.remove(oldest)
            self._arena_used.pop(id(oldest), None)
        self._arena = arena
        self._arena_stacks = [_fuse_layer(_stack_layer(layer, arena)) for layer in range(len(self.layers))]
        return self._arena_stacks

    def _arena_index(self, with_lora: list[Segment]) -> list[int]:
        position = {id(a): i for i, a in enumerate(self._arena)}
        return [position[id(s.lora)] for s in with_lora]

    def _layers(
        self,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        delta: _PerSegment | _Stacked | _Fused,
        attend: Any,
    ) -> torch.Tensor:
        # h (N, hidden): N = tokens of one prompt (prefill) or one token per row (decode).
        n = h.shape[0]
        nq, nkv, d = self.heads, self.kv_heads, self.head_dim
        cos, sin = cos[:, None, :], sin[:, None, :]  # (N, 1, D) against (N, heads, D)
        half = d // 2
        down: torch.Tensor | None = None  # the previous layer's output, added to h by the next norm
        for i, layer in enumerate(self.layers):
            x = self._norm(h, down, layer.ln1)
            qkv = linear(x, layer.qkv, layer.qkv_bias)
            delta(qkv, x, i, "qkv")
            qkv = qkv.view(n, nq + 2 * nkv, d)
            qk = qkv[:, : nq + nkv]
            qk = torch.addcmul(qk * cos, torch.roll(qk, half, dims=-1), sin)
            att = attend(i, qk[:, :nq], qk[:, nq:], qkv[:, nq + nkv :])
            o = linear(att, layer.o)
            delta(o, att, i, "o")
            x = self._norm(h, o, layer.ln2)
            gu = linear(x, layer.gu)
            delta(gu, x, i, "gu")
            gate, up = gu.chunk(2, dim=-1)
            m = F.silu(gate).mul_(up)
            down = linear(m, layer.down)
            delta(down, m, i, "down")
        return self._norm(h, down, self.norm)

    def _norm(self, h: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor) -> torch.Tensor:
        """``h += residual`` (in place: ``h`` is the layers' own residual stream), then RMSNorm."""
        if self.native is not None:
            if residual is None:
                out: torch.Tensor = self.native.rms_norm(h, weight, self.eps)
                return out
            out = self.native.add_rms_norm(h, residual, weight, self.eps)
            return out
        if residual is not None:
            h.add_(residual)
        return F.rms_norm(h, (self.hidden,), weight, self.eps)


class _PerSegment:
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
class _StackedGroup:
    """One projection's adapters stacked: ``a`` (S, in, R) and, per part, a B stack.

    A part (q, k or v; gate or up) holds ranks ``rows`` of ``a``'s last dimension and writes output
    columns ``cols``: ``b`` is (S, rank, columns). Keeping parts apart, instead of one
    block-diagonal B, halves the bytes read per step for q|k|v and gate|up.
    """

    a: torch.Tensor
    parts: list[tuple[tuple[int, int], tuple[int, int], torch.Tensor]]  # (rows, cols, b)
    whole: bool  # the parts' columns tile the output in order: deltas concatenated, one add


# One layer's stacked adapters, per group.
_Stack = dict[str, _StackedGroup]


class _Stacked:
    """All adapters of a step at once: ``(S, m, in) @ (S, in, R)``, then ``@ (S, r, out)`` per part.

    The S segments' rows are viewed as an (S, m) grid when the segments are contiguous and equally
    long; otherwise they are gathered into a padded grid (padding rows masked to zero) and the
    results added back with ``index_add_``. Ranks are padded to the largest one with zeros.
    """

    def __init__(self, segments: list[Segment], stacks: list[_Stack]) -> None:
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
class _FusedGroup:
    """One projection's adapters for the native kernel: ``a`` (S, R, in) fp16; ``b`` every part's
    (S, ranks, width) fp16 block, flattened; ``parts`` (P, 5): first rank, ranks, first column,
    width and offset in ``b`` of each part."""

    a: torch.Tensor
    b: torch.Tensor
    parts: torch.Tensor


def _fuse_layer(stack: _Stack) -> dict[str, _FusedGroup]:
    """A layer's stacks (fp32, from ``_stack_layer``) in the native kernel's layout."""
    out = {}
    for group, g in stack.items():
        blocks, rows, offset = [], [], 0
        for (r0, r1), (c0, c1), b in g.parts:
            blocks.append(b.half().reshape(-1))
            rows.append([r0, r1 - r0, c0, c1 - c0, offset])
            offset += blocks[-1].numel()
        a = g.a.transpose(1, 2).half().contiguous()
        out[group] = _FusedGroup(a, torch.cat(blocks), torch.tensor(rows, dtype=torch.long))
    return out


class _Fused:
    """All adapters of a step through the native kernel: one call per projection, any segments."""

    def __init__(
        self, kernel: Any, segments: list[Segment], stacks: list[dict[str, _FusedGroup]], index: list[int]
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


def _resolve_lora_kernel(choice: str, dtype: torch.dtype) -> Any | None:
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


def _stack_layer(layer: int, loras: list[LoraLayers]) -> _Stack:
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
        out[group] = _StackedGroup(a, parts, whole)
    return out
