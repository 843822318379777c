"""Small statistics shared by evaluations and experiments: mean, AUROC, relative change, confidence intervals."""

from __future__ import annotations

import math
import random
from typing import Sequence

import torch


def mean(values: Sequence[float]) -> float:
    """The arithmetic mean; NaN for no values (a missing measurement, not zero)."""
    return sum(values) / len(values) if values else float("nan")


def rank_auroc(positives: torch.Tensor | Sequence[float], negatives: torch.Tensor | Sequence[float]) -> float:
    """P(pos > neg) + ½ P(pos = neg), by the rank-sum (Mann–Whitney) formula with mid-ranks for ties."""
    pos = torch.as_tensor(positives, dtype=torch.float64).reshape(-1)
    neg = torch.as_tensor(negatives, dtype=torch.float64).reshape(-1)
    n_pos, n_neg = pos.numel(), neg.numel()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    values = torch.cat([pos, neg])
    order = torch.argsort(values, stable=True)
    ranks = torch.empty_like(values)
    ranks[order] = torch.arange(1, values.numel() + 1, dtype=torch.float64)
    uniq, inverse, counts = torch.unique(values, return_inverse=True, return_counts=True)
    rank_sums = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inverse, ranks)
    ranks = (rank_sums / counts)[inverse]
    u = ranks[:n_pos].sum().item() - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def relative_reduction(before: float, after: float) -> float:
    """(before − after) / before; 0 when there was nothing to reduce."""
    return (before - after) / before if before > 0 else 0.0


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion."""
    if n == 0:
        return (float("nan"), float("nan"))
    phat = successes / n
    denom = 1 + z * z / n
    centre = (phat + z * z / (2 * n)) / denom
    half = z * math.sqrt(phat * (1 - phat) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def bootstrap_mean_interval(values: Sequence[float], n_boot: int = 2000, seed: int = 0,
                            level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of a mean."""
    if not values:
        return (float("nan"), float("nan"))
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(n_boot))
    lo = means[int((1 - level) / 2 * n_boot)]
    hi = means[min(n_boot - 1, int((1 + level) / 2 * n_boot))]
    return (lo, hi)
