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
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

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
    raise ValueError(f"top_fraction handles 'matrix' and 'row'; use select_global for 'global', not {granularity!r}")


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
    """Harm set (top-q by harm-support) minus utility set (top-p by utility-support)."""
    if granularity not in GRANULARITIES:
        raise ScoreFileError(f"unknown granularity {granularity!r}; expected one of {', '.join(GRANULARITIES)}")
    harm_method = harm_method or _method_of(harm, "harm")
    names = _names(harm)
    if utility is not None:
        utility_method = utility_method or _method_of(utility, "utility")
        _check_compatible(harm, utility)
    shapes = {n: tuple(_get(harm, n).shape) for n in names}
    harm_support = ((n, support(_get(harm, n), harm_method)) for n in names)
    harm_sets = _per_unit(harm_support, q, granularity)
    if utility is None or p == 0:
        util_sets = {n: torch.empty(0, dtype=torch.long) for n in names}
    else:
        util_sets = _per_unit(((n, support(_get(utility, n), utility_method)) for n in names), p, granularity)
    indices = {n: difference(harm_sets[n], util_sets[n]) for n in names}
    meta = {"q": q, "p": p, "granularity": granularity, "harm_method": harm_method,
            "utility_method": utility_method, "harmprune_version": __version__, "kind": "harm-minus-utility"}
    return Mask(indices, shapes, meta)


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


def _per_unit(items: Iterable[tuple[str, torch.Tensor]], fraction: float, granularity: str) -> dict[str, torch.Tensor]:
    if granularity == "global":
        return select_global(items, fraction)
    return {n: top_fraction(v, fraction, granularity) for n, v in items}


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
        hs = harm.shape(n) if isinstance(harm, TensorFile) else tuple(harm[n].shape)
        us = utility.shape(n) if isinstance(utility, TensorFile) else tuple(utility[n].shape)
        if hs != us:
            raise ScoreFileError(f"weight {n!r}: harm scores have shape {hs}, utility scores {us}")


def _check_same_shapes(a: Mask, b: Mask) -> None:
    for n in set(a.shapes) & set(b.shapes):
        if a.shapes[n] != b.shapes[n]:
            raise ScoreFileError(f"masks disagree on the shape of {n!r}: {a.shapes[n]} vs {b.shapes[n]}")

