"""Evaluation: task quality, general-ability regression, bias, truthfulness, safety and memorization,
each on the base model and the adapter with confidence intervals, judged by a release gate.

Public entry points: :func:`evaluate` with an :class:`EvalConfig`; the CLI's ``loraforge eval``.
"""

from loraforge.evaluate.config import DEFAULT_SIZES, SUITES, EvalConfig, TaskChecks, parse_suites
from loraforge.evaluate.gate import GATE_FAILED_EXIT, GATE_INCONCLUSIVE_EXIT
from loraforge.evaluate.pipeline import EvalResult, evaluate

__all__ = [
    "DEFAULT_SIZES",
    "GATE_FAILED_EXIT",
    "GATE_INCONCLUSIVE_EXIT",
    "SUITES",
    "EvalConfig",
    "EvalResult",
    "TaskChecks",
    "evaluate",
    "parse_suites",
]
