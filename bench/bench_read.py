"""Benchmark: how ``TensorFile.get`` reads (``safe_open``) against positioned reads into memory of its own.

``TensorFile.get`` opens the file with ``safe_open`` for each tensor: a new mapping of the file, whose pages
fault in on first touch, returned as a view that owns the mapping. The alternative measured here reads the
tensor's bytes with ``os.preadv`` into a new tensor (which owns ordinary memory). Both touch every value (a sum),
alternating on the same files from the page cache. The files are float32 score files with the scored shapes of
a model (bench_selection.py's), written once and removed at the end.

    .venv/bin/python bench/bench_read.py [--shapes qwen2.5-0.5b llama-3.1-8b:1 --repeats 7 --threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_attribution import code_version, machine, update_section  # noqa: E402
from bench_selection import SHAPES, read_all, write_scores  # noqa: E402

from harmprune.tensorfile import TensorFile  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HEADING = "## Reading score files"


def read_positioned(paths: list[Path]) -> float:
    """Each tensor's bytes read with os.preadv into a new tensor (float32 files only, as written here)."""
    start = time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            size = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(size))
            for name, entry in header.items():
                if name == "__metadata__":
                    continue
                begin, end = entry["data_offsets"]
                out = torch.empty(end - begin, dtype=torch.uint8)
                view, done = memoryview(out.numpy()), 0
                while done < len(view):  # one read returns at most about 2 GiB
                    done += os.preadv(f.fileno(), [view[done:]], 8 + size + begin + done)
                out.view(torch.float32).sum()
    return time.perf_counter() - start


def bench_shape(spec: str, args, tmp: Path) -> dict:
    name, _, layers = spec.partition(":")
    shape = SHAPES[name]
    layers = int(layers or shape.layers)
    paths = [tmp / "harm.safetensors", tmp / "util.safetensors"]
    entries = sum(write_scores(shape, layers, p, i, "signed-snip") for i, p in enumerate(paths))
    read_all(*map(TensorFile, paths))  # into the page cache
    mapped, positioned = [], []
    for _ in range(args.repeats):
        mapped.append(read_all(*map(TensorFile, paths)))
        positioned.append(read_positioned(paths))
    for p in paths:
        p.unlink()
    row = {"shape": f"{name} ({layers} layer{'s' * (layers > 1)})", "entries": entries, "mapped": mapped,
           "positioned": positioned, "paired": statistics.median(t / o for o, t in zip(mapped, positioned))}
    print(row, flush=True)
    return row


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["qwen2.5-0.5b", "llama-3.1-8b:1"])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tmp", type=Path, default=None, help="where to write the score files")
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "RESULTS.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        rows = [bench_shape(s, args, Path(tmp)) for s in args.shapes]
    lines = [
        HEADING,
        "",
        f"Command: `.venv/bin/python bench/bench_read.py --shapes {' '.join(args.shapes)} --repeats {args.repeats} "
        f"--threads {args.threads}`. Two float32 score files (harm and utility) with the scored shapes named, "
        f"every tensor read and summed, from the page cache; {machine()}; load average at the end "
        f"{open('/proc/loadavg').read().split()[0]}; {code_version()}; run on {time.strftime('%Y-%m-%d')}.",
        "",
        "| shapes | scores (both files) | `TensorFile.get` (s) | positioned reads (s) | positioned / TensorFile "
        "(best) | paired median |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['entries'] / 1e6:.0f}M ({4 * r['entries'] / 2**30:.2f} GiB) | "
                     f"{min(r['mapped']):.3f} | {min(r['positioned']):.3f} | **{min(r['positioned']) / min(r['mapped']):.2f}×** | "
                     f"{r['paired']:.2f}× |")
    lines += [
        "",
        f"- The two alternate {args.repeats} times; best of each shown (all, in seconds: "
        + "; ".join(f"{r['shape']}: TensorFile {', '.join(f'{t:.3f}' for t in r['mapped'])}, positioned "
                    f"{', '.join(f'{t:.3f}' for t in r['positioned'])}" for r in rows) + ").",
        "- `TensorFile.get`: `safe_open` per tensor, a new mapping of the file whose pages fault in on the sum and "
        "which is unmapped when the tensor is freed. Positioned reads: `os.preadv` into a new tensor per call.",
        "",
    ]
    print("\n".join(lines))
    update_section(args.results, HEADING, "\n".join(lines), keep_history=True)


if __name__ == "__main__":
    main()
