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


def wilson(successes: int, n: int, *, z: float = 1.959964) -> Estimate:
    """A proportion with its Wilson score interval (sound at 0, 1 and small ``n``; ``n`` 0 gives 0..1)."""
    if n == 0:
        return Estimate(0.0, 0.0, 1.0, 0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * float(np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))) / (1 + z * z / n)
    return Estimate(p, max(0.0, centre - half), min(1.0, centre + half), n)


@dataclass(frozen=True)
class Comparison:
    """``treatment - control`` of two independent groups' means, its interval and two-sided p-value."""

    difference: Estimate
    p_value: float

    @property
    def significant(self) -> bool:
        return self.difference.low > 0 or self.difference.high < 0

    def to_json(self) -> dict[str, object]:
        return {**self.difference.to_json(), "p_value": self.p_value, "significant": self.significant}


def cluster_bootstrap_difference(
    control: Sequence[Sequence[float]],
    treatment: Sequence[Sequence[float]],
    *,
    resamples: int = DEFAULT_RESAMPLES,
    level: float = 0.95,
    seed: int = 0,
) -> Comparison:
    """The difference of two groups' mean values, resampling *clusters* (one per end user).

    A user who rates ten answers gives ten correlated values: resampling users, not values, keeps
    them together, so the interval is not narrowed by one enthusiastic user. Each group is a list of
    clusters, each a list of values (a user without an id is a cluster of one). The p-value is the
    bootstrap's two-sided share of replicates on the other side of zero (at least 1/resamples).

    Raises:
        ValueError: a group without a value.
    """
    rng = np.random.default_rng(seed)

    def replicates(groups: Sequence[Sequence[float]]) -> tuple[float, np.ndarray]:
        sums = np.array([sum(c) for c in groups if len(c)], dtype=np.float64)
        counts = np.array([len(c) for c in groups if len(c)], dtype=np.float64)
        if counts.size == 0:
            raise ValueError("each group needs at least one value")
        idx = rng.integers(0, counts.size, size=(resamples, counts.size))
        return float(sums.sum() / counts.sum()), sums[idx].sum(axis=1) / counts[idx].sum(axis=1)

    c_value, c_reps = replicates(control)
    t_value, t_reps = replicates(treatment)
    diffs = t_reps - c_reps
    low, high = _percentiles(diffs, level)
    below = float(np.mean(diffs <= 0))
    above = float(np.mean(diffs >= 0))
    p = min(1.0, max(1.0 / resamples, 2 * min(below, above)))
    n = sum(len(c) for c in control) + sum(len(c) for c in treatment)
    return Comparison(Estimate(t_value - c_value, low, high, n), p)
