"""Forward passes of a Llama-family decoder for serving: one KV pool, many adapters per batch.

The Hugging Face model is only read for its weights. They are regrouped into fused matrices
(``q|k|v`` and ``gate|up`` become one GEMM each) and the model object is dropped, so the base
weights are in memory once. Each running request owns one *slot* of the KV pool::

    kv: (layers, 2, slots, kv_heads, capacity, head_dim)   # 2 = keys, values

The scheduler keeps the running rows in slots ``0..n-1``, grouped so that rows using the same
adapter are contiguous ("segments"). A decode step then costs one GEMM per fused projection for
the whole batch, plus, per segment with an adapter, ``x ↦ out + (x·Aᵀ)·(s·Bᵀ)`` on a contiguous
slice — the LoRA delta of that adapter only, with no gather of weights per row.

How the weights are held is the *weight format* (``serve/weights.py``); how adapters are
applied to a batch, the *LoRA batching* (``serve/lora_batching.py``).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from loraforge.errors import ModelError
from loraforge.serve.blocks import Blocks, dequantize, exact_blocks
from loraforge.serve.kernels import load_kernels
from loraforge.serve.lora_batching import (
    LoraLayers,
    LoraPlan,
    LoraPlanner,
    PerSegmentLora,
    Segment,
    resolve_lora_kernel,
)
from loraforge.serve.weights import Weight, linear, pack_weight, resolve_weight_format

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")


@dataclass
class Layer:
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
        weight_format: one of ``WEIGHT_FORMATS`` (see ``weights.py``).
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
        self.kernel = resolve_lora_kernel(lora_kernel, self.dtype)
        # The native norms (kernels/norm_cpu.cpp) wherever the kernels build, for float32 models.
        self.native: Any = load_kernels() if self.dtype == torch.float32 else None
        inner = model.model
        with torch.no_grad():
            self.embed: torch.Tensor | Blocks = inner.embed_tokens.weight.detach()
            self.lm_head: Weight = model.lm_head.weight.detach()
            tied = self.lm_head.data_ptr() == self.embed.data_ptr()
            self.norm = inner.norm.weight.detach()
            self.layers: list[Layer] = []
            for block in inner.layers:
                att, mlp = block.self_attn, block.mlp
                bias = None
                if att.q_proj.bias is not None:
                    bias = torch.cat([att.q_proj.bias, att.k_proj.bias, att.v_proj.bias]).detach()
                self.layers.append(
                    Layer(
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
        self.lora_planner = LoraPlanner(self.kernel, len(self.layers))

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
                self.lm_head = head if head is not None else pack_weight(self.lm_head, fallback, max_slots)
                if tied and head is not None:
                    self.embed = head
                elif not tied and isinstance(self.embed, torch.Tensor):
                    self.embed = exact_blocks(self.embed) or self.embed  # else float32: its exact values
                return "gguf"
            if choice == "gguf":
                raise ModelError(f"the gguf weight format cannot hold this model: {found}; use weight_format: auto")
        for layer in self.layers:
            for name in ("qkv", "o", "gu", "down"):
                setattr(layer, name, pack_weight(getattr(layer, name), fallback, max_slots))
        self.lm_head = pack_weight(self.lm_head, fallback, max_slots)
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

        h = self._layers(self._embed(ids), cos, sin, PerSegmentLora(segments), attend)
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

        h = self._layers(self._embed(ids), self.cos[positions], self.sin[positions], PerSegmentLora(segments), attend)
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
            self.lora_planner.plan(segments),
            attend,
        )
        return linear(h, self.lm_head)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Embedding rows (N, hidden) in the activations' dtype."""
        if isinstance(self.embed, Blocks):
            return dequantize(self.embed, ids)
        return self.embed[ids].to(self.dtype)

    def _layers(
        self,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        delta: LoraPlan,
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
