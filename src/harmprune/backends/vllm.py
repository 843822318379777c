"""The vLLM backend: fast GPU generation from a saved model directory (a pruned model is saved first).

Prompts are tokenised here with the model's Hugging Face tokenizer and :mod:`harmprune.formatting`, and passed to
vLLM as token ids, so prompts and prefilling prefixes are exactly those of the Hugging Face backend. vLLM seeds each
request on its own, so sampled outputs do not depend on the batch composition.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path
from typing import Any, Sequence

from harmprune.backends import GenerationBackend
from harmprune.errors import HarmpruneError
from harmprune.formatting import PromptFormat
from harmprune.generation import Generation, validate_generation_args, generation_input_ids, decode_generation


class VLLMBackend(GenerationBackend):
    """Generation with ``vllm.LLM`` on one or more GPUs; ``llm_kwargs`` go to ``vllm.LLM`` unchanged."""

    name = "vllm"

    def __init__(self, model_dir: str, *, dtype: str = "bfloat16", **llm_kwargs: Any) -> None:
        if not self.available():
            raise HarmpruneError("the vLLM backend needs the vllm package and a CUDA GPU")
        from transformers import AutoTokenizer
        from vllm import LLM

        from harmprune.models import resolve_model

        self.model_dir = resolve_model(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.eos_ids = _eos_ids(self.tokenizer, self.model_dir)
        self.llm = LLM(model=self.model_dir, tokenizer=self.model_dir, dtype=dtype, **llm_kwargs)

    @staticmethod
    def available() -> bool:
        """True when vllm is importable and a CUDA device is present."""
        if importlib.util.find_spec("vllm") is None:
            return False
        import torch

        return torch.cuda.is_available()

    @classmethod
    def from_model(cls, model, tokenizer, workdir: str | Path, **kwargs: Any) -> "VLLMBackend":
        """Save an in-memory (e.g. pruned) model to ``workdir`` and serve it with vLLM."""
        from harmprune.models import save_model

        save_model(model, tokenizer, workdir)
        return cls(str(workdir), **kwargs)

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
        from vllm import SamplingParams

        validate_generation_args(prompts, prefixes, max_new_tokens, 1, do_sample, temperature, top_p, n_samples)
        prefixes = list(prefixes) if prefixes is not None else [""] * len(prompts)
        requests = [
            {"prompt_token_ids": generation_input_ids(self.tokenizer, p, pre, fmt)} for p, pre in zip(prompts, prefixes)
        ]
        params = SamplingParams(
            n=n_samples,
            temperature=temperature if do_sample else 0.0,
            top_p=top_p if do_sample else 1.0,
            max_tokens=max_new_tokens,
            seed=seed,
            stop_token_ids=self.eos_ids,
        )
        outputs = self.llm.generate(requests, params, use_tqdm=progress)
        gens = []
        for i, out in enumerate(outputs):
            for s, completion in enumerate(sorted(out.outputs, key=lambda c: c.index)):
                ids = list(completion.token_ids)
                gen = decode_generation(self.tokenizer, prompts[i], prefixes[i], ids, s, i, self.eos_ids)
                if completion.finish_reason == "stop" and not gen.finished:  # vLLM dropped the stop token
                    gen = dataclasses.replace(gen, finished=True, n_new_tokens=gen.n_new_tokens + 1)
                gens.append(gen)
        return gens


def _eos_ids(tokenizer, model_dir: str) -> list[int]:
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    gen_config = Path(model_dir) / "generation_config.json"
    if gen_config.exists():
        eos = json.loads(gen_config.read_text()).get("eos_token_id")
        ids += eos if isinstance(eos, list) else [eos] if eos is not None else []
    return list(dict.fromkeys(int(i) for i in ids))
