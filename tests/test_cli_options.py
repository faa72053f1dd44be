"""The flags of `train`, `eval` and `serve`, made from the fields of their config dataclasses."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.main import get_command
from typer.testing import CliRunner

from loraforge.cli import app
from loraforge.cli.options import EVAL_FLAGS, SERVE_FLAGS, TRAIN_FLAGS, FlagSource, read_config_fields
from loraforge.evaluate import EvalConfig
from loraforge.serve.config import ServeConfig
from loraforge.train import TrainConfig
from tests.conftest import SAMPLES

CASES = [("train", TrainConfig, TRAIN_FLAGS), ("eval", EvalConfig, EVAL_FLAGS), ("serve", ServeConfig, SERVE_FLAGS)]


def _options(command: str) -> dict[str, Any]:
    """The options of a command, by parameter name (Typer's click objects)."""
    group: Any = get_command(app)
    return {p.name: p for p in group.commands[command].params if p.param_type_name == "option"}


@pytest.mark.parametrize(("command", "cls", "source"), CASES)
def test_every_field_is_a_flag_with_its_default_and_help(command: str, cls: type, source: FlagSource) -> None:
    options = _options(command)
    fields = dataclasses.fields(cls)
    flagged = [f for f in fields if f.name not in source.not_flags]
    assert set(source.not_flags) <= {f.name for f in fields}  # no stale exclusion
    for f in flagged:
        option = options[f.name]
        assert option.opts == [source.names.get(f.name, "--" + f.name.replace("_", "-"))]
        assert option.help, f.name
        if f.default is dataclasses.MISSING or f.default in ("", None):
            assert option.default is None, f.name
        else:
            assert option.default == f.default, f.name
        if isinstance(f.default, bool):
            assert option.is_flag and not option.secondary_opts  # --use-rslora, never --no-use-rslora


def test_the_source_reader_sees_what_the_import_sees() -> None:
    for _, cls, source in CASES:
        read = read_config_fields(source.module, source.class_name)
        assert [f.name for f in read] == [f.name for f in dataclasses.fields(cls)]


@pytest.mark.parametrize(
    ("command", "flag", "help_text"),
    [
        ("train", "use_rslora", "Scale by alpha/sqrt(r) instead of alpha/r (rank-stabilised LoRA)."),
        ("train", "validation", "Validation dataset; without it, validation_split of the training data is held out."),
        ("train", "lora_r", "LoRA rank."),  # no docstring yet: the help table of TRAIN_FLAGS
        ("eval", "policy", "Gate policy YAML (default: the shipped default.yaml)."),
        (
            "eval",
            "extraction_prefix",
            "k: answer tokens given to the model before it must continue a training example.",
        ),
        ("serve", "max_batch_size", "Rows decoded together in one step (each choice of each request is a row)."),
    ],
)
def test_help_comes_from_the_field_docstring(command: str, flag: str, help_text: str) -> None:
    assert _options(command)[flag].help == help_text


def test_existing_flag_spellings_are_kept() -> None:
    train = {o for p in _options("train").values() for o in p.opts}
    assert {"--max-steps", "--epochs", "--allow-unlicensed", "--allow-secrets", "--use-rslora", "--use-dora"} <= train
    assert {"--resume", "--lora-r", "--base-model", "--price-per-hour", "--pii", "--dedupe", "--canaries"} <= train
    evaluate = {o for p in _options("eval").values() for o in p.opts}
    assert {"--adapter", "--suites", "--gate", "--report", "--data", "--max-items", "--seed", "--threads"} <= evaluate
    assert {"--config", "--host", "--port", "--home"} <= {o for p in _options("serve").values() for o in p.opts}


def _capture_train(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    import loraforge.train

    seen: list[Any] = []
    monkeypatch.setattr(loraforge.train, "train", lambda cfg, **kw: seen.append(cfg))
    return seen


def test_a_train_flag_beats_the_yaml_and_the_yaml_beats_the_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = _capture_train(monkeypatch)
    cfg = tmp_path / "c.yaml"
    data = SAMPLES / "support.jsonl"
    cfg.write_text(f"data: {data}\noutput: {tmp_path / 'o'}\nlora_r: 4\nseq_len: 128\nmax_steps: 9\nresume: true\n")
    result = CliRunner().invoke(app, ["train", "--config", str(cfg), "--lora-r", "8", "--epochs", "2"])
    assert result.exit_code == 0, result.output
    [c] = seen
    assert (c.lora_r, c.seq_len, c.learning_rate) == (8, 128, 1e-3)
    assert (c.epochs, c.max_steps, c.resume) == (2.0, None, True)  # --epochs beats the YAML's max_steps


def test_a_new_train_flag_reaches_the_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _capture_train(monkeypatch)
    args = ["train", "--data", str(SAMPLES / "support.jsonl"), "--output", str(tmp_path / "o")]
    result = CliRunner().invoke(app, [*args, "--warmup-ratio", "0.25", "--threads", "2", "--use-dora"])
    assert result.exit_code == 0, result.output
    assert [(c.warmup_ratio, c.threads, c.use_dora) for c in seen] == [(0.25, 2, True)]


def _capture_eval(monkeypatch: pytest.MonkeyPatch) -> list[EvalConfig]:
    import loraforge.evaluate

    seen: list[EvalConfig] = []

    def fake_evaluate(config: EvalConfig, **kw: Any) -> None:
        seen.append(config)
        raise typer.Exit(0)

    monkeypatch.setattr(loraforge.evaluate, "evaluate", fake_evaluate)
    return seen


def test_eval_config_file_with_flags_winning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _capture_eval(monkeypatch)
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(
        f"adapter: {tmp_path / 'a'}\nsuites: [safety, task]\npolicy: {tmp_path / 'gate.yaml'}\n"
        "seed: 3\nsizes: {mmlu: 5, harmful: 30}\nwrite_manifest: false\n"
    )
    runner = CliRunner()
    assert runner.invoke(app, ["eval", "--config", str(cfg), "--seed", "7"]).exit_code == 0
    assert runner.invoke(app, ["eval", "--config", str(cfg), "--suites", "bias", "--max-items", "10"]).exit_code == 0
    first, capped = seen
    assert first.adapter == tmp_path / "a" and first.policy == tmp_path / "gate.yaml"
    assert (first.suites, first.seed, first.write_manifest) == (("task", "safety"), 7, False)
    assert (first.sizes["mmlu"], first.sizes["harmful"], first.sizes["bbq"]) == (5, 30, 100)
    assert (capped.suites, capped.seed) == (("bias",), 3)
    assert (capped.sizes["mmlu"], capped.sizes["harmful"], capped.sizes["bbq"]) == (5, 10, 10)


@pytest.mark.parametrize(
    ("yaml_text", "needle"),
    [
        ("adapter: a\nseeed: 3\n", "unknown key(s) 'seeed' (did you mean 'seed'?)"),
        ("adapter: a\nseed: three\n", "seed: expected int, got 'three'"),
        ("seed: 3\n", "no adapter: pass --adapter DIR or set `adapter:` in"),
        ("adapter: a\nsizes: 5\n", "sizes: expected a mapping"),
    ],
)
def test_eval_config_mistakes_are_one_clear_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], yaml_text: str, needle: str
) -> None:
    from loraforge.cli import main

    cfg = tmp_path / "eval.yaml"
    cfg.write_text(yaml_text)
    monkeypatch.setattr("sys.argv", ["loraforge", "eval", "--config", str(cfg)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 1
    err = " ".join(capsys.readouterr().err.split())
    assert needle in err and "Traceback" not in err


def test_eval_without_adapter_or_config_is_a_usage_error() -> None:
    result = CliRunner().invoke(app, ["eval"])
    assert result.exit_code == 2 and "Missing option '--adapter'" in result.output


def test_serve_flags_beat_the_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import loraforge.serve.server

    seen: list[ServeConfig] = []
    monkeypatch.setattr(loraforge.serve.server, "run_server", lambda cfg, home: seen.append(cfg))
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("port: 9000\nmax_batch_size: 4\n")
    args = ["serve", "--config", str(cfg), "--max-batch-size", "2", "--admin-endpoints", "--home", str(tmp_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert [(c.port, c.max_batch_size, c.admin_endpoints, c.host) for c in seen] == [(9000, 2, True, "127.0.0.1")]


def test_building_the_commands_loads_no_pytorch() -> None:
    code = (
        "import sys, loraforge.cli, typer.main; typer.main.get_command(loraforge.cli.app); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"
