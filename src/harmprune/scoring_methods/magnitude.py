"""``magnitude``: |W|, from the weights alone (no data, no passes)."""

from __future__ import annotations

import torch

from harmprune.scoring_methods import ScoringMethod, register_scoring_method


@register_scoring_method("magnitude")
class Magnitude(ScoringMethod):
    needs_data = False
    passes = "none"

    def finalise(self, weight: torch.Tensor, acc: torch.Tensor | None) -> torch.Tensor:
        return weight.abs()
