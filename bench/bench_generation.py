"""Batched generation against a batch-1 loop: throughput and identical greedy outputs.

Runs ``harmprune.generation.generate`` on the same prompts with batch size 1 and with larger batches, greedy,
and reports new tokens per second, the speed-up over batch 1, and how many outputs match batch 1 exactly.
Writes the section "## Generation" of bench/RESULTS.md (other sections are left as they are).

    .venv/bin/python bench/bench_generation.py [--model smollm2-135m-instruct] [--data PATH]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from harmprune.data import load_records
from harmprune.generation import generate
from harmprune.io import atomic_write_text
from harmprune.models import load_model

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Generation"


def machine_line() -> str:
    """'N CPU cores, no GPU, <CPU model>' (or the GPU's name)."""
    gpu = f"GPU: {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "no GPU"
    cpu = platform.processor() or "unknown CPU"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        cpu = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    return f"{os.cpu_count()} CPU cores, {gpu}, {cpu}"


def timed_generate(model, tokenizer, prompts, batch_size, max_new_tokens):
    start = time.perf_counter()
    gens = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=False)
    return gens, time.perf_counter() - start


def write_section(results: Path, body: str) -> None:
    """Replace (or append) the Generation section of the results file, creating the file if needed."""
    text = results.read_text() if results.exists() else f"# Benchmarks\n\nMachine: {machine_line()}\n"
    block = f"{SECTION}\n\n{body.rstrip()}\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: block + "\n", text, count=1).rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + block
    atomic_write_text(results, text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--data", default=str(REPO.parent / "shared/data/benign/alpaca_eval.jsonl"))
    ap.add_argument("--n-prompts", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-sizes", default="8,16,32")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; 1 by default because the CPU is shared and oversubscribed threads stall")
    ap.add_argument("--results", default=str(REPO / "bench/RESULTS.md"))
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    prompts = [r.prompt for r in load_records(args.data)[: args.n_prompts]]
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    generate(model, tokenizer, prompts[:2], max_new_tokens=4, batch_size=2, progress=False)  # warm-up

    base, base_s = timed_generate(model, tokenizer, prompts, 1, args.max_new_tokens)
    base_tokens = sum(g.n_new_tokens for g in base)
    rows = [("1 (loop)", base_tokens, base_s, len(prompts), 1.0)]
    print(f"batch 1: {base_tokens} tokens in {base_s:.1f} s = {base_tokens / base_s:.1f} tok/s", flush=True)
    for bs in (int(x) for x in args.batch_sizes.split(",")):
        gens, secs = timed_generate(model, tokenizer, prompts, bs, args.max_new_tokens)
        tokens = sum(g.n_new_tokens for g in gens)
        same = sum(g.response == b.response for g, b in zip(gens, base))
        speedup = (tokens / secs) / (base_tokens / base_s)
        rows.append((str(bs), tokens, secs, same, speedup))
        print(f"batch {bs}: {tokens} tokens in {secs:.1f} s = {tokens / secs:.1f} tok/s, x{speedup:.2f}, "
              f"{same}/{len(prompts)} identical to batch 1", flush=True)

    table = ["| batch size | new tokens | seconds | tokens/s | speed-up | outputs identical to batch 1 |",
             "|---|---|---|---|---|---|"]
    table += [f"| {bs} | {tok} | {s:.1f} | {tok / s:.1f} | {sp:.2f}x | {same}/{len(prompts)} |"
              for bs, tok, s, same, sp in rows]
    best = max(rows[1:], key=lambda r: r[4])
    if all(r[3] == len(prompts) for r in rows[1:]):
        identical_note = "Every batched greedy output is identical to its batch-1 output."
    else:
        identical_note = (
            "Some batched greedy outputs differ from batch 1: padded batches run matrix products of other shapes, "
            "so float32 rounding differs and a near-tie between two tokens can flip the greedy choice."
        )
    body = "\n".join([
        f"`{' '.join(['python', 'bench/bench_generation.py'] + (argv if argv is not None else sys.argv[1:]))}`",
        "",
        f"Model `{args.model}` ({args.dtype}), {len(prompts)} prompts from `{Path(args.data).name}` (chat format), "
        f"{args.max_new_tokens} new tokens, greedy, KV cache, left padding; torch threads: {torch.get_num_threads()}, "
        f"torch {torch.__version__}. Machine: {machine_line()}. The CPU was shared with other jobs during the run "
        f"(load average {load[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end), so absolute times are "
        "noisy.",
        "",
        *table,
        "",
        f"Best: batch {best[0]} at {best[4]:.2f}x the batch-1 throughput (target: at least 4x). " + identical_note,
    ])
    if not args.no_write:
        write_section(Path(args.results), body)
        print(f"wrote {SECTION!r} in {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
