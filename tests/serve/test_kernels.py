"""The native LoRA kernel against a plain computation, on shapes that hit every code path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loraforge.serve.kernels import load_kernels, native_supported

NATIVE = pytest.mark.skipif(not native_supported() or load_kernels() is None, reason="no native kernel on this machine")


def test_the_kernel_builds_wherever_it_is_supported() -> None:
    """On an x86 CPU with AVX2 (every CI machine) a failed build must fail the suite, not skip it."""
    if not native_supported():
        pytest.skip("not an x86 CPU with AVX2")
    assert load_kernels() is not None, "the native kernels did not build: see the warning logged above"


CASES = [
    # (name, fan_in, [(ranks, width)] per part, segments (start, end, adapter), rows, adapters)
    ("one row, one part", 64, [(8, 64)], [(0, 1, 0)], 1, 1),
    ("q|k|v of SmolLM2", 576, [(16, 576), (16, 192), (16, 192)], [(0, 4, 0), (4, 8, 1), (8, 12, 2)], 12, 3),
    ("odd sizes: tails of 8 and 16", 45, [(3, 37), (5, 19)], [(0, 5, 1), (6, 13, 0)], 14, 2),
    ("rows outside every segment", 32, [(4, 32)], [(2, 3, 0), (5, 9, 0)], 10, 1),
    ("an empty segment", 16, [(2, 16)], [(0, 0, 0), (0, 3, 1)], 3, 2),
]


@NATIVE
@pytest.mark.parametrize(("name", "fan_in", "parts", "segments", "rows", "adapters"), CASES, ids=[c[0] for c in CASES])
def test_kernel_equals_per_segment_products(
    name: str, fan_in: int, parts: list[tuple[int, int]], segments: list[tuple[int, int, int]], rows: int, adapters: int
) -> None:
    kernel = load_kernels()
    g = torch.Generator().manual_seed(len(name))
    rank = sum(r for r, _ in parts)
    out_dim = sum(w for _, w in parts)
    x = torch.randn(rows, fan_in, generator=g)
    a = torch.randn(adapters, rank, fan_in, generator=g).half()
    bs = [torch.randn(adapters, r, w, generator=g).half() for r, w in parts]
    meta, r0, c0, offset = [], 0, 0, 0
    for (r, w), b in zip(parts, bs, strict=True):
        meta.append([r0, r, c0, w, offset])
        r0, c0, offset = r0 + r, c0 + w, offset + b.numel()
    out = torch.randn(rows, out_dim, generator=g)
    expected = out.clone()
    for start, end, s in segments:
        h = x[start:end] @ a[s].float().t()
        r0 = c0 = 0
        for (r, w), b in zip(parts, bs, strict=True):
            expected[start:end, c0 : c0 + w] += h[:, r0 : r0 + r] @ b[s].float()
            r0, c0 = r0 + r, c0 + w
    kernel.lora_delta(out, x, a, torch.cat([b.reshape(-1) for b in bs]), torch.tensor(meta), torch.tensor(segments))
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


@NATIVE
def test_kernel_refuses_bad_arguments_clearly() -> None:
    kernel = load_kernels()
    x, out = torch.randn(4, 16), torch.zeros(4, 16)
    a, b = torch.randn(1, 2, 16).half(), torch.randn(32).half()
    parts, segments = torch.tensor([[0, 2, 0, 16, 0]]), torch.tensor([[0, 4, 0]])
    with pytest.raises(RuntimeError, match="fp16 adapter weights"):
        kernel.lora_delta(out, x, a.float(), b, parts, segments)
    with pytest.raises(RuntimeError, match="contiguous"):
        kernel.lora_delta(out, torch.randn(16, 4).t(), a, b, parts, segments)
    with pytest.raises(RuntimeError, match="segment is out of range"):
        kernel.lora_delta(out, x, a, b, parts, torch.tensor([[0, 5, 0]]))
    with pytest.raises(RuntimeError, match="segment is out of range"):
        kernel.lora_delta(out, x, a, b, parts, torch.tensor([[0, 4, 1]]))
    with pytest.raises(RuntimeError, match="part is out of range"):
        kernel.lora_delta(out, x, a, b, torch.tensor([[0, 2, 8, 16, 0]]), segments)  # columns past the output
    with pytest.raises(RuntimeError, match="part is out of range"):
        kernel.lora_delta(out, x, a, b, torch.tensor([[0, 2, 0, 16, 8]]), segments)  # past the end of b


@NATIVE
@pytest.mark.parametrize("rows", [1, 3, 15, 16, 40])
@pytest.mark.parametrize("hidden", [64, 76, 576])
def test_native_norms_equal_pytorchs(rows: int, hidden: int) -> None:
    """One row to a prompt's worth (the pool's path from 16 rows), hidden sizes with a tail of 8."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(rows * hidden)
    h, d = torch.randn(rows, hidden, generator=g) * 3, torch.randn(rows, hidden, generator=g)
    w = torch.randn(hidden, generator=g)
    kernel = load_kernels()
    expected = F.rms_norm(h + d, (hidden,), w, 1e-5)
    torch.testing.assert_close(kernel.rms_norm(h + d, w, 1e-5), expected, atol=1e-5, rtol=1e-5)
    residual = h.clone()
    got = kernel.add_rms_norm(residual, d, w, 1e-5)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(residual, h + d, atol=0, rtol=0)  # the residual stream is updated in place


@NATIVE
def test_native_norms_refuse_bad_arguments_clearly() -> None:
    kernel = load_kernels()
    with pytest.raises(RuntimeError, match="the weight must be a contiguous"):
        kernel.rms_norm(torch.zeros(2, 8), torch.zeros(9), 1e-5)
    with pytest.raises(RuntimeError, match="x must be a contiguous"):
        kernel.rms_norm(torch.zeros(8, 2).t(), torch.zeros(8), 1e-5)
    with pytest.raises(RuntimeError, match="the added tensor must be like x"):
        kernel.add_rms_norm(torch.zeros(2, 8), torch.zeros(3, 8), torch.zeros(8), 1e-5)


def test_a_build_lock_left_by_a_killed_build_is_cleared(tmp_path: Path) -> None:
    """PyTorch waits forever for the lock of a build that was killed; an old one is removed, a fresh one kept."""
    import os
    import time

    from loraforge.serve.kernels import STALE_LOCK_S, clear_stale_lock

    lock = tmp_path / "lock"
    assert not clear_stale_lock(lock)  # none: nothing to do
    lock.write_text("")
    assert not clear_stale_lock(lock) and lock.exists()  # a build may be running now
    old = time.time() - STALE_LOCK_S - 5
    os.utime(lock, (old, old))
    assert clear_stale_lock(lock) and not lock.exists()


def test_a_fresh_lock_of_a_killed_build_is_cleared_under_our_own_lock(tmp_path: Path) -> None:
    """Holding the build directory's flock proves that no live loraforge build runs, so PyTorch's
    lock file is stale however young it is (a build killed a minute ago would hang every start)."""
    import fcntl
    import subprocess
    import sys

    from loraforge.serve.kernels import exclusive_build

    build = tmp_path / "build"
    build.mkdir()
    (build / "lock").write_text("")
    with exclusive_build(build):
        assert not (build / "lock").exists()
        # while it is held, another process cannot take it
        probe = (
            "import fcntl, sys; f = open(sys.argv[1], 'a')\n"
            "try:\n    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept OSError:\n    sys.exit(3)"
        )
        held = subprocess.run([sys.executable, "-c", probe, str(build / ".loraforge-build.flock")], timeout=30)
        assert held.returncode == 3
    with open(build / ".loraforge-build.flock", "a") as f:  # released afterwards
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
