"""Scoring methods: what one calibration loop of :mod:`harmprune.attribution` sums, and how it becomes a score.

A method is a :class:`ScoringMethod` subclass registered with ``@register_scoring_method(name)`` in one module of
this package, or in another distribution's module named by an entry point in the group
``harmprune.scoring_methods``. Its class attributes tell the loop what to run, selection which direction counts
as support, and the memory plan what it holds; its methods make the accumulators, the hooks that fill them, and
the scores.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import TYPE_CHECKING, Callable, Iterator, Literal

from harmprune.registry import Registry

if TYPE_CHECKING:
    import torch
    from torch import nn


class Collector:
    """Hooks that fold one batch's contribution into float32 accumulators, installed for the whole loop.

    ``reduce_rows`` (FSDP, methods that build weight gradients themselves): sums a whole-matrix sum over the ranks
    and keeps this rank's rows.
    """

    def __init__(self, model: nn.Module, params: dict[str, nn.Parameter], acc: dict[str, torch.Tensor],
                 reduce_rows: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.model, self.params, self.acc = model, params, acc
        self.reduce_rows = reduce_rows
        self.response_mask: torch.Tensor | None = None
        self._stack = ExitStack()

    def begin_batch(self, response_mask: torch.Tensor) -> None:
        self.response_mask = response_mask

    def __enter__(self) -> "Collector":
        self.install()
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def install(self) -> None:
        raise NotImplementedError

    def _modules(self) -> Iterator[tuple[str, nn.Linear]]:
        from torch import nn

        by_weight = {id(p): n for n, p in self.params.items()}
        for module in self.model.modules():
            if isinstance(module, nn.Linear) and id(module.weight) in by_weight:
                yield by_weight[id(module.weight)], module


class ScoringMethod:
    """One way to score weights. Subclasses set the attributes and implement :meth:`finalise` (and, unless
    ``passes`` is ``"none"``, :meth:`collector`)."""

    name: str = ""
    # selection: True if the raw scores are signed and the most negative ones support the scored data most
    signed: bool = False
    # False: the scores depend on the weights alone (no data is read, and none is in the cache key)
    needs_data: bool = True
    # per batch: nothing, one forward without gradients, or a forward and a backward of the summed response loss
    passes: Literal["none", "forward", "backward"] = "backward"
    # backward: autograd computes the scored weights' own gradients; otherwise only activations get gradients
    # and the method's hooks build what they need from them
    weight_gradients: bool = False
    # the hooks give the same sums when gradient checkpointing re-runs forwards
    checkpointing: bool = False
    # accumulators: one float32 per input feature of each matrix, instead of one per weight
    per_feature: bool = False

    def collector(self, model: nn.Module, params: dict[str, nn.Parameter], acc: dict[str, torch.Tensor],
                  reduce_rows: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Collector:
        raise NotImplementedError

    def finalise(self, weight: torch.Tensor, acc: torch.Tensor | None) -> torch.Tensor:
        """The scores of one matrix from its float32 ``weight`` (never modified) and its accumulator (which may be
        overwritten: scores are formed in its memory)."""
        raise NotImplementedError

    def transient_bytes(self, largest_matrix: int, batch_size: int, dtype_bytes: int) -> int:
        """The memory plan's peak of temporary tensors beyond the accumulators and activations."""
        return 0


SCORING_METHODS: Registry[ScoringMethod] = Registry("method", "harmprune.scoring_methods", "register_scoring_method",
                                                    [__name__])


def register_scoring_method(name: str) -> Callable[[type[ScoringMethod]], type[ScoringMethod]]:
    """Class decorator: register one instance of the class under ``name``."""

    def deco(cls: type[ScoringMethod]) -> type[ScoringMethod]:
        cls.name = name
        SCORING_METHODS.add(name, cls(), source=cls)
        return cls

    return deco


def scoring_method(name: str) -> ScoringMethod:
    """The registered method called ``name`` (``unknown method 'x'; available: ...`` otherwise)."""
    return SCORING_METHODS.get(name)
