"""The stage functions: score → select → control → evaluate, plus a model's own answers and fine-tunes.

Each function builds the parameters that decide its output (content hashes of models, records and upstream files,
never names or paths), asks the :class:`~harmprune.experiments.stage_cache.StageCache` for that stage, and says how
to build it from the :class:`~harmprune.experiments.inputs.Inputs`. The :class:`~harmprune.experiments.runner.Runner`
binds them to one run directory for the experiments.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from harmprune.data import load_records
from harmprune.errors import ConfigError
from harmprune.experiments.inputs import Inputs
from harmprune.experiments.stage_cache import StageCache, hash_model_source
from harmprune.io import atomic_write_json, sha256_file


def scores(inputs: Inputs, cache: StageCache, model_name: str, data_name: str, role: str = "harm", *,
           method: str | None = None, fmt: str | None = None) -> Path:
    """Score file of ``model`` on ``data`` (computed once, reused by every selection).

    ``role`` picks the config's method and format for the harm or the utility set; ``method`` / ``fmt``
    override them. The cache key holds the method and the resolved format, not the role, so the same data
    scored the same way is one file whichever role asks for it.
    """
    from harmprune.attribution import compute_scores, save_scores
    from harmprune.scoring_methods import scoring_method

    data_name = data_for(inputs, cache, model_name, data_name)
    sc = inputs.config.scoring
    role_method, role_fmt = inputs.recipe(model_name, role)
    method, fmt = method or role_method, fmt or role_fmt
    params = {"model": inputs.model_hash(model_name), "data": inputs.data_hash(data_name), "method": method,
              "format": fmt, "max_length": sc["max_length"], "modules": sc["modules"]}
    needs_data = scoring_method(method).needs_data
    if not needs_data:
        params["data"] = None

    def build(d: Path) -> None:
        model, tok = inputs.model(model_name)
        records = [r for r in inputs.records(data_name) if r.response] if needs_data else []
        result = compute_scores(model, tok, records, method, fmt=fmt, max_length=sc["max_length"],
                                batch_size=sc["batch_size"], modules=sc["modules"])
        result.metadata.update({"model": cache.run_relative(inputs.model_path(model_name)), "data": data_name})
        save_scores(result, d / "scores.safetensors")

    return cache.stage("scores", params, build, "scores.safetensors") / "scores.safetensors"


def masks(inputs: Inputs, cache: StageCache, model_name: str, qs: list[float], ps: list[float], *,
          harm_data: str | None = None, utility_data: str | None = None, granularity: str | None = None
          ) -> dict[tuple[float, float], Path]:
    """Harm set (top-q) minus utility set (top-p) of ``model`` at every (q, p) of ``qs`` × ``ps`` (p-major
    order), each set scored with its role's recipe; the masks not cached yet are selected together by one
    ``select_grid``, which reads each score file once and ranks each matrix once."""
    from harmprune.selection import Mask, default_device, save_mask, select_grid
    from harmprune.tensorfile import TensorFile

    sc = inputs.config.scoring
    harm_data = harm_data or sc["harm"]
    utility_data = utility_data if utility_data is not None else sc.get("utility")
    granularity = granularity or inputs.config.selection["granularity"]
    harm = scores(inputs, cache, model_name, harm_data, "harm")
    util = (scores(inputs, cache, model_name, utility_data, "utility")
            if utility_data and any(p > 0 for p in ps) else None)
    harm_sha, util_sha = sha256_file(harm), sha256_file(util) if util else None
    computed: dict[tuple[float, float], Mask] = {}

    def formats(uses_util: bool) -> dict[str, str]:
        return {"harm_format": str(TensorFile(harm).metadata.get("prompt_format", "")),
                "utility_format": str(TensorFile(util).metadata.get("prompt_format", "")) if uses_util else ""}

    def grid() -> dict[tuple[float, float], Mask]:
        if not computed:  # only once some point is not cached
            computed.update(select_grid(TensorFile(harm), TensorFile(util) if util else None, qs, ps,
                                        granularity, device=default_device()))
        return computed

    out = {}
    for p in ps:
        for q in qs:
            uses_util = util is not None and p > 0
            params = {"harm": harm_sha, "utility": util_sha if uses_util else None, "q": q, "p": p,
                      "granularity": granularity}

            def build(d: Path, q: float = q, p: float = p, uses_util: bool = uses_util) -> None:
                mask = grid()[(q, p)]
                if not uses_util:  # as selected without a utility file
                    mask = Mask(mask.indices, mask.shapes, {**mask.metadata, "utility_method": None})
                save_mask(mask, d / "mask.safetensors", harm_file=cache.run_relative(harm),
                          utility_file=cache.run_relative(util) if uses_util else "", harm_sha256=harm_sha,
                          utility_sha256=util_sha if uses_util else "", **formats(uses_util))

            out[(q, p)] = cache.stage("mask", params, build, "mask.safetensors") / "mask.safetensors"
    return out


def control(inputs: Inputs, cache: StageCache, mask_path: Path, kind: str, seed: int, model_name: str,
            benign_data: str | None = None) -> Path:
    """A control mask with ``mask_path``'s per-matrix counts, of a kind of :mod:`harmprune.control_masks`:
    random, magnitude-matched (the model's weights), or a benign task's (``benign_data``'s scores)."""
    from harmprune.control_masks import CONTROLS
    from harmprune.selection import load_mask, save_mask
    from harmprune.tensorfile import TensorFile

    ctrl = CONTROLS.get(kind)
    params: dict[str, Any] = {"mask": sha256_file(mask_path), "kind": kind, "seed": seed}
    if ctrl.needs == "weights":
        params["model"] = inputs.model_hash(model_name)
    if ctrl.needs == "scores":
        if not benign_data:
            raise ConfigError(f"a {kind} control needs benign_data (a data set name)")
        benign_scores = scores(inputs, cache, model_name, benign_data, "harm")  # the harm set's recipe, other data
        params["benign_scores"] = sha256_file(benign_scores)

    def build(d: Path) -> None:
        extra: dict[str, Any] = {}
        if ctrl.needs == "weights":
            extra["weights"] = dict(inputs.model(model_name)[0].named_parameters())
        if ctrl.needs == "scores":
            extra["scores"] = TensorFile(benign_scores)
        made = ctrl.make(load_mask(mask_path), seed, **extra)
        save_mask(made, d / "mask.safetensors", source_mask=cache.run_relative(mask_path))

    return cache.stage("control", params, build, "mask.safetensors") / "mask.safetensors"


def saved_mask(cache: StageCache, mask, provenance: dict[str, Any]) -> Path:
    """A mask computed by an experiment (e.g. an intersection of masks) as a cached mask file."""
    from harmprune.selection import save_mask

    return cache.stage("mask", {"derived": provenance},
                       lambda d: save_mask(mask, d / "mask.safetensors"), "mask.safetensors") / "mask.safetensors"


def evaluate(inputs: Inputs, cache: StageCache, model_name: str, evaluation: str,
             mask: Path | None = None) -> dict[str, Any]:
    """Metrics of one named evaluation on ``model`` with ``mask`` applied (None: unpruned).

    The key hashes the evaluation's table, the records of every data set its spec declares it reads (whatever
    the field is called) and the files of its judge."""
    from harmprune.experiments.evaluations import run_evaluation
    from harmprune.pruning import pruned
    from harmprune.specs import references

    ev = inputs.config.evaluations[evaluation]
    params = {"model": inputs.model_hash(model_name), "mask": sha256_file(mask) if mask else None,
              "evaluation": ev.table,
              "data": {k: inputs.data_hash(v) for k, v in references(ev.spec, "data").items()},
              "format": inputs.model_format(model_name), "seed": inputs.config.seed}
    files = judge_file_hashes(ev.spec)
    if files:  # a grader retrained in place must not reuse old verdicts
        params["judge_files"] = files

    def build(d: Path) -> None:
        model, tok = inputs.model(model_name)
        with pruned(model, mask):
            metrics = run_evaluation(ev.spec, model, tok, inputs.eval_inputs(model_name), d)
        atomic_write_json(d / "metrics.json", metrics)

    d = cache.stage("evaluate", params, build, "metrics.json")
    return json.loads((d / "metrics.json").read_text())


def judge_file_hashes(spec: Any) -> dict[str, str]:
    """Content hashes of the local files and directories an evaluation's judge reads (models, adapters, prompts)."""
    from harmprune.experiments.evaluations import judge_files

    return {k: hash_model_source(v) for k, v in judge_files(spec).items()}


def generated_data(inputs: Inputs, cache: StageCache, model_name: str, data_name: str, *, prefix: str = "",
                   max_new_tokens: int = 128, batch_size: int = 8, prefill_tokens: int = 0,
                   prefill_from: str | None = None, judge: str | None = None, score_prefix: bool = True) -> str:
    """The model's own greedy answers to ``data_name``'s prompts, as a derived data set (cached stage).

    Every answer is forced to open with ``prefix``, or with the first ``prefill_tokens`` tokens of its
    reference answer (``prefill_from``'s response for the same prompt, else the record's own): a prefilling
    attack, to get compliant answers from a model that would refuse. Answers that ``judge`` marks as refused,
    and empty ones, are dropped (:func:`harmprune.calibration.self_generate`); the counts are kept beside the
    records and in the results store. The stored response is the prefix followed by the continuation; without
    ``score_prefix`` the prefix is unscored context.
    """
    from harmprune.calibration import forced_prefixes, self_generate, write_answers

    fmt = inputs.model_format(model_name)
    params: dict[str, Any] = {"model": inputs.model_hash(model_name), "data": inputs.data_hash(data_name),
                              "format": fmt, "prefix": prefix, "max_new_tokens": max_new_tokens}
    if prefill_tokens or judge or not score_prefix:  # only then, so older cached answers stay valid
        params.update(prefill_tokens=prefill_tokens, judge=judge, score_prefix=score_prefix,
                      prefill_from=inputs.data_hash(prefill_from) if prefill_from else None)

    def build(d: Path) -> None:
        model, tok = inputs.model(model_name)
        records = inputs.records(data_name)
        refs = inputs.records(prefill_from) if prefill_from else None
        prefixes = forced_prefixes(tok, records, prefix=prefix, prefill_tokens=prefill_tokens, references=refs)
        result = self_generate(model, tok, records, prefixes, judge=judge, fmt=fmt,
                               max_new_tokens=max_new_tokens, batch_size=batch_size, score_prefix=score_prefix)
        write_answers(result, d / "records.jsonl", {"model": inputs.model_path(model_name), "data": data_name,
                                                    **{k: v for k, v in params.items() if k != "model"}})

    d = cache.stage("generate", params, build, "records.jsonl")
    name = f"{data_name}@{model_name}:{d.name[:8]}"
    records = [r for r in load_records(d / "records.jsonl") if r.response and r.response.strip() != prefix.strip()]
    meta = d / "records.meta.json"
    if meta.exists():
        inputs.generation_counts[name] = json.loads(meta.read_text())["counts"]
    return inputs.derived_data(name, records)


def data_for(inputs: Inputs, cache: StageCache, model_name: str, data_name: str) -> str:
    """``data_name`` itself, or for a self-generated set (``[data.X] self_generated = true``) the name of
    ``model``'s own answers to its source prompts; their kept/dropped counts go into the results store."""
    spec = inputs.config.data.get(data_name)
    if spec is None or not spec.options.get("self_generated"):
        return data_name
    o = spec.options
    judge = None if o["refusal_judge"] == "none" else o["refusal_judge"]
    name = generated_data(inputs, cache, model_name, o["from"], prefix=o["prefix"],
                          max_new_tokens=o["max_new_tokens"], batch_size=o["batch_size"],
                          prefill_tokens=o["prefill_tokens"], prefill_from=o["prefill_from"], judge=judge,
                          score_prefix=o["score_prefix"])
    record_generation_counts(inputs, cache, model_name, data_name, name, o["from"])
    return name


def record_generation_counts(inputs: Inputs, cache: StageCache, model_name: str, label: str, derived: str,
                             source: str) -> None:
    """The kept / dropped / total counts of a self-generated set, as ``calibration`` rows of the store."""
    counts = inputs.generation_counts.get(derived)
    if not counts:
        return
    keys = ("kept", "dropped", "total", "refused", "empty")
    cache.store.record_metrics("calibration", model_name, label, source, {k: counts[k] for k in keys})
    for cat, c in counts.get("per_category", {}).items():
        cache.store.record_metrics("calibration", model_name, label, f"{source}:{cat}", {k: c[k] for k in keys})


def finetuned(inputs: Inputs, cache: StageCache, model_name: str, data_name: str, *, mask: Path | None = None,
              keep_pruned: bool = True, seed: int = 0, rank: int = 8, alpha: float = 16, lr: float = 1e-3,
              steps: int = 40, batch_size: int = 8, max_length: int = 256) -> str:
    """LoRA fine-tune of ``model`` (pruned by ``mask`` first) on ``data``, merged and saved; return its name.

    With ``keep_pruned`` the pruned weights stay exactly zero through training and merging
    (:func:`harmprune.finetune.lora_finetune`); without it the dense LoRA delta may regrow them. The result is
    registered as a model named ``<model>+ft-<key>``, with ``model``'s format and settings.
    """
    from harmprune.finetune import lora_finetune, merge
    from harmprune.models import save_model
    from harmprune.pruning import apply_mask
    from harmprune.selection import load_mask

    fmt = inputs.model_format(model_name)
    hparams = {"rank": rank, "alpha": alpha, "lr": lr, "steps": steps, "batch_size": batch_size,
               "max_length": max_length, "seed": seed}
    params = {"model": inputs.model_hash(model_name), "data": inputs.data_hash(data_name), "format": fmt,
              "mask": sha256_file(mask) if mask else None, "keep_pruned": bool(mask) and keep_pruned, **hparams}

    def build(d: Path) -> None:
        model, tok = inputs.fresh_model(model_name)  # the peft wrap and the pruning happen in place
        keep = load_mask(mask) if mask and keep_pruned else None
        if mask and not keep_pruned:
            apply_mask(model, load_mask(mask))
        records = [r for r in inputs.records(data_name) if r.response]
        peft_model = lora_finetune(model, tok, records, rank=rank, alpha=alpha, lr=lr, max_steps=steps,
                                   epochs=max(1.0, steps * batch_size / max(1, len(records))),
                                   batch_size=batch_size, max_length=max_length, fmt=fmt, seed=seed,
                                   keep_pruned=keep, progress=False)
        info = dict(peft_model.finetune_info)
        save_model(merge(peft_model), tok, d / "model")
        atomic_write_json(d / "finetune.json", info)

    d = cache.stage("finetune", params, build, "finetune.json")
    name = f"{model_name}+ft-{d.name[:8]}"
    if name not in inputs.config.models:
        inputs.register_model(name, d / "model", like=model_name)
    return name
