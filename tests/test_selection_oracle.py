"""Partial selection gives the same masks, bit for bit, as the full stable sort it replaced (kept here as the oracle).

The oracle below is the selection algorithm harmprune used before partial selection: a stable descending sort of
every matrix (or row, or of all scores concatenated), the first k taken, ties falling to the lowest flat index.
"""

from __future__ import annotations

import math

import pytest
import torch

import harmprune.selection as selection
from harmprune.selection import (
    difference, select, select_counts, select_global, select_global_streaming, select_grid, support, top_fraction,
)
from harmprune.tensorfile import TensorFile, save_tensors

# ------------------------------------------------------------------------------------------- the oracle


def old_top_k_flat(values: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0:
        return torch.empty(0, dtype=torch.long)
    order = torch.sort(values.float(), descending=True, stable=True).indices
    return order[:k].sort().values


def old_top_fraction(values: torch.Tensor, fraction: float, granularity: str) -> torch.Tensor:
    if granularity == "matrix":
        return old_top_k_flat(values.reshape(-1), math.floor(fraction * values.numel()))
    rows = values.reshape(values.shape[0], -1)
    k = math.floor(fraction * rows.shape[1])
    if k == 0:
        return torch.empty(0, dtype=torch.long)
    cols = torch.sort(rows.float(), dim=1, descending=True, stable=True).indices[:, :k]
    flat = cols + torch.arange(rows.shape[0]).unsqueeze(1) * rows.shape[1]
    return flat.reshape(-1).sort().values


def old_select_global(items: dict[str, torch.Tensor], fraction: float) -> dict[str, torch.Tensor]:
    flat = torch.cat([v.reshape(-1).float() for v in items.values()])
    chosen = old_top_k_flat(flat, math.floor(fraction * flat.numel()))
    out, offset = {}, 0
    for name, v in items.items():
        lo, hi = torch.searchsorted(chosen, torch.tensor([offset, offset + v.numel()]))
        out[name] = chosen[lo:hi] - offset
        offset += v.numel()
    return out


def old_select(harm, util, q, p, granularity, harm_method, util_method) -> dict[str, torch.Tensor]:
    h = {n: support(t.float(), harm_method) for n, t in harm.items()}
    u = {n: support(t.float(), util_method) for n, t in util.items()} if util is not None else None
    if granularity == "global":
        hs = old_select_global(h, q)
        us = old_select_global(u, p) if u is not None and p > 0 else None
    else:
        hs = {n: old_top_fraction(t, q, granularity) for n, t in h.items()}
        us = {n: old_top_fraction(t, p, granularity) for n, t in u.items()} if u is not None and p > 0 else None
    return {n: difference(hs[n], us[n]) if us is not None else hs[n] for n in h}


# ------------------------------------------------------------------------------------------- tied score sets


def tied_scores(seed: int) -> dict[str, torch.Tensor]:
    """Matrices built to tie: few distinct values, all-equal rows, an all-equal matrix, ties straddling the
    threshold, special floats (±0, ±inf, NaN), and one large enough to take the sampled threshold."""
    g = torch.Generator().manual_seed(seed)
    ints = torch.randint(-3, 4, (37, 23), generator=g).float()  # 7 values: every threshold is a tie
    rows = torch.randn(12, 30, generator=g)
    rows[::3] = 1.5  # all-equal rows
    rows[1::3, :10] = rows[1::3, :10].max()  # each such row's maximum repeated: ties straddle row thresholds
    same = torch.full((9, 16), -0.25)
    special = torch.randint(-3, 4, (20, 17), generator=g).float()
    special[special == 3] = float("nan")
    special[special == -3] = -0.0
    special[special == 2] = float("inf")
    special[special == -2] = -float("inf")
    big = torch.randint(-50, 50, (640, 512), generator=g).float()  # > _EXACT_BELOW: the sampled candidates
    big[:, :7] = 49.0  # a block of the top value much larger than any small k
    odd = torch.randint(-3, 4, (160, 128), generator=g).float()  # special floats on the block-maxima path
    odd[odd == 3] = float("nan")
    odd[odd == -3] = -0.0
    odd[odd == 2] = float("inf")
    return {"model.layers.3.a": odd, "model.layers.0.a": ints, "model.layers.0.b": rows, "model.layers.1.a": same,
            "model.layers.1.b": special, "model.layers.2.a": big, "model.layers.2.b": torch.randn(5, 8, generator=g)}


FRACTIONS = (0.0, 1e-5, 0.001, 0.013, 0.1, 0.37, 0.5, 0.999, 1.0)
METHODS = ("signed-snip", "snip", "wanda", "magnitude")


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what) -> None:
    assert got.keys() == want.keys()
    for n in want:
        assert got[n].dtype == torch.long and got[n].device.type == "cpu"
        assert torch.equal(got[n], want[n]), (what, n, got[n].numel(), want[n].numel())


@pytest.mark.parametrize("granularity", ["matrix", "row"])
@pytest.mark.parametrize("seed", [0, 1])
def test_top_fraction_equals_full_sort(granularity, seed):
    for name, t in tied_scores(seed).items():
        for f in FRACTIONS:
            for values in (t, -t):
                assert torch.equal(top_fraction(values, f, granularity), old_top_fraction(values, f, granularity)), \
                    (name, f, granularity)


@pytest.mark.parametrize("seed", [0, 1])
def test_global_equals_full_sort(seed):
    scores = tied_scores(seed)
    for f in FRACTIONS:
        for sign in (1, -1):
            vals = {n: sign * t for n, t in scores.items()}
            want = old_select_global(vals, f)
            assert_same(select_global(vals, f), want, f)
            assert_same(select_global_streaming(list(vals), vals.__getitem__, f), want, f)


def write(tmp_path, name: str, tensors: dict[str, torch.Tensor], method: str, dtype=torch.float32) -> TensorFile:
    save_tensors({n: t.to(dtype) for n, t in tensors.items()}, tmp_path / name, {"method": method})
    return TensorFile(tmp_path / name)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("granularity", ["matrix", "row", "global"])
def test_select_from_score_files_equals_oracle(tmp_path, method, granularity):
    harm = dict(sorted(tied_scores(2).items()))  # files list names sorted
    g = torch.Generator().manual_seed(9)
    util = {n: torch.randint(-2, 3, t.shape, generator=g).float() for n, t in harm.items()}
    hf, uf = write(tmp_path, "h.safetensors", harm, method), write(tmp_path, "u.safetensors", util, method)
    for q, p in ((0.0, 0.0), (1e-5, 0.0), (0.013, 0.001), (0.1, 0.05), (0.37, 0.5), (1.0, 0.2), (1.0, 1.0)):
        want = old_select(harm, util, q, p, granularity, method, method)
        assert_same(select(hf, uf, q, p, granularity).indices, want, (q, p))
    assert_same(select(hf, None, 0.2, 0.1, granularity).indices, old_select(harm, None, 0.2, 0.1, granularity,
                                                                            method, method), "no utility")


def test_bfloat16_score_files_equal_oracle(tmp_path):
    harm = {n: t for n, t in sorted(tied_scores(3).items()) if t.isfinite().all()}
    hf = write(tmp_path, "h.safetensors", harm, "signed-snip", torch.bfloat16)
    as_read = {n: t.to(torch.bfloat16).float() for n, t in harm.items()}
    for granularity in ("matrix", "row", "global"):
        want = old_select(as_read, None, 0.05, 0.0, granularity, "signed-snip", None)
        assert_same(select(hf, None, 0.05, 0.0, granularity).indices, want, granularity)


@pytest.mark.parametrize("granularity", ["matrix", "row", "global"])
def test_grid_equals_one_selection_per_point(tmp_path, granularity):
    harm = dict(sorted(tied_scores(4).items()))
    g = torch.Generator().manual_seed(5)
    util = {n: torch.randn(t.shape, generator=g).round(decimals=1) for n, t in harm.items()}
    hf = write(tmp_path, "h.safetensors", harm, "signed-snip")
    uf = write(tmp_path, "u.safetensors", util, "snip")
    qs, ps = [0.5, 1e-5, 0.013, 0.1, 0.0], [0.0, 0.05, 0.2]
    grid = select_grid(hf, uf, qs, ps, granularity)
    assert set(grid) == {(q, p) for q in qs for p in ps}
    for (q, p), mask in grid.items():
        assert_same(mask.indices, old_select(harm, util, q, p, granularity, "signed-snip", "snip"), (q, p))
        assert mask.metadata["q"] == q and mask.metadata["p"] == p


class ReadCounter(TensorFile):
    def __init__(self, path):
        super().__init__(path)
        self.reads: dict[str, int] = {}

    def get(self, name):
        self.reads[name] = self.reads.get(name, 0) + 1
        return super().get(name)


@pytest.mark.parametrize("granularity", ["matrix", "row", "global"])
def test_grid_reads_each_tensor_once(tmp_path, granularity):
    g = torch.Generator().manual_seed(0)
    harm = {f"model.layers.{i}.w": torch.randn(40, 30, generator=g) for i in range(4)}
    write(tmp_path, "h.safetensors", harm, "snip")
    write(tmp_path, "u.safetensors", {n: torch.randn(40, 30, generator=g) for n in harm}, "snip")
    hf, uf = ReadCounter(tmp_path / "h.safetensors"), ReadCounter(tmp_path / "u.safetensors")
    select_grid(hf, uf, [0.01, 0.02, 0.05, 0.1], [0.01, 0.05], granularity)
    assert set(hf.reads.values()) == {1} and set(uf.reads.values()) == {1}


def test_global_beyond_the_running_cap_uses_the_radix_select(monkeypatch):
    monkeypatch.setattr(selection, "_GLOBAL_CAP", 50)
    scores = tied_scores(6)
    for f in (0.001, 0.1, 0.6):
        assert_same(select_global(scores, f), old_select_global(scores, f), f)


def test_sampled_threshold_and_its_fallback(monkeypatch):
    """Small sample and size limits: block maxima and the sampled bound are used, and when too few entries reach it (the sampled
    positions hold the largest values), the exact k-th value is found instead; both give the oracle's set."""
    monkeypatch.setattr(selection, "_SAMPLE", 64)
    monkeypatch.setattr(selection, "_EXACT_BELOW", 10)
    monkeypatch.setattr(selection, "_SMALL", 10)  # block maxima, recursively, even on 1000 entries
    g = torch.Generator().manual_seed(1)
    flat = torch.randint(0, 5, (1000,), generator=g).float()
    for case in ("ties", "adversarial", "special"):
        t = flat.clone()
        if case == "adversarial":
            t[torch.arange(64) * selection._SPREAD % 1000] = 100.0
        if case == "special":
            t[t == 4] = float("nan")
            t[t == 3] = -0.0
            t[::97] = -float("inf")
        for k in (0, 1, 5, 63, 64, 65, 100, 400, 999, 1000, 1500):
            for negate in (False, True):
                support_ = -t if negate else t
                assert torch.equal(selection._top(t, k, False, negate), old_top_k_flat(support_, k)), (case, k)
                order = torch.sort(support_, descending=True, stable=True).indices
                assert torch.equal(selection._top(t, k, True, negate), order[: min(k, 1000)]), (case, k)
    scores = {"a": flat.view(40, 25), "b": t.view(25, 40), "c": -t.view(50, 20)}
    for f in (0.001, 0.01, 0.1, 0.5):
        assert_same(select_global(scores, f), old_select_global(scores, f), f)


def test_select_counts_equals_oracle():
    scores = tied_scores(7)
    counts = {n: max(0, t.numel() // 3 - 1) for n, t in scores.items()}
    counts["model.layers.0.a"] = scores["model.layers.0.a"].numel()  # k = numel
    counts["model.layers.1.a"] = 0
    mask = select_counts(scores, counts, "signed-snip")
    for n, k in counts.items():
        assert torch.equal(mask.indices[n], old_top_k_flat(-scores[n].reshape(-1), k)), n


@pytest.mark.parametrize("n, size", [(1000, 16), (1024, 16), (5003, 128), (1_000_003, 128), (400_000, 64)])
@pytest.mark.parametrize("negate", [False, True])
@pytest.mark.parametrize("strict", [False, True])
def test_gathering_kept_blocks_equals_comparing_every_entry(n, size, negate, strict):
    """``_in_blocks`` reads whole kept blocks (and the short last one), narrowed to sub-blocks when the kept rows
    are many (the two largest cases): the same entries, in index order, as a comparison of every entry of them."""
    g = torch.Generator().manual_seed(n + size)
    flat = torch.randint(-20, 20, (n,), generator=g).float()  # many ties at the floor
    n_blocks = math.ceil(n / size)
    keep = torch.zeros(n_blocks, dtype=torch.bool)
    keep[torch.randperm(n_blocks, generator=g)[: max(1, n_blocks // 20)]] = True
    keep[-1] = True  # the last block, short unless size divides n
    floor = torch.tensor(5.0)
    idx, vals = selection._in_blocks(flat, negate, keep, size, floor, strict)
    support_ = -flat if negate else flat
    in_kept = keep.repeat_interleave(size)[:n]
    hit = in_kept & ((support_ > floor) if strict else (support_ >= floor))
    expected = torch.nonzero(hit).flatten()
    assert torch.equal(idx, expected) and torch.equal(vals, support_[expected])


@pytest.mark.parametrize("fraction", [1e-3, 1e-2, 0.2])
def test_global_over_many_tied_tensors_equals_full_sort(fraction):
    """Many tensors with few distinct values: the running top k merges its pending entries only now and then, so
    later tensors are tested against an older (lower) floor; ties must still go to earlier tensors, then indices."""
    g = torch.Generator().manual_seed(7)
    vals = {f"t{i}": torch.randint(-4, 5, (int(torch.randint(20, 300, (1,), generator=g)), 64), generator=g).float()
            for i in range(60)}
    for sign in (1, -1):
        signed = {n: sign * t for n, t in vals.items()}
        want = old_select_global(signed, fraction)
        assert_same(select_global(signed, fraction), want, fraction)


@pytest.mark.parametrize("fraction", [1e-4, 1e-3, 1e-2])
def test_global_when_a_large_tensor_follows_small_low_ones(fraction):
    """A small tensor of low values sets a low floor; the large tensors after it have more blocks above that floor
    than k, so they are cut by their own top-k bound (ties at it to the lowest indices), then narrowed to
    sub-blocks. Same indices as a full sort, for both signs."""
    g = torch.Generator().manual_seed(3)
    vals = {"low": torch.randint(-6, 0, (40, 64), generator=g).float(),
            "wide": torch.randn(1000, 512, generator=g),
            "tied": torch.randint(-4, 5, (600, 256), generator=g).float(),
            "late": torch.randn(300, 128, generator=g) * 3}
    for sign in (1, -1):
        signed = {n: sign * t for n, t in vals.items()}
        assert_same(select_global(signed, fraction), old_select_global(signed, fraction), fraction)


@pytest.mark.parametrize("negate", [False, True])
def test_running_top_with_frequent_merges_short_blocks_and_nan_equals_full_sort(monkeypatch, negate):
    """The running global top-k with small blocks and merges after a few copied blocks or short last blocks:
    tensors whose size the block does not divide, NaN of both signs (a NaN block maximum always reaches the floor),
    ±0 and ±inf, ties across tensors; every fraction of a sweep (prefixes of one ranking) equals a full sort."""
    monkeypatch.setattr(selection, "_FLOOR_BLOCK", 16)
    monkeypatch.setattr(selection, "_PENDING_ENTRIES", 64)
    monkeypatch.setattr(selection, "_PENDING_TAILS", 2)
    g = torch.Generator().manual_seed(11)
    vals = {}
    for i in range(25):
        t = torch.randint(-5, 6, (int(torch.randint(3, 40, (1,), generator=g)), 23), generator=g).float()
        t[t == 5] = float("nan") if i % 2 else -float("nan")
        t[t == -5] = -0.0
        t[t == 4] = float("inf") if i % 3 else 0.0
        vals[f"t{i}"] = t
    shapes = {n: tuple(t.shape) for n, t in vals.items()}
    fractions = [0.001, 0.01, 0.05, 0.2]
    got = selection._global_sets(list(vals), vals.__getitem__, shapes, fractions, negate)
    for f in fractions:
        assert_same(got[f], old_select_global({n: -t if negate else t for n, t in vals.items()}, f), f)


@pytest.mark.parametrize("negate", [False, True])
def test_row_paths_equal_full_sort(negate):
    """Per-row selection takes the block-maxima path (rows of 512 and 1024), topk (rows of 17 × 40, no block
    divides them) or the kthvalue path (k large beside the row); ties inside and across blocks, ±0, and NaN (which
    sends a tensor to sort keys); a sweep's fractions are prefixes of one ranking. All equal a full stable sort."""
    g = torch.Generator().manual_seed(5)
    ties = torch.randint(-3, 4, (30, 512), generator=g).float()
    ties[ties == -3] = -0.0
    ties[::4, 100:140] = 3.0  # many tied maxima in one stretch of every 4th row
    with_nan = torch.randint(-3, 4, (20, 1024), generator=g).float()
    with_nan[with_nan == 3] = float("nan")
    odd = torch.randint(-3, 4, (25, 17 * 40), generator=g).float()
    for name, t in {"ties": ties, "nan": with_nan, "odd": odd, "normal": torch.randn(40, 1024, generator=g)}.items():
        fractions = [0.002, 0.004, 0.01, 0.03, 0.2]
        got = selection._prefix_sets(t, fractions, "row", negate)
        single = selection._prefix_sets(t, [0.01], "row", negate)[0.01]
        support_ = -t if negate else t
        for f in fractions:
            assert torch.equal(got[f], old_top_fraction(support_, f, "row")), (name, f)
        assert torch.equal(single, old_top_fraction(support_, 0.01, "row")), name
