"""Benchmark: selection against the time to read the score files, the full-sort selection it replaced side by side.

Writes a harm and a utility score file (float32, random normal scores) with the scored shapes of a model, then
times, in one process on the same files: reading every tensor of both files; the old selection (full stable sort
per matrix; the three-pass radix select for ``global``); the partial selection (``select``); and a sweep of
several q at one p by ``select_grid`` against one ``select`` per point. Every pair is checked to give the same
mask. The files are read once before timing, so every variant reads from the page cache.

    .venv/bin/python bench/bench_selection.py [--shapes qwen2.5-0.5b llama-3.1-8b:1 --q 1e-5 --p 5e-5]

``SHAPE:N`` keeps the first N layers. Shapes: qwen2.5-0.5b (24 layers, hidden 896, intermediate 4864, 14 q /
2 kv heads of dim 64), llama-3.1-8b (hidden 4096, intermediate 14336, 32 q / 8 kv heads of dim 128).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_attribution import code_version, machine, update_section  # noqa: E402

import harmprune.selection as selection  # noqa: E402
from harmprune.plan import ModelShape  # noqa: E402
from harmprune.selection import difference, select, select_grid, support  # noqa: E402
from harmprune.tensorfile import TensorFile, save_tensors  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HEADING = "## Selection at the speed of reading the scores"
SHAPES = {
    "qwen2.5-0.5b": ModelShape("qwen2.5-0.5b", "Qwen2.5-0.5B config", hidden=896, intermediate=4864, layers=24,
                               heads=14, kv_heads=2, head_dim=64, vocab=151936, tied=True, qkv_bias=True),
    "llama-3.1-8b": ModelShape("llama-3.1-8b", "Llama-3.1-8B config", hidden=4096, intermediate=14336, layers=32,
                               heads=32, kv_heads=8, head_dim=128, vocab=128256),
}


def write_scores(shape: ModelShape, layers: int, path: Path, seed: int, method: str) -> int:
    """One float32 score file with the model's scored matrices; returns the entry count. Random normal values
    for a signed method; for an absolute one (``snip``: |W| ⊙ Σ|∇W|) the product of two |normal| draws, which is
    non-negative and heavy-tailed like the real scores."""
    from harmprune.scoring_methods import scoring_method

    g = torch.Generator().manual_seed(seed)
    draw = ((lambda o, k: torch.randn(o, k, generator=g)) if scoring_method(method).signed else
            (lambda o, k: torch.randn(o, k, generator=g).abs_() * torch.randn(o, k, generator=g).abs_()))
    tensors = {f"model.layers.{i}.{m}.weight": draw(o, k)
               for i in range(layers) for m, (o, k) in shape.linear_shapes().items()}
    save_tensors(tensors, path, {"method": method})
    return sum(t.numel() for t in tensors.values())


def read_all(*files: TensorFile) -> float:
    start = time.perf_counter()
    for f in files:
        for n in f.names():
            f.get(n).float().sum()  # touch every value, as a selection must
    return time.perf_counter() - start


def old_top_fraction(values: torch.Tensor, fraction: float) -> torch.Tensor:
    """The selection before partial selection: a full stable descending sort of the matrix."""
    k = math.floor(fraction * values.numel())
    if k <= 0:
        return torch.empty(0, dtype=torch.long)
    return torch.sort(values.reshape(-1).float(), descending=True, stable=True).indices[:k].sort().values


def old_select(harm: TensorFile, util: TensorFile, q: float, p: float, granularity: str) -> dict:
    if granularity == "global":  # the radix select, forced by a running cap below any k
        cap, selection._GLOBAL_CAP = selection._GLOBAL_CAP, -1
        try:
            return select(harm, util, q, p, "global").indices
        finally:
            selection._GLOBAL_CAP = cap
    out = {}
    for n in harm.names():
        h = old_top_fraction(support(harm.get(n).float(), harm.metadata["method"]), q)
        u = old_top_fraction(support(util.get(n).float(), util.metadata["method"]), p)
        out[n] = difference(h, u)
    return out


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def bench_shape(spec: str, args, tmp: Path) -> list[dict]:
    """The rows of one model shape: a harm and a utility file of random scores written, timed, removed."""
    name, _, layers = spec.partition(":")
    shape = SHAPES[name]
    layers = int(layers or shape.layers)
    write_scores(shape, layers, tmp / "harm.safetensors", 0, "signed-snip")
    write_scores(shape, layers, tmp / "util.safetensors", 1, args.utility_method)
    rows = bench_files(f"{name} ({layers} layer{'s' * (layers > 1)})", tmp / "harm.safetensors",
                       tmp / "util.safetensors", args)
    for f in ("harm.safetensors", "util.safetensors"):
        (tmp / f).unlink()
    return rows


def bench_files(label: str, harm_path: Path, util_path: Path, args) -> list[dict]:
    """One row per granularity: read and selection of these two score files, alternating, and the sweep."""
    harm, util = TensorFile(harm_path), TensorFile(util_path)
    n = sum(math.prod(harm.shape(name)) for name in harm.names())
    read_all(harm, util)  # into the page cache
    rows = []
    for granularity in args.granularities:
        # Read and the new selection alternate, best of --repeats each, so a change in the machine's load hits both.
        reads, news = [], []
        for _ in range(args.repeats):
            reads.append(read_all(harm, util))
            t, new = timed(lambda: select(harm, util, args.q, args.p, granularity).indices)
            news.append(t)
        read, t_new = min(reads), min(news)
        t_old, old = (None, new) if args.skip_old else timed(lambda: old_select(harm, util, args.q, args.p, granularity))
        qs = [args.q * m for m in args.sweep]
        t_each, each = timed(lambda: {q: select(harm, util, q, args.p, granularity).indices for q in qs})
        t_grid, grid = timed(lambda: select_grid(harm, util, qs, [args.p], granularity))
        rows.append({"shape": label, "entries": n, "file_gib": 4 * n / 2**30, "granularity": granularity,
                     "read": read, "old": t_old, "new": t_new, "reads": reads, "news": news,
                     "paired": statistics.median(t / r for t, r in zip(news, reads)),
                     "selected": sum(t.numel() for t in new.values()),
                     "same": same(old, new) and all(same(each[q], grid[(q, args.p)].indices) for q in qs),
                     "sweep": len(qs), "each": t_each, "grid": t_grid})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="*", default=["qwen2.5-0.5b", "llama-3.1-8b:1"])
    ap.add_argument("--files", nargs=2, metavar=("HARM", "UTILITY"), default=None,
                    help="also time two score files `harmprune score` wrote (their methods from their metadata)")
    ap.add_argument("--granularities", nargs="+", default=["matrix", "global"],
                    choices=["matrix", "row", "global"])
    ap.add_argument("--utility-method", default="signed-snip", choices=["signed-snip", "snip"],
                    help="the utility file's method (the study's recipe: snip)")
    ap.add_argument("--q", type=float, default=1e-5)
    ap.add_argument("--p", type=float, default=5e-5)
    ap.add_argument("--sweep", type=float, nargs="+", default=[1, 3, 10, 30],
                    help="the sweep's q values, as multiples of --q")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="read / new selection alternations (best of each)")
    ap.add_argument("--skip-old", action="store_true",
                    help="do not time the old full-sort selection (minutes at 0.5B); its columns show '-'")
    ap.add_argument("--tmp", type=Path, default=None, help="where to write the score files")
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "RESULTS.md")
    ap.add_argument("--heading", default=HEADING,
                    help="the RESULTS.md section to write (another one for a run at other fractions)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        rows = [r for spec in args.shapes for r in bench_shape(spec, args, Path(tmp))]
    if args.files:
        harm, util = map(Path, args.files)
        rows += bench_files(f"files {harm.name} + {util.name}", harm, util, args)
    report(args, rows)


def _seconds(t: float | None) -> str:
    return "-" if t is None else f"{t:.2f}"


def _ratio(a: float | None, b: float) -> str:
    return "-" if a is None else f"{a / b:.1f}×"


def report(args, rows: list[dict]) -> None:
    sweep = ", ".join(f"{args.q * m:g}" for m in args.sweep)
    lines = [
        args.heading,
        "",
        f"Command: `.venv/bin/python bench/bench_selection.py --shapes {' '.join(args.shapes)} --granularities "
        f"{' '.join(args.granularities)} --q {args.q:g} --p {args.p:g} --sweep {' '.join(f'{m:g}' for m in args.sweep)}"
        f" --threads {args.threads} --repeats {args.repeats}{' --skip-old' * args.skip_old}"
        f"{f' --utility-method {args.utility_method}' * (args.utility_method != 'signed-snip')}"
        f"{f' --files {args.files[0]} {args.files[1]}' if args.files else ''}"
        f"{f' --heading {chr(39)}{args.heading}{chr(39)}' * (args.heading != HEADING)}`. Harm and utility "
        f"score files (float32; harm: signed-snip, random normal; utility: {args.utility_method}"
        f"{', random normal' if args.utility_method == 'signed-snip' else ', |normal| × |normal|'}) with the "
        f"scored shapes named{'; and the two --files' if args.files else ''}; all times from the page cache; {machine()}; load average at the end "
        f"{open('/proc/loadavg').read().split()[0]} (other jobs shared the CPU); {code_version()}; "
        f"run on {time.strftime('%Y-%m-%d')}.",
        "",
        "| shapes | scores per file | granularity | read both files (s) | old selection (s) | new selection (s) | "
        "new / read | median of paired new / read | old / new | selected | same mask | sweep: one select per q (s) | "
        "sweep: select_grid (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['entries'] / 1e6:.0f}M ({r['file_gib']:.2f} GiB) | {r['granularity']} | "
                     f"{r['read']:.3f} | {_seconds(r['old'])} | {r['new']:.3f} | **{r['new'] / r['read']:.2f}×** | "
                     f"{r['paired']:.2f}× | "
                     f"{_ratio(r['old'], r['new'])} | {r['selected']} | {'yes' if r['same'] else 'NO'} | "
                     f"{r['each']:.2f} | {r['grid']:.2f} |")
    lines += [
        "",
        f"- read and new selection alternate {args.repeats} times; the best of each is shown, and the median over "
        f"the repeats of each selection's time over the read just before it (all, in seconds: "
        + "; ".join(f"{r['shape']} {r['granularity']}: read {', '.join(f'{t:.3f}' for t in r['reads'])}, new "
                    f"{', '.join(f'{t:.3f}' for t in r['news'])}" for r in rows) + ").",
        f"- Target: new selection ≤ 2× the time to read both files. \"read\" loads every tensor of both files and "
        f"touches every value; selection reads them too, so the ratio includes its own reading.",
        f"- Old: a full stable sort of every matrix (`matrix`), the three-pass radix select (`global`). New: the "
        f"maxima of small blocks bound the k-th value from below, then only the ~k candidates in the blocks "
        f"reaching it are ranked (`matrix`); one pass keeping the running top k (`global`). \"same mask\": old "
        f"and new, and the sweep's two ways, give equal indices"
        f"{' (with --skip-old: the sweep' + chr(39) + 's two ways only; old columns from earlier runs)' * args.skip_old}.",
        f"- Sweep: q ∈ {{{sweep}}} at p = {args.p:g}; `select_grid` ranks each matrix once at the largest q and "
        f"reads each file once.",
        "",
    ]
    print("\n".join(lines))
    update_section(args.results, args.heading, "\n".join(lines),
                   keep_history=True)


if __name__ == "__main__":
    main()
