"""Shared statistics against brute-force computations."""

from __future__ import annotations

import random

import pytest

from harmprune.stats import bootstrap_mean_interval, rank_auroc, relative_reduction, wilson_interval


def test_rank_auroc_equals_pair_count_with_ties():
    rng = random.Random(0)
    for _ in range(20):
        pos = [rng.randint(0, 5) for _ in range(rng.randint(1, 12))]
        neg = [rng.randint(0, 5) for _ in range(rng.randint(1, 12))]
        brute = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))
        assert rank_auroc(pos, neg) == pytest.approx(brute)


def test_wilson_interval_contains_the_proportion_and_narrows():
    lo, hi = wilson_interval(30, 100)
    assert lo < 0.3 < hi and hi - lo < 0.2
    lo2, hi2 = wilson_interval(300, 1000)
    assert hi2 - lo2 < hi - lo
    assert wilson_interval(0, 10)[0] == 0.0


def test_bootstrap_interval_and_relative_reduction():
    lo, hi = bootstrap_mean_interval([0.0, 1.0] * 50, seed=1)
    assert lo < 0.5 < hi
    assert relative_reduction(0.8, 0.2) == pytest.approx(0.75) and relative_reduction(0.0, 0.1) == 0.0
