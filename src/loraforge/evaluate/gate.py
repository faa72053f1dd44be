"""The release gate: a YAML policy of bounds on evaluation metrics, and its verdict in plain words.

Policy format (``assets/default_gate.yaml`` is the shipped default)::

    name: my-policy
    rules:
      - metric: regression.mean_accuracy   # a metric id of eval.json
        min_delta: -5.0                     # adapter − base must be ≥ −5 (points for rates)
        why: general knowledge may fall by at most 5 points
    task: {answer_regex: null, answer_json: false}

Bounds: ``min_delta``, ``max_delta``, ``max_abs_delta`` (on adapter − base) and ``min_adapter``,
``max_adapter`` (on the adapter's own score). A rule may hold several. Rules are judged on the
point estimate; the interval is quoted in the reason so a reader sees how sure the number is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from loraforge.errors import EvalError
from loraforge.evaluate.config import TaskChecks
from loraforge.evaluate.harness import Metric

DEFAULT_POLICY = Path(__file__).parent / "assets" / "default_gate.yaml"
BOUNDS = ("min_delta", "max_delta", "max_abs_delta", "min_adapter", "max_adapter")


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


@dataclass
class Verdict:
    passed: bool
    failures: list[str] = field(default_factory=list)
    passes: list[str] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)

    @property
    def word(self) -> str:
        return "PASS" if self.passed else "FAIL"

    def to_json(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "verdict": self.word,
            "failures": self.failures,
            "passes": self.passes,
            "unchecked": self.unchecked,
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
    unknown = set(raw) - {"name", "version", "rules", "task"}
    if unknown:
        raise EvalError(
            f"gate policy {path}: unknown key(s) {', '.join(sorted(unknown))}; allowed: name, version, rules, task"
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
    return Policy(str(raw.get("name") or path.stem), str(path), tuple(rules), checks)


def _fmt(x: float, unit: str) -> str:
    if unit == "%":
        return f"{x:.1f}%"
    return f"{x:.3g} {unit}".strip()


def _pts(x: float, unit: str) -> str:
    return f"{x:+.1f} points" if unit == "%" else f"{x:+.3g} {unit}".strip()


def judge(policy: Policy, metrics: dict[str, Metric]) -> Verdict:
    """Apply every rule; each failure and pass becomes one sentence a manager can read."""
    verdict = Verdict(passed=True)
    for rule in policy.rules:
        m = metrics.get(rule.metric)
        if m is None:
            verdict.unchecked.append(f"{rule.metric}: not checked (its suite was not run or had no data)")
            continue
        d, a, u = m.delta, m.adapter, m.unit
        delta_text = (
            f"{m.label}: {_fmt(m.base.value, u)} → {_fmt(a.value, u)} "
            f"({_pts(d.value, u)}, 95% CI {_pts(d.low, u)} to {_pts(d.high, u)})"
        )
        problems = []
        b = rule.bounds
        if "min_delta" in b and d.value < b["min_delta"]:
            problems.append(f"the change is below the allowed {_pts(b['min_delta'], u)}")
        if "max_delta" in b and d.value > b["max_delta"]:
            problems.append(f"the change is above the allowed {_pts(b['max_delta'], u)}")
        if "max_abs_delta" in b and abs(d.value) > b["max_abs_delta"]:
            problems.append(f"it moved by more than the allowed ±{_pts(b['max_abs_delta'], u).lstrip('+')}")
        if "min_adapter" in b and a.value < b["min_adapter"]:
            problems.append(f"the adapter is below the required {_fmt(b['min_adapter'], u)}")
        if "max_adapter" in b and a.value > b["max_adapter"]:
            problems.append(f"the adapter is above the allowed {_fmt(b['max_adapter'], u)}")
        why = f" Rule: {rule.why}." if rule.why else ""
        if problems:
            verdict.passed = False
            verdict.failures.append(f"{delta_text}: {'; '.join(problems)}.{why}")
        else:
            verdict.passes.append(f"{delta_text}: within the policy.")
    return verdict
