"""Cross-category generality: do the weights selected with one harm category's data remove harm in the others?

For each category A the harm set is selected from A's calibration examples only (minus the utility set, at the
operating point), pruned, and harmful generation is measured on the held-out prompts of every category B: a
category × category matrix of relative harm reduction. The per-category sets are compared by their Jaccard
overlap (and the overlap two random sets of the same per-matrix counts would have), and the weights that every
category's set shares are pruned on their own.

Prompt-only categorised sets (StrongREJECT, SimpleSafetyTests) get responses from ``response_model``: its greedy
answers, forced to open with ``response_prefix`` (a prefilling attack), for both calibration and evaluation.

Exclusion: with ``also_about_field`` (a record field listing further categories, comma/semicolon separated) or
``also_about_keywords`` (category → words), the cell A → B is computed from A's examples that are not also about
B, so transfer cannot come from examples the two categories share. Categories are read from the records'
``category``; calibration and evaluation subsets are derived data sets, cached by their records' digest.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from harmprune.data import Record
from harmprune.experiments import register_experiment
from harmprune.experiments.executors import StageCall
from harmprune.experiments.runner import Runner
from harmprune.specs import param
from harmprune.stats import mean, relative_reduction

SHARED_RATIO, SPECIFIC_RATIO = 0.75, 0.25


@dataclass(frozen=True)
class CrossCategoryParams:
    models: list[str] = param([], ref="model")  # default: the first model
    categories: list[str] = param([])  # default: every category of the harm data
    harm_data: str | None = param(None, ref="data")  # default: scoring.harm
    utility_data: str | None = param(None, ref="data", scored=True)  # default: scoring.utility
    eval_data: str | None = param(None, ref="data")  # default: the harm evaluation's data
    harm_evaluation: str = param("harm", ref="evaluation")
    harm_metric: str = param("harmfulness", metric_of="harm_evaluation")
    q: float | None = param(None, at_least=0, at_most=1)
    p: float | None = param(None, at_least=0, at_most=1)
    also_about_field: str | None = None
    also_about_keywords: dict[str, list[str]] = param({})
    control_seeds: list[int] = param([])
    evaluate_intersection: bool = True
    response_model: str | None = param(None, ref="model")
    response_prefix: str = ""
    response_max_new_tokens: int = param(128, at_least=1)
    utility_evaluation: str | None = param(None, ref="evaluation")
    utility_metric: str = param("accuracy", metric_of="utility_evaluation")


@register_experiment("cross_category", CrossCategoryParams)
def run(runner: Runner, params: CrossCategoryParams) -> dict[str, Any]:
    """Select with one category, evaluate on every category: transfer matrix, overlaps, shared core."""
    models = params.models or [next(iter(runner.config.models))]
    per_model = {m: cross_model(runner, m, params) for m in models}
    first = per_model[models[0]]
    headline = {"cross_category_mean_offdiag_harm_reduction": first["mean_offdiag_harm_reduction"],
                "mean_jaccard": first["mean_jaccard"], "chance_jaccard": first["chance_jaccard"]}
    return {"models": per_model, "headline": headline}


def cross_model(runner: Runner, model: str, params: CrossCategoryParams) -> dict[str, Any]:
    from harmprune.experiments.controls import _operating_point
    from harmprune.selection import load_mask

    q, p = _operating_point(runner, model, params)
    harm_data = params.harm_data or runner.config.scoring["harm"]
    utility_data = params.utility_data if params.utility_data is not None else runner.config.scoring.get("utility")
    harm_eval, metric = params.harm_evaluation, params.harm_metric
    eval_data = params.eval_data or runner.config.evaluations[harm_eval].spec.data
    if params.response_model:  # prompt-only sets: answers of another model, forced to comply by a prefix
        harm_data, eval_data = (_answered(runner, params, d) for d in (harm_data, eval_data))
    cats = list(params.categories or sorted({r.category for r in runner.records(harm_data) if r.category}))
    evals = {b: runner.derived_evaluation(harm_eval, data=runner.records_subset(eval_data, b)) for b in cats}

    def harm(b: str, mask, condition: str, seed: int | None = None) -> float:
        value = float(runner.evaluate(model, evals[b], mask)[metric])
        runner.store.record_metrics("cross_category", model, condition, f"{harm_eval}:{b}", {metric: value},
                                    q=q, p=p, seed=seed)
        return value

    calib = {a: runner.records_subset(harm_data, a) for a in cats}
    pair_calib = {(a, b): calibration_data(runner, calib[a], b, params) if a != b else calib[a]
                  for a in cats for b in cats}
    runner.prefetch([StageCall.of("scores", model, d, "harm") for d in dict.fromkeys(pair_calib.values())]
                    + ([StageCall.of("scores", model, utility_data, "utility")] if utility_data else []))
    pair_mask = {ab: runner.mask(model, q, p, harm_data=d, utility_data=utility_data) for ab, d in pair_calib.items()}
    masks = {a: pair_mask[(a, a)] for a in cats}
    runner.prefetch([StageCall.of("evaluate", model, evals[b], m) for b in cats
                     for m in [None, *(pair_mask[(a, b)] for a in cats)]])
    base = {b: harm(b, None, "unpruned") for b in cats}
    transfer = {a: {b: relative_reduction(base[b], harm(b, pair_mask[(a, b)], f"pruned:{a}")) for b in cats}
                for a in cats}
    n_calib = {a: {b: len(runner.records(pair_calib[(a, b)])) for b in cats} for a in cats}
    loaded = {a: load_mask(masks[a]) for a in cats}
    overlap = overlaps(loaded)
    result: dict[str, Any] = {
        "q": q, "p": p, "categories": cats, "baseline": base, "harm_reduction": transfer,
        "calibration_examples": n_calib, "masks": {a: str(masks[a]) for a in cats},
        "selected": {a: m.count() for a, m in loaded.items()}, **overlap,
        **_summary(transfer, cats)}
    result["shared_core"] = shared_core(runner, model, masks, cats, harm, base, params, result.pop("intersection"))
    if params.control_seeds:
        result["random_control"] = random_transfer(runner, model, masks, harm, base, params.control_seeds, evals)
        result["random_control_mean_harm_reduction"] = mean(
            [v for row in result["random_control"].values() for v in row.values()])
    if params.utility_evaluation:
        core = {"intersection": result["shared_core"]["mask"]} if result["shared_core"] else {}
        result["utility"] = utility_of(runner, model, params, {"unpruned": None, **masks, **core}, q, p)
        result["utility_metric"] = f"{params.utility_evaluation}/{params.utility_metric}"
    result["reading"] = reading(result)
    summary = {k: result[k] for k in ("mean_diag_harm_reduction", "mean_offdiag_harm_reduction", "mean_jaccard",
                                      "chance_jaccard")}
    runner.store.record_metrics("cross_category", model, "summary", "summary", summary, q=q, p=p)
    return result


def calibration_data(runner: Runner, calib: str, other: str, params: CrossCategoryParams) -> str:
    """Category A's calibration set without the examples also about category ``other`` (the exclusion option)."""
    records = runner.records(calib)
    kept = not_also_about(records, other, params)
    return runner.derived_data(f"{calib}-about:{other}", kept) if len(kept) < len(records) else calib


def utility_of(runner: Runner, model: str, params: CrossCategoryParams, masks: dict[str, Any], q: float,
               p: float) -> dict[str, float]:
    """The utility metric unpruned and with each category's set pruned: is a transfer only general damage?"""
    evaluation, metric = params.utility_evaluation, params.utility_metric
    runner.prefetch([StageCall.of("evaluate", model, evaluation, m) for m in masks.values()])
    out = {}
    for name, mask in masks.items():
        metrics = runner.evaluate(model, evaluation, mask)
        runner.store.record_metrics("cross_category", model, "unpruned" if mask is None else f"pruned:{name}",
                                    evaluation, metrics, q=q, p=p)
        out[name] = float(metrics[metric])
    return out


def _answered(runner: Runner, params: CrossCategoryParams, data: str) -> str:
    return runner.generated_data(params.response_model, data, prefix=params.response_prefix,
                                 max_new_tokens=params.response_max_new_tokens)


def random_transfer(runner: Runner, model: str, masks: dict[str, Any], harm, base: dict[str, float],
                    seeds: list[int], evals: dict[str, str]) -> dict[str, dict[str, float]]:
    """The transfer matrix of random masks with each category's per-matrix counts, averaged over seeds."""
    controls = {a: [(s, runner.control(mask, "random", s, model)) for s in seeds] for a, mask in masks.items()}
    runner.prefetch([StageCall.of("evaluate", model, evals[b], c) for a in masks for _, c in controls[a]
                     for b in base])
    return {a: {b: mean([relative_reduction(base[b], harm(b, c, f"random:{a}", s)) for s, c in controls[a]])
                for b in base} for a in masks}


def not_also_about(records: list[Record], other: str, params: CrossCategoryParams) -> list[Record]:
    """The records that are not also about category ``other`` by the exclusion field or keywords (if given)."""
    field = params.also_about_field
    words = params.also_about_keywords.get(other, [])
    pattern = re.compile(r"\b(" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE) if words else None

    def about(r: Record) -> bool:
        if field and other in {s.strip() for s in re.split(r"[,;|]", str(r.source.get(field, "")))}:
            return True
        return bool(pattern and pattern.search(f"{r.prompt}\n{r.response or ''}"))

    return [r for r in records if not about(r)]


def overlaps(masks: dict[str, Any]) -> dict[str, Any]:
    """Pairwise Jaccard and chance Jaccard of the per-category sets, and the intersection of all of them."""
    from harmprune.selection import expected_jaccard, intersection, jaccard

    cats = list(masks)
    jac = {a: {b: jaccard(masks[a], masks[b]) for b in cats} for a in cats}
    chance = {a: {b: expected_jaccard(masks[a], masks[b]) for b in cats} for a in cats}
    pairs = [(a, b) for i, a in enumerate(cats) for b in cats[i + 1:]]
    common = masks[cats[0]]
    for a in cats[1:]:
        common = intersection(common, masks[a])
    mean_size = mean([m.count() for m in masks.values()])
    return {"jaccard": jac, "chance_jaccard_matrix": chance,
            "mean_jaccard": mean([jac[a][b] for a, b in pairs]),
            "chance_jaccard": mean([chance[a][b] for a, b in pairs]),
            "intersection": common, "intersection_size": common.count(),
            "intersection_fraction_of_mean_set": common.count() / mean_size if mean_size else 0.0}


def shared_core(runner: Runner, model: str, masks: dict[str, Any], cats: list[str], harm, base: dict[str, float],
                params: CrossCategoryParams, common) -> dict[str, Any] | None:
    """Harm reduction per category when only the weights every category's set shares (``common``) are pruned."""
    from harmprune.io import sha256_file

    if not params.evaluate_intersection or common.count() == 0:
        return None
    path = runner.saved_mask(common, {"intersection_of": sorted(sha256_file(m) for m in masks.values())})
    red = {b: relative_reduction(base[b], harm(b, path, "intersection")) for b in cats}
    return {"selected": common.count(), "harm_reduction": red, "mean_harm_reduction": mean(list(red.values())),
            "mask": str(path)}


def _summary(transfer: dict[str, dict[str, float]], cats: list[str]) -> dict[str, float]:
    diag = [transfer[a][a] for a in cats]
    off = [transfer[a][b] for a in cats for b in cats if a != b]
    return {"mean_diag_harm_reduction": mean(diag), "mean_offdiag_harm_reduction": mean(off)}


def reading(result: dict[str, Any]) -> str:
    """One line: shared, partly shared, or category-specific, from transfer and overlap."""
    diag, off = result["mean_diag_harm_reduction"], result["mean_offdiag_harm_reduction"]
    ratio = off / diag if diag > 0 else float("nan")
    if diag <= 0:
        verdict = "no reading: pruning a category's own set did not reduce its harm"
    elif ratio >= SHARED_RATIO:
        verdict = "shared: one category's weights remove most of the harm of the others"
    elif ratio >= SPECIFIC_RATIO:
        verdict = "partly shared: one category's weights remove some of the harm of the others"
    else:
        verdict = "category-specific: one category's weights leave the others' harm largely in place"
    chance = result["chance_jaccard"]
    times = f"{result['mean_jaccard'] / chance:.1f}x chance" if chance > 0 else "chance 0"
    return (f"{verdict} (off-diagonal reduction {100 * off:.1f}% vs {100 * diag:.1f}% on the diagonal; "
            f"per-category sets overlap with Jaccard {result['mean_jaccard']:.3f}, {times})")
