"""The results store: one SQLite file per run directory indexing every stage and every metric.

Stages are recorded when they finish (their outputs are already on disk, written atomically), so the store never
points at a half-written file. Metrics are (experiment, model, condition, q, p, metric, value) rows that the
report and ``harmprune results`` query; a row's ``extra`` JSON holds its ``recipe`` (which scoring method and
prompt format made the harm and utility score files of the run that recorded it), read back by :func:`recipe_of`.
"""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import closing
from pathlib import Path
from typing import Any, Callable, Iterable

SCHEMA = """
CREATE TABLE IF NOT EXISTS stages (
    key TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    params TEXT NOT NULL,
    output TEXT NOT NULL,
    seconds REAL,
    finished REAL
);
CREATE TABLE IF NOT EXISTS metrics (
    experiment TEXT NOT NULL,
    model TEXT NOT NULL,
    condition TEXT NOT NULL,
    q REAL,
    p REAL,
    seed INTEGER,
    evaluation TEXT NOT NULL,
    metric TEXT NOT NULL,
    value REAL,
    stage TEXT,
    extra TEXT,
    UNIQUE (experiment, model, condition, q, p, seed, evaluation, metric)
);
"""


class Store:
    """A thin, explicit layer over sqlite3; every write is its own transaction."""

    def __init__(self, path: str | Path, recipe_of_model: Callable[[str], str] | None = None):
        self.path = Path(path)
        self.recipe_of_model = recipe_of_model  # model name -> scoring recipe label, stored with pruned rows
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.executescript(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=60)
        db.row_factory = sqlite3.Row
        return db

    def record_stage(self, key: str, kind: str, params: dict[str, Any], output: str, seconds: float | None,
                     reused: bool = False) -> None:
        """Record a stage this run computed, or (``reused``) one it found finished, here or in a shared
        ``stages/``: then an existing record of it is kept."""
        with closing(self._connect()) as db, db:
            db.execute(f"INSERT OR {'IGNORE' if reused else 'REPLACE'} INTO stages VALUES (?, ?, ?, ?, ?, ?)",
                       (key, kind, json.dumps(params, sort_keys=True, default=str), output, seconds, time.time()))

    def stage(self, key: str) -> dict[str, Any] | None:
        with closing(self._connect()) as db:
            row = db.execute("SELECT * FROM stages WHERE key = ?", (key,)).fetchone()
        return dict(row) if row else None

    def record_metrics(self, experiment: str, model: str, condition: str, evaluation: str,
                       metrics: dict[str, Any], *, q: float | None = None, p: float | None = None,
                       seed: int | None = None, stage: str | None = None, extra: dict[str, Any] | None = None) -> None:
        extra = dict(extra or {})
        if self.recipe_of_model is not None and condition != "unpruned" and "recipe" not in extra:
            extra["recipe"] = self.recipe_of_model(model)
        rows = [(experiment, model, condition, q, p, seed, evaluation, k, float(v), stage,
                 json.dumps(extra, sort_keys=True))
                for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        with closing(self._connect()) as db, db:
            # NULLs never collide in a UNIQUE index, so delete the old row explicitly before inserting.
            for r in rows:
                db.execute("DELETE FROM metrics WHERE experiment=? AND model=? AND condition=? AND q IS ? AND p IS ? "
                           "AND seed IS ? AND evaluation=? AND metric=?", r[:8])
            db.executemany("INSERT INTO metrics VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)

    def metrics(self, **where: Any) -> list[dict[str, Any]]:
        clauses = " AND ".join(f"{k} IS ?" for k in where) or "1"
        with closing(self._connect()) as db:
            rows = db.execute(f"SELECT * FROM metrics WHERE {clauses} ORDER BY experiment, model, condition, q, p, "
                              "seed, evaluation, metric", tuple(where.values())).fetchall()
        return [dict(r) for r in rows]

    def stages(self) -> list[dict[str, Any]]:
        with closing(self._connect()) as db:
            return [dict(r) for r in db.execute("SELECT * FROM stages ORDER BY finished").fetchall()]


def recipe_of(row: dict[str, Any]) -> str | None:
    """The scoring recipe stored with a metrics row (None for unpruned rows and runs that predate it)."""
    try:
        return json.loads(row.get("extra") or "{}").get("recipe")
    except (TypeError, ValueError, AttributeError):
        return None


def format_table(rows: Iterable[dict[str, Any]], columns: list[str]) -> str:
    """A plain-text table for the terminal."""
    rows = list(rows)
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths))
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
