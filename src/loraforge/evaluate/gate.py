"""The release gate: a YAML policy of bounds on evaluation metrics, and its verdict in plain words.

Policy format (``assets/default_gate.yaml`` is the shipped default)::

    name: my-policy
    inconclusive: block                     # or pass: may a rule the interval cannot decide let it through?
    rules:
      - metric: regression.mean_accuracy   # a metric id of eval.json
        min_delta: -5.0                     # adapter − base must be ≥ −5 (points for rates)
        why: general knowledge may fall by at most 5 points
    task: {answer_regex: null, answer_json: false}

Bounds: ``min_delta``, ``max_delta``, ``max_abs_delta`` (on adapter − base) and ``min_adapter``,
``max_adapter`` (on the adapter's own score). A rule may hold several.

Each bound is judged on the 95% interval of the number it bounds (the paired interval of the
change, or the adapter's own interval), not on the point estimate alone:

- PASS: the whole interval is on the allowed side of the threshold (touching it is allowed);
- FAIL: the whole interval is on the forbidden side;
- INCONCLUSIVE: the interval crosses the threshold. The reason says which way the point estimate
  leans and how many items would decide it (:func:`items_to_decide`).

One exception: a rate (unit ``%``: per-item scores in [0, 1], shown ×100) bounded at the end of
its scale (``max_adapter: 0`` or ``min_adapter: 100``) fails as soon as one item is observed beyond
it, whatever the interval: a true rate of 0% cannot produce a positive item (a memorized canary).

A rule fails if any of its bounds fails, else is inconclusive if any is, else passes. The verdict
is FAIL if any rule fails; else INCONCLUSIVE if any rule is and the policy says
``inconclusive: block`` (the default: a gate that cannot tell must not pass); else PASS (with
``inconclusive: pass`` the undecided rules are still listed). ``loraforge eval`` exits with
:data:`GATE_FAILED_EXIT` (3) for FAIL and :data:`GATE_INCONCLUSIVE_EXIT` (4) for a blocking
INCONCLUSIVE, so a release script that only accepts 0 blocks both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from loraforge.errors import EvalError
from loraforge.evaluate.config import TaskChecks
from loraforge.evaluate.harness import Metric
from loraforge.evaluate.stats import Estimate

DEFAULT_POLICY = Path(__file__).parent / "assets" / "default_gate.yaml"
BOUNDS = ("min_delta", "max_delta", "max_abs_delta", "min_adapter", "max_adapter")
GATE_FAILED_EXIT = 3  # exit status of `loraforge eval` when the gate fails (1 is an error)
GATE_INCONCLUSIVE_EXIT = 4  # … when it cannot decide and the policy blocks undecided rules
INCONCLUSIVE_POLICIES = ("block", "pass")
_EPS = 1e-9  # rates ×100 carry float noise (−5.000000000000004 points is −5)

Outcome = Literal["PASS", "FAIL", "INCONCLUSIVE"]


@dataclass(frozen=True)
class Rule:
    metric: str
    bounds: dict[str, float]
    why: str = ""


@dataclass(frozen=True)
class Policy:
    name: str
    path: str
    rules: tuple[Rule, ...]
    checks: TaskChecks = field(default_factory=TaskChecks)
    inconclusive: Literal["block", "pass"] = "block"  # does a rule the interval cannot decide block the release?


@dataclass(frozen=True)
class RuleResult:
    """One rule's outcome, in a sentence a manager can read.

    ``leaning`` is what the point estimate alone says (PASS or FAIL); ``n`` the items measured;
    ``n_needed`` (inconclusive rules only) the items that would decide it if the effect stays as
    observed, None when no number would (the estimate sits on the threshold).
    """

    metric: str
    outcome: Outcome
    reason: str
    leaning: Outcome
    n: int
    n_needed: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "outcome": self.outcome,
            "reason": self.reason,
            "leaning": self.leaning,
            "n": self.n,
            "n_needed": self.n_needed,
        }


@dataclass
class Verdict:
    """The gate's decision: PASS, FAIL or INCONCLUSIVE, with every rule's result."""

    outcome: Outcome
    rules: list[RuleResult] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)
    inconclusive_policy: Literal["block", "pass"] = "block"

    @property
    def passed(self) -> bool:
        return self.outcome == "PASS"

    @property
    def word(self) -> str:
        return self.outcome

    @property
    def exit_status(self) -> int:
        """0 PASS, :data:`GATE_FAILED_EXIT` FAIL, :data:`GATE_INCONCLUSIVE_EXIT` INCONCLUSIVE."""
        return {"PASS": 0, "FAIL": GATE_FAILED_EXIT, "INCONCLUSIVE": GATE_INCONCLUSIVE_EXIT}[self.outcome]

    def _reasons(self, outcome: Outcome) -> list[str]:
        return [r.reason for r in self.rules if r.outcome == outcome]

    @property
    def failures(self) -> list[str]:
        return self._reasons("FAIL")

    @property
    def inconclusive(self) -> list[str]:
        return self._reasons("INCONCLUSIVE")

    @property
    def passes(self) -> list[str]:
        return self._reasons("PASS")

    def to_json(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "verdict": self.word,
            "failures": self.failures,
            "inconclusive": self.inconclusive,
            "passes": self.passes,
            "unchecked": self.unchecked,
            "inconclusive_policy": self.inconclusive_policy,
            "rules": [r.to_json() for r in self.rules],
        }


def load_policy(path: Path | None) -> Policy:
    """Read and check a gate policy (the shipped default when ``path`` is None).

    Raises:
        EvalError: the file is missing, not YAML, or has an unknown key or a non-numeric bound.
    """
    path = path or DEFAULT_POLICY
    if not path.is_file():
        raise EvalError(f"gate policy {path} does not exist; pass --gate POLICY.yaml (format: docs/evaluation.md)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise EvalError(f"gate policy {path} is not valid YAML: {e}") from e
    if not isinstance(raw, dict) or not isinstance(raw.get("rules", []), list):
        raise EvalError(f"gate policy {path}: expected a mapping with a list under 'rules'")
    unknown = set(raw) - {"name", "version", "rules", "task", "inconclusive"}
    if unknown:
        raise EvalError(
            f"gate policy {path}: unknown key(s) {', '.join(sorted(unknown))}; "
            "allowed: name, version, rules, task, inconclusive"
        )
    inconclusive = raw.get("inconclusive", "block")
    if inconclusive not in INCONCLUSIVE_POLICIES:
        raise EvalError(
            f"gate policy {path}: inconclusive must be block (an undecided rule blocks the release) "
            f"or pass (it is listed but does not block), got {inconclusive!r}"
        )
    rules = []
    for n, r in enumerate(raw.get("rules") or [], 1):
        where = f"gate policy {path}: rule {n}"
        if not isinstance(r, dict) or not isinstance(r.get("metric"), str):
            raise EvalError(f"{where}: needs 'metric: SUITE.NAME' (e.g. regression.mean_accuracy)")
        bad = set(r) - {"metric", "why", *BOUNDS}
        if bad:
            raise EvalError(f"{where}: unknown key(s) {', '.join(sorted(bad))}; bounds are {', '.join(BOUNDS)}")
        bounds = {k: r[k] for k in BOUNDS if k in r}
        if not bounds:
            raise EvalError(f"{where} ({r['metric']}): give at least one bound of {', '.join(BOUNDS)}")
        for k, v in bounds.items():
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise EvalError(f"{where} ({r['metric']}): {k} must be a number, got {v!r}")
        rules.append(Rule(r["metric"], {k: float(v) for k, v in bounds.items()}, str(r.get("why") or "")))
    task = raw.get("task") or {}
    if not isinstance(task, dict) or set(task) - {"answer_regex", "answer_json"}:
        raise EvalError(f"gate policy {path}: 'task' takes answer_regex and answer_json only")
    regex = task.get("answer_regex")
    if regex is not None:
        import re

        try:
            re.compile(str(regex))
        except re.error as e:
            raise EvalError(f"gate policy {path}: task.answer_regex {regex!r} is not a valid regex: {e}") from e
    checks = TaskChecks(str(regex) if regex is not None else None, bool(task.get("answer_json", False)))
    return Policy(str(raw.get("name") or path.stem), str(path), tuple(rules), checks, inconclusive)


def _fmt(x: float, unit: str) -> str:
    if unit == "%":
        return f"{x:.1f}%"
    return f"{x:.3g} {unit}".strip()


def _pts(x: float, unit: str) -> str:
    return f"{x:+.1f} points" if unit == "%" else f"{x:+.3g} {unit}".strip()


def items_to_decide(e: Estimate, threshold: float) -> int | None:
    """Items that would put ``e``'s 95% interval wholly on one side of ``threshold``, the point estimate's side.

    Assumes the interval's half-width shrinks like the standard error of a mean, ``∝ 1/sqrt(n)``,
    with the per-item spread and the observed effect unchanged: the side of the interval that
    crosses the threshold, ``w`` from the estimate, becomes ``w·sqrt(n/N)`` on ``N`` items, which
    clears a threshold at distance ``d`` once ``N > n·(w/d)²``. It is the order of magnitude to plan
    the next evaluation with, not a guarantee: the effect measured on more items will move.

    Returns:
        The smallest such ``N`` (more than ``e.n`` when the interval crosses now), or None when the
        estimate sits on the threshold (``d = 0``: no number of items decides it).
    """
    distance = abs(e.value - threshold)
    if distance <= _EPS * max(1.0, abs(threshold)):
        return None
    half_width = e.value - e.low if e.value > threshold else e.high - e.value
    return max(e.n, math.floor(e.n * (half_width / distance) ** 2) + 1)


@dataclass(frozen=True)
class _Bound:
    """One bound's outcome: ``text`` a clause of the reason; ``n_needed`` for an inconclusive one."""

    outcome: Outcome
    leaning: Outcome
    text: str
    n_needed: int | None = None


def _judge_bound(kind: str, t: float, e: Estimate, *, unit: str, rate: bool) -> _Bound:
    """Judge ``e`` (the change, or the adapter's score) against one bound ``kind`` with threshold ``t``.

    ``min_*`` bounds allow ``e ≥ t``, ``max_*`` bounds ``e ≤ t``; ``max_abs_delta`` is both ``≥ −t``
    and ``≤ t``, each judged as a bound of its own and the worse outcome kept.
    """
    on_delta = kind.endswith("delta")
    show = _pts if on_delta else _fmt
    subject = "the change" if on_delta else "the adapter"
    if kind == "max_abs_delta":
        sides = [_judge_bound(k, x, e, unit=unit, rate=False) for k, x in (("min_delta", -t), ("max_delta", t))]
        outcome = _worst([b.outcome for b in sides])
        band = f"the allowed ±{show(t, unit).lstrip('+')}"
        if outcome != "INCONCLUSIVE":
            return _Bound(outcome, outcome, f"it moved by more than {band}" if outcome == "FAIL" else "")
        leaning: Outcome = _worst([b.leaning for b in sides])
        needed = [b.n_needed for b in sides if b.outcome == "INCONCLUSIVE"]
        how = "more" if leaning == "FAIL" else "less"
        text = f"it moved by {how} than {band} on the point estimate, but its 95% interval crosses it"
        return _Bound("INCONCLUSIVE", leaning, text, None if None in needed else max(n or 0 for n in needed))
    at_least = kind.startswith("min")
    slack = _EPS * max(1.0, abs(t))

    def allowed(x: float) -> bool:  # touching the threshold is allowed
        return x >= t - slack if at_least else x <= t + slack

    ok_point, ok_all, bad_all = (
        allowed(e.value),
        allowed(e.low if at_least else e.high),
        not allowed(e.high if at_least else e.low),
    )
    # a rate bounded at the end of its scale (0% or 100%) is broken by one observed item
    bad_all = bad_all or (rate and not ok_point and (t >= 100 if at_least else t <= 0))
    side = "below" if at_least else "above"
    limit = f"the {'required' if at_least and not on_delta else 'allowed'} {show(t, unit)}"
    if bad_all:
        return _Bound("FAIL", "FAIL", f"{subject} is {side} {limit}")
    if ok_all:
        return _Bound("PASS", "PASS", "")
    reach = e.high if at_least != ok_point else e.low  # the end of the interval across the threshold
    where = f"within {limit}" if ok_point else f"{side} {limit}"
    text = f"{subject} is {where} on the point estimate, but its 95% interval reaches {show(reach, unit)}"
    return _Bound("INCONCLUSIVE", "PASS" if ok_point else "FAIL", text, items_to_decide(e, t))


def _worst(outcomes: list[Outcome]) -> Outcome:
    return "FAIL" if "FAIL" in outcomes else "INCONCLUSIVE" if "INCONCLUSIVE" in outcomes else "PASS"


def judge(policy: Policy, metrics: dict[str, Metric]) -> Verdict:
    """Apply every rule on the metrics' intervals; each result becomes one sentence a manager can read.

    See the module docstring for how a bound, a rule and the verdict are decided.
    """
    results: list[RuleResult] = []
    unchecked: list[str] = []
    for rule in policy.rules:
        m = metrics.get(rule.metric)
        if m is None:
            unchecked.append(f"{rule.metric}: not checked (its suite was not run or had no data)")
            continue
        d, a, u = m.delta, m.adapter, m.unit
        delta_text = (
            f"{m.label}: {_fmt(m.base.value, u)} → {_fmt(a.value, u)} "
            f"({_pts(d.value, u)}, 95% CI {_pts(d.low, u)} to {_pts(d.high, u)})"
        )
        bounds = [
            _judge_bound(kind, t, d if kind.endswith("delta") else a, unit=u, rate=u == "%")
            for kind, t in rule.bounds.items()
        ]
        outcome = _worst([b.outcome for b in bounds])
        leaning = _worst([b.leaning for b in bounds])
        why = f" Rule: {rule.why}." if rule.why else ""
        n = max(d.n, a.n)
        if outcome == "FAIL":
            texts = [b.text for b in bounds if b.outcome == "FAIL"]
            results.append(RuleResult(rule.metric, "FAIL", f"{delta_text}: {'; '.join(texts)}.{why}", leaning, n))
        elif outcome == "INCONCLUSIVE":
            undecided = [b for b in bounds if b.outcome == "INCONCLUSIVE"]
            needed = None if any(b.n_needed is None for b in undecided) else max(b.n_needed or 0 for b in undecided)
            size = (
                f"about {needed:,} items (now {n:,}) would decide it if the effect stays as measured"
                if needed is not None
                else "no number of items decides it: the estimate sits on the threshold"
            )
            reason = f"{delta_text}: inconclusive: {'; '.join(b.text for b in undecided)}; {size}.{why}"
            results.append(RuleResult(rule.metric, "INCONCLUSIVE", reason, leaning, n, needed))
        else:
            results.append(RuleResult(rule.metric, "PASS", f"{delta_text}: within the policy.", "PASS", n))
    outcome = _worst([r.outcome for r in results])
    if outcome == "INCONCLUSIVE" and policy.inconclusive == "pass":
        outcome = "PASS"
    return Verdict(outcome, results, unchecked, policy.inconclusive)
