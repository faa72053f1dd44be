"""The evaluation report shows the adapter's governance exceptions first: eval.html, eval.json, the console."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from loraforge.evaluate.report import render_html
from loraforge.train import TrainConfig, train
from tests.conftest import chat


def _report(flags: list[dict[str, str]]) -> dict[str, object]:
    """The smallest report the template renders: no suite ran."""
    return {
        "adapter": {"name": "support", "path": "/a/support"},
        "base_model": {"name": "tiny", "sha256": "0" * 64},
        "created": "2026-01-01T00:00:00+00:00",
        "timing": {"total_seconds": 1.0},
        "governance_flags": flags,
        "gate": {"passed": True, "verdict": "PASS", "failures": [], "passes": [], "unchecked": []},
        "policy": {"name": "default"},
        "suites": [],
        "sources": [],
    }


def test_the_warning_box_lists_each_flag_before_the_verdict() -> None:
    flags = [
        {"flag": "allow_secrets", "detail": "Trained with --allow-secrets: 2 secrets <kept>."},
        {"flag": "non_default_policy", "detail": "Licences were judged by the policy 'lenient'."},
    ]
    html = render_html(_report(flags), None)
    box = html.index('<div class="flags" id="governance-flags" role="alert">')
    assert box < html.index('<div class="verdict pass">')
    assert "this adapter was trained with 2 of them" in html
    assert "<li><code>allow_secrets</code> Trained with --allow-secrets: 2 secrets &lt;kept&gt;.</li>" in html
    assert "<code>non_default_policy</code>" in html
    assert 'id="governance-flags"' not in render_html(_report([]), None)


def test_loraforge_eval_shows_the_flags_of_an_adapter_trained_with_allow_unlicensed(
    tmp_path: Path, write_jsonl, tiny_model_dir: Path, model_cache: Path
) -> None:  # type: ignore[no-untyped-def]
    from loraforge.cli import app

    records = [chat(f"Question {i} about returns?", f"Bring the receipt within {i + 10} days.") for i in range(20)]
    cfg = TrainConfig(
        data=str(write_jsonl(records)),
        output=str(tmp_path / "adapter"),
        base_model=str(tiny_model_dir),
        max_steps=1,
        seq_len=256,
        eval_every=0,
        checkpoint_every=0,
        allow_unlicensed=True,
    )
    adapter = train(cfg, model_cache=model_cache).output
    manifest = json.loads((adapter / "manifest.json").read_text())
    assert [f["flag"] for f in manifest["governance_flags"]] == ["allow_unlicensed"]
    out, lenient = tmp_path / "r", tmp_path / "lenient.yaml"
    lenient.write_text("name: lenient\nrules:\n  - {metric: task.loss, max_delta: 100}\n")
    args = ["eval", "--adapter", str(adapter), "--suites", "task", "--max-items", "2", "--report", str(out)]
    result = CliRunner().invoke(app, [*args, "--gate", str(lenient)])
    assert result.exit_code == 0, result.output
    assert "governance exceptions (1)" in result.output and "allow_unlicensed: Trained with --allow-unlicensed" in (
        " ".join(result.output.split())
    )
    assert json.loads((out / "eval.json").read_text())["governance_flags"] == manifest["governance_flags"]
    html = (out / "eval.html").read_text()
    assert '<div class="flags" id="governance-flags" role="alert">' in html and "<code>allow_unlicensed</code>" in html
