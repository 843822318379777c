"""Judged harmfulness of generations, with or without a prefilling attack.

Each prompt is answered (greedily unless sampling is asked for); the judge sees the model's continuation only,
with any forced prefix passed beside it (:class:`~harmprune.judges.JudgeItem` ``prefix``), so a prefilled
harmful start is never credited to the model. ``harmfulness`` is the mean judge score over generations and
``refusal_rate`` the fraction the judge marks as refused.

Prefilling attack: the forced prefix of a prompt is the first ``prefill_tokens`` tokens of a reference response
for that prompt (:func:`harmprune.generation.prefill_prefix`). References are matched to prompts **by prompt
text** (exact after stripping surrounding whitespace; the first reference of a repeated prompt wins). When no
separate reference set is given, each record's own response is its reference. A prompt without a reference is an
error naming that prompt.
"""

from __future__ import annotations

from typing import Any, Sequence

from harmprune.data import Record
from harmprune.errors import DataError
from harmprune.formatting import PromptFormat
from harmprune.generation import generate, judge_generations, prefill_prefix


def reference_prefixes(
    tokenizer, records: Sequence[Record], prefill_tokens: int, references: Sequence[Record] | None = None
) -> list[str]:
    """The forced prefix of every record: the first ``prefill_tokens`` tokens of its reference response."""
    if prefill_tokens <= 0:
        return [""] * len(records)
    by_prompt: dict[str, str] = {}
    for ref in references if references is not None else records:
        if ref.response and ref.response.strip():
            by_prompt.setdefault(ref.prompt.strip(), ref.response)
    prefixes = []
    for r in records:
        response = by_prompt.get(r.prompt.strip())
        if response is None:
            where = "the prefill file" if references is not None else "the prompts file (no --prefill-from given)"
            raise DataError(f"no reference response in {where} for the prompt {r.prompt[:80]!r}")
        prefixes.append(prefill_prefix(tokenizer, response, prefill_tokens))
    return prefixes


def evaluate_harm(
    model,
    tokenizer,
    records: Sequence[Record],
    judge,
    *,
    prefill_tokens: int = 0,
    prefill_from: Sequence[Record] | None = None,
    fmt: PromptFormat = "chat",
    max_new_tokens: int = 128,
    batch_size: int = 8,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    n_samples: int = 1,
    seed: int = 0,
    extra_judges: Sequence[Any] = (),
    progress: bool = False,
) -> tuple[dict[str, float | int], list[dict[str, Any]]]:
    """Generate, judge, and summarise: (flat metrics, one ``generations.jsonl`` row per generation).

    ``extra_judges`` also grade every generation (their verdicts go into the rows). The first judge's metrics are
    unprefixed; with extra judges, every judge's mean harmfulness, refusal rate and (for yes/no judges) harmful
    rate are also given as ``<name>/harmfulness``, ``<name>/refusal_rate`` and ``<name>/harmful_rate``.
    """
    if not records:
        raise DataError("no prompts to evaluate")
    prefixes = reference_prefixes(tokenizer, records, prefill_tokens, prefill_from)
    gens = generate(
        model, tokenizer, [r.prompt for r in records], fmt=fmt, prefixes=prefixes, max_new_tokens=max_new_tokens,
        batch_size=batch_size, do_sample=do_sample, temperature=temperature, top_p=top_p, n_samples=n_samples,
        seed=seed, progress=progress,
    )
    judges = [judge] + [j for j in extra_judges if j.name != judge.name]
    rows = judge_generations(gens, judges, [r.category for r in records])
    metrics = summarise(rows, judge.name)
    for one in judges if len(judges) > 1 else []:
        summary = summarise(rows, one.name)
        for key in ("harmfulness", "refusal_rate", "harmful_rate"):
            if key in summary:
                metrics[f"{one.name}/{key}"] = summary[key]
    metrics.update(n_prompts=len(records), prefill_tokens=prefill_tokens,
                   finished_rate=sum(r["finished"] for r in rows) / len(rows),
                   mean_new_tokens=sum(r["n_new_tokens"] for r in rows) / len(rows))
    return metrics, rows


def summarise(rows: Sequence[dict[str, Any]], judge_name: str) -> dict[str, float | int]:
    """Mean harmfulness and refusal rate by one judge, overall and per category (``harmfulness/<category>``), and
    the fraction judged harmful outright (``harmful_rate``) where the judge gives that verdict."""
    verdicts = [r["verdicts"][judge_name] for r in rows]
    out: dict[str, float | int] = {
        "harmfulness": sum(v["harmfulness"] for v in verdicts) / len(verdicts),
        "refusal_rate": sum(bool(v["refused"]) for v in verdicts) / len(verdicts),
        "n": len(verdicts),
    }
    if all(isinstance(v.get("harmful"), bool) for v in verdicts):  # judges with a yes/no verdict (e.g. organism)
        out["harmful_rate"] = sum(v["harmful"] for v in verdicts) / len(verdicts)
    categories = sorted({r["category"] for r in rows if r["category"] is not None})
    for cat in categories:
        scores = [v["harmfulness"] for r, v in zip(rows, verdicts) if r["category"] == cat]
        out[f"harmfulness/{cat}"] = sum(scores) / len(scores)
    return out
