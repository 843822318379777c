"""The GPU benchmark's smoke test: ``bench/bench_gpu.py --tiny`` runs every stage on the CPU and reports each row."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_gpu_tiny_reports_every_row(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from bench_gpu import ROWS
    finally:
        sys.path.pop(0)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_gpu.py"), "--tiny", "--json",
                           str(tmp_path / "rows.json")], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = [json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("ROW ")]
    rows = {r["stage"]: r for r in printed}
    assert set(rows) == set(ROWS) and len(printed) == len(ROWS)
    assert json.loads((tmp_path / "rows.json").read_text()) == printed
    for stage in ROWS:
        assert rows[stage]["seconds"] > 0 and f"| {stage} |" in proc.stdout, stage
    for stage in ("likelihood (harmprune)", "likelihood (plain forward)", "generation", "generation with mask"):
        assert rows[stage]["tokens_per_s"] > 0
    for method in ("signed-snip", "snip"):
        row = rows[f"scoring {method}"]
        assert row["plan_bytes"] > 0 and row["peak_bytes"] > 0 and row["tflops"] >= 0
    assert rows["select matrix"]["selected"] > 0 and rows["select global"]["selected"] > 0
    assert rows["select sweep (4 q, matrix)"]["selected"] == sorted(rows["select sweep (4 q, matrix)"]["selected"])
    assert rows["generation"]["new_tokens"] > 0
