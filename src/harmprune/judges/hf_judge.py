"""The ``hf-judge`` judge: the StrongREJECT rubric answered by a local Hugging Face chat model (the offline route).

The grader model reads the same prompt as the ``strongreject`` judge (:func:`rubric_prompt`), answers greedily
through :func:`harmprune.generation.generate`, and its reply is parsed by the same :func:`parse_rubric`. A reply
without the three answer lines raises :class:`HarmpruneError` naming the reply: small graders often fail the
format, and a silent default score would bias the results.
"""

from __future__ import annotations

from typing import Sequence

from harmprune.errors import HarmpruneError
from harmprune.judges import Judge, JudgeItem, Verdict, register_judge
from harmprune.judges.strongreject import parse_rubric, rubric_prompt


@register_judge("hf-judge")
class HFJudge(Judge):
    """Rubric grading by a local chat model given by spec (directory, hub id, alias) or as (model, tokenizer)."""

    option_refs = {"model": "source"}

    def __init__(
        self,
        model: str | None = None,
        tokenizer=None,
        dtype: str = "float32",
        device: str | None = None,
        batch_size: int = 4,
        max_new_tokens: int = 256,
    ) -> None:
        if model is None:
            raise HarmpruneError("hf-judge needs a grader model: a directory, hub id or alias (judge option model=...)")
        if isinstance(model, str):
            from harmprune.models import load_model

            self.model, self.tokenizer = load_model(model, dtype=dtype, device=device)
            self.model_name = model
        else:
            if tokenizer is None:
                raise HarmpruneError("hf-judge was given a model object without its tokenizer")
            self.model, self.tokenizer = model, tokenizer
            self.model_name = str(getattr(model, "name_or_path", "") or type(model).__name__)
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens

    def judge_batch(self, items: Sequence[JudgeItem]) -> list[Verdict]:
        from harmprune.generation import generate

        if not items:
            return []
        prompts = [rubric_prompt(item.prompt, item.response) for item in items]
        replies = generate(
            self.model, self.tokenizer, prompts, fmt="chat", max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size, progress=False,
        )
        return [parse_rubric(r.response).verdict(judge_model=self.model_name) for r in replies]
