"""Evaluations of a (possibly pruned) in-memory model; each returns a flat dict of metrics.

One module per measurement: :mod:`~harmprune.evals.harm` (judged generations, prefilling attacks),
:mod:`~harmprune.evals.likelihood` (teacher-forced harmful/benign NLL), :mod:`~harmprune.evals.utility`
(perplexity, MMLU, lm-eval), :mod:`~harmprune.evals.recognition` (detection, explanation, refusal). None of them
loads a model or applies a mask: callers wrap them in :func:`harmprune.pruning.pruned`, so one loaded model
serves every mask.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

from harmprune.io import atomic_write_json

Scalar = (str, int, float, bool, type(None))


def write_metrics(out_dir: str | Path, metrics: Mapping[str, Any]) -> Path:
    """Write ``out_dir/metrics.json`` atomically; values must be scalars (non-finite floats become null)."""
    flat = {}
    for key, value in metrics.items():
        if not isinstance(value, Scalar):
            raise TypeError(f"metric {key!r} is a {type(value).__name__}; metrics.json holds scalars only")
        flat[key] = None if isinstance(value, float) and not math.isfinite(value) else value
    path = Path(out_dir) / "metrics.json"
    atomic_write_json(path, flat)
    return path
