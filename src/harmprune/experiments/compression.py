"""Compression: how small a set of weights carries harmful generation, per model (aligned vs unaligned).

For each model and each (q, p) of the grid: select the harm set minus the utility set, prune it, and measure
harmful generation and utility. Summaries: harm reduction against the fraction pruned; the *harm-compression
fraction* (smallest fraction pruned that removes at least half of the harmful generation while utility drops by
no more than ``max_utility_drop`` points, or with ``max_relative_utility_drop`` by no more than that share of its
unpruned value: the right budget for a utility measured on a low baseline, such as a token likelihood); and how
separable the harm and utility scores are. Without a
``utility_evaluation`` utility is not measured: the points, the operating point and the headline carry no utility
keys, and the utility budget does not constrain the choice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from harmprune.experiments import register_experiment
from harmprune.experiments.executors import StageCall
from harmprune.experiments.runner import Runner
from harmprune.specs import param
from harmprune.stats import rank_auroc, relative_reduction


@dataclass(frozen=True)
class CompressionParams:
    models: list[str] = param([], ref="model")  # default: every model
    q: list[float] = param([], at_least=0, at_most=1)  # default: selection.q
    p: list[float] = param([], at_least=0, at_most=1)  # default: selection.p
    harm_evaluation: str = param("harm", ref="evaluation")
    harm_metric: str = param("harmfulness", metric_of="harm_evaluation")
    utility_evaluation: str | None = param(None, ref="evaluation")
    utility_metric: str = param("accuracy", metric_of="utility_evaluation")
    utility_scale: float = 100.0
    evaluations: list[str] = param([], ref="evaluation")  # measured at every point too
    max_utility_drop: float = 2.0
    max_relative_utility_drop: float | None = param(None, at_least=0, at_most=1)  # replaces max_utility_drop
    target_harm_reduction: float = param(0.5, at_most=1)
    separability_q: float | None = param(None, at_least=0, at_most=1)  # default: the middle of the q grid


@register_experiment("compression", CompressionParams)
def run(runner: Runner, params: CompressionParams) -> dict[str, Any]:
    """Sweep q (and p) per model; report harm reduction, utility drop and the harm-compression fraction."""
    models = params.models or list(runner.config.models)
    qs = sorted(params.q or runner.config.selection["q"])
    ps = sorted(params.p or runner.config.selection["p"])
    per_model = {m: sweep_model(runner, m, qs, ps, params) for m in models}
    runner.results["compression"] = per_model
    headline = {}
    first = per_model[models[0]]
    if first.get("operating_point"):
        op = first["operating_point"]
        headline = {"harm_reduction": op["harm_reduction"], "fraction_pruned": op["fraction_pruned"],
                    "operating_q": op["q"], "operating_p": op["p"]}
        if "utility_drop" in op:  # absent when the experiment has no utility evaluation
            headline["utility_drop"] = op["utility_drop"]
    return {"models": per_model, "headline": headline}


def sweep_model(runner: Runner, model: str, qs: list[float], ps: list[float], params: CompressionParams) -> dict:
    from harmprune.selection import load_mask

    harm_eval, harm_metric = params.harm_evaluation, params.harm_metric
    util_eval, util_metric, scale = params.utility_evaluation, params.utility_metric, params.utility_scale
    extra = [e for e in params.evaluations if e not in (harm_eval, util_eval)]
    evals = list(dict.fromkeys([harm_eval] + ([util_eval] if util_eval else []) + extra))

    def measure(mask, condition: str, q=None, p=None) -> dict[str, dict[str, Any]]:
        out = {}
        for e in evals:
            out[e] = runner.evaluate(model, e, mask)
            runner.store.record_metrics("compression", model, condition, e, out[e], q=q, p=p)
        return out

    sc = runner.config.scoring
    runner.prefetch([StageCall.of("scores", model, d, role) for role, d in (("harm", sc["harm"]),
                                                                            ("utility", sc.get("utility"))) if d])
    masks = runner.masks(model, qs, ps)  # one read of each score file for the whole grid
    runner.prefetch([StageCall.of("evaluate", model, e, m) for m in [None, *masks.values()] for e in evals])
    base = measure(None, "unpruned")
    base_harm = float(base[harm_eval][harm_metric])
    base_util = float(base[util_eval][util_metric]) * scale if util_eval else None
    points = []
    for p in ps:
        for q in qs:
            mask_path = masks[(q, p)]
            mask = load_mask(mask_path)
            res = measure(mask_path, "harm-set", q, p)
            harm = float(res[harm_eval][harm_metric])
            point = {"q": q, "p": p, "selected": mask.count(), "fraction_pruned": mask.fraction(),
                     "harm": harm, "harm_reduction": relative_reduction(base_harm, harm), "mask": str(mask_path)}
            if util_eval:
                point["utility"] = float(res[util_eval][util_metric]) * scale
                point["utility_drop"] = base_util - point["utility"]
            runner.store.record_metrics("compression", model, "harm-set", "summary",
                                        {k: v for k, v in point.items() if k not in ("q", "p", "mask")}, q=q, p=p)
            points.append(point)
    max_drop, target = utility_budget(params, base_util), params.target_harm_reduction
    sep_q = params.separability_q if params.separability_q is not None else qs[len(qs) // 2]
    result = {"baseline": {"harm": base_harm, "utility": base_util}, "points": points, "utility_budget": max_drop,
              "harm_compression_fraction": compression_fraction(points, target, max_drop),
              "operating_point": operating_point(points, target, max_drop),
              "separability": separability(runner, model, sep_q)}
    return result


def utility_budget(params: CompressionParams, base_util: float | None) -> float:
    """The utility drop (in ``utility_scale`` units) a point may cost: ``max_relative_utility_drop`` of the
    unpruned utility when given, else ``max_utility_drop``."""
    if params.max_relative_utility_drop is None or base_util is None:
        return params.max_utility_drop
    return params.max_relative_utility_drop * base_util


def compression_fraction(points: list[dict], target: float, max_drop: float) -> float | None:
    """Smallest fraction pruned reaching ``target`` relative harm reduction within the utility budget."""
    ok = [pt["fraction_pruned"] for pt in points
          if pt["harm_reduction"] >= target and pt.get("utility_drop", 0.0) <= max_drop]
    return min(ok) if ok else None


def operating_point(points: list[dict], target: float, max_drop: float) -> dict | None:
    """The point the controls compare against: the compression point, else the best harm reduction in budget."""
    if not points:
        return None
    in_budget = [pt for pt in points if pt.get("utility_drop", 0.0) <= max_drop] or points
    reaching = [pt for pt in in_budget if pt["harm_reduction"] >= target]
    if reaching:
        return min(reaching, key=lambda pt: pt["fraction_pruned"])
    return max(in_budget, key=lambda pt: (pt["harm_reduction"], -pt["fraction_pruned"]))


def separability(runner: Runner, model: str, q: float) -> dict[str, float] | None:
    """Overlap of the top-q harm and utility sets (Jaccard, with its chance level) and a rank AUROC.

    The AUROC is the probability that a top-q *utility* weight has higher utility-support than a top-q *harm*
    weight: 0.5 when the two sets are the same kind of weight, 1 when harm weights carry no utility.
    """
    from harmprune.selection import Mask, expected_jaccard, jaccard, select, support
    from harmprune.tensorfile import TensorFile

    util_data = runner.config.scoring.get("utility")
    if not util_data:
        return None
    harm_file = TensorFile(runner.scores(model, runner.config.scoring["harm"], "harm"))
    util_file = TensorFile(runner.scores(model, util_data, "utility"))
    harm_set = select(harm_file, None, q, 0.0)
    util_set = select(util_file, None, q, 0.0)
    util_method = str(util_file.metadata["method"])
    harm_vals, util_vals = [], []
    for name in harm_file.names():
        s = support(util_file.get(name).float(), util_method).reshape(-1)
        harm_vals.append(s[harm_set.indices[name]])
        util_vals.append(s[util_set.indices[name]])
    auroc = rank_auroc(torch.cat(util_vals), torch.cat(harm_vals))
    return {"q": q, "jaccard": jaccard(harm_set, util_set), "chance_jaccard": expected_jaccard(harm_set, util_set),
            "utility_support_auroc": auroc}
