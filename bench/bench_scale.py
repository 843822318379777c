"""Benchmark: data-parallel scoring on 2 processes vs 1, and streaming vs in-memory global selection.

1. Scoring: the same examples scored by one process with 2 threads and by ``torchrun --nproc-per-node 2`` with
   1 thread per rank (same total threads, Gloo on CPU); the two score files are compared.
2. Global selection over a score file pair of a model's scored shapes (random float32 scores): the streaming
   ``select`` on TensorFiles vs the in-memory path (every support tensor loaded, one concatenation, one sort).
   Each variant runs in its own process so its peak RSS is its own; the masks are compared.

    .venv/bin/python bench/bench_scale.py [--n-examples 32 --max-length 256 --shapes smollm2-135m-instruct]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from bench_attribution import update_section  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "benign" / "alpaca_eval.jsonl"
HEADING_SCORE = "## Data-parallel scoring (2 processes vs 1)"
HEADING_SELECT = "## Streaming global selection"


def rss() -> int:
    """Peak resident memory of this process so far (bytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def status(field: str) -> int:
    """A memory figure from /proc/self/status (VmRSS: now; VmHWM: peak since the last reset), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak() -> None:
    """Start VmHWM afresh from the current RSS (Linux: write 5 to clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


# ---------------------------------------------------------------------------------------------- workers


def score_worker(args) -> None:
    import torch

    from harmprune import distributed
    from harmprune.attribution import compute_scores, save_scores
    from harmprune.data import load_records
    from harmprune.models import load_model

    torch.set_num_threads(args.threads)
    ctx = distributed.init_distributed() if "WORLD_SIZE" in os.environ else None
    records = load_records(args.data, n_examples=args.n_examples, seed=0, require_response=True, skip_empty=True)
    model, tok = load_model(args.model)
    distributed.barrier()
    start = time.perf_counter()
    scores = compute_scores(model, tok, records, "signed-snip", max_length=args.max_length,
                            batch_size=args.batch_size, progress=False)
    seconds = time.perf_counter() - start
    save_scores(scores, args.out)
    distributed.barrier()
    peak = torch.tensor([rss()])
    if ctx is not None:
        torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
        distributed.shutdown()
    if ctx is None or ctx.is_main:
        print(json.dumps({"seconds": seconds, "tokens": scores.metadata["tokens"], "examples": len(records),
                          "peak_rss_bytes": int(peak), "world": ctx.world if ctx else 1}))


def select_worker(args) -> None:
    import torch

    from harmprune.selection import difference, save_mask, select, select_global, support
    from harmprune.tensorfile import TensorFile

    torch.set_num_threads(args.threads)
    harm, util = TensorFile(args.harm), TensorFile(args.util)
    reset_peak()
    before = status("VmRSS")
    start = time.perf_counter()
    if args.worker == "streaming":
        mask = select(harm, util, args.q, args.p, "global")
        indices = mask.indices
    else:
        h = select_global({n: support(harm.get(n).float(), "signed-snip") for n in harm.names()}, args.q)
        u = select_global({n: support(util.get(n).float(), "signed-snip") for n in util.names()}, args.p)
        indices = {n: difference(h[n], u[n]) for n in h}
    seconds = time.perf_counter() - start
    peak = status("VmHWM")
    from harmprune.selection import Mask

    save_mask(Mask(indices, {n: harm.shape(n) for n in harm.names()}), args.out)
    print(json.dumps({"seconds": seconds, "peak_rss_bytes": peak, "rss_before_bytes": before,
                      "selected": sum(int(t.numel()) for t in indices.values())}))


# ---------------------------------------------------------------------------------------------- driver


def run(cmd: list[str], env: dict | None = None) -> tuple[dict, float]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=ROOT)
    wall = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"{' '.join(cmd[:6])} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), wall


def bench_scoring(args, tmp: Path) -> str:
    common = ["--worker", "score", "--model", args.model, "--data", str(args.data), "--n-examples",
              str(args.n_examples), "--max-length", str(args.max_length), "--batch-size", str(args.batch_size)]
    torchrun = Path(sys.executable).parent / "torchrun"
    variants = {
        "1 process × 2 threads": ([sys.executable, __file__, *common, "--threads", "2",
                                   "--out", str(tmp / "one.safetensors")], None),
        "1 process × 1 thread": ([sys.executable, __file__, *common, "--threads", "1",
                                  "--out", str(tmp / "one-thread.safetensors")], {"OMP_NUM_THREADS": "1"}),
        "torchrun 2 processes × 1 thread (Gloo)": (
            [str(torchrun), "--nnodes", "1", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
             "--master-port", str(args.port), __file__, *common, "--threads", "1",
             "--out", str(tmp / "two.safetensors")], {"OMP_NUM_THREADS": "1"}),
    }
    runs: dict[str, list[tuple[dict, float]]] = {name: [] for name in variants}
    for repeat in range(args.repeats):  # alternate the order: other processes' load drifts over minutes
        for name in (list(variants) if repeat % 2 == 0 else list(variants)[::-1]):
            cmd, env = variants[name]
            runs[name].append(run(cmd, env))
    err = max_relative_error(tmp / "two.safetensors", tmp / "one.safetensors")
    gib = lambda b: b / 2**30  # noqa: E731
    first = runs[next(iter(runs))][0][0]
    rows, best = [], {}
    for name, rs in runs.items():
        best[name] = min(r["seconds"] for r, _ in rs)
        times = ", ".join(f"{r['seconds']:.1f}" for r, _ in rs)
        rows.append(f"| {name} | {best[name]:.1f} | {times} | {min(w for _, w in rs):.1f} | "
                    f"{gib(max(r['peak_rss_bytes'] for r, _ in rs)):.2f} |")
    one, one_thread, two = best.values()
    return "\n".join([
        HEADING_SCORE,
        "",
        f"Command: `.venv/bin/python bench/bench_scale.py --n-examples {args.n_examples} --max-length "
        f"{args.max_length} --batch-size {args.batch_size} --repeats {args.repeats}` (scoring part). Model "
        f"`{args.model}`, signed-snip, float32, data `{args.data.name}` ({first['examples']} examples, "
        f"{first['tokens']} response tokens); load average {os.getloadavg()[0]:.1f} at the end (other jobs "
        f"shared the 2 cores); run on {time.strftime('%Y-%m-%d')}.",
        "",
        "| variant | scoring time, best (s) | each run (s) | wall incl. start-up, best (s) | peak RSS per process (GiB) |",
        "|---|---|---|---|---|",
        *rows,
        "",
        f"- Best scoring time, 1 process × 2 threads / 2 processes × 1 thread: {one / two:.2f}×; 1 process × 1 "
        f"thread / 2 processes × 1 thread: {one_thread / two:.2f}× (2× would be perfect scaling). The 2-process "
        f"and 1-process score files differ by at most {err:.1e} (relative to each matrix's largest score): float32 "
        "summation order.",
        f"- With other jobs on the 2 cores, one process with 2 OpenMP threads ran {one / one_thread:.1f}× slower "
        "than with 1 thread (its threads wait for each other whenever one is descheduled), so the first ratio "
        "overstates what data parallelism buys; the 1-thread comparison is the fair one here.",
        "- Each data-parallel rank holds a whole model, its activations and float32 accumulators, so memory per "
        "process is about the single process's; the gain is throughput, which matters on GPUs, where each rank "
        "has a device of its own.",
        "",
    ])


def make_score_files(shapes_from: str, layers: int | None, tmp: Path) -> tuple[Path, Path, int, int]:
    import torch

    from harmprune.plan import model_shape
    from harmprune.tensorfile import save_tensors

    shape = model_shape(shapes_from)
    n_layers = layers or shape.layers
    paths = []
    for seed, name in ((0, "harm"), (1, "util")):
        g = torch.Generator().manual_seed(seed)
        tensors = {f"model.layers.{i}.{m}.weight": torch.randn(s, generator=g)
                   for i in range(n_layers) for m, s in shape.linear_shapes().items()}
        paths.append(save_tensors(tensors, tmp / f"{name}.safetensors", {"method": "signed-snip"}))
        total = sum(t.numel() for t in tensors.values())
        del tensors
    return paths[0], paths[1], total, shape.largest_matrix()


def bench_selection(args, tmp: Path) -> str:
    harm, util, total, largest = make_score_files(args.shapes, args.layers, tmp)
    results = {}
    for variant in ("streaming", "in-memory"):
        results[variant], _ = run([sys.executable, __file__, "--worker", variant, "--harm", str(harm), "--util",
                                   str(util), "--q", str(args.q), "--p", str(args.p), "--threads", "2",
                                   "--out", str(tmp / f"{variant}.mask.safetensors")])
    from harmprune.selection import load_mask

    a, b = load_mask(tmp / "streaming.mask.safetensors"), load_mask(tmp / "in-memory.mask.safetensors")
    same = a.indices.keys() == b.indices.keys() and all(a.indices[n].equal(b.indices[n]) for n in a.indices)
    gib = lambda x: x / 2**30  # noqa: E731
    rows = []
    for variant, r in results.items():
        extra = r["peak_rss_bytes"] - r["rss_before_bytes"]
        rows.append(f"| {variant} | {r['seconds']:.1f} | {gib(r['peak_rss_bytes']):.2f} | {gib(extra):.2f} | "
                    f"{extra / (4 * largest):.1f} |")
    layers = f" (first {args.layers} layer{'s' if args.layers > 1 else ''})" if args.layers else ""
    return "\n".join([
        HEADING_SELECT,
        "",
        f"Command: `.venv/bin/python bench/bench_scale.py --shapes {args.shapes}{f' --layers {args.layers}' if args.layers else ''} "
        f"--q {args.q} --p {args.p}` (selection part). Harm and utility score files with the scored shapes of "
        f"`{args.shapes}`{layers}: {total / 1e6:.0f}M float32 scores each ({gib(4 * total):.2f} GiB per file; "
        f"largest matrix {gib(4 * largest):.3f} GiB), random normal values; granularity global, 2 threads; "
        f"run on {time.strftime('%Y-%m-%d')}.",
        "",
        "| variant | time (s) | peak RSS while selecting (GiB) | added over the RSS before (GiB) | added / largest matrix |",
        "|---|---|---|---|---|",
        *rows,
        "",
        f"- Same mask: {'yes' if same else 'NO'} ({a.count()} weights selected).",
        "- Streaming makes three passes over each file (two radix histograms, then the indices); the in-memory "
        "path concatenates and sorts every score at once, so its memory grows with the model while the "
        "streaming path's stays a few matrices' worth (plus the mask).",
        "",
    ])


def max_relative_error(a: Path, b: Path) -> float:
    from harmprune.tensorfile import TensorFile

    x, y = TensorFile(a), TensorFile(b)
    return max(float((x.get(n) - y.get(n)).abs().max() / y.get(n).abs().max().clamp(min=1e-30)) for n in y.names())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--n-examples", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--shapes", default="smollm2-135m-instruct", help="model whose scored shapes the files get")
    ap.add_argument("--layers", type=int, default=None, help="only this many layers of --shapes")
    ap.add_argument("--q", type=float, default=0.01)
    ap.add_argument("--p", type=float, default=0.005)
    ap.add_argument("--repeats", type=int, default=2, help="scoring runs per variant, in alternating order")
    ap.add_argument("--only", choices=["scoring", "selection"], default=None)
    ap.add_argument("--port", type=int, default=29533)
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "RESULTS.md")
    # worker arguments
    ap.add_argument("--worker", choices=["score", "streaming", "in-memory"], default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--harm", default=None)
    ap.add_argument("--util", default=None)
    args = ap.parse_args()
    if args.worker == "score":
        return score_worker(args)
    if args.worker:
        return select_worker(args)
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "scoring"):
            section = bench_scoring(args, Path(tmp))
            print(section)
            update_section(args.results, HEADING_SCORE, section)
        if args.only in (None, "selection"):
            section = bench_selection(args, Path(tmp))
            print(section)
            update_section(args.results, HEADING_SELECT, section)


if __name__ == "__main__":
    main()
