"""Pruning: zero (or scale by α) the weights a mask selects, in place, and undo it bit for bit.

Every mask is checked against the model before any weight changes: unknown names, wrong shapes or indices out
of range raise :class:`ScoreFileError` and leave the model untouched.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from harmprune.errors import ScoreFileError
from harmprune.selection import Mask, check_fits, load_mask


def check_mask_fits(model: nn.Module, mask: Mask) -> dict[str, nn.Parameter]:
    """The parameters the mask addresses; raises if a name, shape or index does not fit the model."""
    params = dict(model.named_parameters())
    check_fits(mask, {n: tuple(p.shape) for n, p in params.items()})
    return {name: params[name] for name in mask.indices}


def check_alpha(alpha: float) -> float:
    """``alpha`` if it is a finite number: NaN or infinite scales would write NaN/inf weights."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ScoreFileError(f"alpha must be a finite number, got {alpha!r}")
    return float(alpha)


def apply_mask(model: nn.Module, mask: Mask | str | Path, alpha: float = 0.0) -> dict[str, torch.Tensor]:
    """Multiply the selected weights by ``alpha`` (0 = prune); return their original values for restoring."""
    check_alpha(alpha)
    mask = load_mask(mask) if isinstance(mask, (str, Path)) else mask
    params = check_mask_fits(model, mask)
    saved = {}
    with torch.no_grad():
        for name, p in params.items():
            idx = mask.indices[name].to(p.device)
            flat = p.data.view(-1)
            saved[name] = flat[idx].clone()
            if alpha == 0.0:
                flat[idx] = 0
            else:
                flat[idx] = flat[idx] * alpha
    return saved


def restore(model: nn.Module, mask: Mask, saved: dict[str, torch.Tensor]) -> None:
    """Write back the values :func:`apply_mask` returned."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, values in saved.items():
            params[name].data.view(-1)[mask.indices[name].to(values.device)] = values


@contextmanager
def pruned(model: nn.Module, mask: Mask | str | Path | None, alpha: float = 0.0) -> Iterator[nn.Module]:
    """Within the block the model is pruned; afterwards every weight is bit-identical to before.

    A ``None`` mask leaves the model as it is, so callers can evaluate with or without a mask the same way.
    """
    if mask is None:
        yield model
        return
    mask = load_mask(mask) if isinstance(mask, (str, Path)) else mask
    saved = apply_mask(model, mask, alpha)
    try:
        yield model
    finally:
        restore(model, mask, saved)
