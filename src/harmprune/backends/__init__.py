"""Generation backends: one interface, the Hugging Face backend always there, vLLM when installed on a GPU.

``get_backend("auto", model_spec)`` picks vLLM when :meth:`VLLMBackend.available` says so and falls back to the
Hugging Face backend otherwise. vLLM loads weights from a directory, so a pruned model is saved first
(:meth:`VLLMBackend.from_model` does that).
"""

from __future__ import annotations

from typing import Any, Sequence

from harmprune.errors import HarmpruneError
from harmprune.formatting import PromptFormat
from harmprune.generation import Generation

BACKENDS = ("auto", "hf", "vllm")


class GenerationBackend:
    """Turns prompts (and optional forced prefixes) into :class:`Generation` records."""

    name = "backend"

    @staticmethod
    def available() -> bool:
        return True

    def generate(
        self,
        prompts: Sequence[str],
        *,
        fmt: PromptFormat = "chat",
        prefixes: Sequence[str] | None = None,
        max_new_tokens: int = 128,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        n_samples: int = 1,
        seed: int = 0,
        progress: bool = True,
    ) -> list[Generation]:
        raise NotImplementedError


def get_backend(name: str, model_spec: str, *, dtype: str = "float32", batch_size: int = 8, **kwargs: Any):
    """Build a backend by name (``auto``, ``hf`` or ``vllm``) for a model directory, hub id or alias."""
    from harmprune.backends.hf import HFBackend
    from harmprune.backends.vllm import VLLMBackend

    if name not in BACKENDS:
        raise HarmpruneError(f"unknown generation backend {name!r}; expected one of {', '.join(BACKENDS)}")
    if name == "vllm" or (name == "auto" and VLLMBackend.available()):
        if not VLLMBackend.available():
            raise HarmpruneError("backend 'vllm' needs the vllm package and a CUDA GPU; use --backend hf")
        return VLLMBackend(model_spec, dtype=dtype, **kwargs)
    return HFBackend.load(model_spec, dtype=dtype, batch_size=batch_size)


__all__ = ["BACKENDS", "GenerationBackend", "get_backend"]
