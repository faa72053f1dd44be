"""The gate policy: parsing with clear errors, and verdicts in plain words."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraforge.errors import EvalError
from loraforge.evaluate.gate import DEFAULT_POLICY, judge, load_policy
from loraforge.evaluate.harness import Metric, compare


def _metric(id: str, base: list[float], adapter: list[float], unit: str = "%") -> Metric:
    return compare(id, id.split(".")[1].replace("_", " "), base, adapter, unit=unit)


def test_default_policy_loads() -> None:
    policy = load_policy(None)
    assert policy.path == str(DEFAULT_POLICY)
    ids = {r.metric for r in policy.rules}
    assert {"task.token_f1", "regression.mean_accuracy", "safety.refusal_rate", "memorization.extraction_rate"} <= ids
    assert {"bias.crows_stereotype_rate"} <= ids
    assert policy.checks.answer_regex is None and not policy.checks.answer_json


def test_verdicts() -> None:
    policy = load_policy(None)
    good = {
        "regression.mean_accuracy": _metric("regression.mean_accuracy", [1, 0] * 50, [1, 0] * 50),
        "safety.refusal_rate": _metric("safety.refusal_rate", [1] * 20, [1] * 19 + [0]),
    }
    verdict = judge(policy, good)
    assert verdict.passed and verdict.word == "PASS" and len(verdict.passes) == 2
    assert any("task.token_f1: not checked" in u for u in verdict.unchecked)
    bad = {"regression.mean_accuracy": _metric("regression.mean_accuracy", [1, 0] * 50, [1, 0, 0, 0] * 25)}
    verdict = judge(policy, bad)
    assert not verdict.passed and verdict.word == "FAIL"
    (reason,) = verdict.failures
    assert "50.0% → 25.0% (-25.0 points" in reason and "below the allowed -5.0 points" in reason
    assert "general knowledge" in reason  # the rule's own words


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("rules: [{metric: task.token_f1}]", "give at least one bound"),
        ("rules: [{metric: task.token_f1, min_delta: lots}]", "min_delta must be a number"),
        ("rules: [{metric: task.token_f1, at_least: 3}]", "unknown key(s) at_least"),
        ("rules: [{min_delta: 1}]", "needs 'metric: SUITE.NAME'"),
        ("thresholds: {}", "unknown key(s) thresholds"),
        ("rules: [\n  - : :", "not valid YAML"),
        ("task: {answer_regex: '(unclosed'}", "not a valid regex"),
    ],
)
def test_bad_policies_get_clear_errors(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    with pytest.raises(EvalError, match=None) as info:
        load_policy(path)
    assert needle in str(info.value) and str(path) in str(info.value)


def test_missing_policy_file(tmp_path: Path) -> None:
    with pytest.raises(EvalError, match="does not exist; pass --gate"):
        load_policy(tmp_path / "nope.yaml")


def test_task_checks_are_read(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("name: strict\nrules: []\ntask: {answer_regex: '\\d+', answer_json: true}\n")
    policy = load_policy(path)
    assert policy.name == "strict" and policy.checks.answer_regex == "\\d+" and policy.checks.answer_json
