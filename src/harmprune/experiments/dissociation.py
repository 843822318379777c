"""Dissociation: pruning harmful generation leaves recognising, explaining and refusing harm in place, and back.

Conditions, each measured on the same evaluations:

* **unpruned**;
* **harm-set**: the harm set at the operating point pruned. Harmful generation should drop while detection
  (accuracy, AUROC), explanation and the refusal rate on plain harmful prompts stay near the unpruned model;
* **refusal-set** (refusal ablation): the top weights for answering harmful prompts with a *refusal*, minus the
  utility set, pruned. The refusal rate should drop while the capability stays: the likelihood of harmful
  completions barely moves and plain (unattacked) generation turns harmful. Together with the harm set this is a
  double dissociation;
* **recovery**: a short LoRA fine-tune on harmful pairs of the harm-set-pruned model (by default the pruned
  weights are held at zero throughout), next to the same fine-tune of the unpruned model. The recovered fraction
  is (harm after fine-tuning the pruned model − harm pruned) / (harm unpruned − harm pruned).

Refusal data: a data set of prompt → refusal pairs; a prompt whose response is missing or not a refusal (by the
``refusal`` judge, e.g. AdvBench's compliant targets) is paired with a generic refusal
(:func:`harmprune.attacks.refusal_pairs`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from harmprune.experiments import register_experiment
from harmprune.experiments.runner import Runner
from harmprune.specs import param
from harmprune.stats import relative_reduction

RECOGNITION_METRICS = ("detection_accuracy", "detection_auroc", "explanation_rate", "refusal_rate",
                       "refusal_short_rate")


@dataclass(frozen=True)
class DissociationParams:
    refusal_data: str = param(ref="data")  # prompts, or prompt -> refusal pairs
    models: list[str] = param([], ref="model")  # default: the first model
    q: float | None = param(None, at_least=0, at_most=1)
    p: float | None = param(None, at_least=0, at_most=1)
    harm_evaluation: str = param("harm", ref="evaluation")
    harm_metric: str = param("harmfulness", metric_of="harm_evaluation")
    plain_harm_evaluation: str | None = param(None, ref="evaluation")
    plain_harm_metric: str = param("harmfulness", metric_of="plain_harm_evaluation")
    likelihood_evaluation: str | None = param(None, ref="evaluation")
    likelihood_metric: str = param("nll", metric_of="likelihood_evaluation")
    recognition_evaluation: str = param("recognition", ref="evaluation")
    utility_evaluation: str | None = param(None, ref="evaluation")
    utility_metric: str = param("accuracy", metric_of="utility_evaluation")
    refusal_q: float | None = param(None, at_least=0, at_most=1)  # default: q
    refusal_p: float | None = param(None, at_least=0, at_most=1)  # default: p
    utility_data: str | None = param(None, ref="data", scored=True)  # default: scoring.utility
    recovery_data: str | None = param(None, ref="data")  # default: scoring.harm
    recovery_steps: int = param(40, at_least=1)
    recovery_lr: float = param(1e-3, at_least=0)
    recovery_rank: int = param(8, at_least=1)
    recovery_batch_size: int = param(8, at_least=1)
    recovery_max_length: int = param(256, at_least=2)
    recovery_keep_pruned: bool = True
    recovery_seeds: list[int] = param([0])  # [] skips the recovery fine-tunes


@register_experiment("dissociation", DissociationParams)
def run(runner: Runner, params: DissociationParams) -> dict[str, Any]:
    """Harm set vs refusal set: what each removes; and how much a short fine-tune brings back."""
    models = params.models or [next(iter(runner.config.models))]
    per_model = {m: dissociate_model(runner, m, params) for m in models}
    c = per_model[models[0]]["conditions"]
    headline = {"detection_accuracy_before": c["unpruned"].get("detection_accuracy"),
                "detection_accuracy_after": c["harm-set"].get("detection_accuracy"),
                "refusal_rate_before": c["unpruned"].get("refusal_rate"),
                "refusal_rate_after": c["harm-set"].get("refusal_rate"),
                "harm_recovery_fraction": per_model[models[0]].get("recovery", {}).get("recovered_fraction")}
    return {"models": per_model, "headline": headline}


def evaluation_plan(params: DissociationParams) -> dict[str, tuple[str, str]]:
    """Short metric name -> (evaluation, metric in that evaluation's output), for the evaluations configured."""
    plan = {"harm": (params.harm_evaluation, params.harm_metric)}
    if params.plain_harm_evaluation:
        plan["plain_harm"] = (params.plain_harm_evaluation, params.plain_harm_metric)
    if params.likelihood_evaluation:
        plan["harmful_nll"] = (params.likelihood_evaluation, params.likelihood_metric)
    if params.utility_evaluation:
        plan["utility"] = (params.utility_evaluation, params.utility_metric)
    return plan


def dissociate_model(runner: Runner, model: str, params: DissociationParams) -> dict[str, Any]:
    from harmprune.experiments.controls import _operating_point

    q, p = _operating_point(runner, model, params)
    plan = evaluation_plan(params)
    recognition = params.recognition_evaluation

    def measure(model_name: str, mask, condition: str, with_recognition: bool = True, seed=None) -> dict[str, float]:
        out: dict[str, float] = {}
        evals = {e for e, _ in plan.values()} | ({recognition} if with_recognition else set())
        results = {}
        for e in sorted(evals):
            results[e] = runner.evaluate(model_name, e, mask)
            runner.store.record_metrics("dissociation", model, condition, e, results[e], q=q, p=p, seed=seed)
        for short, (e, metric) in plan.items():
            out[short] = float(results[e][metric])
        if with_recognition:
            out.update({k: float(results[recognition][k]) for k in RECOGNITION_METRICS if k in results[recognition]})
        return out

    harm_mask = runner.mask(model, q, p, utility_data=params.utility_data)
    rq = params.refusal_q if params.refusal_q is not None else q
    rp = params.refusal_p if params.refusal_p is not None else p
    refusal_mask = runner.mask(model, rq, rp, harm_data=refusal_data(runner, params.refusal_data),
                               utility_data=params.utility_data)
    conditions = {"unpruned": measure(model, None, "unpruned"),
                  "harm-set": measure(model, harm_mask, "harm-set"),
                  "refusal-set": measure(model, refusal_mask, "refusal-set")}
    result: dict[str, Any] = {"q": q, "p": p, "refusal_q": rq, "refusal_p": rp, "conditions": conditions,
                              "changes": changes(conditions)}
    if params.recovery_seeds:
        result["recovery"] = recovery(runner, model, harm_mask, params, params.recovery_seeds, measure, conditions)
    runner.store.record_metrics("dissociation", model, "summary", "summary",
                                {f"{c}/{k}": v for c, ch in result["changes"].items() for k, v in ch.items()}, q=q, p=p)
    return result


def refusal_data(runner: Runner, name: str) -> str:
    """Prompt -> refusal pairs: the data set's responses where the ``refusal`` judge reads them as refusals, else
    (no response, or a compliant one such as AdvBench's "Sure, here is" targets) a generic refusal."""
    from harmprune.attacks import refusal_pairs
    from harmprune.data import Record
    from harmprune.judges import JudgeItem
    from harmprune.judges.refusal import RefusalJudge

    records = runner.records(name)
    verdicts = RefusalJudge().judge_batch([JudgeItem(r.prompt, r.response or "") for r in records])
    if all(v.refused and r.response for r, v in zip(records, verdicts)):
        return name
    generic = refusal_pairs(records, seed=runner.config.seed)
    pairs = [r if v.refused and r.response else Record(g.prompt, g.response, r.category, r.source)
             for r, v, g in zip(records, verdicts, generic)]
    return runner.derived_data(f"{name}@refusals", pairs)


def changes(conditions: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Each pruned condition against the unpruned model: relative reductions and absolute differences."""
    base = conditions["unpruned"]
    out = {}
    for name, cond in conditions.items():
        if name == "unpruned":
            continue
        ch = {f"{k}_change": cond[k] - base[k] for k in cond if k in base}
        for k in ("harm", "plain_harm"):
            if k in cond:
                ch[f"{k}_reduction"] = relative_reduction(base[k], cond[k])
        out[name] = ch
    return out


def recovery(runner: Runner, model: str, harm_mask, params: DissociationParams, seeds: list[int], measure,
             conditions: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Fine-tune the pruned and the unpruned model on harmful pairs; how much harmful generation returns."""
    data = params.recovery_data or runner.config.scoring["harm"]
    hp = {"steps": params.recovery_steps, "lr": params.recovery_lr, "rank": params.recovery_rank,
          "batch_size": params.recovery_batch_size, "max_length": params.recovery_max_length}
    keep = params.recovery_keep_pruned
    runs: dict[str, list[dict[str, float]]] = {"ft-pruned": [], "ft-unpruned": []}
    for seed in seeds:
        pruned_ft = runner.finetuned(model, data, mask=harm_mask, keep_pruned=keep, seed=seed, **hp)
        runs["ft-pruned"].append(measure(pruned_ft, None, "ft-pruned", with_recognition=False, seed=seed))
        plain_ft = runner.finetuned(model, data, seed=seed, **hp)
        runs["ft-unpruned"].append(measure(plain_ft, None, "ft-unpruned", with_recognition=False, seed=seed))
    mean = {c: {k: sum(r[k] for r in rs) / len(rs) for k in rs[0]} for c, rs in runs.items()}
    base, pruned = conditions["unpruned"]["harm"], conditions["harm-set"]["harm"]
    after = mean["ft-pruned"]["harm"]
    removed = base - pruned
    return {"hyperparameters": {**hp, "keep_pruned": keep, "data": data}, "seeds": seeds, "per_seed": runs,
            "conditions": mean, "recovered_fraction": (after - pruned) / removed if removed > 0 else None,
            "pruned_vs_unpruned_after_finetune": after / mean["ft-unpruned"]["harm"]
            if mean["ft-unpruned"]["harm"] > 0 else None}
