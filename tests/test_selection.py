"""Selection semantics on hand-made tensors, against brute-force loops."""

from __future__ import annotations

import math

import pytest
import torch

from harmprune.errors import ScoreFileError
from harmprune.selection import (
    Mask, difference, expected_jaccard, intersection, jaccard, layer_and_module, load_mask,
    magnitude_matched_random, mask_stats, random_like, save_mask, select, select_counts, select_global, select_grid,
    top_fraction, union,
)


def brute_top(values: list[float], k: int) -> list[int]:
    """Top-k positions by value, ties by position: a plain sort."""
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))
    return sorted(order[:k])


def test_signed_snip_harm_support_is_the_most_negative_score():
    harm = {"w": torch.tensor([[-5.0, 1.0, -3.0], [2.0, -1.0, 0.0]])}
    mask = select(harm, None, q=0.5, p=0.0, harm_method="signed-snip")
    assert mask.indices["w"].tolist() == [0, 2, 4]  # floor(0.5*6)=3 most negative: -5, -3, -1


def test_absolute_methods_take_the_largest_scores():
    harm = {"w": torch.tensor([[5.0, 1.0, 3.0], [2.0, 4.0, 0.0]])}
    assert select(harm, None, 0.5, 0.0, harm_method="snip").indices["w"].tolist() == [0, 2, 4]
    assert select(harm, None, 0.34, 0.0, harm_method="wanda").indices["w"].tolist() == [0, 4]  # floor(2.04)=2


def test_utility_set_is_removed():
    harm = {"w": torch.tensor([[-5.0, 1.0, -3.0], [2.0, -1.0, 0.0]])}
    util = {"w": torch.tensor([[0.0, 0.0, -9.0], [0.0, 0.0, 0.0]])}  # weight 2 is the top utility weight
    mask = select(harm, util, q=0.5, p=1 / 6, harm_method="signed-snip", utility_method="signed-snip")
    assert mask.indices["w"].tolist() == [0, 4]
    assert mask.metadata["q"] == 0.5 and mask.metadata["granularity"] == "matrix"


def test_row_granularity():
    harm = {"w": torch.tensor([[-5.0, 1.0, -3.0, 7.0], [2.0, -1.0, 0.0, -8.0]])}
    mask = select(harm, None, q=0.5, p=0.0, granularity="row", harm_method="signed-snip")
    assert mask.indices["w"].tolist() == [0, 2, 5, 7]  # per row floor(0.5*4)=2


def test_global_granularity_spans_matrices():
    harm = {"a": torch.tensor([[1.0, 9.0]]), "b": torch.tensor([[8.0, 2.0, 7.0]])}
    mask = select(harm, None, q=0.6, p=0.0, granularity="global", harm_method="snip")
    assert mask.indices["a"].tolist() == [1] and mask.indices["b"].tolist() == [0, 2]  # floor(0.6*5)=3


@pytest.mark.parametrize("granularity", ["matrix", "row", "global"])
def test_against_brute_force(granularity):
    gen = torch.Generator().manual_seed(0)
    scores = {"a": torch.randint(-20, 20, (7, 11), generator=gen).float(),  # integers: many ties
              "b": torch.randint(-20, 20, (5, 3), generator=gen).float()}
    q = 0.3
    mask = select(scores, None, q, 0.0, granularity, harm_method="snip")
    if granularity == "matrix":
        for n, s in scores.items():
            assert mask.indices[n].tolist() == brute_top(s.flatten().tolist(), math.floor(q * s.numel()))
    elif granularity == "row":
        for n, s in scores.items():
            expected = []
            for r, row in enumerate(s.tolist()):
                expected += [r * s.shape[1] + c for c in brute_top(row, math.floor(q * s.shape[1]))]
            assert mask.indices[n].tolist() == sorted(expected)
    else:
        flat = torch.cat([s.flatten() for s in scores.values()]).tolist()
        top = brute_top(flat, math.floor(q * len(flat)))
        assert mask.indices["a"].tolist() == [i for i in top if i < 77]
        assert mask.indices["b"].tolist() == [i - 77 for i in top if i >= 77]


def test_counts_are_floored_per_matrix():
    scores = {"a": torch.randn(10, 10), "b": torch.randn(3, 3)}
    mask = select(scores, None, 0.055, 0.0, harm_method="snip")
    assert mask.counts() == {"a": 5, "b": 0}
    assert mask.total() == 109 and mask.fraction() == pytest.approx(5 / 109)


def test_bad_fractions_and_mismatched_files():
    s = {"a": torch.randn(4, 4)}
    with pytest.raises(ScoreFileError, match=r"\[0, 1\]"):
        select(s, None, 1.5, 0.0, harm_method="snip")
    with pytest.raises(ScoreFileError, match="granularity"):
        select(s, None, 0.1, 0.0, "column", harm_method="snip")
    with pytest.raises(ScoreFileError, match="different weights"):
        select(s, {"b": torch.randn(4, 4)}, 0.1, 0.1, harm_method="snip", utility_method="snip")
    with pytest.raises(ScoreFileError, match="shape"):
        select(s, {"a": torch.randn(4, 5)}, 0.1, 0.1, harm_method="snip", utility_method="snip")


def test_set_algebra():
    shapes = {"w": (4, 4)}
    a = Mask({"w": torch.tensor([0, 1, 2, 3])}, shapes)
    b = Mask({"w": torch.tensor([2, 3, 4])}, shapes)
    assert intersection(a, b).indices["w"].tolist() == [2, 3]
    assert union(a, b).indices["w"].tolist() == [0, 1, 2, 3, 4]
    assert jaccard(a, b) == pytest.approx(2 / 5)
    assert difference(torch.tensor([1, 5, 7]), torch.tensor([5])).tolist() == [1, 7]


def test_expected_jaccard_matches_simulation():
    shapes = {"w": (20, 50), "v": (10, 10)}
    a = random_like(Mask({"w": torch.arange(100), "v": torch.arange(10)}, shapes), seed=1)
    b = random_like(Mask({"w": torch.arange(200), "v": torch.arange(30)}, shapes), seed=2)
    sims = [jaccard(random_like(a, seed=10 + i), random_like(b, seed=1000 + i)) for i in range(300)]
    assert expected_jaccard(a, b) == pytest.approx(sum(sims) / len(sims), rel=0.1)


def test_random_control_same_counts_and_deterministic():
    shapes = {"w": (30, 30), "v": (5, 40)}
    m = Mask({"w": torch.arange(0, 90, 3), "v": torch.tensor([1, 2])}, shapes)
    r1, r2, r3 = random_like(m, seed=0), random_like(m, seed=0), random_like(m, seed=1)
    assert r1.counts() == m.counts()
    assert all(torch.equal(r1.indices[n], r2.indices[n]) for n in m.indices)
    assert not torch.equal(r1.indices["w"], r3.indices["w"])
    assert all(len(set(t.tolist())) == t.numel() for t in r1.indices.values())


def test_magnitude_matched_random_matches_weight_mass():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(100, 100, generator=gen)
    # A sparse selection biased towards large weights, as harm sets are, but not the very largest ones.
    top = torch.multinomial(w.abs().flatten() ** 4, 100, generator=gen).sort().values
    m = Mask({"w": top}, {"w": (100, 100)})
    ctrl = magnitude_matched_random(m, {"w": w}, seed=0)
    plain = random_like(m, seed=0)
    assert ctrl.counts() == m.counts()
    mass = lambda mk: w.flatten()[mk.indices["w"]].abs().mean().item()
    assert abs(mass(ctrl) - mass(m)) < 0.1 * mass(m)
    assert mass(plain) < 0.5 * mass(m)
    assert not torch.isin(ctrl.indices["w"], top).any()  # a control, not the same weights


def test_stats_per_layer_and_module():
    m = Mask({"model.layers.0.mlp.down_proj.weight": torch.tensor([1, 2]),
              "model.layers.1.self_attn.q_proj.weight": torch.tensor([3])},
             {"model.layers.0.mlp.down_proj.weight": (4, 4), "model.layers.1.self_attn.q_proj.weight": (4, 4)})
    stats = mask_stats(m)
    assert stats["per_layer"] == {"0": 2, "1": 1}
    assert stats["per_module"] == {"mlp.down_proj": 2, "self_attn.q_proj": 1}
    assert layer_and_module("transformer.h.11.attn.c_proj.weight") == (11, "attn.c_proj")


def test_mask_file_round_trip(tmp_path):
    m = select({"w": torch.randn(8, 8)}, None, 0.25, 0.0, harm_method="snip")
    path = save_mask(m, tmp_path / "m.safetensors", harm_sha256="abc")
    back = load_mask(path)
    assert torch.equal(back.indices["w"], m.indices["w"]) and back.indices["w"].dtype == torch.int64
    assert back.shapes == {"w": (8, 8)}
    assert back.metadata["q"] == 0.25 and back.metadata["harm_sha256"] == "abc"
    with pytest.raises(ScoreFileError, match="no such file"):
        load_mask(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(ScoreFileError, match="not a readable"):
        load_mask(tmp_path / "junk.safetensors")


def test_select_global_helper_preserves_names():
    out = select_global({"x": torch.tensor([3.0, 1.0]), "y": torch.tensor([2.0])}, 0.67)
    assert out == {"x": torch.tensor([0]), "y": torch.tensor([0])} or (
        out["x"].tolist() == [0] and out["y"].tolist() == [0])
    assert top_fraction(torch.tensor([1.0, 2.0, 3.0]), 0.0).numel() == 0


def test_select_counts_takes_exact_per_matrix_counts():
    scores = {"a": torch.tensor([[3.0, -1.0, -7.0, 2.0]]), "b": torch.tensor([[-1.0, -2.0]])}
    m = select_counts(scores, {"a": 2, "b": 1}, method="signed-snip")
    assert m.indices["a"].tolist() == [1, 2] and m.indices["b"].tolist() == [1]


def test_a_q_that_selects_nothing_by_construction_is_logged(caplog):
    """Rows of 40 weights at q = 0.01: floor(0.4) = 0 in every row, so the row harm set is empty; said once."""
    g = torch.Generator().manual_seed(0)
    harm = {"model.layers.0.a": torch.randn(8, 40, generator=g), "model.layers.0.b": torch.randn(5, 30, generator=g)}
    with caplog.at_level("WARNING", logger="harmprune.selection"):
        masks = select_grid(harm, None, [0.01, 0.1], [0.0], "row", harm_method="signed-snip")
    assert masks[(0.01, 0.0)].count() == 0 and masks[(0.1, 0.0)].count() > 0
    said = [r.getMessage() for r in caplog.records]
    assert said == ["q = 0.01 selects no weights at row granularity: floor(q × size) is 0 for every row (the "
                    "largest holds 40 weights)"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="harmprune.selection"):
        select_grid(harm, None, [0.01], [0.0], "matrix", harm_method="signed-snip")  # 3 of 320: something
    assert not caplog.records
