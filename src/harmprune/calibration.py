"""Self-generated calibration data: the model under study answers harmful prompts under a prefilling attack.

The study scores its harm set on the *model's own* harmful answers, not on another model's text: every
calibration prompt is answered by the model with the start of a harmful answer forced (a fixed ``prefix`` such
as "Sure, here is", or the first ``prefill_tokens`` tokens of a reference harmful answer, e.g. AdvBench's
``target``), a judge (by default the ``refusal`` judge) reads the model's continuation, and the answers it marks
as refusals are dropped. What is left are (prompt, response) records for scoring, with the counts of what was
kept and dropped (overall and per category).

**The forced prefix is context, not a scoring target** (as in the study, whose answer files keep the prefilled
start on the prompt side and the model's continuation as the response). The record's response is the prefix
followed by the continuation, so it reads as one answer, and the record's ``unscored_prefix`` (kept in
``Record.source``, written as a JSONL field, and part of the records' digest) says which leading part is
context: scoring tokenises the prefix after the prompt and puts the loss on the continuation's tokens only.
With ``score_prefix`` the prefix is scored too (the record carries no ``unscored_prefix``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from harmprune.data import Record
from harmprune.errors import DataError, HarmpruneError
from harmprune.formatting import PromptFormat

log = logging.getLogger(__name__)

UNSCORED_PREFIX = "unscored_prefix"  # the Record.source / JSONL field naming a response's leading context


@dataclass
class SelfGenerated:
    """Kept records, the drop counts, and one label row per answer (its verdict, never its text)."""

    records: list[Record]
    counts: dict[str, Any]
    labels: list[dict[str, Any]] = field(default_factory=list)


def forced_prefixes(tokenizer, records: Sequence[Record], *, prefix: str | None = None, prefill_tokens: int = 0,
                    references: Sequence[Record] | None = None) -> list[str]:
    """One forced start per record: the fixed ``prefix``, or the first ``prefill_tokens`` tokens of the record's
    reference answer (matched by prompt text in ``references``; the record's own response when none is given)."""
    from harmprune.evals.harm import reference_prefixes

    if prefix and prefill_tokens:
        raise HarmpruneError("give a fixed prefix or a number of prefill tokens, not both")
    if prefill_tokens < 0:
        raise HarmpruneError(f"prefill_tokens must be non-negative, got {prefill_tokens}")
    if prefix:
        return [prefix] * len(records)
    return reference_prefixes(tokenizer, records, prefill_tokens, references)


def self_generate(model, tokenizer, records: Sequence[Record], prefixes: Sequence[str], *, judge: Any = "refusal",
                  fmt: PromptFormat = "chat", max_new_tokens: int = 128, batch_size: int = 8,
                  score_prefix: bool = False, progress: bool = False) -> SelfGenerated:
    """Greedy answers to ``records``' prompts, each forced to open with its prefix; refusals dropped.

    ``judge`` is a judge name from the registry, a judge object, or None (keep every non-empty answer). An answer
    whose continuation is empty is always dropped (it has nothing of the model's own to score).
    """
    from harmprune.generation import generate

    records = list(records)
    if not records:
        raise DataError("no prompts to answer")
    if len(prefixes) != len(records):
        raise HarmpruneError(f"{len(prefixes)} prefixes for {len(records)} prompts")
    judge = _judge(judge)
    gens = generate(model, tokenizer, [r.prompt for r in records], fmt=fmt, prefixes=list(prefixes),
                    max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress)
    verdicts = _verdicts(judge, records, gens)
    kept: list[Record] = []
    labels: list[dict[str, Any]] = []
    for i, (r, g, v) in enumerate(zip(records, gens, verdicts)):
        empty = not g.response.strip()
        refused = bool(v.refused) if v is not None else False
        keep = not empty and not refused
        labels.append({"index": i, "category": r.category, "kept": keep, "empty": empty, "refused": refused,
                       "reason": (v.details.get("reason") if v is not None else None), "n_new_tokens": g.n_new_tokens})
        if keep:
            kept.append(answer_record(r, g.prefix, g.response, score_prefix))
    counts = drop_counts(labels, judge.name if judge is not None else None)
    log.info("self-generated answers: kept %d of %d (%d refusals, %d empty)", counts["kept"], counts["total"],
             counts["refused"], counts["empty"])
    return SelfGenerated(kept, counts, labels)


def answer_record(source: Record, prefix: str, continuation: str, score_prefix: bool = False) -> Record:
    """The (prompt, prefix + continuation) record; the prefix is marked as unscored context unless scored."""
    meta = {k: v for k, v in source.source.items() if k != UNSCORED_PREFIX}
    meta["response"] = "self-generated"
    if prefix and not score_prefix:
        meta[UNSCORED_PREFIX] = prefix
    return Record(source.prompt, prefix + continuation, source.category, meta)


def drop_counts(labels: Sequence[dict[str, Any]], judge_name: str | None) -> dict[str, Any]:
    """kept / dropped / total (dropped = refused + empty), overall and per category where there are categories."""

    def tally(rows: Sequence[dict[str, Any]]) -> dict[str, int]:
        kept = sum(r["kept"] for r in rows)
        return {"kept": kept, "dropped": len(rows) - kept, "total": len(rows),
                "refused": sum(r["refused"] for r in rows), "empty": sum(r["empty"] for r in rows)}

    out: dict[str, Any] = {**tally(labels), "judge": judge_name}
    cats = sorted({r["category"] for r in labels if r["category"] is not None})
    if cats:
        out["per_category"] = {c: tally([r for r in labels if r["category"] == c]) for c in cats}
    return out


def split_unscored(record: Record) -> tuple[str, str]:
    """(context, target) of a record's response: its ``unscored_prefix`` and the rest ("" and all without one)."""
    response = record.response or ""
    prefix = record.source.get(UNSCORED_PREFIX) or ""
    if not prefix:
        return "", response
    if not response.startswith(prefix):
        raise DataError(f"{record.source.get('file', 'data')}: row {record.source.get('row', '?')}: the response "
                        f"does not start with its {UNSCORED_PREFIX} {prefix[:40]!r}")
    return prefix, response[len(prefix):]


# ---------------------------------------------------------------------------------------------- files


def write_answers(result: SelfGenerated, path: str | Path, provenance: dict[str, Any]) -> Path:
    """The kept records as JSONL (``prompt``, ``response``, ``category``, ``unscored_prefix``), readable by
    :func:`harmprune.data.load_records`, and a sidecar ``<name>.meta.json`` with the provenance, the drop counts
    and the per-answer labels (verdicts without text). Both are written atomically, the sidecar last."""
    from harmprune.io import atomic_write_json, atomic_write_text

    path = Path(path)
    lines = []
    for r in result.records:
        row: dict[str, Any] = {"prompt": r.prompt, "response": r.response, "category": r.category}
        if r.source.get(UNSCORED_PREFIX):
            row[UNSCORED_PREFIX] = r.source[UNSCORED_PREFIX]
        lines.append(json.dumps(row, ensure_ascii=False))
    if not lines:
        raise DataError(f"every answer was dropped ({result.counts['refused']} refusals, "
                        f"{result.counts['empty']} empty of {result.counts['total']}); nothing to write to {path}")
    atomic_write_text(path, "\n".join(lines) + "\n")
    meta = sidecar_path(path)
    atomic_write_json(meta, {**provenance, "counts": result.counts, "labels": result.labels})
    return path


def sidecar_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.stem + ".meta.json")


def read_counts(path: str | Path) -> dict[str, Any]:
    return json.loads(sidecar_path(path).read_text(encoding="utf-8"))["counts"]


# ---------------------------------------------------------------------------------------------- internals


def _judge(judge: Any):
    if judge is None or not isinstance(judge, str):
        return judge
    from harmprune.judges import get_judge

    return get_judge(judge)


def _verdicts(judge, records: Sequence[Record], gens) -> list[Any]:
    if judge is None:
        return [None] * len(gens)
    from harmprune.judges import JudgeItem

    items = [JudgeItem(g.prompt, g.response, r.category, g.prefix) for r, g in zip(records, gens)]
    return list(judge.judge_batch(items))
