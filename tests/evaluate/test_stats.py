"""Bootstrap intervals: they contain the truth about as often as they claim, and pairing narrows deltas."""

from __future__ import annotations

import numpy as np
import pytest

from loraforge.evaluate.stats import bootstrap_ci, cluster_bootstrap_difference, paired_bootstrap, wilson


def test_interval_brackets_the_mean_and_is_deterministic() -> None:
    values = [1, 0, 1, 1, 0, 1, 0, 1, 1, 1]
    a, b = bootstrap_ci(values, seed=3), bootstrap_ci(values, seed=3)
    assert a == b
    assert a.value == pytest.approx(0.7) and a.low < 0.7 < a.high and a.n == 10
    assert a.low >= 0.3 and a.high <= 1.0


def test_coverage_is_close_to_95_percent() -> None:
    rng = np.random.default_rng(0)
    hits = 0
    trials = 200
    for t in range(trials):
        sample = rng.binomial(1, 0.3, size=80)
        ci = bootstrap_ci(sample, resamples=500, seed=t)
        hits += ci.low <= 0.3 <= ci.high
    assert 0.88 <= hits / trials <= 0.99


def test_paired_interval_is_narrower_than_unpaired_for_correlated_items() -> None:
    rng = np.random.default_rng(1)
    difficulty = rng.normal(size=200)
    base = difficulty + rng.normal(scale=0.1, size=200)
    adapter = difficulty + 0.05 + rng.normal(scale=0.1, size=200)
    paired = paired_bootstrap(base, adapter)
    width_unpaired = (bootstrap_ci(adapter).high - bootstrap_ci(adapter).low) + (
        bootstrap_ci(base).high - bootstrap_ci(base).low
    )
    assert paired.value == pytest.approx(float(np.mean(adapter - base)))
    assert paired.high - paired.low < width_unpaired / 5
    assert paired.low > 0  # a small but consistent gain is detected


def test_statistic_and_errors() -> None:
    losses = np.array([1.0, 2.0, 3.0])
    ppl = bootstrap_ci(losses, statistic=lambda x: np.exp(x.mean(axis=-1)))
    assert ppl.value == pytest.approx(np.exp(2.0))
    with pytest.raises(ValueError, match="at least one"):
        bootstrap_ci([])
    with pytest.raises(ValueError, match="same items"):
        paired_bootstrap([1, 2], [1, 2, 3])


def test_wilson_interval() -> None:
    e = wilson(0, 20)
    assert e.value == 0 and e.low == 0 and 0.1 < e.high < 0.2  # never the useless 0..0 of the normal interval
    e = wilson(50, 100)
    assert e.low == pytest.approx(0.404, abs=0.002) and e.high == pytest.approx(0.596, abs=0.002)
    assert wilson(0, 0).high == 1.0


def _users(rng: np.random.Generator, count: int, p: float) -> list[list[float]]:
    """Users who each rate 1-4 answers; a user's own rate varies around ``p`` (correlated ratings)."""
    out = []
    for _ in range(count):
        own = float(np.clip(p + rng.normal(0, 0.15), 0, 1))
        out.append([float(x) for x in rng.random(int(rng.integers(1, 5))) < own])
    return out


def test_cluster_bootstrap_difference_covers_the_true_difference() -> None:
    rng = np.random.default_rng(7)
    trials, hits, significant = 200, 0, 0
    for i in range(trials):
        control, treatment = _users(rng, 60, 0.55), _users(rng, 60, 0.75)
        result = cluster_bootstrap_difference(control, treatment, resamples=1000, seed=i)
        hits += result.difference.low <= 0.20 <= result.difference.high
        significant += result.significant
    assert 0.90 <= hits / trials <= 0.99, hits / trials
    assert significant / trials > 0.9  # a 0.20 difference with 60 users an arm is found
    same = cluster_bootstrap_difference(_users(rng, 60, 0.6), _users(rng, 60, 0.6), resamples=1000)
    assert same.p_value > 0.01
    with pytest.raises(ValueError, match="at least one value"):
        cluster_bootstrap_difference([[]], [[1.0]])
