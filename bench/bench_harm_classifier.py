"""Throughput of the ``harm-classifier`` judge beside the ``refusal`` judge, on the same answers.

    python bench/bench_harm_classifier.py --classifier runs/harm-classifier \
        [--generations runs/.../generations.jsonl] [--n 2000] [--batch-size 256]

Answers are the ``generations.jsonl`` rows of an ``eval harm`` run (64-token answers with --max-new-tokens 64),
repeated to ``--n``; without a file, synthetic 48-word answers. Prints responses per second of each judge and
their ratio (best of 3 timed passes after a warm-up).
"""

from __future__ import annotations

import argparse
import json
import time

from harmprune.judges import JudgeItem, get_judge


def _items(path: str | None, n: int) -> list[JudgeItem]:
    if path:
        rows = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
        base = [JudgeItem(r["prompt"], r["response"], None, r.get("prefix", "")) for r in rows]
    else:
        words = "take the zorb and glue it to the frame then wait and polish it until it shines".split()
        base = [JudgeItem(f"how to glue zorb {i}", " ".join(words[(i + k) % len(words)] for k in range(48)))
                for i in range(64)]
    return [base[i % len(base)] for i in range(n)]


def _rate(judge, items, repeats: int = 3) -> float:
    judge(items[:32])
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        judge(items)
        best = min(best, time.perf_counter() - start)
    return len(items) / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classifier", required=True)
    ap.add_argument("--generations", default=None)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=256)
    args = ap.parse_args()
    items = _items(args.generations, args.n)
    hc = _rate(get_judge("harm-classifier", model=args.classifier, batch_size=args.batch_size), items)
    ref = _rate(get_judge("refusal"), items)
    print(f"answers: {len(items)}; harm-classifier {hc:.0f} responses/s; refusal {ref:.0f} responses/s; "
          f"ratio harm-classifier/refusal {hc / ref:.3f}")


if __name__ == "__main__":
    main()
