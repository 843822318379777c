"""Side-by-side Markdown tables of two runs of the same splits and evaluations under different recipes.

    python docs/results/tabulate_recipes.py btap=runs/btap-smollm2 today=runs/today-smollm2
    python docs/results/tabulate_recipes.py --compact own-abs-pre=runs/ablation/own-abs-pre ...   # one row per run

Reads each run's ``results.sqlite`` (through ``harmprune results --json``'s rows) and ``summary.json``, and prints,
per model: the compression sweep and the controls (one row per condition, the recipes' columns side by side), then
the separability and harm-compression figures. Every number is a stored metric of those runs; nothing is computed
here but the ratio of a pruned condition's harmful token likelihood to the unpruned one's.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

from harmprune.store import Store

# (evaluation, metric, column title)
COLUMNS = [
    ("summary", "selected", "weights pruned"),
    ("likelihood", "harmful_token_likelihood", "harmful tok. lik."),
    ("likelihood", "benign_token_likelihood", "benign tok. lik."),
    ("mmlu", "mmlu_accuracy", "MMLU"),
    ("advbench_prefill", "harmful_rate", "prefilled AdvBench harmful (harm-classifier)"),
    ("advbench_prefill", "refusal/refusal_rate", "prefilled AdvBench refusal (refusal judge)"),
    ("strongreject_plain", "harmful_rate", "plain StrongREJECT harmful (harm-classifier)"),
    ("strongreject_plain", "refusal/refusal_rate", "plain StrongREJECT refusal (refusal judge)"),
]


def rows_of(run: Path) -> dict[tuple, float]:
    """(experiment, model, condition, q, seed, evaluation, metric) → value for one run directory."""
    out = {}
    for r in Store(run / "results.sqlite").metrics():
        key = (r["experiment"], r["model"], r["condition"], r["q"], r["seed"], r["evaluation"], r["metric"])
        out[key] = r["value"]
    return out


def fmt(value) -> str:
    if value is None:
        return "–"
    if float(value).is_integer() and (abs(value) >= 1 or value == 0):
        return f"{int(value):,}"
    return f"{value:.3f}" if abs(value) >= 0.001 or value == 0 else f"{value:.1e}"


def conditions(rows: dict[tuple, float], model: str) -> list[tuple]:
    seen = {(k[0], k[2], k[3], k[4]) for k in rows if k[1] == model and k[0] in ("compression", "controls")}
    order = {"unpruned": 0, "harm-set": 1}
    return sorted(seen, key=lambda c: (c[0] != "compression", order.get(c[1], 2), c[1], c[2] or 0, c[3] or 0))


def table(runs: dict[str, dict[tuple, float]], model: str) -> str:
    """One row per (condition, recipe): each condition's recipes on adjacent rows."""
    rank = {"unpruned": 0, "harm-set": 1}
    conds = sorted({c for rows in runs.values() for c in conditions(rows, model)},
                   key=lambda c: (c[0] != "compression", rank.get(c[1], 2), c[1], c[2] or 0, c[3] or 0))
    head = ["experiment", "condition", "q", "seed", "recipe"] + [t for _, _, t in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for exp, cond, q, seed in conds:
        for name, rows in runs.items():
            values = [rows.get((exp, model, cond, q, seed, e, m)) for e, m, _ in COLUMNS]
            if all(v is None for v in values):
                continue
            if cond == "unpruned":
                values[0] = 0.0
            cells = [exp, cond, f"{q:g}" if q is not None else "-", "-" if seed is None else str(int(seed)), name]
            lines.append("| " + " | ".join(cells + [fmt(v) for v in values]) + " |")
    return "\n".join(lines)


def separability(summaries: dict[str, dict], model: str) -> str:
    lines = ["| recipe | harm-compression fraction | Jaccard(harm set, utility set) at q | chance Jaccard | "
             "utility-support AUROC | q |", "|---|---|---|---|---|---|"]
    for name, s in summaries.items():
        m = s.get("experiments", {}).get("compression", {}).get("models", {}).get(model)
        if not m:
            continue
        sep = m.get("separability") or {}
        lines.append(f"| {name} | {fmt(m.get('harm_compression_fraction'))} | {fmt(sep.get('jaccard'))} | "
                     f"{fmt(sep.get('chance_jaccard'))} | {fmt(sep.get('utility_support_auroc'))} | "
                     f"{sep.get('q', '-')} |")
    return "\n".join(lines)


def compact(runs: dict[str, dict[tuple, float]], summaries: dict[str, dict], model: str) -> str:
    """One row per recipe and q of the compression sweep: the change of the harmful and benign token likelihood
    against the unpruned model (its own row of that run), the prefilled harmful rate, and the separability."""
    head = ["recipe", "q", "weights pruned", "harmful tok. lik. change", "benign tok. lik. change",
            "prefilled harmful (harm-classifier)", "prefilled refusal (refusal judge)", "Jaccard(harm, utility)",
            "harm-compression fraction"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def change(rows, q, metric):
        base = rows.get(("compression", model, "unpruned", None, None, "likelihood", metric))
        value = rows.get(("compression", model, "harm-set", q, None, "likelihood", metric))
        return "–" if base is None or value is None else f"{(value / base - 1) * 100:+.1f}%"

    for name, rows in runs.items():
        m = summaries[name].get("experiments", {}).get("compression", {}).get("models", {}).get(model, {})
        sep = (m.get("separability") or {}).get("jaccard")
        qs = sorted({k[3] for k in rows if k[0] == "compression" and k[1] == model and k[2] == "harm-set"})
        for q in [None, *qs]:
            cond = "unpruned" if q is None else "harm-set"
            get = lambda e, metric: rows.get(("compression", model, cond, q, None, e, metric))  # noqa: E731
            cells = [name, "unpruned" if q is None else f"{q:g}",
                     "0" if q is None else fmt(rows.get(("compression", model, "harm-set", q, None, "summary",
                                                         "selected"))),
                     "" if q is None else change(rows, q, "harmful_token_likelihood"),
                     "" if q is None else change(rows, q, "benign_token_likelihood"),
                     fmt(get("advbench_prefill", "harmful_rate")), fmt(get("advbench_prefill", "refusal/refusal_rate")),
                     "" if q is None else fmt(sep) if q == (m.get("separability") or {}).get("q") else "",
                     fmt(m.get("harm_compression_fraction")) if q is None else ""]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    compact_only = "--compact" in argv
    argv = [a for a in argv if a != "--compact"]
    named = dict(a.split("=", 1) for a in argv)
    runs = {n: rows_of(Path(p)) for n, p in named.items()}
    summaries = {n: json.loads((Path(p) / "summary.json").read_text()) if (Path(p) / "summary.json").exists() else {}
                 for n, p in named.items()}
    models = defaultdict(int)
    for rows in runs.values():
        for k in rows:
            if k[0] == "compression":
                models[k[1]] += 1
    for model in models:
        print(f"### {model}\n")
        if compact_only:
            print(compact(runs, summaries, model) + "\n")
            continue
        print(table(runs, model) + "\n")
        print(separability(summaries, model) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
