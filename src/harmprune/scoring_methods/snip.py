"""``snip``: |W| ⊙ Σ_i |∇_W L_i|, the absolute value taken per example (Wei et al. 2024), the utility score.

Each example's exact ``nn.Linear`` gradient G_i = δ_iᵀ X_i is built from the layer input and the output gradient
inside the backward hook before its absolute value is taken, so batch size changes nothing; autograd computes
no weight gradient at all.
"""

from __future__ import annotations

import torch
from torch import nn

from harmprune.scoring_methods import Collector, ScoringMethod, register_scoring_method


class AbsExampleGradientSum(Collector):
    """Σ_i |∇_W L_i| from per-example Linear gradients G_i = δ_iᵀ X_i, built inside the backward pass."""

    def install(self) -> None:
        for name, module in self._modules():
            handle = module.register_forward_hook(self._forward_hook(name))
            self._stack.callback(handle.remove)

    def _forward_hook(self, name: str):
        acc = self.acc[name]

        def forward_hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if not torch.is_grad_enabled():
                return  # a no-grad forward (a check, an evaluation) has no backward whose gradients to collect
            x = inputs[0].detach()

            def grad_hook(delta: torch.Tensor) -> None:
                per_example = torch.einsum("bto,bti->boi", delta.float(), x.float())
                total = per_example.abs_().sum(dim=0)
                acc.add_(self.reduce_rows(total) if self.reduce_rows else total)

            output.register_hook(grad_hook)

        return forward_hook


@register_scoring_method("snip")
class Snip(ScoringMethod):
    def collector(self, model, params, acc, reduce_rows=None) -> Collector:
        return AbsExampleGradientSum(model, params, acc, reduce_rows)

    def finalise(self, weight: torch.Tensor, acc: torch.Tensor | None) -> torch.Tensor:
        return acc.mul_(weight.abs())

    def transient_bytes(self, largest_matrix: int, batch_size: int, dtype_bytes: int) -> int:
        return batch_size * largest_matrix * 4 + largest_matrix * 4  # per-example gradients and their sum
