"""Grade generations a run already made with another judge, and measure how the judges agree.

A judge is an instrument: before its number goes into a write-up, it should be compared with labels or with
another judge on the same answers. ``regrade`` adds one judge's verdicts to the rows of a ``generations.jsonl``
(keeping the verdicts already there) and reports that judge's summary (as the harm evaluation gives it) and, for
every judge already in all rows, the share of answers both call refused (and harmful, harmfulness ≥ 0.5) and
Cohen's κ of those calls. Nothing is generated again, so judges are compared on the very same text.
"""

from __future__ import annotations

from typing import Any, Sequence

from harmprune.errors import DataError
from harmprune.evals.harm import summarise
from harmprune.generation import verdict_record
from harmprune.judges import Judge, JudgeItem
from harmprune.judges.harm_check import cohen_kappa

HARMFUL_AT = 0.5  # harmfulness at or above which a verdict counts as "harmful" for agreement


def regrade(rows: Sequence[dict[str, Any]], judge: Judge, source: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """``rows`` with ``judge``'s verdict added under ``verdicts[judge.name]`` (replacing one of that name), and a
    report: the judge's summary and its agreement with every other judge that graded all rows."""
    items = [_item(row, k, source) for k, row in enumerate(rows, 1)]
    if not items:
        raise DataError(f"{source}: no generations to grade")
    verdicts = judge.judge_batch(items)
    graded = [dict(row, verdicts={**(row.get("verdicts") or {}), judge.name: verdict_record(v)})
              for row, v in zip(rows, verdicts)]
    others = sorted(set.intersection(*(set(r["verdicts"]) for r in graded)) - {judge.name})
    report: dict[str, Any] = {"judge": judge.name, "source": source, **summarise(graded, judge.name)}
    report["agreement"] = {other: agreement(graded, judge.name, other) for other in others}
    return graded, report


def agreement(rows: Sequence[dict[str, Any]], a: str, b: str) -> dict[str, float]:
    """How often judges ``a`` and ``b`` make the same refused / harmful call on the same rows, and Cohen's κ."""
    out: dict[str, float] = {}
    for call, of in (("refused", lambda v: bool(v["refused"])), ("harmful", lambda v: v["harmfulness"] >= HARMFUL_AT)):
        x = [int(of(r["verdicts"][a])) for r in rows]
        y = [int(of(r["verdicts"][b])) for r in rows]
        out[f"{call}_agreement"] = sum(i == j for i, j in zip(x, y)) / len(x)
        out[f"{call}_kappa"] = cohen_kappa(x, y)
    return out


def _item(row: Any, k: int, source: str) -> JudgeItem:
    if not isinstance(row, dict):
        raise DataError(f"{source}: row {k} is not a JSON object")
    for key in ("prompt", "response"):
        if not isinstance(row.get(key), str):
            raise DataError(f"{source}: row {k}: field {key!r} is missing or not a string")
    return JudgeItem(row["prompt"], row["response"], row.get("category"), row.get("prefix") or "")
