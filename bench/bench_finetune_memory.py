"""Benchmark: peak memory and time of a CPU LoRA fine-tune under glibc's default heap and a fixed mmap threshold.

On CPU, PyTorch's large activation buffers come from glibc malloc. Its dynamic mmap threshold rises after the first
large frees, so later buffers come from the heap and fragment it: resident memory grows step after step with
variable-length batches. ``MALLOC_MMAP_THRESHOLD_`` fixes the threshold (buffers are mapped and returned to the OS
each time) at the price of page faults. Each variant runs in its own subprocess, side by side in one run.

    .venv/bin/python bench/bench_finetune_memory.py [--steps 24 --batch-size 4 --max-length 512]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "harmful" / "harmful_completions_lat.jsonl"
VARIANTS = {"glibc default": {}, "MALLOC_MMAP_THRESHOLD_=1 MiB": {"MALLOC_MMAP_THRESHOLD_": "1048576"},
            "MALLOC_MMAP_THRESHOLD_=64 KiB": {"MALLOC_MMAP_THRESHOLD_": "65536"}}


def worker(args) -> dict:
    import torch

    from harmprune.data import load_records
    from harmprune.finetune import lora_finetune
    from harmprune.models import load_model

    torch.set_num_threads(args.threads)
    records = load_records(args.data, n_examples=args.steps * args.batch_size, seed=0, require_response=True,
                           skip_empty=True)
    model, tok = load_model(args.model, dtype=args.dtype)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    start = time.perf_counter()
    lora_finetune(model, tok, records, rank=16, batch_size=args.batch_size, max_length=args.max_length,
                  max_steps=args.steps, progress=False)
    return {"seconds": time.perf_counter() - start, "rss_before_gib": before,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    rows = {}
    for name, env in VARIANTS.items():
        cmd = [sys.executable, __file__, "--worker", *sys.argv[1:]]
        out = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, check=True).stdout
        rows[name] = json.loads(out.strip().splitlines()[-1])
    base = rows["glibc default"]
    print(f"Model {args.model}, {args.dtype}, LoRA rank 16, {args.steps} steps of {args.batch_size} examples "
          f"(<= {args.max_length} tokens), {args.threads} threads, {platform.machine()} {platform.system()}\n")
    print("| variant | time (s) | time / default | peak RSS (GiB) | peak / default |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['seconds']:.1f} | {r['seconds'] / base['seconds']:.2f} | {r['peak_rss_gib']:.2f} | "
              f"{r['peak_rss_gib'] / base['peak_rss_gib']:.2f} |")


if __name__ == "__main__":
    main()
