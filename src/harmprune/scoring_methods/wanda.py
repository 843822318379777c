"""``wanda``: |W_jk| · ‖X_k‖₂, with X the layer's inputs at response positions.

One forward without gradients per batch; sums of squares over positions are additive over batches and ranks
(the square root is taken at the end).
"""

from __future__ import annotations

import torch
from torch import nn

from harmprune.scoring_methods import Collector, ScoringMethod, register_scoring_method


class InputNormSum(Collector):
    """Σ over response positions of X_k², per input feature k of each Linear layer.

    Its forwards run without grad, so a stray forward cannot be told apart by grad mode: each layer counts one
    forward per batch, and a second one (anything else run while the hooks are installed) is an error rather
    than a silently doubled sum.
    """

    def install(self) -> None:
        self._counted: set[str] = set()
        for name, module in self._modules():
            handle = module.register_forward_hook(self._forward_hook(name))
            self._stack.callback(handle.remove)

    def begin_batch(self, response_mask: torch.Tensor) -> None:
        super().begin_batch(response_mask)
        self._counted = set()

    def _forward_hook(self, name: str):
        sq = self.acc[name]

        def forward_hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if name in self._counted:
                raise RuntimeError(f"wanda: a second forward through {name} within one scoring batch")
            self._counted.add(name)
            x = inputs[0].detach()
            mask = self.response_mask.to(x.device)
            sq.add_(x[mask].float().pow(2).sum(dim=0))

        return forward_hook


@register_scoring_method("wanda")
class Wanda(ScoringMethod):
    passes = "forward"
    per_feature = True

    def collector(self, model, params, acc, reduce_rows=None) -> Collector:
        return InputNormSum(model, params, acc, reduce_rows)

    def finalise(self, weight: torch.Tensor, acc: torch.Tensor | None) -> torch.Tensor:
        return weight.abs() * acc.sqrt_().unsqueeze(0)
