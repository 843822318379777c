"""Controls: do weights chosen *without* the harmful data reduce harmful generation as the harm set does?

At one operating point (q, p) per model, compare the harm set with masks of exactly the same per-matrix counts:
uniformly random weights, magnitude-matched random weights, and the top weights of a benign task's scores.
"""

from __future__ import annotations

from typing import Any

from harmprune.control_masks import CONTROLS
from harmprune.errors import ConfigError
from harmprune.experiments import register_experiment
from harmprune.experiments.executors import StageCall
from harmprune.experiments.runner import Runner
from harmprune.stats import mean, relative_reduction

PARAMS = {"models", "q", "p", "kinds", "seeds", "benign_task_data", "harm_evaluation", "harm_metric",
          "utility_evaluation", "utility_metric", "utility_scale"}


@register_experiment("controls", PARAMS)
def run(runner: Runner, params: dict[str, Any]) -> dict[str, Any]:
    """Harm set vs random, magnitude-matched and benign-task masks of equal counts."""
    models = params.get("models") or [next(iter(runner.config.models))]
    per_model = {m: control_model(runner, m, params) for m in models}
    first = per_model[models[0]]
    headline = {"random_control_harm_reduction": first["conditions"].get("random", {}).get("harm_reduction")}
    return {"models": per_model, "headline": headline}


def control_model(runner: Runner, model: str, params: dict[str, Any]) -> dict[str, Any]:
    q, p = _operating_point(runner, model, params)
    harm_eval = params.get("harm_evaluation", "harm")
    harm_metric = params.get("harm_metric", "harmfulness")
    util_eval = params.get("utility_evaluation")
    util_metric = params.get("utility_metric", "accuracy")
    scale = float(params.get("utility_scale", 100.0))
    kinds = params.get("kinds", ["random", "magnitude-matched"])
    for k in kinds:
        if k not in CONTROLS:
            raise ConfigError(f"experiments.controls.kinds: unknown control {k!r} "
                              f"(known: {', '.join(CONTROLS.names())})")
    seeds = params.get("seeds", [0, 1, 2])
    evals = list(dict.fromkeys([harm_eval] + ([util_eval] if util_eval else [])))

    def measure(mask, condition: str, seed=None) -> dict[str, float]:
        res = {}
        for e in evals:
            metrics = runner.evaluate(model, e, mask)
            runner.store.record_metrics("controls", model, condition, e, metrics, q=q, p=p, seed=seed)
            res[e] = metrics
        out = {"harm": float(res[harm_eval][harm_metric])}
        if util_eval:
            out["utility"] = float(res[util_eval][util_metric]) * scale
        return out

    harm_mask = runner.mask(model, q, p)
    if any(CONTROLS.get(k).needs == "scores" for k in kinds) and params.get("benign_task_data"):
        runner.prefetch([StageCall.of("scores", model, params.get("benign_task_data"), "harm")])
    control_masks = {(kind, seed): runner.control(harm_mask, kind, seed, model, params.get("benign_task_data"))
                     for kind in kinds for seed in (seeds if CONTROLS.get(kind).seeded else [0])}
    runner.prefetch([StageCall.of("evaluate", model, e, m)
                     for m in [None, harm_mask, *control_masks.values()] for e in evals])
    base = measure(None, "unpruned")
    conditions: dict[str, dict[str, Any]] = {"harm-set": measure(harm_mask, "harm-set")}
    for kind in kinds:
        runs = [measure(mask, kind, seed) for (k, seed), mask in control_masks.items() if k == kind]
        conditions[kind] = {"harm": mean([r["harm"] for r in runs]), "harm_per_seed": [r["harm"] for r in runs]}
        if util_eval:
            conditions[kind]["utility"] = mean([r["utility"] for r in runs])
    for cond in conditions.values():
        cond["harm_reduction"] = relative_reduction(base["harm"], cond["harm"])
        if util_eval:
            cond["utility_drop"] = base["utility"] - cond["utility"]
    for name, cond in conditions.items():
        runner.store.record_metrics("controls", model, name, "summary",
                                    {k: v for k, v in cond.items() if not isinstance(v, list)}, q=q, p=p)
    return {"q": q, "p": p, "baseline": base, "conditions": conditions}


def _operating_point(runner: Runner, model: str, params: dict[str, Any]) -> tuple[float, float]:
    """(q, p) from the params, else the compression experiment's operating point, else the grid's first point."""
    if "q" in params:
        return float(params["q"]), float(params.get("p", runner.config.selection["p"][0]))
    op = runner.results.get("compression", {}).get(model, {}).get("operating_point")
    if op:
        return op["q"], op["p"]
    return runner.config.selection["q"][0], runner.config.selection["p"][0]
