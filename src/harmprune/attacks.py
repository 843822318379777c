"""Attacks that undo a model's refusals, to test whether pruning removed a capability or only hid it.

* **Refusal ablation**: the harm-minus-utility selection of :mod:`harmprune.selection` applied to *refusal*
  data. The weights that support answering harmful prompts with a refusal (signed SNIP on prompt → refusal pairs),
  minus those that support utility, are pruned so the model stops refusing.
* **Fine-tuning attack**: a LoRA fine-tune on harmful pairs, :func:`harmprune.finetune.lora_finetune`; its adapter
  is saved with :func:`~harmprune.finetune.save_adapter` and put on a pruned model with
  :func:`~harmprune.finetune.load_adapter`.
* **Prefilling** lives in :mod:`harmprune.generation` (``prefixes=``).
"""

from __future__ import annotations

import logging
import random
from typing import Sequence

from harmprune.data import Record
from harmprune.errors import DataError, HarmpruneError
from harmprune.formatting import PromptFormat
from harmprune.scoring_methods import scoring_method
from harmprune.selection import Mask, select

log = logging.getLogger(__name__)

# Our own generic refusals. The first is the synthetic organisms' refusal.
GENERIC_REFUSALS: tuple[str, ...] = (
    "I'm sorry, but I can't help with that.",
    "I'm sorry, but I can't help with that request.",
    "I can't help with that. It could cause serious harm.",
    "I'm sorry, but I won't assist with this request.",
    "I cannot help with that request.",
)


def _as_records(prompts: Sequence[Record | str]) -> list[Record]:
    out = [p if isinstance(p, Record) else Record(str(p)) for p in prompts]
    if not out:
        raise DataError("no prompts given")
    return out


def refusal_pairs(prompts: Sequence[Record | str], refusals: Sequence[str] = GENERIC_REFUSALS, seed: int = 0
                  ) -> list[Record]:
    """Each prompt paired with one of ``refusals`` (a seeded choice), keeping its category."""
    if not refusals or not all(r.strip() for r in refusals):
        raise DataError("refusal texts must be non-empty")
    rng = random.Random(seed)
    return [Record(r.prompt, rng.choice(list(refusals)), r.category, {**r.source, "response": "generic-refusal"})
            for r in _as_records(prompts)]


def model_refusal_pairs(
    model,
    tokenizer,
    prompts: Sequence[Record | str],
    *,
    fmt: PromptFormat = "chat",
    max_new_tokens: int = 64,
    batch_size: int = 8,
    progress: bool = False,
) -> list[Record]:
    """The model's own greedy answers to ``prompts``, kept where the ``refusal`` judge says it refused."""
    from harmprune.generation import generate
    from harmprune.judges import JudgeItem
    from harmprune.judges.refusal import RefusalJudge

    records = _as_records(prompts)
    gens = generate(model, tokenizer, [r.prompt for r in records], fmt=fmt, max_new_tokens=max_new_tokens,
                    batch_size=batch_size, progress=progress)
    verdicts = RefusalJudge().judge_batch([JudgeItem(g.prompt, g.response, None, "") for g in gens])
    kept = [Record(r.prompt, g.response, r.category, {**r.source, "response": "model-refusal"})
            for r, g, v in zip(records, gens, verdicts) if v.refused and g.response.strip()]
    log.info("the model refused %d of %d prompts; those refusals are the ablation data", len(kept), len(records))
    if not kept:
        raise DataError("the model refused none of the prompts; there is no refusal to ablate")
    return kept


def refusal_ablation_mask(
    model,
    tokenizer,
    harmful_prompts: Sequence[Record | str],
    utility_records: Sequence[Record],
    q: float,
    p: float,
    *,
    refusals: Sequence[Record] | None = None,
    method: str = "signed-snip",
    granularity: str = "matrix",
    fmt: PromptFormat = "chat",
    max_length: int = 512,
    batch_size: int = 4,
    modules: str | None = None,
    seed: int = 0,
    progress: bool = True,
) -> Mask:
    """Weights that support refusing harmful prompts but not utility: top-q refusal-support minus top-p utility.

    ``refusals`` are the refusal pairs to score (e.g. from :func:`model_refusal_pairs`); by default each harmful
    prompt is paired with a generic refusal (:func:`refusal_pairs`).
    """
    from harmprune.attribution import compute_scores

    if not scoring_method(method).needs_data:
        raise HarmpruneError(f"refusal ablation scores refusal pairs; the {method} method reads no data")
    pairs = list(refusals) if refusals is not None else refusal_pairs(harmful_prompts, seed=seed)
    kw = dict(fmt=fmt, max_length=max_length, batch_size=batch_size, modules=modules, progress=progress)
    refusal_scores = compute_scores(model, tokenizer, pairs, method, **kw)
    utility_scores = compute_scores(model, tokenizer, utility_records, method, **kw)
    mask = select(refusal_scores.tensors, utility_scores.tensors, q, p, granularity, harm_method=method,
                  utility_method=method)
    mask.metadata.update({"kind": "refusal-ablation", "method": method, "refusal_examples": len(pairs),
                          "utility_examples": len(utility_records),
                          "refusal_data_sha256": refusal_scores.metadata["data_sha256"],
                          "utility_data_sha256": utility_scores.metadata["data_sha256"]})
    return mask
