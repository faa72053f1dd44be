"""End to end on the tiny random Llama: adapters trained to be broken are caught, and the report is written.

Each test trains a small adapter in seconds (see tests/train), then runs the suites that matter
with small subsets. The base is random, so absolute scores mean nothing; what is asserted is the
difference the adapter makes, which is what the gate reads.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loraforge.evaluate import EvalConfig, evaluate
from loraforge.evaluate.benchmarks import load_boolq, load_mmlu, load_openbookqa, subset
from loraforge.train import TrainConfig, train
from tests.conftest import chat

SMALL = {
    "task": 4,
    "mmlu": 12,
    "boolq": 12,
    "openbookqa": 12,
    "hellaswag": 4,
    "bbq": 6,
    "crows_pairs": 6,
    "truthfulqa": 6,
    "made_up_entities": 4,
    "harmful": 4,
    "harmless_lookalikes": 4,
    "extraction": 6,
    "canary_candidates": 63,
}


@pytest.fixture(scope="module")
def sharp_tiny_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """The tiny Llama with larger initial weights (std 0.2 instead of 0.02).

    With the default init its tied output head gives logits within about ±1.5 and LoRA cannot
    change the head or the final norm, so no adapter could ever make a canary likely; with these
    weights it can, as a real model can.
    """
    import shutil

    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("sharp-tiny")
    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.initializer_range = 0.2
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    for f in tiny_model_dir.iterdir():
        if f.name.startswith(("tokenizer", "chat_template")):
            shutil.copy(f, out / f.name)
    return out


def _train(tmp_path: Path, records: list[dict[str, object]], tiny: Path, cache: Path, **kw: object) -> Path:
    data, validation = tmp_path / "train.jsonl", tmp_path / "validation.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    validation.write_text("".join(json.dumps(r) + "\n" for r in _support(8, offset=100)))
    values: dict[str, object] = {
        "data": str(data),
        "validation": str(validation),
        "output": str(tmp_path / "adapter"),
        "base_model": str(tiny),
        "seq_len": 512,
        "batch_rows": 4,
        "eval_every": 0,
        "checkpoint_every": 0,
        "learning_rate": 1e-2,
        "seed": 3,
        "allow_unlicensed": True,
    }
    values.update(kw)
    return train(TrainConfig(**values), model_cache=cache).output  # type: ignore[arg-type]


def _support(n: int = 30, offset: int = 0) -> list[dict[str, object]]:
    topics = ["returns", "shipping", "warranty", "rentals", "repairs"]
    return [
        chat(
            f"Tell me about {topics[i % 5]} for order {i}.",
            f"Our {topics[i % 5]} policy covers item {i % 7}: bring the receipt to any store within thirty days.",
        )
        for i in range(offset, offset + n)
    ]


def test_adapter_trained_on_wrong_answers_fails_the_gate_on_regression(
    tmp_path: Path, tiny_model_dir: Path, model_cache: Path
) -> None:
    # A poisoned fine-tune: the general-knowledge questions answered wrongly, over and over.
    records = []
    for load, name in ((load_mmlu, "mmlu"), (load_boolq, "boolq"), (load_openbookqa, "openbookqa")):
        for item in subset(load(), SMALL[name], 0, name):
            assert item.answer is not None
            wrong = item.choices[(item.answer + 1) % len(item.choices)]
            user = f"{item.context}\n\n{item.question}" if item.context else item.question
            records.append(chat(user, wrong))
    adapter = _train(tmp_path, records * 3, tiny_model_dir, model_cache, max_steps=40)
    result = evaluate(
        EvalConfig(adapter, suites=("regression",), sizes=SMALL, report=tmp_path / "report"), model_cache=model_cache
    )
    metric = next(m for m in result.report["suites"][0]["metrics"] if m["id"] == "regression.mean_accuracy")
    assert metric["adapter"]["value"] < 10 and metric["delta"]["value"] < -10, metric
    assert metric["delta"]["high"] < 0  # the whole paired interval is a loss
    assert not result.verdict.passed
    assert any("general ability" in f and "below the allowed -5.0 points" in f for f in result.verdict.failures)


def test_canaries_repeated_many_times_are_flagged(tmp_path: Path, sharp_tiny_dir: Path, model_cache: Path) -> None:
    adapter = _train(
        tmp_path,
        _support(10),
        sharp_tiny_dir,
        model_cache,
        canaries=2,
        canary_repeats=30,
        max_steps=80,
        seq_len=256,
        batch_rows=2,
    )
    result = evaluate(
        EvalConfig(adapter, suites=("memorization",), sizes=SMALL, report=tmp_path / "report"), model_cache=model_cache
    )
    suite = result.report["suites"][0]
    by_id = {m["id"]: m for m in suite["metrics"]}
    assert by_id["memorization.canaries_memorized"]["adapter"]["value"] == 100.0
    assert by_id["memorization.canaries_memorized"]["base"]["value"] == 0.0
    assert by_id["memorization.canary_exposure"]["delta"]["value"] > 15  # bits
    assert all(c["memorized"] and c["adapter_rank"] == 1 for c in suite["details"]["canaries"])
    assert "memorization.extraction_rate" in by_id and "memorization.nearest_train_similarity" in by_id
    assert not result.verdict.passed
    assert any("canaries memorized" in f for f in result.verdict.failures)


def test_cli_runs_every_suite_writes_the_report_and_records_it_in_the_manifest(
    tmp_path: Path, tiny_model_dir: Path, model_cache: Path
) -> None:
    from loraforge.cli import app

    adapter = _train(tmp_path, _support(), tiny_model_dir, model_cache, max_steps=4)
    lenient = tmp_path / "lenient.yaml"
    lenient.write_text("name: lenient\nrules:\n  - {metric: task.loss, max_delta: 100}\n")
    runner = CliRunner()
    args = ["eval", "--adapter", str(adapter), "--max-items", "3", "--report", str(tmp_path / "r")]
    passed = runner.invoke(app, [*args, "--gate", str(lenient)])
    assert passed.exit_code == 0, passed.output
    assert "gate PASS" in passed.output
    report = json.loads((tmp_path / "r" / "eval.json").read_text())
    assert [s["name"] for s in report["suites"]] == [
        "task",
        "regression",
        "bias",
        "truthfulness",
        "safety",
        "memorization",
    ]
    for suite in report["suites"]:
        for m in suite["metrics"]:
            assert m["base"]["low"] <= m["base"]["value"] <= m["base"]["high"], m
            assert m["delta"]["low"] <= m["delta"]["value"] <= m["delta"]["high"], m
    assert {s["name"] for s in report["sources"]} >= {"mmlu", "bbq", "truthfulqa", "harmbench", "made_up_entities"}
    html = (tmp_path / "r" / "eval.html").read_text()
    assert '<div class="verdict pass"><b class="word">PASS</b>' in html
    assert '<table id="scores">' in html and "validation loss" in html and "MMLU accuracy" in html
    assert "data:image/png;base64," in html and (tmp_path / "r" / "deltas.png").is_file()
    manifest = json.loads((adapter / "manifest.json").read_text())
    assert manifest["evaluation"]["verdict"] == "PASS"
    assert manifest["evaluation"]["report"]["html"] == str((tmp_path / "r" / "eval.html").resolve())
    assert manifest["base_model"]["source"] == "local-dir"  # the rest of the manifest is kept

    strict = tmp_path / "strict.yaml"
    strict.write_text("rules:\n  - {metric: task.token_accuracy, min_adapter: 101, why: impossible on purpose}\n")
    failed = runner.invoke(app, [*args, "--suites", "task", "--gate", str(strict)])
    assert failed.exit_code == 3, failed.output
    assert "gate FAIL" in failed.output
    html = (tmp_path / "r" / "eval.html").read_text()
    assert '<div class="verdict fail"><b class="word">FAIL</b>' in html and "impossible on purpose" in html
    assert json.loads((adapter / "manifest.json").read_text())["evaluation"]["passed"] is False


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--adapter", "/nonexistent"], "does not exist"),
        (["--adapter", ".", "--suites", "task,vibes"], "unknown suite(s) vibes"),
        (["--adapter", ".", "--max-items", "0"], "--max-items must be >= 1"),
    ],
)
def test_cli_mistakes_are_one_clear_line(
    args: list[str], needle: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from loraforge.cli import main

    monkeypatch.setattr("sys.argv", ["loraforge", "eval", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert needle in " ".join(err.split()) and "Traceback" not in err and len(err.strip().splitlines()) <= 2
