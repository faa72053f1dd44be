"""GGUF block formats: exact recovery of a GGUF model's values, and the native block products."""

from __future__ import annotations

import pytest
import torch

from loraforge.serve.blocks import KINDS, Blocks, dequantize, exact_blocks, quantize
from loraforge.serve.kernels import load_kernels, native_supported
from loraforge.serve.weights import DEQUANTIZE_FROM, linear

NATIVE = pytest.mark.skipif(not native_supported() or load_kernels() is None, reason="no native kernel")


def _weight(rows: int, cols: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.05


def test_q4_1_codes_are_packed_as_ggml_packs_them() -> None:
    """Byte j of a block holds value j in its low nibble and value j + 16 in its high one."""
    values = torch.arange(32, dtype=torch.float32).remainder(16).reshape(1, 32)  # 0..15, 0..15
    blocks = quantize(values, "q4_1")
    assert blocks.scales.item() == 1.0 and blocks.mins is not None and blocks.mins.item() == 0.0
    assert blocks.qs.tolist() == [[j | (j << 4) for j in range(16)]]
    assert torch.equal(dequantize(blocks), values)


@pytest.mark.parametrize("kind", KINDS)
def test_values_of_a_block_format_are_recovered_exactly(kind: str) -> None:
    """A weight that went through a format (as a GGUF file's did) is found in it again, bit for bit."""
    weight = dequantize(quantize(_weight(40, 96, 0), kind))
    blocks = exact_blocks(weight)
    assert blocks is not None and blocks.kind == kind
    assert torch.equal(dequantize(blocks), weight)
    assert blocks.shape == (40, 96)
    assert blocks.nbytes == {"q4_1": 40 * 96 // 2 + 40 * 3 * 4, "q8_0": 40 * 96 + 40 * 3 * 2}[kind]


def test_weights_that_are_not_block_values_are_not_held_as_blocks() -> None:
    assert exact_blocks(_weight(8, 64, 1)) is None  # random floats
    assert exact_blocks(dequantize(quantize(_weight(8, 64, 1), "q4_1")).bfloat16()) is None
    assert exact_blocks(torch.zeros(8, 48)) is None  # 48 inputs: no whole blocks
    with pytest.raises(ValueError, match=r"K a multiple of 32; this one is \(8, 48\)"):
        quantize(torch.zeros(8, 48), "q4_1")
    with pytest.raises(ValueError, match="block format must be one of q4_1, q8_0, got 'q2_k'"):
        quantize(torch.zeros(8, 64), "q2_k")


def test_exactness_is_bit_for_bit() -> None:
    weight = dequantize(quantize(_weight(4, 32, 6), "q8_0"))
    assert exact_blocks(weight) is not None
    signed = weight.clone()
    signed[0, 0] = -0.0  # equal to 0.0, but not the value a block gives back
    weight[0, 0] = 0.0
    assert exact_blocks(weight) is not None and exact_blocks(signed) is None
    weight[1, 1] = float("nan")
    assert exact_blocks(weight) is None


def test_q8_0_rounds_like_roundf() -> None:
    """Halves away from zero, and nothing below a half up (0.49999997 is not 0.5)."""
    below_half = torch.nextafter(torch.tensor(0.5), torch.tensor(0.0)).item()
    values = torch.tensor([[127.0, 0.5, -0.5, 2.5, -2.5, below_half, -below_half] + [0.0] * 25])
    assert quantize(values, "q8_0").qs[0, :7].tolist() == [127, 1, -1, 3, -3, 0, 0]


def test_dequantizing_some_rows_equals_those_rows() -> None:
    blocks = quantize(_weight(30, 64, 2), "q8_0")
    rows = torch.tensor([3, 0, 29, 3])
    assert torch.equal(dequantize(blocks, rows), dequantize(blocks)[rows])


@NATIVE
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 16, 17, DEQUANTIZE_FROM + 3])
@pytest.mark.parametrize(("out_dim", "fan_in"), [(37, 96), (64, 32), (50, 320)])
def test_block_products_equal_products_with_the_dequantized_weights(
    kind: str, rows: int, out_dim: int, fan_in: int
) -> None:
    """Every path of the kernel (1–3 rows in registers, tiles for more, dequantize + GEMM for many),
    with output widths that leave tails."""
    blocks = quantize(_weight(out_dim, fan_in, 3), kind)
    x = torch.randn(rows, fan_in, generator=torch.Generator().manual_seed(rows))
    bias = torch.randn(out_dim)
    expected = x @ dequantize(blocks).t() + bias
    got = linear(x, blocks, bias)
    assert got.shape == (rows, out_dim)
    assert (got - expected).abs().max() < 1e-5 * max(1.0, expected.abs().max().item())


@NATIVE
@pytest.mark.parametrize("kind", KINDS)
def test_native_dequantization_is_bit_exact(kind: str) -> None:
    blocks = quantize(_weight(70, 160, 4), kind)
    out = torch.empty(70, 160)
    mins = blocks.mins if blocks.mins is not None else torch.empty(0, dtype=torch.float16)
    load_kernels().dequantize_blocks(blocks.qs, blocks.scales, mins, out)
    assert torch.equal(out, dequantize(blocks))


@NATIVE
def test_block_kernels_refuse_bad_arguments_clearly() -> None:
    kernel = load_kernels()
    q4 = quantize(_weight(8, 64, 5), "q4_1")
    with pytest.raises(RuntimeError, match="K = 48 is not a multiple of 32"):
        kernel.q4_1_linear(torch.zeros(2, 48), q4.qs, q4.scales, q4.mins)
    with pytest.raises(RuntimeError, match="x must be a contiguous"):
        kernel.q4_1_linear(torch.zeros(2, 64, dtype=torch.float64), q4.qs, q4.scales, q4.mins)
    with pytest.raises(RuntimeError, match=r"codes must be a contiguous \(N, 32\) tensor"):
        kernel.q4_1_linear(torch.zeros(2, 64), q4.qs[:, :16].contiguous(), q4.scales, q4.mins)
    with pytest.raises(RuntimeError, match="scales must be"):
        kernel.q8_0_linear(torch.zeros(2, 64), torch.zeros(8, 64, dtype=torch.int8), q4.scales[:4].contiguous())
    with pytest.raises(RuntimeError, match="mins must be like the scales"):
        kernel.q4_1_linear(torch.zeros(2, 64), q4.qs, q4.scales, q4.scales[:, :1].contiguous())
    with pytest.raises(RuntimeError, match="tensors must be on the CPU"):
        kernel.q4_1_linear(torch.zeros(2, 64), q4.qs.to("meta"), q4.scales, q4.mins)
    with pytest.raises(RuntimeError, match="lora_delta needs tensors on the CPU"):
        kernel.lora_delta(*(torch.zeros(1, 1, device="meta") for _ in range(4)), torch.zeros(1, 5), torch.zeros(1, 3))
    assert isinstance(q4, Blocks)
