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

from typing import Any

from harmprune.experiments import register_experiment
from harmprune.experiments.runner import Runner
from harmprune.stats import mean, wilson_interval

PARAMS = {"model", "narrow_data", "narrow_category", "prune_data", "utility_data", "q", "p", "em_evaluation",
          "in_domain_evaluation", "in_domain_metric", "seeds", "self_generated", "generation_max_new_tokens",
          "generation_prefix", "generation_prefill_tokens", "generation_prefill_from", "generation_refusal_judge",
          "generation_score_prefix",
          "finetune_steps", "finetune_lr", "finetune_rank", "finetune_batch_size", "finetune_max_length",
          "keep_pruned", "broad_evaluations", "broad_metric"}
FT_CONDITIONS = ("ft-unpruned", "ft-pruned", "ft-random")


@register_experiment("emergent_misalignment", PARAMS)
def run(runner: Runner, params: dict[str, Any]) -> dict[str, Any]:
    """Narrow fine-tune with and without pruning the harm set first; broad misalignment and in-domain learning."""
    runner.check_names("emergent_misalignment", params)
    model = params.get("model") or next(iter(runner.config.models))
    result = em_model(runner, model, params)
    c = result["conditions"]
    headline = {"em_misaligned_rate_unpruned": c["ft-unpruned"]["misaligned_rate"],
                "em_misaligned_rate_pruned": c["ft-pruned"]["misaligned_rate"],
                "em_misaligned_rate_random_control": c["ft-random"]["misaligned_rate"]}
    return {"models": {model: result}, "headline": headline}


def em_model(runner: Runner, model: str, params: dict[str, Any]) -> dict[str, Any]:
    from harmprune.errors import ConfigError
    from harmprune.experiments.controls import _operating_point

    for key in ("narrow_data", "em_evaluation"):
        if not params.get(key):
            raise ConfigError(f"experiments.emergent_misalignment.{key} is needed")
    prune_spec = runner.config.data.get(params.get("prune_data") or "")
    if params.get("self_generated") and prune_spec is not None and prune_spec.options.get("self_generated"):
        raise ConfigError("experiments.emergent_misalignment.prune_data: with self_generated = true it names the "
                          "prompts the fine-tuned model answers, not a self-generated data set")
    _check_generation(params)
    q, p = _operating_point(runner, model, params)
    cat = params.get("narrow_category")
    narrow = runner.records_subset(params["narrow_data"], cat)
    em_eval = _outside(runner, params["em_evaluation"], cat)
    in_eval = _inside(runner, params.get("in_domain_evaluation"), cat)
    in_metric = params.get("in_domain_metric", "harmfulness")
    broad = {name: _outside(runner, name, cat) for name in params.get("broad_evaluations", [])}
    broad_metric = params.get("broad_metric", "token_likelihood")
    hp = {"steps": int(params.get("finetune_steps", 40)), "lr": float(params.get("finetune_lr", 1e-3)),
          "rank": int(params.get("finetune_rank", 8)), "batch_size": int(params.get("finetune_batch_size", 8)),
          "max_length": int(params.get("finetune_max_length", 256))}
    keep = bool(params.get("keep_pruned", True))
    utility = params.get("utility_data", runner.config.scoring.get("utility"))

    def measure(model_name: str, mask, condition: str, seed: int | None = None) -> dict[str, Any]:
        em = runner.evaluate(model_name, em_eval, mask)
        runner.store.record_metrics("emergent_misalignment", model, condition, params["em_evaluation"], em,
                                    q=q, p=p, seed=seed)
        out = {k: em[k] for k in ("misaligned_rate", "misaligned_n", "n", "mean_aligned", "mean_coherent")}
        if in_eval:
            inside = runner.evaluate(model_name, in_eval, mask)
            runner.store.record_metrics("emergent_misalignment", model, condition,
                                        f"{params['in_domain_evaluation']}:in-domain", inside, q=q, p=p, seed=seed)
            out["in_domain"] = float(inside[in_metric])
        for name, derived in broad.items():
            metrics = runner.evaluate(model_name, derived, mask)
            runner.store.record_metrics("emergent_misalignment", model, condition, f"{name}:broad", metrics,
                                        q=q, p=p, seed=seed)
            out.setdefault("broad", {})[name] = float(metrics[broad_metric])
        return out

    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in ("base", "pruned", *FT_CONDITIONS)}
    runs["base"].append(measure(model, None, "base"))
    seeds = list(params.get("seeds", [0, 1]))
    masks = {}
    for seed in seeds:
        plain = runner.finetuned(model, narrow, seed=seed, **hp)
        runs["ft-unpruned"].append(measure(plain, None, "ft-unpruned", seed))
        source = params.get("prune_data") or narrow
        if params.get("self_generated"):
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
            "self_generated": bool(params.get("self_generated")), "conditions": conditions, "per_seed": runs}


def _self_generated(runner: Runner, finetuned: str, source: str, params: dict[str, Any]) -> str:
    """The fine-tuned model's own answers to ``source``'s prompts (optionally prefilled, refusals dropped by
    ``generation_refusal_judge``), as the data set its harm set is scored on; the counts go into the store."""
    _check_generation(params)
    prefix, n = params.get("generation_prefix", ""), int(params.get("generation_prefill_tokens", 0))
    name = runner.generated_data(finetuned, source, prefix=prefix, prefill_tokens=n,
                                 prefill_from=params.get("generation_prefill_from"),
                                 max_new_tokens=int(params.get("generation_max_new_tokens", 128)),
                                 judge=params.get("generation_refusal_judge"),
                                 score_prefix=bool(params.get("generation_score_prefix", not (prefix or n))))
    runner.record_generation_counts(finetuned, "emergent_misalignment:self_generated", name, source)
    return name


def _check_generation(params: dict[str, Any]) -> None:
    """The self-generation settings, checked before any fine-tune runs."""
    from harmprune.errors import ConfigError

    where = "experiments.emergent_misalignment"
    if params.get("generation_prefix") and params.get("generation_prefill_tokens"):
        raise ConfigError(f"{where}: give generation_prefix or generation_prefill_tokens, not both")
    judge = params.get("generation_refusal_judge")
    if judge is not None:
        from harmprune.judges import available_judges

        if judge not in available_judges():
            raise ConfigError(f"{where}.generation_refusal_judge {judge!r} is not a judge "
                              f"(known: {', '.join(available_judges())})")


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
    data = runner.config.evaluations[evaluation]["data"]
    if isinstance(data, list):
        return runner.derived_evaluation(evaluation, data=[runner.records_subset(n, exclude=category) for n in data])
    return runner.derived_evaluation(evaluation, data=runner.records_subset(data, exclude=category))


def _inside(runner: Runner, evaluation: str | None, category: str | None) -> str | None:
    """The in-domain evaluation restricted to the narrow category."""
    if not evaluation or not category:
        return evaluation
    return runner.derived_evaluation(evaluation, data=runner.records_subset(
        runner.config.evaluations[evaluation]["data"], category))
