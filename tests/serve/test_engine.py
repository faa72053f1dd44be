"""The engine: parity with PEFT, and batched decoding equal to one request at a time."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from loraforge.files import sha256_file
from loraforge.serve.adapter_cache import load_lora
from loraforge.serve.blocks import Blocks
from loraforge.serve.engine import LocalEngine
from loraforge.serve.forward import LlamaRunner
from loraforge.serve.generation import FinishEvent, GenerationRequest, SamplingParams, TokenEvent
from loraforge.serve.kernels import load_kernels, native_supported
from loraforge.serve.lora_batching import Segment
from loraforge.serve.weights import MKLDNN, format_available, resolve_weight_format

NATIVE = pytest.mark.skipif(not native_supported() or load_kernels() is None, reason="no native kernel")
KERNELS = ["torch", pytest.param("native", marks=NATIVE)]
FORMATS = [
    "row-major",
    pytest.param("onednn", marks=pytest.mark.skipif(not format_available("onednn", torch.float32), reason="no oneDNN")),
    pytest.param("fp16", marks=pytest.mark.skipif(not format_available("fp16", torch.float32), reason="no fbgemm")),
    pytest.param("gguf", marks=NATIVE),  # on the block-exact copy of the tiny model
]


def _runner(model_dir: Path, slots: int = 8, *, weight_format: str = "auto", lora_kernel: str = "auto") -> LlamaRunner:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    return LlamaRunner(model, max_slots=slots, weight_format=weight_format, lora_kernel=lora_kernel)


@pytest.mark.parametrize("lora_kernel", KERNELS)
@pytest.mark.parametrize("weight_format", FORMATS)
def test_runner_logits_match_peft_within_1e4(
    tiny_model_dir: Path, gguf_model_dir: Path, adapter_dirs: dict[str, Path], weight_format: str, lora_kernel: str
) -> None:
    """Against PEFT on the weights the runner stores: fp16 base weights (and, with the native
    kernel, fp16 adapter weights) are compared with a PEFT model whose weights were rounded the
    same way, so the products themselves must agree to 1e-4. GGUF blocks hold the block-exact
    model's own values: no rounding."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = adapter_dirs["a1"]
    model_dir = gguf_model_dir if weight_format == "gguf" else tiny_model_dir
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(model_dir)), str(adapter))
    peft_model.eval()
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            lora = "lora_" in name
            if p.dim() == 2 and ((weight_format == "fp16" and not lora) or (lora_kernel == "native" and lora)):
                p.copy_(p.half().float())  # base: projections, embedding (and the tied head)
    ids = torch.tensor([[1, 504, 3458, 314, 253, 1345, 28, 2477, 30]])
    with torch.no_grad():
        expected = peft_model(ids).logits[0]
        with peft_model.disable_adapter():
            expected_base = peft_model(ids).logits[0]
    runner = _runner(model_dir, weight_format=weight_format, lora_kernel=lora_kernel)
    assert runner.weight_format == weight_format and (runner.kernel is not None) is (lora_kernel == "native")
    assert (getattr(runner.layers[0].gu, "layout", None) == MKLDNN) is (weight_format == "onednn")
    assert isinstance(runner.layers[0].gu, torch.Tensor) is (weight_format in ("row-major", "onednn"))
    assert isinstance(runner.layers[0].gu, Blocks) is (weight_format == "gguf")
    lora = load_lora(adapter, sha256_file(adapter / "adapter_model.safetensors"), runner)
    tokens = ids[0].tolist()
    prefill = runner.prefill(0, tokens[:-1], lora, all_logits=True)
    runner.prefill(1, tokens[:-1], None)
    step = runner.decode([tokens[-1]] * 2, [len(tokens) - 1] * 2, [Segment(0, 1, lora), Segment(1, 2, None)])
    assert (prefill - expected[:-1]).abs().max() < 1e-4
    assert (step[0] - expected[-1]).abs().max() < 1e-4
    assert (step[1] - expected_base[-1]).abs().max() < 1e-4
    assert (expected[-1] - expected_base[-1]).abs().max() > 1e-2  # the adapter changes the output


def test_fp16_weights_stay_close_to_fp32(tiny_model_dir: Path) -> None:
    """fp16 storage changes the numbers only by the weights' rounding: near the fp32 logits, the
    same greedy choices on a random model, and half the bytes."""
    if not format_available("fp16", torch.float32):
        pytest.skip("no fbgemm")
    fp32, fp16 = _runner(tiny_model_dir, weight_format="row-major"), _runner(tiny_model_dir, weight_format="fp16")
    tokens = list(range(5, 60))
    a, b = fp32.prefill(0, tokens, None, all_logits=True), fp16.prefill(0, tokens, None, all_logits=True)
    assert b.dtype == torch.float32 and fp16.kv.dtype == torch.float32  # activations stay fp32
    assert 0 < (a - b).abs().max() < 1e-2 * a.abs().max()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.95
    assert fp16.embed.dtype == torch.float16


def test_adapter_with_wrong_checksum_is_refused(tiny_model_dir: Path, adapter_dirs: dict[str, Path]) -> None:
    from loraforge.errors import ModelError

    with pytest.raises(ModelError, match="sha256"):
        load_lora(adapter_dirs["a1"], "0" * 64, _runner(tiny_model_dir))


def test_adapter_with_a_missing_file_is_a_clear_error(
    tiny_model_dir: Path, adapter_dirs: dict[str, Path], tmp_path: Path
) -> None:
    import shutil

    from loraforge.errors import ModelError

    copy = Path(shutil.copytree(adapter_dirs["a1"], tmp_path / "a1"))
    digest = sha256_file(copy / "adapter_model.safetensors")
    (copy / "adapter_model.safetensors").unlink()
    with pytest.raises(ModelError, match=r"adapter_model\.safetensors is missing.*re-register"):
        load_lora(copy, digest, _runner(tiny_model_dir))


def _generate(engine: LocalEngine, requests: list[GenerationRequest], stagger: float) -> list[list[int]]:
    async def one(req: GenerationRequest, delay: float) -> list[int]:
        await asyncio.sleep(delay)
        tokens: list[int] = []
        async for event in engine.submit(req).events():
            if isinstance(event, TokenEvent):
                tokens.append(event.token)
            assert not isinstance(event, FinishEvent) or event.completion_tokens >= len(tokens)
        return tokens

    async def all_() -> list[list[int]]:
        return list(await asyncio.gather(*(one(r, i * stagger) for i, r in enumerate(requests))))

    return asyncio.run(all_())


@pytest.mark.parametrize("weight_format", ["auto", pytest.param("gguf", marks=NATIVE)])
def test_batched_greedy_equals_one_at_a_time(
    tiny_model_dir: Path, gguf_model_dir: Path, adapter_dirs: dict[str, Path], weight_format: str
) -> None:
    """Rows join and leave mid-flight across four segments (base + 3 adapters); every
    request's tokens must be exactly those it gets when it runs alone. With GGUF blocks, 1–3 rows
    and more rows take different paths through the kernel."""
    model_dir = gguf_model_dir if weight_format == "gguf" else tiny_model_dir
    runner = _runner(model_dir, slots=6, weight_format=weight_format)
    loras = {
        name: load_lora(adapter_dirs[name], sha256_file(adapter_dirs[name] / "adapter_model.safetensors"), runner)
        for name in ("a1", "a2", "b1")
    }
    rng = random.Random(0)
    names = [None, "a1", "a2", "b1"]
    requests = []
    for i in range(14):
        name = names[i % 4]
        prompt = [rng.randrange(100, 40000) for _ in range(rng.randrange(3, 30))]
        params = SamplingParams(max_tokens=rng.randrange(2, 24), temperature=0)
        requests.append(GenerationRequest(f"r{i}", prompt, params, name, loras.get(name) if name else None))
    engine = LocalEngine(runner, tokenizer=_FakeTokenizer(), model_id="tiny")
    try:
        batched = _generate(engine, requests, stagger=0.01)
        alone = [_generate(engine, [r], 0)[0] for r in requests]
    finally:
        engine.close()
    assert [len(t) for t in batched] == [r.params.max_tokens for r in requests]
    assert batched == alone


def test_sampling_with_a_seed_is_reproducible(tiny_model_dir: Path) -> None:
    engine = LocalEngine(_runner(tiny_model_dir), tokenizer=_FakeTokenizer(), model_id="tiny")
    try:

        def run(seed: int) -> list[int]:
            params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=seed)
            return _generate(engine, [GenerationRequest("s", [1, 2, 3], params)], 0)[0]

        assert run(7) == run(7)
        assert run(7) != run(8)
    finally:
        engine.close()


def test_tensor_work_runs_on_the_engine_thread(
    tiny_model_dir: Path, adapter_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """The model is built and adapters are prepared by the engine's thread; errors reach the caller."""
    import threading

    from loraforge.serve.adapter_cache import AdapterCache
    from loraforge.serve.adapters import AdapterStore

    threads: list[str] = []

    def build() -> LlamaRunner:
        threads.append(threading.current_thread().name)
        return _runner(tiny_model_dir)

    engine = LocalEngine(build, tokenizer=_FakeTokenizer(), model_id="tiny")
    try:
        assert threads == ["loraforge-engine"] and engine.max_batch_size == 8
        assert engine.call(lambda: threading.current_thread().name) == "loraforge-engine"
        assert engine.call(lambda: engine.call(lambda: 7)) == 7  # a nested call runs in place
        with pytest.raises(ZeroDivisionError):
            engine.call(lambda: 1 // 0)
        store = AdapterStore(tmp_path / "home")
        reg = store.add(adapter_dirs["a1"], "a1", tenant=None)

        def run(fn: Any) -> Any:
            def recorded() -> Any:
                threads.append(threading.current_thread().name)
                return fn()

            return engine.call(recorded)

        cache = AdapterCache(store, engine.runner, base_sha256=reg.base_sha256, capacity=2, run=run)
        lora = cache.get(reg).lora
        assert threads == ["loraforge-engine"] * 2
        assert lora[0]["qkv"].a.shape[1] > 0 and not lora[0]["qkv"].a.is_inference()
        # The engine still generates after the calls.
        params = SamplingParams(max_tokens=3, temperature=0)
        assert len(_generate(engine, [GenerationRequest("r", [1, 2, 3], params, adapter="a1", lora=lora)], 0)[0]) == 3
    finally:
        engine.close()
    with pytest.raises(RuntimeError, match="closed"):
        engine.call(lambda: 1)

    def broken() -> LlamaRunner:
        raise ValueError("no model here")

    with pytest.raises(ValueError, match="no model here"):
        LocalEngine(broken, tokenizer=_FakeTokenizer(), model_id="tiny")


def test_a_dead_engine_thread_fails_calls_instead_of_hanging(tiny_model_dir: Path) -> None:
    engine = LocalEngine(_runner(tiny_model_dir), tokenizer=_FakeTokenizer(), model_id="tiny")

    def crash() -> bool:
        raise RuntimeError("a bug in the loop")

    engine._loop_once = crash  # type: ignore[method-assign]
    # The thread is waiting inside the old loop: this call wakes it, runs, and the next pass dies.
    assert engine.call(lambda: 1) == 1
    engine._thread.join(timeout=10)
    assert not engine.alive()
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(1)
    try:
        with pytest.raises(RuntimeError, match="closed"):  # not a hang (TimeoutError)
            pool.submit(engine.call, lambda: 1).result(timeout=10)
    finally:
        pool.shutdown(wait=False)


class _FakeTokenizer:
    """Token ids as text: enough for the engine's text deltas."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(f"<{i}>" for i in ids)


@pytest.mark.parametrize("lora_kernel", KERNELS)
@pytest.mark.parametrize(
    "layout",
    [
        [("a1", 2), ("a2", 2), ("b1", 2)],  # contiguous, equal: one (S, m) view
        [("a1", 1), (None, 2), ("a2", 3)],  # a base segment between, unequal: gathered
        [("a1", 2), ("qv", 2), ("up", 2)],  # parts missing in some adapters, other ranks
        [("qv", 2), ("up", 2)],  # no adapter has k or gate: parts do not tile the output
        [("qv", 1), (None, 1), ("up", 3)],  # the same, gathered
        [("a1", 5), ("b1", 7), (None, 1), ("a2", 1)],  # segments longer than the kernel's 4-row blocks
    ],
)
def test_stacked_adapters_equal_per_segment(
    tiny_model_dir: Path,
    adapter_dirs: dict[str, Path],
    layout: list[tuple[str | None, int]],
    tmp_path: Path,
    lora_kernel: str,
) -> None:
    """All adapters of a step at once (PyTorch's stacked products, or the native kernel) equal
    each segment's own two products."""
    from loraforge.serve.lora_batching import FusedLora, PerSegmentLora, StackedLora

    from .conftest import make_adapter

    runner = _runner(tiny_model_dir, slots=16, lora_kernel=lora_kernel)
    dirs = {n: adapter_dirs[n] for n in ("a1", "a2", "b1")}
    dirs["qv"] = make_adapter(tiny_model_dir, tmp_path / "qv", seed=11, r=4, targets=["q_proj", "v_proj"])
    dirs["up"] = make_adapter(tiny_model_dir, tmp_path / "up", seed=12, r=6, targets=["up_proj", "o_proj"])
    loras = {n: load_lora(d, sha256_file(d / "adapter_model.safetensors"), runner) for n, d in dirs.items()}
    segments, start = [], 0
    for name, rows in layout:
        segments.append(Segment(start, start + rows, loras[name] if name else None))
        start += rows
    plan = runner.lora_planner.plan(segments)
    if lora_kernel == "native":
        assert isinstance(plan, FusedLora)
    else:
        assert isinstance(plan, StackedLora) and plan.view == (None not in [name for name, _ in layout])
    qkv = (runner.heads + 2 * runner.kv_heads) * runner.head_dim
    widths = {"qkv": qkv, "o": runner.hidden, "gu": 2 * runner.intermediate}
    for group, width in widths.items():
        x = torch.randn(start, runner.hidden)
        before = torch.randn(start, width)  # the deltas are added to what is there
        stacked, single = before.clone(), before.clone()
        plan(stacked, x, 1, group)
        PerSegmentLora(segments)(single, x, 1, group)
        assert (stacked - single).abs().max() < 1e-5
        assert (single - before).abs().max() > 1e-3


def test_prefill_many_equals_one_prompt_at_a_time(tiny_model_dir: Path, adapter_dirs: dict[str, Path]) -> None:
    runner = _runner(tiny_model_dir)
    lora = load_lora(adapter_dirs["a1"], sha256_file(adapter_dirs["a1"] / "adapter_model.safetensors"), runner)
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16], [17, 18, 19]]
    loras = [None, lora, lora, None]
    together = runner.prefill_many([0, 1, 2, 3], prompts, loras)
    kv = runner.kv.clone()
    for slot, (prompt, adapter) in enumerate(zip(prompts, loras, strict=True)):
        alone = runner.prefill(slot + 4, prompt, adapter)
        assert (together[slot] - alone[0]).abs().max() < 1e-4
        t = len(prompt)
        assert (kv[:, :, slot, :, :t] - runner.kv[:, :, slot + 4, :, :t]).abs().max() < 1e-4


@pytest.mark.parametrize("weight_format", ["fp16", "onednn"])
def test_packed_formats_for_bf16_weights_are_refused_clearly(tiny_model_dir: Path, weight_format: str) -> None:
    from transformers import AutoModelForCausalLM

    from loraforge.errors import ModelError

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.bfloat16).eval()
    with pytest.raises(ModelError, match=f"the {weight_format} weight format needs float32.*torch.bfloat16"):
        LlamaRunner(model, max_slots=2, weight_format=weight_format)


@NATIVE
def test_gguf_projections_with_a_head_of_another_format(gguf_model_dir: Path, tmp_path: Path) -> None:
    """GGUF files often keep the output head in a format of their own: the projections are still
    served from blocks, the head from the fallback format, the embedding in exact float32."""
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    model_dir = Path(shutil.copytree(gguf_model_dir, tmp_path / "other-head"))
    weights = load_file(str(model_dir / "model.safetensors"))
    weights["model.embed_tokens.weight"] += 1e-3 * torch.randn_like(weights["model.embed_tokens.weight"])
    save_file(weights, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    runner = _runner(model_dir)
    assert runner.weight_format == "gguf" and isinstance(runner.layers[0].qkv, Blocks)
    assert not isinstance(runner.lm_head, Blocks) and isinstance(runner.embed, torch.Tensor)
    assert runner.embed.dtype == torch.float32
    tokens = list(range(7, 40))
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(str(model_dir))(torch.tensor([tokens])).logits[0]
    head_rounding = {"fp16": 1e-3}.get(resolve_weight_format("auto", torch.float32), 1e-4)
    assert (runner.prefill(0, tokens, None, all_logits=True) - expected).abs().max() < head_rounding


def test_without_native_kernels_gguf_weights_get_the_next_format(
    gguf_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A machine where the kernels do not build still serves a GGUF-valued model (auto), and
    asking for gguf there says what is missing."""
    import loraforge.serve.forward as forward_module
    from loraforge.errors import ModelError

    monkeypatch.setattr(forward_module, "load_kernels", lambda: None)
    runner = _runner(gguf_model_dir, lora_kernel="torch")
    assert runner.weight_format == resolve_weight_format("auto", torch.float32)
    assert not isinstance(runner.lm_head, Blocks) and not isinstance(runner.embed, Blocks)
    with pytest.raises(ModelError, match="cannot hold this model: it needs the native kernels, which need an x86"):
        _runner(gguf_model_dir, weight_format="gguf", lora_kernel="torch")


def test_gguf_blocks_for_bf16_weights_are_refused_clearly(gguf_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    from loraforge.errors import ModelError

    model = AutoModelForCausalLM.from_pretrained(str(gguf_model_dir), dtype=torch.bfloat16).eval()
    with pytest.raises(ModelError, match="gguf weight format cannot hold this model: it needs float32 weights; these"):
        LlamaRunner(model, max_slots=2, weight_format="gguf")


def test_native_lora_kernel_for_bf16_weights_is_refused_clearly(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    from loraforge.errors import ModelError

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.bfloat16).eval()
    with pytest.raises(
        ModelError, match=r"native LoRA kernel needs float32 model weights \(this runner has torch.bfloat16"
    ):
        LlamaRunner(model, max_slots=2, lora_kernel="native")
    assert LlamaRunner(model, max_slots=2).kernel is None  # auto: PyTorch operations for bf16


@NATIVE
def test_auto_weight_format_takes_gguf_blocks_only_for_block_exact_weights(
    tiny_model_dir: Path, gguf_model_dir: Path
) -> None:
    from loraforge.errors import ModelError

    runner = _runner(gguf_model_dir)
    assert runner.weight_format == "gguf"
    assert isinstance(runner.lm_head, Blocks) and runner.lm_head.kind == "q8_0"
    assert runner.embed is runner.lm_head  # tied: one copy, looked up and multiplied
    assert {getattr(layer, name).kind for layer in runner.layers for name in ("qkv", "o", "gu", "down")} == {"q4_1"}
    assert _runner(tiny_model_dir).weight_format == resolve_weight_format("auto", torch.float32)  # not block values
    with pytest.raises(ModelError, match="gguf weight format cannot hold this model: layer 0's qkv weights are not"):
        _runner(tiny_model_dir, weight_format="gguf")


def test_unknown_weight_format_is_refused(tiny_model_dir: Path) -> None:
    from loraforge.errors import ModelError

    formats = "auto, gguf, fp16, onednn, row-major"
    with pytest.raises(ModelError, match=f"weight format must be one of {formats}, got 'int3'"):
        _runner(tiny_model_dir, weight_format="int3")


def test_auto_weight_format_for_bf16_weights_is_row_major(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.bfloat16).eval()
    assert LlamaRunner(model, max_slots=2).weight_format == "row-major"


def test_bf16_storage_runs_and_stays_close(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    fp32 = _runner(tiny_model_dir)
    bf16 = LlamaRunner(
        AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.bfloat16).eval(), max_slots=2
    )
    tokens = [5, 6, 7, 8, 9]
    a, b = fp32.prefill(0, tokens, None), bf16.prefill(0, tokens, None)
    assert b.dtype == torch.bfloat16 and bf16.kv.dtype == torch.bfloat16
    assert (a - b.float()).abs().max() < 0.1 * a.abs().max()


def test_min_tokens_masks_the_stop_token_for_every_choice(tiny_model_dir: Path) -> None:
    """The end-of-turn mask is written into a step's logits in place: one choice (the prompt's own
    logits) and two choices (an expanded view, copied first) must pick the same tokens."""
    prompt = [5, 6, 7, 8, 9]
    probe = LocalEngine(_runner(tiny_model_dir), tokenizer=_FakeTokenizer(), model_id="tiny")
    try:
        first = _generate(probe, [GenerationRequest("p", prompt, SamplingParams(max_tokens=1, temperature=0))], 0)[0]
    finally:
        probe.close()
    engine = LocalEngine(_runner(tiny_model_dir), tokenizer=_FakeTokenizer(), model_id="tiny", stop_tokens=first)

    async def choices(n: int) -> dict[int, list[int]]:
        params = SamplingParams(max_tokens=4, min_tokens=3, temperature=0, logprobs=1)
        out: dict[int, list[int]] = {}
        async for event in engine.submit(GenerationRequest("r", prompt, params, n=n)).events():
            if isinstance(event, TokenEvent):
                assert event.logprob is not None and event.logprob > float("-inf")
                out.setdefault(event.index, []).append(event.token)
        return out

    try:
        one, two = asyncio.run(choices(1)), asyncio.run(choices(2))
    finally:
        engine.close()
    assert len(one[0]) >= 3 and first[0] not in one[0][:3]
    assert two[0] == two[1] == one[0]


@NATIVE
def test_kernel_stack_is_rebuilt_only_when_its_adapters_change(
    tiny_model_dir: Path, adapter_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """New combinations of stacked adapters reuse the stack; a new adapter joins it, and beyond the
    arena's size the least recently used one that the step does not need leaves it."""
    from loraforge.serve import lora_batching
    from loraforge.serve.lora_batching import PerSegmentLora

    monkeypatch.setattr(lora_batching, "KERNEL_ARENA", 2)
    runner = _runner(tiny_model_dir, lora_kernel="native")
    loras = {
        n: load_lora(adapter_dirs[n], sha256_file(adapter_dirs[n] / "adapter_model.safetensors"), runner)
        for n in ("a1", "a2", "b1")
    }

    def step(names: list[str]) -> list[Any]:
        segments = [Segment(2 * i, 2 * i + 2, loras[n]) for i, n in enumerate(names)]
        plan = runner.lora_planner.plan(segments)
        x, before = torch.randn(2 * len(names), runner.hidden), torch.randn(2 * len(names), runner.hidden)
        fused, single = before.clone(), before.clone()
        plan(fused, x, 0, "o")
        PerSegmentLora(segments)(single, x, 0, "o")
        assert (fused - single).abs().max() < 1e-5
        return runner.lora_planner.arena_stacks

    first = step(["a1", "a2"])
    assert step(["a2"]) is first and step(["a2", "a1"]) is first  # other combinations: the same stack
    after = step(["b1", "a2"])  # b1 joins; a1, least recently used and not needed, leaves
    assert after is not first and [id(a) for a in runner.lora_planner.arena] == [id(loras["a2"]), id(loras["b1"])]
    step(["a1", "a2", "b1"])  # a step needs more adapters than the arena holds: all of them stay
    assert len(runner.lora_planner.arena) == 3
