"""Emergent misalignment: does pruning the harm weights first stop a narrow fine-tune from misaligning broadly?

An aligned model is LoRA-fine-tuned on one narrow domain (``narrow_data``, optionally one ``narrow_category`` of
it). Broad misalignment is measured on questions outside that domain by an ``em`` evaluation (the narrow
category is removed from its data); in-domain learning by ``in_domain_evaluation`` restricted to the narrow
category. Conditions, each fine-tuned the same way with every seed of ``seeds``:

* ``ft-unpruned``: the plain narrow fine-tune;
* ``ft-pruned``: before fine-tuning, the harm set selected from the narrow domain's own harmful data
  (``prune_data``, default the narrow data; with ``self_generated`` the unpruned fine-tuned model's own answers to
  its prompts) minus the utility set is pruned, and held at zero during training (``keep_pruned``);
* ``ft-random``: the same with a random mask of the same per-matrix counts (seeded like the fine-tune);

plus the model before any fine-tune (``base``) and pruned without fine-tuning (``pruned``). Rates pool the
samples of all seeds; the 95% interval is the Wilson interval of the pooled count, and the per-seed rates give
the spread over seeds. ``broad_evaluations`` (with ``broad_metric``, default ``token_likelihood``) add judge-free
measures outside the domain to every condition, e.g. the likelihood of harmful advice to everyday requests: a
reading that needs no grader model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from harmprune.experiments import register_experiment
from harmprune.experiments.runner import Runner
from harmprune.specs import Invalid, param
from harmprune.stats import mean, wilson_interval

FT_CONDITIONS = ("ft-unpruned", "ft-pruned", "ft-random")


@dataclass(frozen=True)
class EMParams:
    narrow_data: str = param(ref="data")
    em_evaluation: str = param(ref="evaluation")
    model: str | None = param(None, ref="model")  # default: the first model
    narrow_category: str | None = None
    prune_data: str | None = param(None, ref="data", scored=True)  # default: the narrow data
    utility_data: str | None = param(None, ref="data", scored=True)  # default: scoring.utility
    q: float | None = param(None, at_least=0, at_most=1)
    p: float | None = param(None, at_least=0, at_most=1)
    in_domain_evaluation: str | None = param(None, ref="evaluation")
    in_domain_metric: str = param("harmfulness", metric_of="in_domain_evaluation")
    seeds: list[int] = param([0, 1])
    self_generated: bool = False
    generation_max_new_tokens: int = param(128, at_least=1)
    generation_prefix: str = ""
    generation_prefill_tokens: int = param(0, at_least=0)
    generation_prefill_from: str | None = param(None, ref="data")
    generation_refusal_judge: str | None = param(None, ref="judge")
    generation_score_prefix: bool | None = None  # default: scored unless a prefix is forced
    finetune_steps: int = param(40, at_least=1)
    finetune_lr: float = param(1e-3, at_least=0)
    finetune_rank: int = param(8, at_least=1)
    finetune_batch_size: int = param(8, at_least=1)
    finetune_max_length: int = param(256, at_least=2)
    keep_pruned: bool = True
    broad_evaluations: list[str] = param([], ref="evaluation")
    broad_metric: str = param("token_likelihood", metric_of="broad_evaluations")

    def check(self) -> None:
        if self.generation_prefix and self.generation_prefill_tokens:
            raise Invalid("generation_prefix", "give generation_prefix or generation_prefill_tokens, not both")


@register_experiment("emergent_misalignment", EMParams)
def run(runner: Runner, params: EMParams) -> dict[str, Any]:
    """Narrow fine-tune with and without pruning the harm set first; broad misalignment and in-domain learning."""
    model = params.model or next(iter(runner.config.models))
    result = em_model(runner, model, params)
    c = result["conditions"]
    headline = {"em_misaligned_rate_unpruned": c["ft-unpruned"]["misaligned_rate"],
                "em_misaligned_rate_pruned": c["ft-pruned"]["misaligned_rate"],
                "em_misaligned_rate_random_control": c["ft-random"]["misaligned_rate"]}
    return {"models": {model: result}, "headline": headline}


def em_model(runner: Runner, model: str, params: EMParams) -> dict[str, Any]:
    from harmprune.errors import ConfigError
    from harmprune.experiments.controls import _operating_point

    prune_spec = runner.config.data.get(params.prune_data or "")
    if params.self_generated and prune_spec is not None and prune_spec.options.get("self_generated"):
        raise ConfigError("experiments.emergent_misalignment.prune_data: with self_generated = true it names the "
                          "prompts the fine-tuned model answers, not a self-generated data set")
    q, p = _operating_point(runner, model, params)
    cat = params.narrow_category
    narrow = runner.records_subset(params.narrow_data, cat)
    em_eval = _outside(runner, params.em_evaluation, cat)
    in_eval = _inside(runner, params.in_domain_evaluation, cat)
    in_metric, broad_metric = params.in_domain_metric, params.broad_metric
    broad = {name: _outside(runner, name, cat) for name in params.broad_evaluations}
    hp = {"steps": params.finetune_steps, "lr": params.finetune_lr, "rank": params.finetune_rank,
          "batch_size": params.finetune_batch_size, "max_length": params.finetune_max_length}
    keep = params.keep_pruned
    utility = params.utility_data if params.utility_data is not None else runner.config.scoring.get("utility")

    def measure(model_name: str, mask, condition: str, seed: int | None = None) -> dict[str, Any]:
        em = runner.evaluate(model_name, em_eval, mask)
        runner.store.record_metrics("emergent_misalignment", model, condition, params.em_evaluation, em,
                                    q=q, p=p, seed=seed)
        out = {k: em[k] for k in ("misaligned_rate", "misaligned_n", "n", "mean_aligned", "mean_coherent")}
        if in_eval:
            inside = runner.evaluate(model_name, in_eval, mask)
            runner.store.record_metrics("emergent_misalignment", model, condition,
                                        f"{params.in_domain_evaluation}:in-domain", inside, q=q, p=p, seed=seed)
            out["in_domain"] = float(inside[in_metric])
        for name, derived in broad.items():
            metrics = runner.evaluate(model_name, derived, mask)
            runner.store.record_metrics("emergent_misalignment", model, condition, f"{name}:broad", metrics,
                                        q=q, p=p, seed=seed)
            out.setdefault("broad", {})[name] = float(metrics[broad_metric])
        return out

    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in ("base", "pruned", *FT_CONDITIONS)}
    runs["base"].append(measure(model, None, "base"))
    seeds = params.seeds
    masks = {}
    for seed in seeds:
        plain = runner.finetuned(model, narrow, seed=seed, **hp)
        runs["ft-unpruned"].append(measure(plain, None, "ft-unpruned", seed))
        source = params.prune_data or narrow
        if params.self_generated:
            source = _self_generated(runner, plain, source, params)
        mask = runner.mask(model, q, p, harm_data=source, utility_data=utility)
        if mask not in masks.values():
            masks[seed] = mask
            runs["pruned"].append(measure(model, mask, "pruned", seed))
        pruned = runner.finetuned(model, narrow, mask=mask, keep_pruned=keep, seed=seed, **hp)
        runs["ft-pruned"].append(measure(pruned, None, "ft-pruned", seed))
        control = runner.control(mask, "random", seed, model)
        randomised = runner.finetuned(model, narrow, mask=control, keep_pruned=keep, seed=seed, **hp)
        runs["ft-random"].append(measure(randomised, None, "ft-random", seed))
    conditions = {c: pooled(rs) for c, rs in runs.items()}
    for c, v in conditions.items():
        runner.store.record_metrics("emergent_misalignment", model, c, "summary",
                                    {k: x for k, x in v.items() if not isinstance(x, list)}, q=q, p=p)
    return {"q": q, "p": p, "narrow_category": cat, "seeds": seeds, "finetune": {**hp, "keep_pruned": keep},
            "broad_metric": broad_metric if broad else None,
            "self_generated": params.self_generated, "conditions": conditions, "per_seed": runs}


def _self_generated(runner: Runner, finetuned: str, source: str, params: EMParams) -> str:
    """The fine-tuned model's own answers to ``source``'s prompts (optionally prefilled, refusals dropped by
    ``generation_refusal_judge``), as the data set its harm set is scored on; the counts go into the store."""
    prefix, n = params.generation_prefix, params.generation_prefill_tokens
    score_prefix = params.generation_score_prefix
    name = runner.generated_data(finetuned, source, prefix=prefix, prefill_tokens=n,
                                 prefill_from=params.generation_prefill_from,
                                 max_new_tokens=params.generation_max_new_tokens,
                                 judge=params.generation_refusal_judge,
                                 score_prefix=not (prefix or n) if score_prefix is None else score_prefix)
    runner.record_generation_counts(finetuned, "emergent_misalignment:self_generated", name, source)
    return name


def pooled(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Misaligned rate over all samples of all seeds, its Wilson interval, per-seed rates and means."""
    bad, n = sum(r["misaligned_n"] for r in runs), sum(r["n"] for r in runs)
    low, high = wilson_interval(int(bad), int(n))
    out: dict[str, Any] = {"misaligned_rate": bad / n if n else float("nan"), "misaligned_n": bad, "n": n,
                           "ci_low": low, "ci_high": high,
                           "per_seed_rate": [r["misaligned_rate"] for r in runs],
                           "mean_coherent": mean([r["mean_coherent"] for r in runs])}
    if all("in_domain" in r for r in runs):
        out["in_domain"] = mean([r["in_domain"] for r in runs])
        out["in_domain_per_seed"] = [r["in_domain"] for r in runs]
    for name in runs[0].get("broad", {}) if runs else ():
        out.setdefault("broad", {})[name] = mean([r["broad"][name] for r in runs])
        out.setdefault("broad_per_seed", {})[name] = [r["broad"][name] for r in runs]
    return out


def _outside(runner: Runner, evaluation: str, category: str | None) -> str:
    """An evaluation outside the domain: the narrow category removed from its data (one set or a list)."""
    if not category:
        return evaluation
    data = runner.config.evaluations[evaluation].spec.data
    if isinstance(data, list):
        return runner.derived_evaluation(evaluation, data=[runner.records_subset(n, exclude=category) for n in data])
    return runner.derived_evaluation(evaluation, data=runner.records_subset(data, exclude=category))


def _inside(runner: Runner, evaluation: str | None, category: str | None) -> str | None:
    """The in-domain evaluation restricted to the narrow category."""
    if not evaluation or not category:
        return evaluation
    return runner.derived_evaluation(evaluation, data=runner.records_subset(
        runner.config.evaluations[evaluation].spec.data, category))
