"""Selection: which weights carry harmful generation and not general utility.

harm set    = the top-q fraction of weights by harm-support
utility set = the top-p fraction of weights by utility-support
selected    = harm set minus utility set

"Support" is how much removing a weight hurts the scored data: for ``signed-snip`` that is the most negative raw
score (zeroing w changes the loss by about −score), for the absolute methods the largest score. Score files are
stored raw; the direction is decided here, from each file's ``method`` metadata (the method's ``signed``).

Counts are floor(fraction × size) per unit: per weight matrix (``matrix``, the default), per output row (``row``)
or over all scored weights at once (``global``). Ties are broken by flat index, so results are deterministic.
A mask is a dict of weight name → sorted 1-D int64 flat indices.

``select`` reads score tensors one at a time, so it never holds all scores in memory, and computes on the device
the scores are put on (``device``; a GPU when given one). Selection is partial, never a full sort: a sampled
lower bound on the k-th largest value keeps about k candidates, and only those are ranked, ties at the threshold
going to the lowest flat indices. ``matrix`` and ``row`` work tensor by tensor; ``global`` keeps the running top
k of the tensors read so far (one pass), or for a k too large to hold, finds the exact k-th largest value by a
radix select over the float32 bit patterns (two histogram passes) before a third pass collects the indices.

``select_grid`` selects every (q, p) of a sweep in one read of each file: each tensor is ranked once, at the
largest fraction, and every smaller fraction's set is a prefix of that ranking.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import torch

from harmprune import __version__
from harmprune.errors import ScoreFileError
from harmprune.scoring_methods import scoring_method
from harmprune.tensorfile import TensorFile, save_tensors

GRANULARITIES = ("matrix", "row", "global")
log = logging.getLogger(__name__)


@dataclass
class Mask:
    """Selected weights: name → sorted flat indices, the shapes they index into, and provenance."""

    indices: dict[str, torch.Tensor]
    shapes: dict[str, tuple[int, ...]]
    metadata: dict[str, object] = field(default_factory=dict)

    def count(self) -> int:
        return sum(int(t.numel()) for t in self.indices.values())

    def total(self) -> int:
        return sum(math.prod(s) for s in self.shapes.values())

    def fraction(self) -> float:
        return self.count() / max(1, self.total())

    def counts(self) -> dict[str, int]:
        return {n: int(t.numel()) for n, t in self.indices.items()}

    def dense(self, name: str) -> torch.Tensor:
        """Boolean tensor of the weight's shape, True where selected."""
        flat = torch.zeros(math.prod(self.shapes[name]), dtype=torch.bool)
        flat[self.indices[name]] = True
        return flat.view(self.shapes[name])


def default_device() -> str:
    """Where selection computes by default: the GPU when there is one (scores stream there one tensor at a time)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def support(scores: torch.Tensor, method: str) -> torch.Tensor:
    """How much each weight supports the scored behaviour (larger = removing it hurts more)."""
    return -scores if scoring_method(method).signed else scores


def top_fraction(values: torch.Tensor, fraction: float, granularity: str = "matrix") -> torch.Tensor:
    """Flat indices (sorted) of the top floor(fraction × size) entries per unit of one tensor."""
    _check_fraction(fraction)
    if granularity not in ("matrix", "row"):
        raise ScoreFileError(f"top_fraction handles 'matrix' and 'row'; use select_global for 'global', not {granularity!r}")
    return _prefix_sets(values, [fraction], granularity)[fraction]


def select_global(values: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]], fraction: float
                  ) -> dict[str, torch.Tensor]:
    """Top floor(fraction × total) entries over all tensors together; ties broken by (tensor order, flat index)."""
    _check_fraction(fraction)
    items = dict(values.items() if isinstance(values, Mapping) else values)
    return select_global_streaming(list(items), lambda n: items[n].float(), fraction)


def select(
    harm: TensorFile | Mapping[str, torch.Tensor],
    utility: TensorFile | Mapping[str, torch.Tensor] | None,
    q: float,
    p: float,
    granularity: str = "matrix",
    *,
    harm_method: str | None = None,
    utility_method: str | None = None,
    device: str | torch.device | None = None,
) -> Mask:
    """Harm set (top-q by harm-support) minus utility set (top-p by utility-support), one tensor at a time."""
    return select_grid(harm, utility, [q], [p], granularity, harm_method=harm_method,
                       utility_method=utility_method, device=device)[(q, p)]


def select_grid(
    harm: TensorFile | Mapping[str, torch.Tensor],
    utility: TensorFile | Mapping[str, torch.Tensor] | None,
    qs: Sequence[float],
    ps: Sequence[float],
    granularity: str = "matrix",
    *,
    harm_method: str | None = None,
    utility_method: str | None = None,
    device: str | torch.device | None = None,
) -> dict[tuple[float, float], Mask]:
    """``select`` at every (q, p) of ``qs`` × ``ps``, reading each score file once.

    Each tensor is ranked once at the largest q (and p); smaller fractions take prefixes of that ranking, so a
    sweep costs about one selection. Scores are moved to ``device`` (default: where they are; CPU for files);
    the masks' indices are on the CPU.
    """
    if granularity not in GRANULARITIES:
        raise ScoreFileError(f"unknown granularity {granularity!r}; expected one of {', '.join(GRANULARITIES)}")
    qs, ps = list(dict.fromkeys(qs)), list(dict.fromkeys(ps))
    for f in (*qs, *ps):
        _check_fraction(f)
    harm_method = harm_method or _method_of(harm, "harm")
    names = _names(harm)
    if utility is not None:
        utility_method = utility_method or _method_of(utility, "utility")
        _check_compatible(harm, utility)
    shapes = {n: _shape(harm, n) for n in names}
    _warn_empty(qs, shapes, granularity)
    harm_of = lambda n: _get(harm, n, device)  # noqa: E731
    util_of = lambda n: _get(utility, n, device)  # noqa: E731
    h_neg = scoring_method(harm_method).signed
    u_neg = utility is not None and scoring_method(utility_method).signed
    util_ps = [f for f in ps if f > 0] if utility is not None else []
    if granularity == "global":
        h = _global_sets(names, harm_of, shapes, qs, h_neg)
        u = _global_sets(names, util_of, shapes, util_ps, u_neg) if util_ps else {}
        per_name = {n: ({q: h[q][n] for q in qs}, {p: u[p][n] for p in util_ps}) for n in names}
    else:
        per_name = {n: (_prefix_sets(harm_of(n), qs, granularity, h_neg),
                        _prefix_sets(util_of(n), util_ps, granularity, u_neg) if util_ps else {}) for n in names}
    masks = {}
    for q in qs:
        for p in ps:
            indices = {n: (difference(hs[q], us[p]) if p in us else hs[q]).cpu() for n, (hs, us) in per_name.items()}
            meta = {"q": q, "p": p, "granularity": granularity, "harm_method": harm_method,
                    "utility_method": utility_method, "harmprune_version": __version__, "kind": "harm-minus-utility"}
            masks[(q, p)] = Mask(indices, dict(shapes), meta)
    return masks


def _warn_empty(qs: Sequence[float], shapes: Mapping[str, Sequence[int]], granularity: str) -> None:
    """Log each q whose harm set is empty by construction: floor(q × size) is 0 for every unit it counts in."""
    sizes = [math.prod(s[1:]) if granularity == "row" else math.prod(s) for s in shapes.values()]
    largest = sum(sizes) if granularity == "global" else max(sizes, default=0)
    unit = {"row": "row", "matrix": "matrix", "global": "model"}[granularity]
    for q in qs:
        if 0 < q and math.floor(q * largest) == 0:
            log.warning("q = %g selects no weights at %s granularity: floor(q × size) is 0 for every %s (the "
                        "largest holds %d weights)", q, granularity, unit, largest)


def select_global_streaming(names: Sequence[str], load: Callable[[str], torch.Tensor], fraction: float,
                            shapes: Mapping[str, Sequence[int]] | None = None) -> dict[str, torch.Tensor]:
    """``select_global`` reading one tensor at a time through ``load(name)``: the same indices, bounded memory."""
    _check_fraction(fraction)
    sizes = {n: tuple(shapes[n]) if shapes else tuple(load(n).shape) for n in names}
    return _global_sets(names, load, sizes, [fraction])[fraction]


def select_counts(scores: TensorFile | Mapping[str, torch.Tensor], counts: Mapping[str, int],
                  method: str | None = None) -> Mask:
    """Per matrix, the top ``counts[name]`` weights by support: a selection with another set's exact counts."""
    method = method or _method_of(scores, "control")
    indices, shapes = {}, {}
    for name, k in counts.items():
        values = support(_get(scores, name), method)
        shapes[name] = tuple(values.shape)
        indices[name] = _top_k_flat(values.reshape(-1), k)
    return Mask(indices, shapes, {"kind": "top-count", "method": method})


# ---------------------------------------------------------------------------------------------- set algebra


def difference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Sorted indices in ``a`` but not in ``b`` (both sorted, unique)."""
    if b.numel() == 0 or a.numel() == 0:
        return a
    return a[~torch.isin(a, b)]


def intersection(a: Mask, b: Mask) -> Mask:
    _check_same_shapes(a, b)
    idx = {n: a.indices[n][torch.isin(a.indices[n], b.indices.get(n, torch.empty(0, dtype=torch.long)))]
           for n in a.indices}
    return Mask(idx, dict(a.shapes), {"kind": "intersection"})


def union(a: Mask, b: Mask) -> Mask:
    _check_same_shapes(a, b)
    names = list(dict.fromkeys([*a.indices, *b.indices]))
    empty = torch.empty(0, dtype=torch.long)
    idx = {n: torch.unique(torch.cat([a.indices.get(n, empty), b.indices.get(n, empty)])) for n in names}
    return Mask(idx, {**a.shapes, **b.shapes}, {"kind": "union"})


def jaccard(a: Mask, b: Mask) -> float:
    """|A ∩ B| / |A ∪ B| over all weights (0 when both are empty)."""
    inter = intersection(a, b).count()
    uni = a.count() + b.count() - inter
    return inter / uni if uni else 0.0


def expected_jaccard(a: Mask, b: Mask) -> float:
    """The Jaccard overlap two independent random masks with the same per-matrix counts would have on average."""
    inter = 0.0
    for n, shape in a.shapes.items():
        size = math.prod(shape)
        inter += a.counts().get(n, 0) * b.counts().get(n, 0) / size if size else 0.0
    uni = a.count() + b.count() - inter
    return inter / uni if uni else 0.0


_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.(.+?)(?:\.weight)?$")


def layer_and_module(name: str) -> tuple[int | None, str]:
    """``model.layers.3.mlp.down_proj.weight`` → (3, ``mlp.down_proj``)."""
    m = _LAYER.search(name)
    return (int(m.group(1)), m.group(2)) if m else (None, name.removesuffix(".weight"))


def mask_stats(mask: Mask) -> dict[str, object]:
    """Counts per layer and per module type, and the fraction selected."""
    per_layer: dict[str, int] = {}
    per_module: dict[str, int] = {}
    for name, n in mask.counts().items():
        layer, module = layer_and_module(name)
        per_layer[str(layer)] = per_layer.get(str(layer), 0) + n
        per_module[module] = per_module.get(module, 0) + n
    return {"selected": mask.count(), "total": mask.total(), "fraction": mask.fraction(),
            "per_layer": per_layer, "per_module": per_module}


# ---------------------------------------------------------------------------------------------- controls


def random_like(mask: Mask, seed: int = 0) -> Mask:
    """Uniformly random weights with the same count in every matrix as ``mask`` (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    idx = {}
    for n, chosen in mask.indices.items():
        size = math.prod(mask.shapes[n])
        idx[n] = torch.randperm(size, generator=gen)[: chosen.numel()].sort().values
    return Mask(idx, dict(mask.shapes), {"kind": "random", "seed": seed, "matched_to": mask.metadata.get("kind")})


def magnitude_matched_random(mask: Mask, weights: Mapping[str, torch.Tensor], seed: int = 0,
                             window: float = 0.01) -> Mask:
    """Random *other* weights matching ``mask``'s per-matrix counts and its |W| distribution.

    Each selected weight is paired with a random unselected weight of the same matrix whose |W| rank lies within
    ``window`` (a fraction of the matrix) of its own, so the control removes as much weight mass as the selection.
    """
    check_fits(mask, {n: tuple(w.shape) for n, w in weights.items()})
    gen = torch.Generator().manual_seed(seed)
    idx = {}
    for n, chosen in mask.indices.items():
        mag = weights[n].detach().float().abs().reshape(-1).cpu()
        free = torch.ones(mag.numel(), dtype=torch.bool)
        free[chosen] = False
        candidates = torch.nonzero(free).flatten()
        candidates = candidates[torch.sort(mag[candidates], stable=True).indices]
        if chosen.numel() > candidates.numel():
            raise ScoreFileError(f"{n}: the mask selects more than half the matrix; no disjoint control exists")
        targets = torch.searchsorted(mag[candidates].contiguous(), mag[chosen].contiguous())
        idx[n] = candidates[_draw_near(targets, candidates.numel(), window, gen)].sort().values
    return Mask(idx, dict(mask.shapes), {"kind": "magnitude-matched-random", "seed": seed, "window": window})


def _draw_near(targets: torch.Tensor, size: int, window: float, gen: torch.Generator) -> torch.Tensor:
    """Distinct positions in [0, size), each within ±window·size of its target, widening the window if crowded."""
    taken = torch.zeros(size, dtype=torch.bool)
    picked = []
    need = targets.clamp(max=size - 1)
    width = max(1, int(window * size))
    while need.numel():
        pos = (need + torch.randint(-width, width + 1, need.shape, generator=gen)).clamp(0, size - 1)
        free = ~taken[pos]
        uniq, inverse = torch.unique(pos, return_inverse=True)
        first = torch.full((uniq.numel(),), pos.numel(), dtype=torch.long)
        first.scatter_reduce_(0, inverse, torch.arange(pos.numel()), reduce="amin")
        is_first = torch.zeros(pos.numel(), dtype=torch.bool)
        is_first[first] = True
        ok = free & is_first
        taken[pos[ok]] = True
        picked.append(pos[ok])
        need = need[~ok]
        width = min(size, width * 2) if ok.float().mean() < 0.5 else width
    return torch.cat(picked) if picked else torch.empty(0, dtype=torch.long)


# ---------------------------------------------------------------------------------------------- partial selection
#
# Support is never materialised for a whole matrix: a flat float32 view of the raw scores and a ``negate`` flag
# (signed methods) travel together, and only the few candidate entries are gathered and negated. Each matrix is
# read by one reduction (the maxima of small blocks), which bounds the k-th largest value from below: the k-th
# largest block maximum is reached by at least k entries. Only the blocks reaching it are gathered and ranked.

_SMALL = 1 << 14  # tensors this small go straight to an exact k-th value
_EXACT_BELOW = 1 << 18  # for a k near the size, tensors this small skip the sampled bound
_MIN_BLOCK = 16  # block maxima pay off while k ≤ size / _MIN_BLOCK²; above, a sampled bound and one comparison
_SAMPLE = 1 << 16  # entries sampled to bound the k-th largest value from below when k is large
_SPREAD = 2654435761  # a prime: i × _SPREAD mod n scatters the sample over rows and columns
_GATHER_SHARE = 2  # kept blocks covering over half a tensor: compare the whole tensor instead of gathering
_SUB_BLOCK = 16  # kept blocks are narrowed to sub-blocks of this size before their entries are compared
_FLOOR_BLOCK = 128  # block of the running global top-k's floor test: smaller blocks' maxima cost more, larger
# blocks copy more entries (256 and 64 were slower at the 0.5B shapes, q = 1e-5 and 5e-5)
_GLOBAL_CAP = 1 << 25  # the running global top-k holds at most this many entries; beyond, the radix select
_PENDING_ENTRIES = 1 << 22  # the running global top-k ranks its copied blocks once they hold this many entries
_PENDING_TAILS = 64  # ... or once this many tensors' short last blocks wait
_ROW_TOPK_SHARE = 16  # per-row selection uses topk while k ≤ row length / this (kthvalue above: topk slows with k)


def _signed(values: torch.Tensor, negate: bool) -> torch.Tensor:
    return -values if negate else values


def _block_max(flat: torch.Tensor, negate: bool, size: int) -> torch.Tensor:
    """The support's maximum over each block of ``size`` consecutive entries (the last block may be short)."""
    full = flat.numel() // size * size
    head = flat[:full].view(-1, size)
    out = head.amin(dim=1).neg_() if negate else head.amax(dim=1)
    if full < flat.numel():
        tail = flat[full:]
        out = torch.cat([out, (-tail.min() if negate else tail.max()).reshape(1)])
    return out


def _in_blocks(flat: torch.Tensor, negate: bool, keep: torch.Tensor, size: int, floor: torch.Tensor,
               strict: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted flat indices and support values of the entries ≥ ``floor`` (> if ``strict``) in the kept blocks."""
    reaches = (lambda t: t > floor) if strict else (lambda t: t >= floor)
    blocks = torch.nonzero(keep).flatten()
    if blocks.numel() * size * _GATHER_SHARE > flat.numel():  # gathering that many costs more than one comparison
        support_ = _signed(flat, negate)
        idx = torch.nonzero(reaches(support_)).flatten()
        return idx, support_[idx]
    n_full = flat.numel() // size
    full = blocks[blocks < n_full]
    rows = flat[: n_full * size].view(n_full, size).index_select(0, full)  # whole rows: a copy
    starts = full * size
    if size >= 2 * _SUB_BLOCK and rows.numel() > _SMALL:  # about one hit per kept block: narrow to sub-blocks
        per_row = size // _SUB_BLOCK
        at = torch.nonzero(reaches(_block_max(rows.view(-1), negate, _SUB_BLOCK))).flatten()
        starts = starts[at // per_row] + at % per_row * _SUB_BLOCK
        rows = rows.view(-1, _SUB_BLOCK).index_select(0, at)
    rows = _signed(rows, negate)
    at = torch.nonzero(reaches(rows).view(-1)).flatten()
    idx, vals = starts[at // rows.shape[1]] + at % rows.shape[1], rows.view(-1)[at]
    if full.numel() < blocks.numel():  # the short last block
        tail = _signed(flat[n_full * size:], negate)
        at = torch.nonzero(reaches(tail)).flatten()
        idx, vals = torch.cat([idx, at + n_full * size]), torch.cat([vals, tail[at]])
    return idx, vals


def _block_size(n: int, k: int) -> int:
    """Blocks of about √(n / k): ~√(nk) maxima to search and ~√(nk) entries to gather."""
    return 1 << max(0, int(math.log2(max(1.0, math.sqrt(n / max(k, 1))))))


def _candidates(flat: torch.Tensor, k: int, negate: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Sorted flat indices, and support values, of entries ≥ a threshold at least k entries reach (1 ≤ k ≤ n):
    a superset of the top k, of about k entries unless many tie at the threshold. None if a value is NaN."""
    n = flat.numel()
    floating = flat.is_floating_point()
    size = _block_size(n, k)
    if n > _SMALL and size >= _MIN_BLOCK:
        maxima = _block_max(flat, negate, size)
        if floating and bool(torch.isnan(maxima.max())):
            return None
        bound = _kth_largest(maxima, k)
        return _in_blocks(flat, negate, maxima >= bound, size, bound, strict=False)
    if floating and n and bool(torch.isnan(flat.max())):
        return None
    if n > _EXACT_BELOW:
        pos = torch.arange(_SAMPLE, device=flat.device) * _SPREAD % n
        expect = k * _SAMPLE / n
        j = min(_SAMPLE, math.ceil(expect + 4 * math.sqrt(expect) + 8))
        bound = torch.kthvalue(_signed(flat[pos], negate), _SAMPLE - j + 1).values
        idx = torch.nonzero(flat <= -bound if negate else flat >= bound).flatten()
        if idx.numel() >= k:
            return idx, _signed(flat[idx], negate)
    support_ = _signed(flat, negate)
    idx = torch.nonzero(support_ >= torch.kthvalue(support_, n - k + 1).values).flatten()
    return idx, support_[idx]


def _kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest of a 1-D support tensor without NaN (1 ≤ k ≤ n), narrowing to candidates first."""
    n = values.numel()
    if n > _SMALL:
        _, vals = _candidates(values, k, False)  # type: ignore[misc]  # no NaN here
        if vals.numel() < n:
            return _kth_largest(vals, k)
    return torch.kthvalue(values, n - k + 1).values


def _top(flat: torch.Tensor, k: int, ranked: bool, negate: bool = False) -> torch.Tensor:
    """Flat indices of the k largest support entries (``flat``, negated if ``negate``), ties to the lowest indices.

    ``ranked``: in rank order (support descending, then index ascending), so any prefix is a smaller top-k;
    otherwise sorted by index. NaN ranks above everything, as in ``torch.sort``.
    """
    k = min(k, flat.numel())
    if k <= 0:
        return torch.empty(0, dtype=torch.long, device=flat.device)
    got = _candidates(flat, k, negate)
    if got is None:  # NaN: rank by sort keys instead
        got = _candidates(sort_keys(_signed(flat, negate)), k, False)
    return _top_of_candidates(*got, k, ranked)  # type: ignore[misc]


def _top_of_candidates(idx: torch.Tensor, vals: torch.Tensor, k: int, ranked: bool) -> torch.Tensor:
    """The top k of candidates (sorted ``idx`` with support ``vals``, at least k of them)."""
    kth = _kth_largest(vals, k)
    above = vals > kth
    tie = vals == kth
    need = k - int(above.sum())
    if not ranked:
        return idx[above | (tie & (tie.cumsum(0) <= need))]
    order = torch.sort(vals[above], descending=True, stable=True).indices
    return torch.cat([idx[above][order], idx[tie][:need]])


def _row_top(rows: torch.Tensor, k: int, ranked: bool, negate: bool = False) -> torch.Tensor:
    """Per row of a 2-D float (NaN ranks first) or sort-key tensor, the flat indices of the k entries of largest
    support (``rows``, negated if ``negate``), ties to the lowest column.

    ``ranked``: a (rows, k) tensor, each row in rank order; otherwise all of them as one sorted 1-D tensor. For a
    k small beside the row, ``topk`` finds the top k + 1 in about one pass; only rows where it had to choose among
    entries tied at the k-th value are redone exactly.
    """
    n_rows, n_cols = rows.shape
    k = min(k, n_cols)
    if k <= 0 or n_rows == 0:
        empty = torch.empty(n_rows, 0, dtype=torch.long, device=rows.device)
        return empty if ranked else empty.reshape(0)
    block = _row_block(n_cols, k)
    flat = _row_top_in_blocks(rows, k, negate, block) if block else None
    if flat is not None:
        return flat if ranked else flat.sort(dim=1).values.reshape(-1)
    if rows.is_floating_point() and bool(torch.isnan(rows.max())):  # max is NaN iff any is: rank by sort keys
        return _row_top(sort_keys(_signed(rows, negate)).view(rows.shape), k, ranked)
    if k * _ROW_TOPK_SHARE <= n_cols:
        # the k+1-th value equals the k-th exactly where more than k entries reach it: a tie topk settled anyhow
        values, cols = torch.topk(rows, k + 1, dim=1, largest=not negate)
        cols = cols[:, :k].contiguous()
        tied = torch.nonzero(values[:, k] == values[:, k - 1]).flatten()
        if tied.numel():
            cols[tied] = _row_top_exact(rows[tied], k, negate, values[tied, k - 1 : k])
        cols = cols.sort(dim=1).values
    else:
        cols = _row_top_exact(rows, k, negate)
    flat = cols + torch.arange(n_rows, device=rows.device).unsqueeze(1) * n_cols
    if not ranked:
        return flat.reshape(-1)
    order = torch.sort(rows.gather(1, cols), dim=1, descending=not negate, stable=True).indices
    return flat.gather(1, order)


def _row_block(n_cols: int, k: int) -> int:
    """The block for per-row block maxima: the largest power of two ≤ _FLOOR_BLOCK that divides the row and leaves
    at least 4k blocks in it, or 0 if none of at least _SUB_BLOCK does."""
    block = _FLOOR_BLOCK
    while block >= _SUB_BLOCK and (n_cols % block or n_cols // block < 4 * k):
        block //= 2
    return block if block >= _SUB_BLOCK else 0


def _row_top_in_blocks(rows: torch.Tensor, k: int, negate: bool, block: int) -> torch.Tensor | None:
    """Per row, the flat indices of the top k support entries in rank order, (rows, k): the k-th largest of the
    row's block maxima bounds its k-th entry from below, so only the blocks reaching it are ranked. None if a
    value is NaN (a block maximum is NaN then)."""
    n_rows, n_cols = rows.shape
    blocks = rows.view(n_rows, n_cols // block, block)
    maxima = blocks.amin(dim=2).neg_() if negate else blocks.amax(dim=2)  # of the support
    if maxima.is_floating_point() and bool(torch.isnan(maxima.max())):
        return None
    bound = torch.topk(maxima, k, dim=1).values[:, -1:]
    kept = torch.nonzero((maxima >= bound).view(-1)).flatten()  # at least k blocks per row, in row order
    row, at = kept // maxima.shape[1], kept % maxima.shape[1]
    values, bound = rows.view(-1, block).index_select(0, kept), bound[row]
    hit = torch.nonzero(((values <= -bound) if negate else (values >= bound)).view(-1)).flatten()
    row, col = row[hit // block], at[hit // block] * block + hit % block  # in (row, column) order
    values = _signed(values.view(-1)[hit], negate)
    order = torch.sort(values, descending=True, stable=True).indices  # then by row, keeping that order
    order = order[torch.sort(row[order], stable=True).indices]
    row, col = row[order], col[order]
    counts = torch.bincount(row, minlength=n_rows)
    first = torch.cumsum(counts, 0) - counts
    keep = torch.arange(row.numel(), device=row.device) - first[row] < k
    return col[keep].view(n_rows, k) + torch.arange(n_rows, device=rows.device).unsqueeze(1) * n_cols


def _row_top_exact(rows: torch.Tensor, k: int, negate: bool, kth: torch.Tensor | None = None) -> torch.Tensor:
    """The columns (ascending, (rows, k)) of each row's top k support entries, ties to the lowest column, from
    each row's k-th value (``kth``, found here if not given) and a count of the ties before each entry."""
    n_rows, n_cols = rows.shape
    if kth is None:
        kth = torch.kthvalue(rows, k if negate else n_cols - k + 1, dim=1, keepdim=True).values
    above = (rows < kth) if negate else (rows > kth)
    tie = rows == kth
    need = k - above.sum(dim=1, keepdim=True)
    keep = above | (tie & (tie.cumsum(dim=1) <= need))
    return torch.nonzero(keep)[:, 1].view(n_rows, k)


def _prefix_sets(values: torch.Tensor, fractions: Sequence[float], granularity: str, negate: bool = False
                 ) -> dict[float, torch.Tensor]:
    """Sorted flat indices of the top floor(f × size) support entries per unit of one tensor, for each fraction f
    (support: ``values``, negated if ``negate``).

    One ranking at the largest fraction serves every smaller one (a prefix), so a sweep ranks each tensor once.
    """
    if not fractions:
        return {}
    top = max(fractions)
    if granularity == "matrix":
        flat = values.reshape(-1).float()
        n = flat.numel()
        if len(fractions) == 1:
            return {top: _top(flat, math.floor(top * n), False, negate)}
        ranking = _top(flat, math.floor(top * n), True, negate)
        return {f: ranking[: math.floor(f * n)].sort().values for f in fractions}
    n_cols = values.numel() // values.shape[0] if values.numel() else 0
    if math.floor(top * n_cols) == 0:  # nothing to select: no need to look at the values
        empty = torch.empty(0, dtype=torch.long, device=values.device)
        return {f: empty for f in fractions}
    rows = values.reshape(values.shape[0], -1).float()
    if len(fractions) == 1:
        return {top: _row_top(rows, math.floor(top * n_cols), ranked=False, negate=negate)}
    ranking = _row_top(rows, math.floor(top * n_cols), ranked=True, negate=negate)
    return {f: ranking[:, : math.floor(f * n_cols)].reshape(-1).sort().values for f in fractions}


class _RunningTop:
    """The top k support entries of a stream of tensors, in rank order: sort key descending, then tensor order,
    then flat index (ties at the k-th key go to the earlier tensor).

    Until it holds k entries it takes each tensor's own top k. From then on a tensor costs one pass over its
    values: the maxima of its blocks of ``block`` entries, of which the blocks reaching the floor (the k-th largest
    entry so far) are copied aside whole. Now and then (once the copied blocks number k or hold
    ``_PENDING_ENTRIES``), the k-th largest of the kept entries and the copied blocks' maxima bounds the k-th
    largest entry from below, and only the copied entries reaching it are ranked with the kept ones. So a tensor
    costs a handful of operations whatever its size. NaN ranks above everything: a block holding one has a NaN
    maximum, which is never below the floor.
    """

    def __init__(self, k: int, negate: bool, block: int):
        self.k, self.negate, self.block = k, negate, block
        self.keys = torch.empty(0, dtype=torch.int32)  # the kept entries, in rank order
        self.tensor = torch.empty(0, dtype=torch.int32)
        self.index = torch.empty(0, dtype=torch.long)
        self._floor = -math.inf  # a support value the k-th largest entry reaches: the float of keys[-1] once full
        self._entries: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # candidates: keys, tensor, index
        self._rows: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []  # tensor, starts, rows, maxima
        self._pending = 0  # entries in _rows

    def add(self, position: int, values: torch.Tensor) -> None:
        if self.k == 0:
            return
        flat = values.reshape(-1).float()
        if self.keys.device != flat.device:
            self.keys, self.tensor, self.index = (t.to(flat.device) for t in (self.keys, self.tensor, self.index))
        if self.keys.numel() < self.k:
            self._add_entries(position, _top(flat, self.k, False, self.negate), flat)
            self._merge()
            return
        n_full = flat.numel() // self.block
        if n_full:
            blocks = flat[: n_full * self.block].view(n_full, self.block)
            maxima = _block_max(blocks.view(-1), self.negate, self.block)
            ids = torch.nonzero(~(maxima < self._floor)).flatten()  # not below: a NaN maximum reaches the floor
            if ids.numel() > self.k:  # more blocks than k reach an old floor: this tensor's own k-th block is higher
                keys = sort_keys(maxima)
                ids = torch.nonzero(keys >= _kth_largest(keys, self.k)).flatten()
            if ids.numel():
                self._rows.append((position, ids * self.block, blocks.index_select(0, ids), maxima[ids]))
                self._pending += ids.numel() * self.block
        if n_full * self.block < flat.numel():  # the short last block: its entries are candidates themselves
            self._add_entries(position, torch.arange(n_full * self.block, flat.numel(), device=flat.device), flat)
        if self._pending >= min(self.k * self.block, _PENDING_ENTRIES) or len(self._entries) >= _PENDING_TAILS:
            self._merge()

    def _add_entries(self, position: int, index: torch.Tensor, flat: torch.Tensor) -> None:
        keys = sort_keys(_signed(flat[index], self.negate))
        self._entries.append((keys, torch.full_like(keys, position), index))

    def _merge(self) -> None:
        """Rank the kept entries with the candidates that can still be among the top k; keep the top k."""
        if self.k == 0 or not (self._rows or self._entries):
            return
        keys, tensor, index = (list(t) for t in zip(*self._entries)) if self._entries else ([], [], [])
        if self._rows:
            keys, tensor, index = self._rows_reaching(keys, tensor, index)
        keys, tensor, index = torch.cat(keys), torch.cat(tensor), torch.cat(index)
        # The candidates in (tensor, index) order after the kept entries (earlier tensors), then a stable sort by
        # key descending: rank order.
        order = _stream_order(tensor, index)
        keys = torch.cat([self.keys, keys[order]])
        tensor, index = torch.cat([self.tensor, tensor[order]]), torch.cat([self.index, index[order]])
        order = torch.sort(keys, descending=True, stable=True).indices[: self.k]
        self.keys, self.tensor, self.index = keys[order], tensor[order], index[order]
        self._entries, self._rows, self._pending = [], [], 0
        if self.keys.numel() == self.k:
            self._floor = float(_key_value(self.keys[-1]))

    def _rows_reaching(self, keys: list[torch.Tensor], tensor: list[torch.Tensor], index: list[torch.Tensor]):
        """The candidate lists extended by the copied blocks' entries that can be among the top k.

        Each kept entry, candidate and block holds an entry at least its key, so the k-th largest of those keys
        bounds the k-th largest entry from below; only blocks reaching that bound are compared, in float."""
        tops = sort_keys(torch.cat([r[3] for r in self._rows]))
        known = torch.cat([self.keys, *keys, tops])
        if known.numel() >= self.k:
            bound = _kth_largest(known, self.k)
            floor = float(_key_value(bound))
        else:  # fewer than k entries known: every copied entry is a candidate
            bound, floor = known.min(), -math.inf
        at = torch.nonzero(tops >= bound).flatten()
        rows = torch.cat([r[2] for r in self._rows]).index_select(0, at)
        starts = torch.cat([r[1] for r in self._rows])[at]
        owner = torch.cat([torch.full((r[1].numel(),), r[0], dtype=torch.int32, device=rows.device)
                           for r in self._rows])[at]
        hit = torch.nonzero((~(rows > -floor)) if self.negate else (~(rows < floor))).T  # NaN: not beyond it
        keys.append(sort_keys(_signed(rows[hit[0], hit[1]], self.negate)))
        tensor.append(owner[hit[0]])
        index.append(starts[hit[0]] + hit[1])
        return keys, tensor, index

    def prefix(self, k: int, count: int) -> list[torch.Tensor]:
        """The top ``k`` (k ≤ self.k) split per tensor (``count`` tensors), each sorted by flat index."""
        self._merge()
        tensor, index = self.tensor[:k].long(), self.index[:k]
        index = index[_stream_order(tensor, index)].cpu()
        sizes = torch.bincount(tensor, minlength=count).tolist()
        return [part.clone() for part in torch.split(index, sizes)]  # not views: safetensors refuses shared storage


def _stream_order(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The order that sorts entries by (tensor position, flat index)."""
    return torch.sort(tensor.long() * (1 << 40) + index).indices


def _key_value(key: torch.Tensor) -> torch.Tensor:
    """The float32 whose ``sort_keys`` key is ``key`` (a NaN for the key every NaN maps to)."""
    k = key.clone().reshape(1)
    k ^= (k >> 31) & 0x7FFFFFFF
    return k.view(torch.float32)[0]


def _global_sets(names: Sequence[str], load: Callable[[str], torch.Tensor], shapes: Mapping[str, Sequence[int]],
                 fractions: Sequence[float], negate: bool = False) -> dict[float, dict[str, torch.Tensor]]:
    """For each fraction f, the top floor(f × total) support entries over all tensors, per tensor (sorted flat
    indices); support is ``load(name)``, negated if ``negate``.

    One read of each tensor keeps the running top k at the largest fraction; when that k is too many entries to
    hold, each fraction is selected by the streaming radix select instead (three reads per fraction).
    """
    if not fractions:
        return {}
    total = sum(math.prod(shapes[n]) for n in names)
    ks = {f: math.floor(f * total) for f in fractions}
    if max(ks.values()) > _GLOBAL_CAP:
        support_of = lambda n: _signed(load(n).float(), negate)  # noqa: E731
        out = {}
        for f, k in ks.items():
            cut = _global_cut(names, support_of, k)
            out[f] = {n: cut.take(support_of(n)).cpu() for n in names}
        return out
    k = max(ks.values())
    running = _RunningTop(k, negate, _FLOOR_BLOCK)
    for i, n in enumerate(names):
        running.add(i, load(n))
    return {f: dict(zip(names, running.prefix(k, len(names)))) for f, k in ks.items()}


# ---------------------------------------------------------------------------------------------- streaming global

_CHUNK = 1 << 22  # elements turned into sort keys at a time
_HALF = 1 << 16  # radix digit: 16 bits, two digits per float32


def sort_keys(values: torch.Tensor) -> torch.Tensor:
    """int32 keys ordered like ``torch.sort`` orders float32: −0 equals +0, every NaN above +inf."""
    v = values.reshape(-1).float() + 0.0  # a copy we own, with −0 + 0 = +0
    nan = torch.isnan(v) if v.numel() and bool(torch.isnan(v.max())) else None  # max is NaN iff any is
    keys = v.view(torch.int32)
    flip = keys >> 31
    flip &= 0x7FFFFFFF
    keys ^= flip  # negatives' magnitude bits flipped: signed int order is now float order
    return keys if nan is None else keys.masked_fill_(nan, torch.iinfo(torch.int32).max)


@dataclass
class _GlobalCut:
    """Everything above ``key``, plus the first ``ties`` entries equal to it in (tensor order, flat index)."""

    key: int
    ties: int
    everything: bool = False
    nothing: bool = False

    def take(self, values: torch.Tensor) -> torch.Tensor:
        """This tensor's chosen flat indices (sorted); call once per tensor, in the selection's tensor order."""
        if self.nothing or self.everything:
            return torch.arange(values.numel()) if self.everything else torch.empty(0, dtype=torch.long)
        flat = values.reshape(-1)
        above, equal = [], []
        for start in range(0, flat.numel(), _CHUNK):
            keys = sort_keys(flat[start : start + _CHUNK])
            above.append(torch.nonzero(keys > self.key).flatten() + start)
            if self.ties:
                eq = torch.nonzero(keys == self.key).flatten()[: self.ties] + start
                self.ties -= eq.numel()
                equal.append(eq)
        return torch.cat(above + equal).sort().values if above else torch.empty(0, dtype=torch.long)


def _global_cut(names: Sequence[str], load: Callable[[str], torch.Tensor], k: int) -> _GlobalCut:
    """The exact k-th largest key over all tensors: a histogram of the high 16 bits, then of the low 16."""
    if k <= 0:
        return _GlobalCut(0, 0, nothing=True)
    high = _histogram(names, load, lambda keys: (keys >> 16).add_(_HALF // 2))
    total = int(high.sum())
    if k >= total:
        return _GlobalCut(0, 0, everything=True)
    hi_bin, rank_in_bin = _bin_of_kth(high, k)
    base = (hi_bin - _HALF // 2) << 16
    low = _histogram(names, load, lambda keys: (keys[(keys >> 16) == hi_bin - _HALF // 2] - base))
    lo_bin, need = _bin_of_kth(low, rank_in_bin)
    return _GlobalCut(base + lo_bin, need)


def _histogram(names: Sequence[str], load: Callable[[str], torch.Tensor], digit) -> torch.Tensor:
    counts = torch.zeros(_HALF, dtype=torch.long)
    for name in names:
        flat = load(name).reshape(-1)
        for start in range(0, flat.numel(), _CHUNK):
            counts += torch.bincount(digit(sort_keys(flat[start : start + _CHUNK])), minlength=_HALF).cpu()
    return counts


def _bin_of_kth(counts: torch.Tensor, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest entry (1-based), and that entry's rank inside the bin."""
    from_top = counts.flip(0).cumsum(0)
    j = int(torch.searchsorted(from_top, torch.tensor(k)))  # first position with cumulative count ≥ k
    before = int(from_top[j - 1]) if j else 0
    return _HALF - 1 - j, k - before


# ---------------------------------------------------------------------------------------------- files


def save_mask(mask: Mask, path: str | Path, **extra_metadata: object) -> Path:
    meta = {**mask.metadata, **extra_metadata, "shapes": {n: list(s) for n, s in mask.shapes.items()},
            "selected": mask.count(), "total": mask.total()}
    return save_tensors({n: t.to(torch.int64) for n, t in mask.indices.items()}, path, meta)


def load_mask(path: str | Path) -> Mask:
    f = TensorFile(path)
    shapes = f.metadata.get("shapes")
    if not isinstance(shapes, dict):
        raise ScoreFileError(f"{path}: not a harmprune mask (no 'shapes' metadata)")
    indices = {}
    for name, t in f.items():
        if t.dtype != torch.int64 or t.dim() != 1:
            raise ScoreFileError(f"{path}: tensor {name!r} is not 1-D int64 indices")
        if name not in shapes:
            raise ScoreFileError(f"{path}: tensor {name!r} has no shape in the metadata")
        indices[name] = t
    meta = {k: v for k, v in f.metadata.items() if k != "shapes"}
    return Mask(indices, {n: tuple(s) for n, s in shapes.items()}, meta)


# ---------------------------------------------------------------------------------------------- internals


def _top_k_flat(values: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted flat indices of the k largest entries (ties: lowest flat index first)."""
    return _top(values.reshape(-1).float(), k, ranked=False)


def _check_fraction(fraction: float) -> None:
    if not 0.0 <= fraction <= 1.0 or math.isnan(fraction):
        raise ScoreFileError(f"a fraction must lie in [0, 1], got {fraction}")


def _names(scores) -> list[str]:
    return scores.names() if isinstance(scores, TensorFile) else list(scores)


def _get(scores, name: str, device: str | torch.device | None = None) -> torch.Tensor:
    t = scores.get(name) if isinstance(scores, TensorFile) else scores[name]
    return (t if device is None else t.to(device)).float()


def _shape(scores, name: str) -> tuple[int, ...]:
    return scores.shape(name) if isinstance(scores, TensorFile) else tuple(scores[name].shape)


def _method_of(scores, role: str) -> str:
    method = scores.metadata.get("method") if isinstance(scores, TensorFile) else None
    if not method:
        raise ScoreFileError(f"the {role} scores carry no 'method' metadata; pass {role}_method explicitly")
    return str(method)


def _check_compatible(harm, utility) -> None:
    h, u = set(_names(harm)), set(_names(utility))
    if h != u:
        missing = sorted(h - u)[:3] or sorted(u - h)[:3]
        raise ScoreFileError(f"harm and utility scores cover different weights (e.g. {missing})")
    for n in _names(harm):
        hs, us = _shape(harm, n), _shape(utility, n)
        if hs != us:
            raise ScoreFileError(f"weight {n!r}: harm scores have shape {hs}, utility scores {us}")


def check_fits(mask: Mask, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Every weight the mask names exists with the mask's shape, and every index lies inside it."""
    for n, chosen in mask.indices.items():
        if n not in shapes:
            raise ScoreFileError(f"the mask names weight {n!r}, which the model does not have")
        if tuple(mask.shapes.get(n, shapes[n])) != tuple(shapes[n]):
            raise ScoreFileError(f"the mask expects {n!r} of shape {tuple(mask.shapes[n])}, the model has "
                                 f"{tuple(shapes[n])}: the mask was made for another model")
        if chosen.numel() and (int(chosen.min()) < 0 or int(chosen.max()) >= math.prod(shapes[n])):
            raise ScoreFileError(f"the mask's indices for {n!r} fall outside [0, {math.prod(shapes[n])})")


def _check_same_shapes(a: Mask, b: Mask) -> None:
    for n in set(a.shapes) & set(b.shapes):
        if a.shapes[n] != b.shapes[n]:
            raise ScoreFileError(f"masks disagree on the shape of {n!r}: {a.shapes[n]} vs {b.shapes[n]}")

