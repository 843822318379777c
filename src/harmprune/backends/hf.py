"""The Hugging Face backend: :func:`harmprune.generation.generate` on an in-memory (possibly pruned) model."""

from __future__ import annotations

from typing import Any, Sequence

from harmprune.backends import GenerationBackend
from harmprune.generation import Generation, generate


class HFBackend(GenerationBackend):
    """Batched transformers generation; works on CPU and GPU, and on models pruned in place."""

    name = "hf"

    def __init__(self, model, tokenizer, batch_size: int = 8) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size

    @classmethod
    def load(cls, model_spec: str, *, dtype: str = "float32", batch_size: int = 8, device: str | None = None):
        """Load a model by spec (directory, hub id, .gguf, alias) with :func:`harmprune.models.load_model`."""
        from harmprune.models import load_model

        model, tokenizer = load_model(model_spec, dtype=dtype, device=device)
        return cls(model, tokenizer, batch_size)

    def generate(self, prompts: Sequence[str], **kwargs: Any) -> list[Generation]:
        return generate(self.model, self.tokenizer, prompts, batch_size=self.batch_size, **kwargs)
