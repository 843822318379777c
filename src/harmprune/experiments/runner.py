"""The experiment runner: cached, resumable stages (score → select → evaluate) over one config.

Each stage's output lives under ``RUN/stages/<kind>/<key>/`` where ``key`` is a content hash of everything the
stage depends on (model weights, data records, parameters, upstream outputs). A stage whose output exists is not
run again: scores are computed once per (model, data, method, format) and reused by every point of a sweep, a
finished config recomputes nothing, and a run killed at any moment resumes at the stage it was in (outputs are
written atomically, so a stage is either complete or absent).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import torch

from harmprune import __version__
from harmprune.data import Record, load_records, records_digest, sample
from harmprune.errors import ConfigError
from harmprune.experiments.config import Config
from harmprune.io import atomic_write_json, process_alive, sha256_file
from harmprune.store import Store

log = logging.getLogger(__name__)

# Bump a stage's version when its semantics change, so old cached outputs are not reused.
STAGE_VERSIONS = {"scores": 1, "mask": 1, "control": 1, "evaluate": 1, "finetune": 1}


def stable_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


class Runner:
    """Memoised access to models, data and stage outputs of one run directory."""

    def __init__(self, config: Config, out_dir: str | Path, executor=None):
        from harmprune.experiments.executors import LocalExecutor

        self.config = config
        self.executor = executor or LocalExecutor()
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.store = Store(self.out / "results.sqlite", recipe_of_model=self.recipe_label)
        self._records: dict[str, list[Record]] = {}
        self._model_hashes: dict[str, str] = {}
        self._loaded: tuple[str, Any, Any] | None = None
        self.stats = {"computed": 0, "reused": 0}
        self.results: dict[str, Any] = {}  # what one experiment leaves for the next (e.g. operating points)
        self.generation_counts: dict[str, dict[str, Any]] = {}  # derived answer set -> kept/dropped counts

    def prefetch(self, calls: list) -> None:
        """Compute a batch of independent stages (:class:`~harmprune.experiments.executors.StageCall`) ahead of
        the sequential code that reads them: a no-op locally, parallel tasks on Ray."""
        self.executor.run(self, calls)

    def worker_state(self) -> dict[str, Any]:
        """What another process needs to act as this runner: the config (with derived models and evaluations)
        and the derived data sets, which exist only in memory."""
        derived = {n: r for n, r in self._records.items() if n not in self.config.data}
        return {"config": self.config, "out": str(self.out), "derived": derived}

    @classmethod
    def from_worker_state(cls, state: dict[str, Any]) -> "Runner":
        runner = cls(state["config"], state["out"])
        runner._records.update(state["derived"])
        return runner

    # ------------------------------------------------------------------------------------------ inputs

    def records(self, data_name: str) -> list[Record]:
        if data_name not in self._records:
            spec = self.config.data[data_name]
            if spec.options.get("self_generated"):
                from harmprune.errors import ConfigError

                raise ConfigError(f"{self.config.path}: data.{data_name} is self-generated: it has answers only per "
                                  "model, where scores are computed")
            opts = dict(spec.options)
            records = load_records(
                spec.path, prompt_field=opts.get("prompt_field"), response_field=opts.get("response_field"),
                category_field=opts.get("category_field"), category=opts.get("category"),
                exclude_category=opts.get("exclude_category"), require_response=opts.get("skip_empty", False),
                skip_empty=opts.get("skip_empty", False), split=opts.get("split", "train"))
            if opts.get("exclude"):  # held-out sets: drop every prompt the other data set uses
                used = {r.prompt for r in self.records(opts["exclude"])}
                records = [r for r in records if r.prompt not in used]
            if opts.get("n_examples"):
                records = sample(records, opts["n_examples"], opts.get("seed", self.config.seed))
            self._records[data_name] = records
        return self._records[data_name]

    def data_hash(self, data_name: str) -> str:
        return records_digest(self.records(data_name))

    def model_path(self, model_name: str) -> str:
        return self.config.models[model_name].path if model_name in self.config.models else model_name

    def model_hash(self, model_name: str) -> str:
        """Content hash of a model's files (memoised by size and mtime), or of its hub id."""
        if model_name not in self._model_hashes:
            from harmprune.models import resolve_model

            self._model_hashes[model_name] = hash_model_source(resolve_model(self.model_path(model_name)))
        return self._model_hashes[model_name]

    def model(self, model_name: str):
        """(model, tokenizer), keeping one model in memory at a time."""
        if self._loaded and self._loaded[0] == model_name:
            return self._loaded[1], self._loaded[2]
        from harmprune.models import load_model

        self._loaded = None
        spec = self.config.models.get(model_name)
        dtype = (spec.dtype if spec and spec.dtype else None) or self.config.dtype
        device = self.config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, tok = load_model(self.model_path(model_name), dtype=dtype, device=device)
        self._loaded = (model_name, model, tok)
        return model, tok

    def model_format(self, model_name: str) -> str:
        spec = self.config.models.get(model_name)
        return spec.format if spec else "chat"

    def register_model(self, name: str, path: str | Path, like: str) -> None:
        """Make a derived model (e.g. a fine-tuned copy) addressable by name, with ``like``'s settings."""
        from dataclasses import replace

        self.config.models[name] = replace(self.config.models[like], name=name, path=str(path))

    def run_relative(self, path: str | Path) -> str:
        """``path`` relative to the run directory if it lies inside it (else as given), for file metadata.

        Stage keys hash upstream files' bytes, so a file that recorded this run directory's location would give
        equal work in two run directories different keys."""
        try:
            return str(Path(path).resolve().relative_to(self.out.resolve()))
        except ValueError:
            return str(path)

    # ------------------------------------------------------------------------------------------ stages

    def stage(self, kind: str, params: dict[str, Any], build: Callable[[Path], None], done_file: str) -> Path:
        """Run ``build(dir)`` unless the stage with these params already finished; return its directory."""
        key = stable_hash({"kind": kind, "v": STAGE_VERSIONS[kind], **params})[:20]
        final = self.out / "stages" / kind / key
        if (final / done_file).exists():
            self.stats["reused"] += 1
            return final
        partial = _fresh_partial_dir(final)
        start = time.perf_counter()
        log.info("stage %s %s: %s", kind, key, _describe(params))
        try:
            build(partial)
            atomic_write_json(partial / "stage.json", {
                "kind": kind, "key": key, "params": params, "harmprune_version": __version__,
                "host": socket.gethostname(), "pid": os.getpid(), "seconds": time.perf_counter() - start})
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        if (final / done_file).exists():  # another process (a parallel executor) finished it first
            shutil.rmtree(partial, ignore_errors=True)
            self.stats["reused"] += 1
            return final
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        self.store.record_stage(key, kind, params, str(final), time.perf_counter() - start)
        self.stats["computed"] += 1
        return final

    def recipe(self, model_name: str, role: str = "harm") -> tuple[str, str]:
        """(method, prompt format) the config scores ``role``'s ("harm" or "utility") data with on ``model``.

        The format ``"model"`` resolves to the model's own ``[models.X] format``.
        """
        if role not in ("harm", "utility"):
            raise ValueError(f"scoring role must be 'harm' or 'utility', not {role!r}")
        sc = self.config.scoring
        fmt = sc[f"{role}_format"]
        return sc[f"{role}_method"], self.model_format(model_name) if fmt == "model" else fmt

    def recipe_label(self, model_name: str) -> str:
        """The run's scoring recipe in one line, e.g. ``harm=signed-snip/pretrained utility=snip/pretrained``."""
        return " ".join(f"{role}={'/'.join(self.recipe(model_name, role))}" for role in ("harm", "utility"))

    def scores(self, model_name: str, data_name: str, role: str = "harm", *, method: str | None = None,
               fmt: str | None = None) -> Path:
        """Score file of ``model`` on ``data`` (computed once, reused by every selection).

        ``role`` picks the config's method and format for the harm or the utility set; ``method`` / ``fmt``
        override them. The cache key holds the method and the resolved format, not the role, so the same data
        scored the same way is one file whichever role asks for it.
        """
        from harmprune.attribution import compute_scores, save_scores
        from harmprune.scoring_methods import scoring_method

        data_name = self.data_for(model_name, data_name)
        sc = self.config.scoring
        role_method, role_fmt = self.recipe(model_name, role)
        method, fmt = method or role_method, fmt or role_fmt
        params = {"model": self.model_hash(model_name), "data": self.data_hash(data_name), "method": method,
                  "format": fmt, "max_length": sc["max_length"], "modules": sc["modules"]}
        needs_data = scoring_method(method).needs_data
        if not needs_data:
            params["data"] = None

        def build(d: Path) -> None:
            model, tok = self.model(model_name)
            records = [r for r in self.records(data_name) if r.response] if needs_data else []
            scores = compute_scores(model, tok, records, method, fmt=fmt, max_length=sc["max_length"],
                                    batch_size=sc["batch_size"], modules=sc["modules"])
            scores.metadata.update({"model": self.run_relative(self.model_path(model_name)), "data": data_name})
            save_scores(scores, d / "scores.safetensors")

        return self.stage("scores", params, build, "scores.safetensors") / "scores.safetensors"

    def mask(self, model_name: str, q: float, p: float, *, harm_data: str | None = None,
             utility_data: str | None = None, granularity: str | None = None) -> Path:
        """Harm set (top-q) minus utility set (top-p) for ``model``, each set scored with its role's recipe."""
        return self.masks(model_name, [q], [p], harm_data=harm_data, utility_data=utility_data,
                          granularity=granularity)[(q, p)]

    def masks(self, model_name: str, qs: list[float], ps: list[float], *, harm_data: str | None = None,
              utility_data: str | None = None, granularity: str | None = None
              ) -> dict[tuple[float, float], Path]:
        """``mask`` at every (q, p) of ``qs`` × ``ps`` (in p-major order); the masks not cached yet are selected
        together by one ``select_grid``, which reads each score file once and ranks each matrix once."""
        from harmprune.selection import Mask, default_device, save_mask, select_grid
        from harmprune.tensorfile import TensorFile

        sc = self.config.scoring
        harm_data = harm_data or sc["harm"]
        utility_data = utility_data if utility_data is not None else sc.get("utility")
        granularity = granularity or self.config.selection["granularity"]
        harm = self.scores(model_name, harm_data, "harm")
        util = self.scores(model_name, utility_data, "utility") if utility_data and any(p > 0 for p in ps) else None
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
                    save_mask(mask, d / "mask.safetensors", harm_file=self.run_relative(harm),
                              utility_file=self.run_relative(util) if uses_util else "", harm_sha256=harm_sha,
                              utility_sha256=util_sha if uses_util else "", **formats(uses_util))

                out[(q, p)] = self.stage("mask", {**params}, build, "mask.safetensors") / "mask.safetensors"
        return out

    def control(self, mask_path: Path, kind: str, seed: int, model_name: str,
                benign_data: str | None = None) -> Path:
        """A control mask with ``mask_path``'s per-matrix counts, of a kind of :mod:`harmprune.control_masks`:
        random, magnitude-matched (the model's weights), or a benign task's (``benign_data``'s scores)."""
        from harmprune.control_masks import CONTROLS
        from harmprune.selection import load_mask, save_mask
        from harmprune.tensorfile import TensorFile

        control = CONTROLS.get(kind)
        params: dict[str, Any] = {"mask": sha256_file(mask_path), "kind": kind, "seed": seed}
        if control.needs == "weights":
            params["model"] = self.model_hash(model_name)
        if control.needs == "scores":
            if not benign_data:
                raise ConfigError(f"a {kind} control needs benign_data (a data set name)")
            benign_scores = self.scores(model_name, benign_data, "harm")  # the harm set's recipe, other data
            params["benign_scores"] = sha256_file(benign_scores)

        def build(d: Path) -> None:
            inputs: dict[str, Any] = {}
            if control.needs == "weights":
                inputs["weights"] = dict(self.model(model_name)[0].named_parameters())
            if control.needs == "scores":
                inputs["scores"] = TensorFile(benign_scores)
            ctrl = control.make(load_mask(mask_path), seed, **inputs)
            save_mask(ctrl, d / "mask.safetensors", source_mask=self.run_relative(mask_path))

        return self.stage("control", params, build, "mask.safetensors") / "mask.safetensors"

    def evaluate(self, model_name: str, evaluation: str, mask: Path | None = None) -> dict[str, Any]:
        """Metrics of one named evaluation on ``model`` with ``mask`` applied (None: unpruned).

        The key hashes the evaluation's table, the records of every data set its spec declares it reads (whatever
        the field is called) and the files of its judge."""
        from harmprune.experiments.evaluations import run_evaluation
        from harmprune.pruning import pruned
        from harmprune.specs import references

        ev = self.config.evaluations[evaluation]
        params = {"model": self.model_hash(model_name), "mask": sha256_file(mask) if mask else None,
                  "evaluation": ev.table, "data": {k: self.data_hash(v) for k, v in references(ev.spec, "data").items()},
                  "format": self.model_format(model_name), "seed": self.config.seed}
        files = judge_file_hashes(ev.spec)
        if files:  # a grader retrained in place must not reuse old verdicts
            params["judge_files"] = files

        def build(d: Path) -> None:
            model, tok = self.model(model_name)
            with pruned(model, mask):
                metrics = run_evaluation(ev.spec, model, tok, self.eval_inputs(model_name), d)
            atomic_write_json(d / "metrics.json", metrics)

        d = self.stage("evaluate", params, build, "metrics.json")
        return json.loads((d / "metrics.json").read_text())

    def eval_inputs(self, model_name: str):
        """What an evaluation of ``model`` reads besides the model: this run's data sets, its format, the seed."""
        from harmprune.experiments.evaluations import EvalInputs

        return EvalInputs(self.records, self.model_format(model_name), self.config.seed,
                          {n: s.path for n, s in self.config.data.items()})

    # ---------------------------------------------------------------------- Experiments II: derived inputs

    def derived_data(self, name: str, records: list[Record]) -> str:
        """Make ``records`` usable wherever a data-set name is (scores, masks, evaluations); return ``name``.

        Every stage keys data by the records' digest, never by name, so a derived set is cached like any other.
        """
        from harmprune.errors import DataError

        if not records:
            raise DataError(f"derived data set {name!r} is empty")
        if name in self._records and records_digest(self._records[name]) != records_digest(records):
            raise DataError(f"derived data set {name!r} already names different records")
        self._records[name] = list(records)
        return name

    def records_subset(self, data_name: str, category: str | list[str] | None = None,
                       exclude: str | list[str] | None = None) -> str:
        """The records of ``data_name`` in ``category`` and not in ``exclude``, as a derived data set's name."""
        from harmprune.data import filter_categories

        keep, drop = _as_names(category), _as_names(exclude)
        if not keep and not drop:
            return data_name
        name = data_name + "[" + ",".join(keep) + ("" if not drop else " -" + ",".join(drop)) + "]"
        if name not in self._records:
            records = self.records(data_name)
            present = {r.category for r in records}
            drop = [c for c in drop if c in present]  # excluding an absent category is a no-op, not an error
            kept = filter_categories(records, keep or None, drop or None, data_name) if keep or drop else records
            self.derived_data(name, kept)
        return name

    def derived_evaluation(self, evaluation: str, **overrides: Any) -> str:
        """A copy of a configured evaluation with some parameters replaced (e.g. its data); return its name."""
        from dataclasses import replace

        from harmprune.experiments.config import Evaluation

        ev = self.config.evaluations[evaluation]
        name = f"{evaluation}@{stable_hash(overrides)[:10]}"
        self.config.evaluations[name] = Evaluation(name, ev.kind, replace(ev.spec, **overrides),
                                                   {**ev.table, **overrides})
        return name

    def generated_data(self, model_name: str, data_name: str, *, prefix: str = "", max_new_tokens: int = 128,
                       batch_size: int = 8, prefill_tokens: int = 0, prefill_from: str | None = None,
                       judge: str | None = None, score_prefix: bool = True) -> str:
        """The model's own greedy answers to ``data_name``'s prompts, as a derived data set (cached stage).

        Every answer is forced to open with ``prefix``, or with the first ``prefill_tokens`` tokens of its
        reference answer (``prefill_from``'s response for the same prompt, else the record's own): a prefilling
        attack, to get compliant answers from a model that would refuse. Answers that ``judge`` marks as refused,
        and empty ones, are dropped (:func:`harmprune.calibration.self_generate`); the counts are kept beside the
        records and in the results store. The stored response is the prefix followed by the continuation; without
        ``score_prefix`` the prefix is unscored context.
        """
        from harmprune.calibration import forced_prefixes, self_generate, write_answers

        fmt = self.model_format(model_name)
        params: dict[str, Any] = {"model": self.model_hash(model_name), "data": self.data_hash(data_name),
                                  "format": fmt, "prefix": prefix, "max_new_tokens": max_new_tokens}
        if prefill_tokens or judge or not score_prefix:  # only then, so older cached answers stay valid
            params.update(prefill_tokens=prefill_tokens, judge=judge, score_prefix=score_prefix,
                          prefill_from=self.data_hash(prefill_from) if prefill_from else None)

        def build(d: Path) -> None:
            model, tok = self.model(model_name)
            records = self.records(data_name)
            refs = self.records(prefill_from) if prefill_from else None
            prefixes = forced_prefixes(tok, records, prefix=prefix, prefill_tokens=prefill_tokens, references=refs)
            result = self_generate(model, tok, records, prefixes, judge=judge, fmt=fmt,
                                   max_new_tokens=max_new_tokens, batch_size=batch_size, score_prefix=score_prefix)
            write_answers(result, d / "records.jsonl", {"model": self.model_path(model_name), "data": data_name,
                                                        **{k: v for k, v in params.items() if k != "model"}})

        d = self.stage("generate", params, build, "records.jsonl")
        name = f"{data_name}@{model_name}:{d.name[:8]}"
        records = [r for r in load_records(d / "records.jsonl") if r.response and r.response.strip() != prefix.strip()]
        meta = d / "records.meta.json"
        if meta.exists():
            self.generation_counts[name] = json.loads(meta.read_text())["counts"]
        return self.derived_data(name, records)

    def data_for(self, model_name: str, data_name: str) -> str:
        """``data_name`` itself, or for a self-generated set (``[data.X] self_generated = true``) the name of
        ``model``'s own answers to its source prompts; their kept/dropped counts go into the results store."""
        spec = self.config.data.get(data_name)
        if spec is None or not spec.options.get("self_generated"):
            return data_name
        o = spec.options
        judge = None if o["refusal_judge"] == "none" else o["refusal_judge"]
        name = self.generated_data(model_name, o["from"], prefix=o["prefix"], max_new_tokens=o["max_new_tokens"],
                                   batch_size=o["batch_size"], prefill_tokens=o["prefill_tokens"],
                                   prefill_from=o["prefill_from"], judge=judge, score_prefix=o["score_prefix"])
        self.record_generation_counts(model_name, data_name, name, o["from"])
        return name

    def record_generation_counts(self, model_name: str, label: str, derived: str, source: str) -> None:
        """The kept / dropped / total counts of a self-generated set, as ``calibration`` rows of the store."""
        counts = self.generation_counts.get(derived)
        if not counts:
            return
        keys = ("kept", "dropped", "total", "refused", "empty")
        self.store.record_metrics("calibration", model_name, label, source, {k: counts[k] for k in keys})
        for cat, c in counts.get("per_category", {}).items():
            self.store.record_metrics("calibration", model_name, label, f"{source}:{cat}", {k: c[k] for k in keys})

    def saved_mask(self, mask, provenance: dict[str, Any]) -> Path:
        """A mask computed by an experiment (e.g. an intersection of masks) as a cached mask file."""
        from harmprune.selection import save_mask

        return self.stage("mask", {"derived": provenance},
                          lambda d: save_mask(mask, d / "mask.safetensors"), "mask.safetensors") / "mask.safetensors"

    def finetuned(self, model_name: str, data_name: str, *, mask: Path | None = None, keep_pruned: bool = True,
                  seed: int = 0, rank: int = 8, alpha: float = 16, lr: float = 1e-3, steps: int = 40,
                  batch_size: int = 8, max_length: int = 256) -> str:
        """LoRA fine-tune of ``model`` (pruned by ``mask`` first) on ``data``, merged and saved; return its name.

        With ``keep_pruned`` the pruned weights stay exactly zero through training and merging
        (:func:`harmprune.finetune.lora_finetune`); without it the dense LoRA delta may regrow them. The result is
        registered as a model named ``<model>+ft-<key>``, with ``model``'s format and settings.
        """
        from harmprune.finetune import lora_finetune, merge
        from harmprune.models import save_model
        from harmprune.pruning import apply_mask
        from harmprune.selection import load_mask

        fmt = self.model_format(model_name)
        hparams = {"rank": rank, "alpha": alpha, "lr": lr, "steps": steps, "batch_size": batch_size,
                   "max_length": max_length, "seed": seed}
        params = {"model": self.model_hash(model_name), "data": self.data_hash(data_name), "format": fmt,
                  "mask": sha256_file(mask) if mask else None, "keep_pruned": bool(mask) and keep_pruned, **hparams}

        def build(d: Path) -> None:
            self._loaded = None  # train a fresh copy: the peft wrap and the pruning happen in place
            model, tok = self.model(model_name)
            self._loaded = None
            keep = load_mask(mask) if mask and keep_pruned else None
            if mask and not keep_pruned:
                apply_mask(model, load_mask(mask))
            records = [r for r in self.records(data_name) if r.response]
            peft_model = lora_finetune(model, tok, records, rank=rank, alpha=alpha, lr=lr, max_steps=steps,
                                       epochs=max(1.0, steps * batch_size / max(1, len(records))),
                                       batch_size=batch_size, max_length=max_length, fmt=fmt, seed=seed,
                                       keep_pruned=keep, progress=False)
            info = dict(peft_model.finetune_info)
            save_model(merge(peft_model), tok, d / "model")
            atomic_write_json(d / "finetune.json", info)

        d = self.stage("finetune", params, build, "finetune.json")
        name = f"{model_name}+ft-{d.name[:8]}"
        if name not in self.config.models:
            self.register_model(name, d / "model", like=model_name)
        return name


def _fresh_partial_dir(final: Path) -> Path:
    """A build directory private to this process, next to ``final``; leftovers of dead processes on this host
    (a killed run), of this stage or of any other of its kind, are removed."""
    host = socket.gethostname().replace("-", "_")
    for old in final.parent.glob(f"*.partial-{host}-*"):
        pid = old.name.rsplit("-", 2)[-2]
        if not pid.isdigit() or not process_alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    partial = final.with_name(f"{final.name}.partial-{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    partial.mkdir(parents=True)
    return partial


def judge_file_hashes(spec: Any) -> dict[str, str]:
    """Content hashes of the local files and directories an evaluation's judge reads (models, adapters, prompts)."""
    from harmprune.experiments.evaluations import judge_files

    return {k: hash_model_source(v) for k, v in judge_files(spec).items()}


def hash_model_source(source: str) -> str:
    """sha256 over a model directory's files (or a file, or a hub id string), memoised by size and mtime."""
    path = Path(source)
    if not path.exists():
        return stable_hash({"hub": source})
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file() and not f.name.startswith("."))
    from harmprune.models import cache_dir

    memo_path = cache_dir() / "file-hashes.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, json.JSONDecodeError):
        memo = {}
    digests = []
    for f in files:
        st = f.stat()
        memo_key = f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}"
        if memo_key not in memo:
            memo[memo_key] = sha256_file(f)
        digests.append((f.name if path.is_file() else str(f.relative_to(path)), memo[memo_key]))
    try:
        atomic_write_json(memo_path, memo)
    except OSError:
        pass
    return stable_hash(digests)


def _describe(params: dict[str, Any]) -> str:
    short = {k: (v[:10] if isinstance(v, str) and len(v) == 64 else v) for k, v in params.items()}
    return json.dumps(short, default=str)[:200]


# ---------------------------------------------------------------------------------------------- Experiments II

STAGE_VERSIONS.setdefault("generate", 1)


def _as_names(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return sorted({value} if isinstance(value, str) else set(value))
