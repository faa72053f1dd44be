"""The CLI as a user meets it: exit codes, one-line errors, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import SAMPLES, chat


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "loraforge", *args], capture_output=True, text=True, timeout=300)


def test_data_check_ok_on_sample() -> None:
    r = _run("data", "check", str(SAMPLES / "support.jsonl"))
    assert r.returncode == 0, r.stderr
    assert "OK: ready to train" in r.stdout and "suggested epochs" in r.stdout


def test_data_check_lists_every_problem_and_exits_1(tmp_path: Path) -> None:
    good = [json.dumps(chat(f"q{i}", f"a{i}")) for i in range(12)]
    bad = ['{"messages": [{"role": "robot", "content": "x"}]}', "{oops", '{"messages": []}']
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(good[:5] + bad + good[5:]) + "\n")
    r = _run("data", "check", str(path), "--json", "--allow-unlicensed")
    assert r.returncode == 1
    payload = json.loads(r.stdout)
    assert not payload["ok"]
    assert [(p["line"], p["code"]) for p in payload["problems"] if p["severity"] == "error"] == [
        (6, "unrecognized_role"),
        (7, "invalid_json"),
        (8, "missing_messages_list"),
    ]
    human = _run("data", "check", str(path), "--allow-unlicensed")
    assert f"{path}:6: messages[0].role: role 'robot'" in human.stdout.replace("\n", "")
    assert "Traceback" not in human.stdout + human.stderr


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["train", "--output", "x"], "no training data"),
        (
            ["train", "--data", "a", "--output", "b", "--max-steps", "3", "--epochs", "2"],
            "either --max-steps or --epochs",
        ),
        (["train", "--data", "a", "--output", "b", "--lora-r", "0"], "lora_r must be > 0"),
        (["train", "--data", "a", "--output", "b", "--base-model", "gpt-9"], "neither a known model"),
        (["generate", "--prompt", "hi", "--adapter", "/nonexistent"], "does not exist"),
        (["data", "check", "/nonexistent.jsonl"], "no such file"),
    ],
)
def test_user_mistakes_get_one_clear_line(args: list[str], needle: str) -> None:
    r = _run(*args)
    assert r.returncode == 1
    out = (r.stdout + r.stderr).replace("\n", " ")
    assert needle in out
    assert "Traceback" not in out


def test_train_config_unknown_key(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: a.jsonl\noutput: o\nepocs: 3\n")
    r = _run("train", "--config", str(cfg))
    assert r.returncode == 1 and "did you mean 'epochs'" in r.stderr.replace("\n", " ")


def test_generate_with_tiny_adapter_free_base(tiny_model_dir: Path) -> None:
    r = _run("generate", "--base-model", str(tiny_model_dir), "--prompt", "Hello", "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr


def test_markup_like_text_in_data_is_printed_verbatim(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    records = [chat(f"q{i}", f"a{i}") for i in range(10)] + [
        {"messages": [{"role": "[/bold]", "content": "x"}, {"role": "assistant", "content": "y"}]}
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    r = _run("data", "check", str(path))
    assert r.returncode == 1
    out = r.stdout.replace("\n", "")
    assert "role '[/bold]' is not one of" in out and "[unrecognized_role]" in out
    assert "Traceback" not in r.stdout + r.stderr


def test_output_that_is_a_file_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "file.txt"
    target.write_text("x")
    r = _run("train", "--data", str(SAMPLES / "support.jsonl"), "--output", str(target), "--max-steps", "1")
    assert r.returncode == 1 and "is a file" in r.stderr.replace("\n", " ")


def test_data_redact_writes_a_valid_redacted_copy(tmp_path: Path) -> None:
    src = tmp_path / "d.jsonl"
    records = [chat(f"q{i}", f"a{i}") for i in range(10)] + [
        chat("I am Maria Garcia, maria@example.com", "Hi Maria Garcia!")
    ]
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "red.jsonl"
    r = _run("data", "redact", str(src), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "EMAIL" in r.stdout and "1 redacted" in r.stdout
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert lines[-1]["messages"][0]["content"] == "I am <PERSON_1>, <EMAIL_1>"
    assert lines[-1]["messages"][1]["content"] == "Hi <PERSON_1>!"
    assert _run("data", "check", str(out), "--allow-unlicensed").returncode == 0
    same = _run("data", "redact", str(src), "--out", str(src))
    assert same.returncode == 1 and "never overwritten" in same.stderr.replace("\n", " ")


def test_data_check_reports_contamination(tmp_path: Path) -> None:
    train_path = tmp_path / "t.jsonl"
    train_path.write_text(
        "".join(
            json.dumps(chat(f"What is the return window for item {i}?", f"It is thirty days for item {i}, unused."))
            + "\n"
            for i in range(12)
        )
    )
    eval_path = tmp_path / "e.jsonl"
    eval_path.write_text(
        json.dumps(chat("What is the return window for item 3?", "It is thirty days for item 3, if unused.")) + "\n"
    )
    r = _run("data", "check", str(train_path), "--against", str(eval_path), "--allow-unlicensed", "--json")
    payload = json.loads(r.stdout)
    assert payload["governance"]["contamination"]["overlapping"] == 1
    bad = _run("data", "check", str(train_path), "--against", str(tmp_path / "typo.jsonl"), "--allow-unlicensed")
    assert bad.returncode == 1 and "cannot be read" in bad.stderr.replace("\n", " ")
    assert any(p["code"] == "contamination" and p["line"] == 1 for p in payload["problems"])


@pytest.mark.parametrize(("flags", "allowed"), [([], False), (["--allow-secrets"], True)])
def test_train_allow_secrets_flag_reaches_the_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flags: list[str], allowed: bool
) -> None:
    from typer.testing import CliRunner

    import loraforge.train
    from loraforge.cli import app

    seen = []
    monkeypatch.setattr(loraforge.train, "train", lambda cfg, **kw: seen.append(cfg))
    args = ["train", "--data", str(SAMPLES / "support.jsonl"), "--output", str(tmp_path / "o"), *flags]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert [c.allow_secrets for c in seen] == [allowed]
