"""Bootstrap confidence intervals for scores, and paired bootstrap intervals for base-vs-adapter deltas.

Every score in an evaluation is a mean over items (1/0 for accuracy, a log-probability, a
similarity). Its 95% interval is the percentile bootstrap of that mean. A delta compares the
same items under two models, so the delta's interval resamples *items* and takes both models'
values of each drawn item together (paired): item difficulty cancels out and the interval is
much narrower than one built from two independent intervals.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

Statistic = Callable[[np.ndarray], np.ndarray]  # (..., n) -> (...): reduces the last axis

DEFAULT_RESAMPLES = 2000


@dataclass(frozen=True)
class Estimate:
    """A mean with its bootstrap interval, in the score's unit."""

    value: float
    low: float
    high: float
    n: int

    def to_json(self) -> dict[str, float | int]:
        return {"value": self.value, "low": self.low, "high": self.high, "n": self.n}

    def scaled(self, factor: float) -> Estimate:
        return Estimate(self.value * factor, self.low * factor, self.high * factor, self.n)


def _percentiles(samples: np.ndarray, level: float) -> tuple[float, float]:
    alpha = (1 - level) / 2
    low, high = np.quantile(samples, [alpha, 1 - alpha])
    return float(low), float(high)


def _mean(x: np.ndarray) -> np.ndarray:
    return np.asarray(x.mean(axis=-1))


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    *,
    statistic: Statistic = _mean,
    resamples: int = DEFAULT_RESAMPLES,
    level: float = 0.95,
    seed: int = 0,
) -> Estimate:
    """``statistic`` (default: the mean) of ``values`` with a percentile-bootstrap interval.

    Args:
        values: one number per item, shape ``(n,)``.
        statistic: reduces the last axis, e.g. ``lambda x: np.exp(x.mean(-1))`` for perplexity.
        resamples: bootstrap replicates.
        level: coverage of the interval (0.95 → 2.5th and 97.5th percentiles).
        seed: the generator's seed; the same inputs always give the same interval.

    Raises:
        ValueError: no values.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(resamples, x.size))
    low, high = _percentiles(statistic(x[idx]), level)
    return Estimate(float(statistic(x)), low, high, int(x.size))


def paired_bootstrap(
    base: Sequence[float] | np.ndarray,
    adapter: Sequence[float] | np.ndarray,
    *,
    statistic: Statistic = _mean,
    resamples: int = DEFAULT_RESAMPLES,
    level: float = 0.95,
    seed: int = 0,
) -> Estimate:
    """``statistic(adapter) - statistic(base)`` over the same items, with a paired bootstrap interval.

    Each replicate draws item indices once and applies them to both arrays, so an item's two
    values always travel together.

    Raises:
        ValueError: the two arrays differ in length, or are empty.
    """
    a = np.asarray(adapter, dtype=np.float64)
    b = np.asarray(base, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired_bootstrap needs the same items for both models, got {b.size} and {a.size}")
    if a.size == 0:
        raise ValueError("paired_bootstrap needs at least one item")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, a.size, size=(resamples, a.size))
    low, high = _percentiles(statistic(a[idx]) - statistic(b[idx]), level)
    return Estimate(float(statistic(a) - statistic(b)), low, high, int(a.size))
