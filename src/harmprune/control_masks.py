"""Control kinds: masks chosen without the harmful data, with exactly another mask's per-matrix counts.

A kind is a function ``make(mask, seed, **inputs) -> Mask`` registered with ``@register_control(name, needs=...)``.
``needs`` names the one input it reads besides the mask and the seed: ``"weights"`` (the model's parameters, by
name) or ``"scores"`` (a score file of another data set); ``seeded = False`` marks a kind whose result does not
depend on the seed, so it is made once. Built-in kinds live here; another distribution's are entry points in the
group ``harmprune.control_kinds``. The selection code is imported by the kinds, so the CLI lists them cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Literal

from harmprune.errors import ConfigError
from harmprune.registry import Registry

if TYPE_CHECKING:
    from harmprune.selection import Mask

Needs = Literal["weights", "scores"] | None


@dataclass(frozen=True)
class ControlKind:
    name: str
    make: Callable[..., Mask]
    needs: Needs = None
    seeded: bool = True


CONTROLS: Registry[ControlKind] = Registry("control kind", "harmprune.control_kinds", "register_control", [__name__],
                                           ConfigError)


def register_control(name: str, needs: Needs = None, seeded: bool = True) -> Callable[[Callable[..., Mask]],
                                                                                      Callable[..., Mask]]:
    def deco(fn: Callable[..., Mask]) -> Callable[..., Mask]:
        CONTROLS.add(name, ControlKind(name, fn, needs, seeded), source=fn)
        return fn

    return deco


@register_control("random")
def _random(mask: Mask, seed: int) -> Mask:
    """Uniformly random weights."""
    from harmprune.selection import random_like

    return random_like(mask, seed)


@register_control("magnitude-matched", needs="weights")
def _magnitude_matched(mask: Mask, seed: int, weights: dict[str, Any]) -> Mask:
    """Random other weights with the mask's |W| distribution."""
    from harmprune.selection import magnitude_matched_random

    return magnitude_matched_random(mask, weights, seed)


@register_control("benign-task", needs="scores", seeded=False)
def _benign_task(mask: Mask, seed: int, scores: Any) -> Mask:
    """The top weights of a benign task's scores (read in their own method's direction)."""
    from harmprune.selection import select_counts

    return select_counts(scores, mask.counts())
