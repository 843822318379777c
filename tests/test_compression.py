"""The compression experiment's choice of points: the harm-compression fraction and the operating point under an
absolute or a relative utility budget (hand-made sweep points)."""

from __future__ import annotations

import pytest

from harmprune.errors import ConfigError
from harmprune.experiments.compression import (CompressionParams, compression_fraction, operating_point,
                                               utility_budget)

# A sweep on a low utility baseline (a token likelihood x 100 of 1.5): absolute drops stay under 2 points even
# where utility has lost most of its value.
BASE = 1.5
POINTS = [
    {"q": 1e-5, "fraction_pruned": 1e-5, "harm_reduction": 0.30, "utility_drop": 0.05},
    {"q": 2e-5, "fraction_pruned": 2e-5, "harm_reduction": 0.55, "utility_drop": 0.10},
    {"q": 5e-5, "fraction_pruned": 5e-5, "harm_reduction": 0.80, "utility_drop": 0.90},
]


def test_an_absolute_budget_passes_points_that_cost_most_of_a_low_baseline():
    budget = utility_budget(CompressionParams(), BASE)
    assert budget == 2.0
    assert compression_fraction(POINTS, 0.5, budget) == 2e-5
    assert operating_point(POINTS, 0.9, budget)["q"] == 5e-5  # best harm reduction in budget: 60% of utility gone


def test_a_relative_budget_is_a_share_of_the_unpruned_utility():
    params = CompressionParams(max_relative_utility_drop=0.1)
    budget = utility_budget(params, BASE)
    assert budget == pytest.approx(0.15)
    assert compression_fraction(POINTS, 0.5, budget) == 2e-5
    assert compression_fraction(POINTS, 0.7, budget) is None  # the 80% point costs 60% of the utility
    assert operating_point(POINTS, 0.9, budget)["q"] == 2e-5
    assert utility_budget(params, None) == 2.0  # no utility evaluation: the absolute default (unused)


def test_the_relative_budget_is_checked_in_the_config(tmp_path):
    from harmprune.experiments import load_checked_config

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    (tmp_path / "c.toml").write_text('[models.m]\npath = "m"\n[evaluations.harm]\nkind = "harm"\n'
                                     'data = "p"\n[data.p]\npath = "p.jsonl"\n[experiments.compression]\n'
                                     'max_relative_utility_drop = 1.5\n')
    (tmp_path / "p.jsonl").write_text('{"prompt": "x"}\n')
    with pytest.raises(ConfigError, match="experiments.compression.max_relative_utility_drop"):
        load_checked_config(tmp_path / "c.toml")
