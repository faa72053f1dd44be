"""Training on a tiny random Llama: the files it writes, PEFT interop, resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loraforge.data.drift import read_profile
from loraforge.train import TrainConfig, train
from tests.conftest import SAMPLES, chat


def _records(n: int = 40) -> list[dict[str, object]]:
    topics = ["returns", "shipping", "warranty", "rentals", "repairs"]
    return [
        chat(
            f"Tell me about {topics[i % 5]} for order {i}.",
            f"Our {topics[i % 5]} policy is simple: item {i % 7}.",
        )
        for i in range(n)
    ]


def _config(tmp_path: Path, data: Path, tiny: Path, **kw: object) -> TrainConfig:
    values: dict[str, object] = {
        "data": str(data),
        "output": str(tmp_path / "out"),
        "base_model": str(tiny),
        "max_steps": 6,
        "seq_len": 256,
        "context_length": 256,
        "batch_rows": 2,
        "eval_every": 3,
        "checkpoint_every": 0,
        "learning_rate": 5e-3,
        "seed": 7,
        "allow_unlicensed": True,
    }
    values.update(kw)
    return TrainConfig(**values)  # type: ignore[arg-type]


def test_training_writes_peft_adapter_manifest_metrics_and_plot(
    tmp_path: Path,
    write_jsonl,
    tiny_model_dir: Path,
    model_cache: Path,  # type: ignore[no-untyped-def]
) -> None:
    cfg = _config(tmp_path, write_jsonl(_records()), tiny_model_dir, max_steps=12, eval_every=4)
    result = train(cfg, model_cache=model_cache)
    out = result.output
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "manifest.json",
        "metrics.jsonl",
        "loss.png",
        "input_profile.json",
    ):
        assert (out / name).is_file(), name
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    profile = read_profile(out)  # what the server watches input drift against
    assert profile is not None and profile.prompts == 40
    assert not profile.unfamiliar("Tell me about shipping for order 3.")
    assert profile.unfamiliar("Which galaxy is closest to the Milky Way?")
    assert json.loads((out / "manifest.json").read_text())["files"]["input_profile"] == "input_profile.json"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(train_losses) == 12
    assert [r["step"] for r in records if r["kind"] == "eval"] == [4, 8, 12]
    assert sum(train_losses[-3:]) < sum(train_losses[:3])  # it learns
    accuracies = [r["accuracy"] for r in records if r["kind"] == "train"]
    assert all(0.0 <= a <= 1.0 for a in accuracies) and sum(accuracies[-3:]) > sum(accuracies[:3])
    assert all(0.0 <= r["val_accuracy"] <= 1.0 for r in records if r["kind"] == "eval")
    m = json.loads((out / "manifest.json").read_text())
    assert m["base_model"]["sha256"] and m["base_model"]["source"] == "local-dir"
    assert m["datasets"][0]["sha256"] and m["datasets"][0]["examples"] == 40
    assert m["config"]["lora_r"] == 16 and m["config"]["max_steps"] == 12
    assert m["metrics"]["final_train_loss"] == train_losses[-1]
    assert {"torch", "transformers", "peft", "accelerate"} <= set(m["libraries"])
    assert m["actual"]["tokens"] > 0 and m["estimate"]["seconds"] > 0 and "cost" in m
    assert m["split"] == {
        "train_examples": 36,
        "validation_examples": 4,
        "validation": "held out 10% (seed 7)",
    }
    # no pickle anywhere in the output
    assert not [p for p in out.rglob("*") if p.suffix in {".bin", ".pt", ".pkl"}]


def test_adapter_loads_in_plain_peft_with_equal_logits(
    tmp_path: Path,
    write_jsonl,
    tiny_model_dir: Path,
    model_cache: Path,  # type: ignore[no-untyped-def]
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loraforge.models.generate import load_chat_model

    cfg = _config(tmp_path, write_jsonl(_records()), tiny_model_dir, max_steps=4)
    out = train(cfg, model_cache=model_cache).output
    ids = torch.tensor([[1, 520, 33, 4096, 77, 2, 1, 9]])
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(out)).eval()
    ours = load_chat_model(model_cache, adapter=out).model
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        a = plain(input_ids=ids).logits
        b = ours(input_ids=ids).logits
        c = base(input_ids=ids).logits
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    assert (a - c).abs().max() > 1e-3  # the adapter is not a no-op


def test_rslora_dora_and_targets(tmp_path: Path, write_jsonl, tiny_model_dir: Path, model_cache: Path) -> None:  # type: ignore[no-untyped-def]
    cfg = _config(
        tmp_path,
        write_jsonl(_records()),
        tiny_model_dir,
        max_steps=2,
        use_rslora=True,
        use_dora=True,
        target_modules=["q_proj", "v_proj"],
    )
    out = train(cfg, model_cache=model_cache).output
    adapter_cfg = json.loads((out / "adapter_config.json").read_text())
    assert adapter_cfg["use_rslora"] and adapter_cfg["use_dora"]
    assert sorted(adapter_cfg["target_modules"]) == ["q_proj", "v_proj"]


def test_rising_validation_loss_warns(tmp_path: Path, write_jsonl, tiny_model_dir: Path, model_cache: Path) -> None:  # type: ignore[no-untyped-def]
    train_path = write_jsonl([chat(f"Say the code {i}", "alpha beta gamma") for i in range(20)], "t.jsonl")
    val_path = write_jsonl([chat(f"Say the code {i}", "zeta eta theta iota") for i in range(5)], "v.jsonl")
    cfg = _config(
        tmp_path,
        train_path,
        tiny_model_dir,
        validation=str(val_path),
        max_steps=12,
        eval_every=2,
        learning_rate=2e-2,
    )
    result = train(cfg, model_cache=model_cache)
    assert any("validation loss rose" in w for w in result.warnings)
    assert json.loads((result.output / "manifest.json").read_text())["warnings"] == result.warnings


def test_refuses_bad_data_and_reused_output(
    tmp_path: Path, write_jsonl, tiny_model_dir: Path, model_cache: Path
) -> None:  # type: ignore[no-untyped-def]
    from loraforge.errors import CheckpointError, DataError

    bad = write_jsonl([*_records(12), {"messages": "nope"}], "bad.jsonl")
    with pytest.raises(DataError, match=r"bad\.jsonl:13: messages"):
        train(_config(tmp_path, bad, tiny_model_dir), model_cache=model_cache)
    good = write_jsonl(_records(), "good.jsonl")
    train(_config(tmp_path, good, tiny_model_dir, max_steps=1), model_cache=model_cache)
    with pytest.raises(CheckpointError, match="--resume"):
        train(_config(tmp_path, good, tiny_model_dir, max_steps=1), model_cache=model_cache)


_KILLER = """
import os, signal, sys
import loraforge.train.recipe as recipe
from loraforge import files as _atomic
real_save = recipe.save_checkpoint
def save(output, step, *a, **k):
    if step == int(os.environ["KILL_INSIDE_STEP"]):
        # die half-way through writing this checkpoint: adapter written, rename never happens
        real_rename = _atomic.os.replace
        def boom(src, dst):
            os.kill(os.getpid(), signal.SIGKILL)
        _atomic.os.replace = boom
    return real_save(output, step, *a, **k)
recipe.save_checkpoint = save
from loraforge.cli import main
sys.argv = ["loraforge", *sys.argv[1:]]
main()
"""


def test_resume_after_sigkill_matches_straight_run(
    tmp_path: Path,
    write_jsonl,
    tiny_model_dir: Path,
    model_cache: Path,  # type: ignore[no-untyped-def]
) -> None:
    data = write_jsonl(_records())
    args = [
        "train",
        "--data",
        str(data),
        "--base-model",
        str(tiny_model_dir),
        "--max-steps",
        "8",
        "--seq-len",
        "256",
        "--batch-rows",
        "2",
        "--eval-every",
        "0",
        "--checkpoint-every",
        "2",
        "--allow-unlicensed",
        "--learning-rate",
        "0.005",
        "--seed",
        "3",
        "--lora-dropout",
        "0.1",
    ]
    env = {**os.environ, "KILL_INSIDE_STEP": "6"}
    straight = tmp_path / "straight"
    subprocess.run(
        [sys.executable, "-m", "loraforge", *args, "--output", str(straight)],
        check=True,
        env=env,
        capture_output=True,
    )

    killed = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", _KILLER, *args, "--output", str(killed)], env=env, capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    ckpts = killed / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step-")) == [
        "step-000002",
        "step-000004",
    ]
    assert any(p.name.startswith(".tmp-step-000006") for p in ckpts.iterdir())  # the half-written one
    assert not (killed / "manifest.json").exists()

    resumed = subprocess.run(
        [sys.executable, "-m", "loraforge", *args, "--output", str(killed), "--resume"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming at step 4 of 8" in resumed.stdout
    a = load_file(str(straight / "adapter_model.safetensors"))
    b = load_file(str(killed / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    lines = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["kind"] == "train"] == list(range(1, 9))
    assert not any(p.name.startswith(".tmp-") for p in ckpts.iterdir())


def test_resume_refuses_other_run_and_missing_checkpoint(
    tmp_path: Path,
    write_jsonl,
    tiny_model_dir: Path,
    model_cache: Path,  # type: ignore[no-untyped-def]
) -> None:
    from loraforge.errors import CheckpointError

    data = write_jsonl(_records())
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        train(_config(tmp_path, data, tiny_model_dir, resume=True), model_cache=model_cache)
    train(_config(tmp_path, data, tiny_model_dir, max_steps=4, checkpoint_every=2), model_cache=model_cache)
    with pytest.raises(CheckpointError, match="finished run"):
        train(
            _config(tmp_path, data, tiny_model_dir, max_steps=4, checkpoint_every=2, resume=True),
            model_cache=model_cache,
        )
    (tmp_path / "out" / "manifest.json").unlink()  # as if killed after the checkpoint at step 2
    with pytest.raises(CheckpointError, match="different data or settings"):
        train(
            _config(tmp_path, data, tiny_model_dir, max_steps=4, checkpoint_every=2, lora_r=4, resume=True),
            model_cache=model_cache,
        )


def test_sample_dataset_is_valid_and_licensed(tokenizer) -> None:  # type: ignore[no-untyped-def]
    import yaml

    from loraforge.data.validate import check_dataset

    for name, n in (("support.jsonl", 220), ("support_holdout.jsonl", 30)):
        report = check_dataset(SAMPLES / name, tokenizer)
        assert len(report.examples) == n
        assert not report.errors
        manifest = yaml.safe_load((SAMPLES / name.replace(".jsonl", ".manifest.yaml")).read_text())
        assert manifest["sources"][0]["path"] == name and manifest["sources"][0]["license"]


def test_bf16_base_keeps_lora_and_optimizer_in_fp32(
    tmp_path: Path,
    write_jsonl,
    tiny_model_dir: Path,
    model_cache: Path,  # type: ignore[no-untyped-def]
) -> None:
    from loraforge.models.packed_attention import register_packed_attention
    from loraforge.models.precision import resolve_precision
    from loraforge.models.sources import load_model, resolve_base_model
    from loraforge.train.lora import add_lora

    model = load_model(
        resolve_base_model(str(tiny_model_dir), model_cache),
        dtype=resolve_precision("bf16", torch.device("cpu")),
        attn_implementation=register_packed_attention(),
    )
    peft_model = add_lora(
        model, r=4, alpha=8, dropout=0.0, target_modules="all-linear", use_rslora=False, use_dora=False
    )
    frozen = {p.dtype for p in peft_model.parameters() if not p.requires_grad}
    trainable = {p.dtype for p in peft_model.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trainable == {torch.float32}
    cfg = _config(tmp_path, write_jsonl(_records()), tiny_model_dir, max_steps=2, precision="bf16", grad_accum=2)
    result = train(cfg, model_cache=model_cache)
    assert result.manifest is not None
    assert result.manifest.precision == {"base": "bfloat16", "adapter": "float32", "optimizer": "float32"}
    saved = load_file(str(result.output / "adapter_model.safetensors"))
    assert {t.dtype for t in saved.values()} == {torch.float32}
    # two micro-batches per step: twice the tokens of a grad_accum=1 step
    steps = [json.loads(x) for x in (result.output / "metrics.jsonl").read_text().splitlines()]
    assert steps[0]["tokens"] > 256


def test_auto_precision_is_fp32_without_fast_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    from loraforge.models import precision as lora

    monkeypatch.setattr(lora, "fast_bf16_available", lambda device: False)
    assert lora.resolve_precision("auto", torch.device("cpu")) == torch.float32
    monkeypatch.setattr(lora, "fast_bf16_available", lambda device: True)
    assert lora.resolve_precision("auto", torch.device("cpu")) == torch.bfloat16
    assert lora.resolve_precision("fp32", torch.device("cpu")) == torch.float32


# A key of the shape secrets_scan knows (OpenAI project key); made up for the test, not a real one.
FAKE_KEY = "sk-proj-" + "Zx8Qk2Lm9Pw4Rt7Yb3Nc5Vd1Hf0GjT6"


@pytest.mark.parametrize("allow_secrets", [False, True])
def test_secrets_are_not_trained_on_under_pii_report_unless_allowed(
    tmp_path: Path,
    write_jsonl,
    tiny_model_dir: Path,
    model_cache: Path,
    tokenizer,
    monkeypatch: pytest.MonkeyPatch,
    allow_secrets: bool,  # type: ignore[no-untyped-def]
) -> None:
    import loraforge.train.schedule as schedule

    records = _records(16)
    for i in (1, 5, 9, 13):  # four examples quote the key, next to an email address (personal data)
        records[i] = chat(f"My API key is {FAKE_KEY}, mail maria@example.com if step {i} fails.", f"Noted, step {i}.")
    data = write_jsonl(records)
    # a licence manifest, so that allow_secrets is the only exception the run can take
    (tmp_path / "data.manifest.yaml").write_text(
        "sources:\n  - path: data.jsonl\n    license: MIT\n    owner: Brightpath Bikes\n    personal_data: true\n"
    )
    packed: list[str] = []  # the text of every example the loop packs: training and validation rows

    def spy(examples, *args, **kwargs):  # type: ignore[no-untyped-def]
        packed.extend(tokenizer.decode(t.input_ids) for t in examples)
        return real_pack(examples, *args, **kwargs)

    real_pack = schedule.pack_examples
    monkeypatch.setattr(schedule, "pack_examples", spy)
    cfg = _config(
        tmp_path,
        data,
        tiny_model_dir,
        max_steps=1,
        eval_every=0,
        allow_unlicensed=False,
        pii="report",
        allow_secrets=allow_secrets,
        validation_split=0.25,
    )
    typed = train(cfg, model_cache=model_cache).manifest
    assert typed is not None
    manifest = typed.to_json()
    assert len(packed) == 16
    text = "\n".join(packed)
    assert text.count("maria@example.com") == 4  # pii: report keeps personal data either way
    secrets = manifest["data_governance"]["secrets"]
    assert secrets["found"] + secrets["validation_found"] == 4
    if allow_secrets:
        assert text.count(FAKE_KEY) == 4
        assert secrets["handling"] == "kept" and secrets["redacted"] + secrets["validation_redacted"] == 0
        assert [f["flag"] for f in manifest["governance_flags"]] == ["allow_secrets"]
    else:
        assert FAKE_KEY not in text and "sk-proj" not in text
        assert text.count("My API key is <SECRET_OPENAI_KEY_1>, mail maria@example.com") == 4
        assert secrets["handling"] == "redacted" and secrets["redacted"] + secrets["validation_redacted"] == 4
        assert manifest["governance_flags"] == []
    assert secrets["allow_secrets"] is allow_secrets
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk["governance_flags"] == manifest["governance_flags"]
    assert on_disk["config"]["allow_secrets"] is allow_secrets
