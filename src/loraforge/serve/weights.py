"""Weight formats: how the forward pass (``forward.py``) holds base projections and the output head.

The *weight format* is one of:

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

import threading
from typing import Any

import torch
import torch.nn.functional as F

from loraforge.errors import ModelError
from loraforge.serve.blocks import Blocks
from loraforge.serve.kernels import load_kernels

WEIGHT_FORMATS = ("auto", "gguf", "fp16", "onednn", "row-major")
PACKED_FORMATS = ("fp16", "onednn", "row-major")  # the formats that any float32 weight can take
MKLDNN = getattr(torch, "_mkldnn", None)  # the layout of oneDNN-packed tensors
_FORMAT_WORKS: dict[str, bool] = {}

# A projection's weight as the runner holds it: a tensor (row-major or oneDNN-packed), fbgemm's
# packed fp16 matrix (a TorchScript object, without tensor methods), or ``Blocks``.
Weight = Any


def pack_weight(weight: torch.Tensor, fmt: str, max_slots: int) -> Weight:
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
            got = linear(x, pack_weight(w, fmt, 4), bias)
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
