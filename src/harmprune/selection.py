"""Selection: which weights carry harmful generation and not general utility.

harm set    = the top-q fraction of weights by harm-support
utility set = the top-p fraction of weights by utility-support
selected    = harm set minus utility set

"Support" is how much removing a weight hurts the scored data: for ``signed-snip`` that is the most negative raw
score (zeroing w changes the loss by about −score), for the absolute methods the largest score. Score files are
stored raw; the direction is decided here, from each file's ``method`` metadata.

Counts are floor(fraction × size) per unit: per weight matrix (``matrix``, the default), per output row (``row``)
or over all scored weights at once (``global``). Ties are broken by flat index, so results are deterministic.
A mask is a dict of weight name → sorted 1-D int64 flat indices.

``select`` reads score tensors one at a time, so it never holds all scores in memory: ``matrix`` and ``row`` work
tensor by tensor, and ``global`` finds the exact k-th largest value by a radix select over the float32 bit
patterns (two histogram passes over the tensors) before a third pass collects the indices.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import torch

from harmprune import __version__
from harmprune.errors import ScoreFileError
from harmprune.tensorfile import TensorFile, save_tensors

GRANULARITIES = ("matrix", "row", "global")
SIGNED_METHODS = ("signed-snip",)


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


def support(scores: torch.Tensor, method: str) -> torch.Tensor:
    """How much each weight supports the scored behaviour (larger = removing it hurts more)."""
    return -scores if method in SIGNED_METHODS else scores


def top_fraction(values: torch.Tensor, fraction: float, granularity: str = "matrix") -> torch.Tensor:
    """Flat indices (sorted) of the top floor(fraction × size) entries per unit of one tensor."""
    _check_fraction(fraction)
    if granularity == "matrix":
        return _top_k_flat(values.reshape(-1), math.floor(fraction * values.numel()))
    if granularity == "row":
        rows = values.reshape(values.shape[0], -1)
        k = math.floor(fraction * rows.shape[1])
        if k == 0:
            return torch.empty(0, dtype=torch.long)
        cols = _stable_top_k_rows(rows, k)
        flat = cols + torch.arange(rows.shape[0]).unsqueeze(1) * rows.shape[1]
        return flat.reshape(-1).sort().values
    raise ScoreFileError(f"top_fraction handles 'matrix' and 'row'; use select_global for 'global', not {granularity!r}")


def select_global(values: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]], fraction: float
                  ) -> dict[str, torch.Tensor]:
    """Top floor(fraction × total) entries over all tensors together; ties broken by (tensor order, flat index)."""
    _check_fraction(fraction)
    items = list(values.items()) if isinstance(values, Mapping) else list(values)
    flat = torch.cat([v.reshape(-1).float() for _, v in items]) if items else torch.empty(0)
    chosen = _top_k_flat(flat, math.floor(fraction * flat.numel()))
    out, offset = {}, 0
    for name, v in items:
        n = v.numel()
        lo, hi = torch.searchsorted(chosen, torch.tensor([offset, offset + n]))
        out[name] = chosen[lo:hi] - offset
        offset += n
    return out


def select(
    harm: TensorFile | Mapping[str, torch.Tensor],
    utility: TensorFile | Mapping[str, torch.Tensor] | None,
    q: float,
    p: float,
    granularity: str = "matrix",
    *,
    harm_method: str | None = None,
    utility_method: str | None = None,
) -> Mask:
    """Harm set (top-q by harm-support) minus utility set (top-p by utility-support), one tensor at a time."""
    if granularity not in GRANULARITIES:
        raise ScoreFileError(f"unknown granularity {granularity!r}; expected one of {', '.join(GRANULARITIES)}")
    _check_fraction(q)
    _check_fraction(p)
    harm_method = harm_method or _method_of(harm, "harm")
    names = _names(harm)
    if utility is not None:
        utility_method = utility_method or _method_of(utility, "utility")
        _check_compatible(harm, utility)
    shapes = {n: _shape(harm, n) for n in names}
    harm_of = lambda n: support(_get(harm, n), harm_method)  # noqa: E731
    harm_pick = _picker(names, harm_of, shapes, q, granularity)
    util_pick = None
    if utility is not None and p > 0:
        util_of = lambda n: support(_get(utility, n), utility_method)  # noqa: E731
        util_pick = _picker(names, util_of, shapes, p, granularity)
    indices = {}
    for n in names:
        chosen = harm_pick(n)
        indices[n] = difference(chosen, util_pick(n)) if util_pick else chosen
    meta = {"q": q, "p": p, "granularity": granularity, "harm_method": harm_method,
            "utility_method": utility_method, "harmprune_version": __version__, "kind": "harm-minus-utility"}
    return Mask(indices, shapes, meta)


def select_global_streaming(names: Sequence[str], load: Callable[[str], torch.Tensor], fraction: float,
                            shapes: Mapping[str, Sequence[int]] | None = None) -> dict[str, torch.Tensor]:
    """``select_global`` reading one tensor at a time through ``load(name)``: the same indices, bounded memory."""
    _check_fraction(fraction)
    sizes = {n: math.prod(shapes[n]) if shapes else load(n).numel() for n in names}
    cut = _global_cut(names, load, math.floor(fraction * sum(sizes.values())))
    return {n: cut.take(load(n)) for n in names}


def _picker(names: list[str], load: Callable[[str], torch.Tensor], shapes: Mapping[str, tuple[int, ...]],
            fraction: float, granularity: str) -> Callable[[str], torch.Tensor]:
    """A function giving one tensor's chosen indices; called for the names in order."""
    if granularity != "global":
        return lambda n: top_fraction(load(n), fraction, granularity)
    cut = _global_cut(names, load, math.floor(fraction * sum(math.prod(s) for s in shapes.values())))
    return lambda n: cut.take(load(n))


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
            counts += torch.bincount(digit(sort_keys(flat[start : start + _CHUNK])), minlength=_HALF)
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
    if k <= 0:
        return torch.empty(0, dtype=torch.long)
    order = torch.sort(values.float(), descending=True, stable=True).indices
    return order[:k].sort().values


def _stable_top_k_rows(rows: torch.Tensor, k: int) -> torch.Tensor:
    return torch.sort(rows.float(), dim=1, descending=True, stable=True).indices[:, :k]


def _check_fraction(fraction: float) -> None:
    if not 0.0 <= fraction <= 1.0 or math.isnan(fraction):
        raise ScoreFileError(f"a fraction must lie in [0, 1], got {fraction}")


def _names(scores) -> list[str]:
    return scores.names() if isinstance(scores, TensorFile) else list(scores)


def _get(scores, name: str) -> torch.Tensor:
    return scores.get(name).float() if isinstance(scores, TensorFile) else scores[name].float()


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

