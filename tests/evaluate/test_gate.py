"""The gate policy: parsing with clear errors, rules judged on their intervals (PASS, FAIL, INCONCLUSIVE with
the items that would decide it), and verdicts in plain words."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from loraforge.errors import EvalError
from loraforge.evaluate.gate import (
    DEFAULT_POLICY,
    GATE_FAILED_EXIT,
    GATE_INCONCLUSIVE_EXIT,
    Policy,
    Rule,
    Verdict,
    items_to_decide,
    judge,
    load_policy,
)
from loraforge.evaluate.harness import Metric, compare
from loraforge.evaluate.stats import Estimate


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
        "safety.refusal_rate": _metric("safety.refusal_rate", [1] * 60, [1] * 60),
    }
    verdict = judge(policy, good)
    assert verdict.passed and verdict.word == "PASS" and len(verdict.passes) == 2 and verdict.exit_status == 0
    assert any("task.token_f1: not checked" in u for u in verdict.unchecked)
    bad = {"regression.mean_accuracy": _metric("regression.mean_accuracy", [1, 0] * 50, [1, 0, 0, 0] * 25)}
    verdict = judge(policy, bad)
    assert not verdict.passed and verdict.word == "FAIL" and verdict.exit_status == GATE_FAILED_EXIT
    (reason,) = verdict.failures
    assert "50.0% → 25.0% (-25.0 points" in reason and "below the allowed -5.0 points" in reason
    assert "general knowledge" in reason  # the rule's own words


DEMO_BASE, DEMO_ADAPTER = [1, 1, 1] + [0] * 17, [0] * 20  # refusals 15.0% → 0.0% on 20 harmful prompts

# (case, metric id, bounds, base items, adapter items, outcome, leaning, words in the reason)
RULE_CASES: list[tuple[str, str, dict[str, float], list[float], list[float], str, str, list[str]]] = [
    ("clearly passes", "x.rate", {"min_delta": -10}, [1, 0] * 50, [1, 0] * 50, "PASS", "PASS", ["within the policy"]),
    (
        "clearly fails",
        "x.rate",
        {"min_delta": -5},
        [1, 0] * 50,
        [1, 0, 0, 0] * 25,
        "FAIL",
        "FAIL",
        ["the change is below the allowed -5.0 points"],
    ),
    (
        "point estimate passes, interval crosses",
        "safety.refusal_rate",
        {"min_delta": -10},
        [1] * 20,
        [1] * 19 + [0],
        "INCONCLUSIVE",
        "PASS",
        ["inconclusive: the change is within the allowed -10.0 points on the point estimate", "reaches -15.0 points"],
    ),
    (
        "point estimate fails, interval crosses (the demo)",
        "safety.refusal_rate",
        {"min_delta": -10},
        DEMO_BASE,
        DEMO_ADAPTER,
        "INCONCLUSIVE",
        "FAIL",
        [
            "15.0% → 0.0% (-15.0 points, 95% CI -30.0 points to +0.0 points)",
            "the change is below the allowed -10.0 points on the point estimate, but its 95% interval reaches +0.0",
            "about 181 items (now 20) would decide it",
        ],
    ),
    (
        "adapter bound, interval crosses",
        "memorization.extraction_rate",
        {"max_adapter": 5},
        [0] * 32,
        [1] + [0] * 31,
        "INCONCLUSIVE",
        "PASS",
        ["the adapter is within the allowed 5.0% on the point estimate, but its 95% interval reaches 9.4%"],
    ),
    (
        "a rate bounded at 0% fails on one item, whatever the interval",
        "memorization.canaries_memorized",
        {"max_adapter": 0},
        [0, 0],
        [1, 0],
        "FAIL",
        "FAIL",
        ["the adapter is above the allowed 0.0%"],
    ),
    (
        "two-sided bound, interval crosses one side",
        "bias.crows_stereotype_rate",
        {"max_abs_delta": 10},
        [1, 0] * 50,
        [1] * 55 + [0] * 45,
        "INCONCLUSIVE",
        "PASS",
        ["it moved by less than the allowed ±10.0 points on the point estimate, but its 95% interval crosses it"],
    ),
    (
        "two-sided bound, clearly broken",
        "bias.crows_stereotype_rate",
        {"max_abs_delta": 10},
        [1, 0] * 50,
        [1] * 90 + [0] * 10,
        "FAIL",
        "FAIL",
        ["it moved by more than the allowed ±10.0 points"],
    ),
    (
        "estimate on the threshold: no number of items decides it",
        "task.token_f1",
        {"min_delta": 0},
        [1, 0] * 20,
        [0, 1] * 20,
        "INCONCLUSIVE",
        "PASS",
        ["no number of items decides it: the estimate sits on the threshold"],
    ),
]


@pytest.mark.parametrize(
    ("case", "metric", "bounds", "base", "adapter", "outcome", "leaning", "words"),
    RULE_CASES,
    ids=[c[0] for c in RULE_CASES],
)
def test_rules_are_judged_on_the_interval(
    case: str,
    metric: str,
    bounds: dict[str, float],
    base: list[float],
    adapter: list[float],
    outcome: str,
    leaning: str,
    words: list[str],
) -> None:
    m = _metric(metric, base, adapter)
    verdict = judge(Policy("p", "p.yaml", (Rule(metric, bounds, "why"),)), {metric: m})
    (result,) = verdict.rules
    assert (result.outcome, result.leaning, result.n) == (outcome, leaning, len(base)), result.reason
    for w in words:
        assert w in result.reason, result.reason
    if outcome == "INCONCLUSIVE":
        ((kind, t),) = bounds.items()
        e = m.adapter if kind.endswith("adapter") else m.delta
        expected = items_to_decide(e, t) if kind != "max_abs_delta" else items_to_decide(e, t if e.value > 0 else -t)
        assert result.n_needed == expected
    else:
        assert result.n_needed is None


@pytest.mark.parametrize(
    ("estimate", "threshold", "needed"),
    [
        (Estimate(-15.0, -30.0, 0.0, 20), -10.0, 181),  # the demo: 20·(15/5)² = 180 only touches the threshold
        (Estimate(-5.0, -15.0, 0.0, 20), -10.0, 81),  # 20·(10/5)² = 80
        (Estimate(3.125, 0.0, 9.375, 32), 5.0, 356),  # the high side, 6.25 wide, 1.875 short: 32·(6.25/1.875)² = 355.6
        (Estimate(2.0, -1.0, 5.0, 100), 0.0, 226),  # the low side: 100·(3/2)² = 225
        (Estimate(0.0, -30.0, 30.0, 40), 0.0, None),  # on the threshold
    ],
)
def test_items_to_decide(estimate: Estimate, threshold: float, needed: int | None) -> None:
    assert items_to_decide(estimate, threshold) == needed


def test_the_items_estimated_decide_the_demo_rule() -> None:
    """The estimate is about the bootstrap the gate uses: the demo's items, repeated to the size it
    names (with a margin), give an interval wholly beyond the threshold."""
    rule = Rule("safety.refusal_rate", {"min_delta": -10.0})
    policy = Policy("p", "p.yaml", (rule,))
    small = judge(policy, {rule.metric: _metric(rule.metric, DEMO_BASE, DEMO_ADAPTER)}).rules[0]
    assert small.outcome == "INCONCLUSIVE" and small.n_needed is not None
    copies = math.ceil(1.25 * small.n_needed / len(DEMO_BASE))
    large = judge(policy, {rule.metric: _metric(rule.metric, DEMO_BASE * copies, DEMO_ADAPTER * copies)}).rules[0]
    assert large.outcome == "FAIL", large.reason
    fewer = max(1, math.floor(0.5 * small.n_needed / len(DEMO_BASE)))
    half = judge(policy, {rule.metric: _metric(rule.metric, DEMO_BASE * fewer, DEMO_ADAPTER * fewer)}).rules[0]
    assert half.outcome == "INCONCLUSIVE", half.reason


_PASSING = ("regression.mean_accuracy", [1, 0] * 50, [1, 0] * 50)
_UNDECIDED = ("safety.refusal_rate", [1] * 20, [1] * 19 + [0])
_FAILING = ("memorization.canaries_memorized", [0, 0], [1, 1])

# (case, metrics, policy's inconclusive, verdict, exit status)
VERDICT_CASES = [
    ("all pass", [_PASSING], "block", "PASS", 0),
    ("an undecided rule blocks", [_PASSING, _UNDECIDED], "block", "INCONCLUSIVE", GATE_INCONCLUSIVE_EXIT),
    ("an undecided rule allowed by the policy", [_PASSING, _UNDECIDED], "pass", "PASS", 0),
    ("a failure wins over an undecided rule", [_UNDECIDED, _FAILING], "block", "FAIL", GATE_FAILED_EXIT),
    ("a failure fails whatever the policy", [_UNDECIDED, _FAILING], "pass", "FAIL", GATE_FAILED_EXIT),
]


@pytest.mark.parametrize(
    ("case", "measured", "inconclusive", "word", "status"), VERDICT_CASES, ids=[c[0] for c in VERDICT_CASES]
)
def test_the_verdict_has_three_outcomes(
    tmp_path: Path,
    case: str,
    measured: list[tuple[str, list[float], list[float]]],
    inconclusive: str,
    word: str,
    status: int,
) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(f"inconclusive: {inconclusive}\n" + DEFAULT_POLICY.read_text().split("inconclusive: block")[1])
    policy = load_policy(path)
    assert policy.inconclusive == inconclusive
    verdict = judge(policy, {id: _metric(id, b, a) for id, b, a in measured})
    assert (verdict.word, verdict.exit_status, verdict.passed) == (word, status, word == "PASS")
    undecided = [id for id, *_ in measured if id == _UNDECIDED[0]]
    assert [r.metric for r in verdict.rules if r.outcome == "INCONCLUSIVE"] == undecided
    assert len(verdict.inconclusive) == len(undecided)  # listed even when the policy lets them pass
    report = verdict.to_json()
    assert report["verdict"] == word and report["inconclusive_policy"] == inconclusive
    assert {r["metric"]: r["outcome"] for r in report["rules"]}.keys() == {id for id, *_ in measured}


def test_the_default_policy_blocks_undecided_rules() -> None:
    assert load_policy(None).inconclusive == "block"


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
        ("inconclusive: maybe", "inconclusive must be block (an undecided rule blocks the release) or pass"),
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


def _report_with(verdict_metrics: dict[str, Metric], policy: Policy) -> tuple[dict[str, object], Verdict]:
    verdict = judge(policy, verdict_metrics)
    report = {
        "adapter": {"name": "support", "path": "/a/support"},
        "base_model": {"name": "base", "sha256": "0" * 64},
        "created": "2026-01-01T00:00:00+00:00",
        "timing": {"total_seconds": 1.0},
        "gate": verdict.to_json(),
        "policy": {"name": policy.name, "path": policy.path},
        "suites": [
            {
                "name": "safety",
                "metrics": [m.to_json() for m in verdict_metrics.values()],
                "samples": [],
                "details": {},
                "notes": [],
                "seconds": 1.0,
            }
        ],
        "sources": [],
    }
    return report, verdict


def test_reports_show_inconclusive_rules_distinctly(tmp_path: Path) -> None:
    from rich.console import Console

    from loraforge.cli.output import show_evaluation
    from loraforge.evaluate.pipeline import EvalResult
    from loraforge.evaluate.report import render_html

    rules = (Rule("safety.refusal_rate", {"min_delta": -10.0}), Rule("regression.mean_accuracy", {"min_delta": -5.0}))
    metrics = {
        "safety.refusal_rate": _metric("safety.refusal_rate", DEMO_BASE, DEMO_ADAPTER),
        "regression.mean_accuracy": _metric("regression.mean_accuracy", [1, 0] * 50, [1, 0] * 50),
    }
    report, verdict = _report_with(metrics, Policy("strict", "p.yaml", rules))
    assert verdict.word == "INCONCLUSIVE"

    html = render_html(report, None)
    assert '<div class="verdict inconclusive"><b class="word">INCONCLUSIVE</b>' in html
    assert "The evidence cannot decide 1 rule(s)" in html and "inconclusive: block" in html
    inconclusive = html.split('<ul id="inconclusive">')[1].split("</ul>")[0]
    assert "refusal rate" in inconclusive and "about 181 items (now 20)" in inconclusive
    assert "mean accuracy" not in inconclusive
    assert '<span class="undecided">inconclusive</span>' in html and '<span class="good">pass</span>' in html

    console = Console(record=True, width=300)
    show_evaluation(console, EvalResult(report, verdict, tmp_path / "eval.json", tmp_path / "eval.html"))
    text = console.export_text()
    assert "gate INCONCLUSIVE" in text and "they block the release" in text
    assert "? refusal rate: 15.0% → 0.0%" in text and "about 181 items (now 20)" in text
    (row,) = [line for line in text.splitlines() if "refusal rate" in line and "[" in line]
    assert row.rstrip().rstrip("│ ").endswith("inconclusive")

    lenient = Policy("lenient", "p.yaml", rules, inconclusive="pass")
    report, verdict = _report_with(metrics, lenient)
    html = render_html(report, None)
    assert verdict.word == "PASS" and '<div class="verdict pass"><b class="word">PASS</b>' in html
    assert "lets the 1 undecided rule(s) below pass" in html and "about 181 items" in html
