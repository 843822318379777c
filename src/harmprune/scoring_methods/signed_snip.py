"""``signed-snip``: W ⊙ Σ_i ∇_W L_i, the study's harm score.

Zeroing weight w changes the summed loss by about −score, so the weights whose removal most *raises* the loss
have the most negative scores (``signed``). The loss is a sum over examples, so ∇ is additive over batches and
over ranks, and activation checkpointing changes nothing.
"""

from __future__ import annotations

import torch

from harmprune.distributed import local
from harmprune.scoring_methods import Collector, ScoringMethod, register_scoring_method


class GradientSum(Collector):
    """Σ_i ∇_W L_i, taken from each parameter's gradient as soon as it is accumulated."""

    def install(self) -> None:
        for name, p in self.params.items():
            handle = p.register_post_accumulate_grad_hook(self._hook(name))
            self._stack.callback(handle.remove)

    def _hook(self, name: str):
        acc = self.acc[name]

        def hook(p: torch.Tensor) -> None:
            acc.add_(local(p.grad).float())  # FSDP2 runs this hook on the reduced, sharded gradient
            p.grad = None

        return hook


@register_scoring_method("signed-snip")
class SignedSnip(ScoringMethod):
    signed = True
    weight_gradients = True
    checkpointing = True

    def collector(self, model, params, acc, reduce_rows=None) -> Collector:
        return GradientSum(model, params, acc, reduce_rows)

    def finalise(self, weight: torch.Tensor, acc: torch.Tensor | None) -> torch.Tensor:
        return acc.mul_(weight)

    def transient_bytes(self, largest_matrix: int, batch_size: int, dtype_bytes: int) -> int:
        return largest_matrix * (dtype_bytes + 4)  # one weight gradient at a time, and its float32 copy
