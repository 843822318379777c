"""Batched generation from a (possibly pruned) model, with optional prefilling attacks, and its JSONL record.

Prompts are rendered exactly as in scoring (:mod:`harmprune.formatting`), left-padded, grouped by length and
decoded with the KV cache. A prefilling attack forces the assistant turn to start with a given prefix (the first
k tokens of a reference harmful response, see :func:`prefill_prefix`); the response that is judged is the model's
continuation, and the record keeps the prefix beside it.

Greedy batched outputs equal batch-1 outputs up to floating-point ties (left padding with an attention mask and
position ids counted from the first real token). Sampled outputs are reproducible for a given ``seed`` and
``batch_size``; they change when the batch composition changes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from harmprune.errors import HarmpruneError
from harmprune.formatting import PromptFormat, pad_id_of, prompt_ids, response_ids
from harmprune.io import atomic_path

DEFAULT_PREFILL_TOKENS = 10


@dataclass(frozen=True)
class Generation:
    """One sampled answer: the prompt, the forced prefix ("" without an attack) and the model's continuation."""

    prompt: str
    prefix: str
    response: str
    sample_index: int
    n_new_tokens: int  # generated tokens, counting the EOS token when there is one
    finished: bool  # True when the model stopped at EOS, False when it hit max_new_tokens
    prompt_index: int = 0  # position of the prompt in the input list


def prefill_prefix(tokenizer, reference_response: str, k: int = DEFAULT_PREFILL_TOKENS) -> str:
    """The first ``k`` tokens of a reference response, decoded: the forced start of a prefilling attack."""
    if k < 0:
        raise HarmpruneError(f"prefill length k must be non-negative, got {k}")
    return tokenizer.decode(response_ids(tokenizer, reference_response)[:k])


def eos_ids_of(model, tokenizer) -> list[int]:
    """Every token id that ends a turn: the tokenizer's EOS plus the model's generation-config EOS ids."""
    ids: list[int] = []
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for x in ([tokenizer.eos_token_id], gen_eos if isinstance(gen_eos, list) else [gen_eos]):
        ids.extend(int(i) for i in x if i is not None and int(i) not in ids)
    if not ids:
        raise HarmpruneError("neither the tokenizer nor the model's generation config defines an EOS token")
    return ids


def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    fmt: PromptFormat = "chat",
    prefixes: Sequence[str] | None = None,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    n_samples: int = 1,
    seed: int = 0,
    progress: bool = True,
) -> list[Generation]:
    """Generate ``n_samples`` answers per prompt, in prompt order (samples of one prompt adjacent)."""
    validate_generation_args(prompts, prefixes, max_new_tokens, batch_size, do_sample, temperature, top_p, n_samples)
    prefixes = list(prefixes) if prefixes is not None else [""] * len(prompts)
    inputs = [generation_input_ids(tokenizer, p, pre, fmt) for p, pre in zip(prompts, prefixes)]
    # Longest first: batches of similar length waste little on padding, and a memory error shows up at once.
    order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i]))
    pad_id, eos_ids = pad_id_of(tokenizer), eos_ids_of(model, tokenizer)
    gen_kwargs = _generation_kwargs(max_new_tokens, do_sample, temperature, top_p, n_samples, pad_id, eos_ids)
    if do_sample:
        torch.manual_seed(seed)
    new_ids: dict[int, list[list[int]]] = {}
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    for batch in _progress(batches, progress):
        outputs = _generate_batch(model, [inputs[i] for i in batch], pad_id, gen_kwargs)
        for j, i in enumerate(batch):
            new_ids[i] = outputs[j * n_samples : (j + 1) * n_samples]
    return [
        decode_generation(tokenizer, prompts[i], prefixes[i], ids, s, i, eos_ids)
        for i in range(len(prompts))
        for s, ids in enumerate(new_ids[i])
    ]


def validate_generation_args(
    prompts, prefixes, max_new_tokens, batch_size, do_sample, temperature, top_p, n_samples
) -> None:
    """Reject arguments that cannot make sense before any model time is spent."""
    if not prompts:
        raise HarmpruneError("no prompts to generate from")
    if prefixes is not None and len(prefixes) != len(prompts):
        raise HarmpruneError(f"{len(prefixes)} prefixes for {len(prompts)} prompts; give one prefix per prompt")
    if max_new_tokens < 1 or batch_size < 1 or n_samples < 1:
        raise HarmpruneError(
            "max_new_tokens, batch_size and n_samples must be positive "
            f"(got {max_new_tokens}, {batch_size}, {n_samples})"
        )
    if n_samples > 1 and not do_sample:
        raise HarmpruneError(f"n_samples={n_samples} with greedy decoding gives identical samples; enable sampling")
    if do_sample and (temperature <= 0 or not 0 < top_p <= 1):
        raise HarmpruneError(f"sampling needs temperature > 0 and 0 < top_p <= 1 (got {temperature}, {top_p})")


def generation_input_ids(tokenizer, prompt: str, prefix: str, fmt: PromptFormat) -> list[int]:
    """The rendered prompt's ids followed by the forced prefix's ids (as in scoring: tokenised separately)."""
    try:
        ids = prompt_ids(tokenizer, prompt, fmt)
    except ValueError as e:
        raise HarmpruneError(str(e)) from None
    return ids + (response_ids(tokenizer, prefix) if prefix else [])


def _generation_kwargs(max_new_tokens, do_sample, temperature, top_p, n_samples, pad_id, eos_ids) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "do_sample": do_sample,
        "num_return_sequences": n_samples,
        "use_cache": True,
        "pad_token_id": pad_id,
        "eos_token_id": eos_ids,
    }
    if do_sample:
        # top_k=0 switches off transformers' default top-k of 50: sampling is plain temperature / nucleus.
        kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
    return kwargs


@torch.no_grad()
def _generate_batch(model, batch_ids: list[list[int]], pad_id: int, gen_kwargs: dict[str, Any]) -> list[list[int]]:
    """Left-pad one batch, generate, and return each sequence's new token ids."""
    width = max(len(ids) for ids in batch_ids)
    input_ids = torch.full((len(batch_ids), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch_ids), width), dtype=torch.long)
    for row, ids in enumerate(batch_ids):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    device = next(model.parameters()).device
    out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **gen_kwargs)
    return out[:, width:].tolist()


def decode_generation(tokenizer, prompt, prefix, ids, sample_index, prompt_index, eos_ids) -> Generation:
    """Cut new token ids at the first EOS and decode them without special tokens."""
    eos = set(eos_ids)
    stop = next((k for k, t in enumerate(ids) if t in eos), None)
    kept = ids if stop is None else ids[:stop]
    text = tokenizer.decode(kept, skip_special_tokens=True)
    n_new = len(ids) if stop is None else stop + 1
    return Generation(prompt, prefix, text, sample_index, n_new, stop is not None, prompt_index)


def _progress(batches: list, enabled: bool):
    if not enabled:
        return batches
    from tqdm.auto import tqdm

    return tqdm(batches, desc="generate", unit="batch")


# ---------------------------------------------------------------------------------------------- records


def generation_record(
    gen: Generation, category: str | None = None, verdicts: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """One ``generations.jsonl`` line: the generation, its category and each judge's verdict."""
    row: dict[str, Any] = {
        "prompt": gen.prompt,
        "prefix": gen.prefix,
        "response": gen.response,
        "category": category,
        "sample_index": gen.sample_index,
        "prompt_index": gen.prompt_index,
        "n_new_tokens": gen.n_new_tokens,
        "finished": gen.finished,
    }
    row["verdicts"] = {name: verdict_record(v) for name, v in (verdicts or {}).items()}
    return row


def verdict_record(verdict: Any) -> dict[str, Any]:
    """A judge's verdict as stored in a generations row: harmfulness, refused and the judge's details."""
    if isinstance(verdict, Mapping):
        return dict(verdict)
    return {"harmfulness": float(verdict.harmfulness), "refused": bool(verdict.refused), **verdict.details}


def judge_generations(
    generations: Sequence[Generation], judges: Sequence[Any], categories: Sequence[str | None] | None = None
) -> list[dict[str, Any]]:
    """Run every judge on every generation; ``categories`` is per prompt (indexed by ``prompt_index``)."""
    from harmprune.judges import JudgeItem

    cats = [categories[g.prompt_index] if categories is not None else None for g in generations]
    items = [JudgeItem(g.prompt, g.response, c, g.prefix) for g, c in zip(generations, cats)]
    per_judge = {judge.name: judge.judge_batch(items) for judge in judges}
    return [
        generation_record(g, c, {name: verdicts[k] for name, verdicts in per_judge.items()})
        for k, (g, c) in enumerate(zip(generations, cats))
    ]


def write_generations(path: str | Path, records: Iterable[Mapping[str, Any] | Generation]) -> Path:
    """Write ``generations.jsonl`` atomically, one JSON object per generation."""
    path = Path(path)
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for rec in records:
            row = generation_record(rec) if isinstance(rec, Generation) else rec
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def read_generations(path: str | Path) -> list[dict[str, Any]]:
    """Read back a ``generations.jsonl`` file."""
    rows = []
    with Path(path).open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise HarmpruneError(f"{path}: line {lineno} is not valid JSON ({e.msg})") from None
    return rows
