"""Controls: do weights chosen *without* the harmful data reduce harmful generation as the harm set does?

At one operating point (q, p) per model, compare the harm set with masks of exactly the same per-matrix counts:
uniformly random weights, magnitude-matched random weights, and the top weights of a benign task's scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from harmprune.control_masks import CONTROLS
from harmprune.experiments import register_experiment
from harmprune.experiments.executors import StageCall
from harmprune.experiments.runner import Runner
from harmprune.specs import Invalid, param
from harmprune.stats import mean, relative_reduction


@dataclass(frozen=True)
class ControlsParams:
    models: list[str] = param([], ref="model")  # default: the first model
    q: float | None = param(None, at_least=0, at_most=1)  # default: the compression operating point, else the grid's
    p: float | None = param(None, at_least=0, at_most=1)
    kinds: list[str] = param(["random", "magnitude-matched"], choices=CONTROLS.names())
    seeds: list[int] = param([0, 1, 2])
    benign_task_data: str | None = param(None, ref="data", scored=True)
    harm_evaluation: str = param("harm", ref="evaluation")
    harm_metric: str = param("harmfulness", metric_of="harm_evaluation")
    utility_evaluation: str | None = param(None, ref="evaluation")
    utility_metric: str = param("accuracy", metric_of="utility_evaluation")
    utility_scale: float = 100.0

    def check(self) -> None:
        needing = [k for k in self.kinds if CONTROLS.get(k).needs == "scores"]
        if needing and not self.benign_task_data:
            raise Invalid("benign_task_data", f"the {needing[0]} control needs a data set to score (benign_task_data)")


@register_experiment("controls", ControlsParams)
def run(runner: Runner, params: ControlsParams) -> dict[str, Any]:
    """Harm set vs random, magnitude-matched and benign-task masks of equal counts."""
    models = params.models or [next(iter(runner.config.models))]
    per_model = {m: control_model(runner, m, params) for m in models}
    first = per_model[models[0]]
    headline = {"random_control_harm_reduction": first["conditions"].get("random", {}).get("harm_reduction")}
    return {"models": per_model, "headline": headline}


def control_model(runner: Runner, model: str, params: ControlsParams) -> dict[str, Any]:
    q, p = _operating_point(runner, model, params)
    harm_eval, harm_metric = params.harm_evaluation, params.harm_metric
    util_eval, util_metric, scale = params.utility_evaluation, params.utility_metric, params.utility_scale
    kinds, seeds = params.kinds, params.seeds
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
    if any(CONTROLS.get(k).needs == "scores" for k in kinds) and params.benign_task_data:
        runner.prefetch([StageCall.of("scores", model, params.benign_task_data, "harm")])
    control_masks = {(kind, seed): runner.control(harm_mask, kind, seed, model, params.benign_task_data)
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


def _operating_point(runner: Runner, model: str, params: Any) -> tuple[float, float]:
    """(q, p) from the params, else the compression experiment's operating point, else the grid's first point."""
    if params.q is not None:
        return params.q, params.p if params.p is not None else runner.config.selection["p"][0]
    op = runner.results.get("compression", {}).get(model, {}).get("operating_point")
    if op:
        return op["q"], op["p"]
    return runner.config.selection["q"][0], runner.config.selection["p"][0]
