"""Native CPU kernels of the serving engine, compiled on first use.

- ``lora_cpu.cpp``: ``lora_delta`` applies every adapter of a decode step to one projection in
  one call.
- ``blocks_cpu.cpp``: ``q4_1_linear`` and ``q8_0_linear`` multiply float32 activations with
  weights held in GGUF's block formats (see ``loraforge.serve.blocks``).
- ``norm_cpu.cpp``: ``rms_norm`` and ``add_rms_norm`` (residual add + RMSNorm) in one call each.

They are compiled together with ``module.cpp``, their Python bindings, as one module, by
PyTorch's ``cpp_extension`` (g++ and ninja, for x86 CPUs with AVX2, FMA and F16C) into PyTorch's
extension cache (``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``), once per
version of the sources: the first server start on a machine takes about a minute longer. Where
the module cannot be built or fails its check against PyTorch's own operations, the engine says
so in the log and uses those operations instead.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import platform
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("loraforge.serve")
SOURCES = [Path(__file__).with_name(name) for name in ("lora_cpu.cpp", "blocks_cpu.cpp", "norm_cpu.cpp", "module.cpp")]
HEADERS = [Path(__file__).with_name("simd.h")]
# at::parallel_for is OpenMP inside PyTorch's headers. Linked with -fopenmp, the kernel asks for
# libgomp.so.1, which PyTorch has already loaded: one OpenMP pool in the process, not two.
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"]
_LOADED: dict[str, Any] = {}  # one build per process: "native" → the module, or None if unavailable


def native_supported() -> bool:
    """Whether this machine can run the kernels at all (x86-64 with AVX2; FMA and F16C come with it)."""
    capability = torch.backends.cpu.get_cpu_capability()
    return platform.machine().lower() in ("x86_64", "amd64") and capability in ("AVX2", "AVX512")


STALE_LOCK_S = 600.0  # a build takes a minute or two; a lock older than this was left by a killed one


def clear_stale_lock(lock: Path, max_age_s: float = STALE_LOCK_S) -> bool:
    """Remove a build lock left by a process killed while building; True if one was removed.

    PyTorch waits for the lock to go away, forever: without this, every later start would hang.
    """
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    if age < max_age_s:
        return False
    log.warning("removing %s, left %.0f s ago by a build that did not finish", lock, age)
    lock.unlink(missing_ok=True)
    return True


@contextlib.contextmanager
def exclusive_build(build: Path) -> Iterator[None]:
    """Hold the build directory against other loraforge processes while building or loading.

    PyTorch marks a build with a ``lock`` file that it waits on forever, and a process killed while
    building leaves it behind. Our own lock is an ``flock``, which the kernel releases when its
    holder dies: whoever holds it knows that no live build is running, so a ``lock`` file still
    there was left by a killed one and is removed, however young it is.
    """
    build.mkdir(parents=True, exist_ok=True)
    with open(build / ".loraforge-build.flock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        clear_stale_lock(build / "lock", max_age_s=0.0)
        yield


def load_kernels() -> Any | None:
    """The compiled module, or ``None`` where it cannot be built or is wrong."""
    if "native" in _LOADED:
        return _LOADED["native"]
    module = None
    if native_supported():
        try:
            from torch.utils.cpp_extension import get_default_build_root, load

            text = b"".join(path.read_bytes() for path in SOURCES + HEADERS)  # a new build when any changes
            digest = hashlib.sha256(text + repr((FLAGS, torch.__version__)).encode()).hexdigest()
            name = f"loraforge_kernels_{digest[:12]}"
            build = Path(get_default_build_root()) / "loraforge" / name
            with exclusive_build(build):
                module = load(
                    name=name,
                    build_directory=str(build),
                    sources=[str(source) for source in SOURCES],
                    extra_cflags=FLAGS,
                    extra_ldflags=["-fopenmp"],
                    verbose=False,
                )
            if not (_lora_agrees(module) and _blocks_agree(module) and _norm_agrees(module)):
                log.warning("the native kernels disagree with PyTorch here; using PyTorch operations")
                module = None
        except Exception as e:  # no compiler, no ninja, a build error: serve without it
            log.warning("the native kernels could not be built (%s); using PyTorch operations", e)
            module = None
    _LOADED["native"] = module
    return module


def _lora_agrees(module: Any) -> bool:
    """One random case (two adapters, two parts, a column tail) against a plain computation."""
    g = torch.Generator().manual_seed(0)
    n, fan_in, out_dim = 5, 40, 52
    x = torch.randn(n, fan_in, generator=g)
    a = torch.randn(2, 6, fan_in, generator=g).half()  # (S, R, in)
    b_parts = [torch.randn(2, 4, 32, generator=g).half(), torch.randn(2, 2, 20, generator=g).half()]
    parts = torch.tensor([[0, 4, 0, 32, 0], [4, 2, 32, 20, b_parts[0].numel()]])
    segments = torch.tensor([[0, 2, 1], [3, 5, 0]])
    out = torch.randn(n, out_dim, generator=g)
    expected = out.clone()
    for start, end, s in segments.tolist():
        h = x[start:end] @ a[s].float().t()
        expected[start:end, :32] += h[:, :4] @ b_parts[0][s].float()
        expected[start:end, 32:] += h[:, 4:] @ b_parts[1][s].float()
    module.lora_delta(out, x, a, torch.cat([p.reshape(-1) for p in b_parts]), parts, segments)
    return bool(torch.allclose(out, expected, atol=1e-4, rtol=1e-4))


def _blocks_agree(module: Any) -> bool:
    """Both block formats, for 1, 3 and 7 rows (each of the kernel's paths) against dequantized
    weights, and the native dequantization (for long prompts) bit for bit."""
    from loraforge.serve.blocks import KINDS, dequantize, quantize

    g = torch.Generator().manual_seed(1)
    weight = torch.randn(37, 96, generator=g)
    for kind in KINDS:
        blocks = quantize(weight, kind)
        exact = dequantize(blocks)
        for rows in (1, 3, 7):
            x = torch.randn(rows, 96, generator=g)
            if kind == "q4_1":
                got = module.q4_1_linear(x, blocks.qs, blocks.scales, blocks.mins)
            else:
                got = module.q8_0_linear(x, blocks.qs, blocks.scales)
            if not torch.allclose(got, x @ exact.t(), atol=1e-4, rtol=1e-4):
                return False
        out = torch.empty_like(exact)
        mins = blocks.mins if blocks.mins is not None else torch.empty(0, dtype=torch.float16)
        module.dequantize_blocks(blocks.qs, blocks.scales, mins, out)
        if not torch.equal(out, exact):
            return False
    return True


def _norm_agrees(module: Any) -> bool:
    """Both norms, for a decode-sized and a prompt-sized batch with a tail of columns, against PyTorch's."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(2)
    for rows in (3, 40):
        h, d, w = (torch.randn(rows, 76, generator=g) for _ in range(3))
        w = w[0].contiguous()
        expected = F.rms_norm(h + d, (76,), w, 1e-5)
        if not torch.allclose(module.rms_norm(h + d, w, 1e-5), expected, atol=1e-5, rtol=1e-5):
            return False
        if not torch.allclose(module.add_rms_norm(h, d, w, 1e-5), expected, atol=1e-5, rtol=1e-5):
            return False
    return True
