"""The experiment runner: cached, resumable stages (score → select → evaluate) over one config.

Each stage's output lives under ``RUN/stages/<kind>/<key>/`` where ``key`` is a content hash of everything the
stage depends on (model weights, data records, parameters, upstream outputs). A stage whose output exists is not
run again: scores are computed once per (model, data, method) and reused by every point of a sweep, a finished
config recomputes nothing, and a run killed at any moment resumes at the stage it was in (outputs are written
atomically, so a stage is either complete or absent).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch

from harmprune import __version__
from harmprune.data import Record, load_records, records_digest
from harmprune.experiments.config import Config
from harmprune.io import atomic_write_json, sha256_file
from harmprune.store import Store

log = logging.getLogger(__name__)

# Bump a stage's version when its semantics change, so old cached outputs are not reused.
STAGE_VERSIONS = {"scores": 1, "mask": 1, "control": 1, "evaluate": 1, "finetune": 1}


def stable_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


class Runner:
    """Memoised access to models, data and stage outputs of one run directory."""

    def __init__(self, config: Config, out_dir: str | Path):
        self.config = config
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.store = Store(self.out / "results.sqlite")
        self._records: dict[str, list[Record]] = {}
        self._model_hashes: dict[str, str] = {}
        self._loaded: tuple[str, Any, Any] | None = None
        self.stats = {"computed": 0, "reused": 0}
        self.results: dict[str, Any] = {}  # what one experiment leaves for the next (e.g. operating points)

    # ------------------------------------------------------------------------------------------ inputs

    def records(self, data_name: str) -> list[Record]:
        if data_name not in self._records:
            spec = self.config.data[data_name]
            opts = dict(spec.options)
            self._records[data_name] = load_records(
                spec.path, prompt_field=opts.get("prompt_field"), response_field=opts.get("response_field"),
                category_field=opts.get("category_field"), category=opts.get("category"),
                exclude_category=opts.get("exclude_category"), n_examples=opts.get("n_examples"),
                seed=opts.get("seed", self.config.seed), skip_empty=opts.get("skip_empty", False),
                require_response=False, split=opts.get("split", "train"))
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

    # ------------------------------------------------------------------------------------------ stages

    def stage(self, kind: str, params: dict[str, Any], build: Callable[[Path], None], done_file: str) -> Path:
        """Run ``build(dir)`` unless the stage with these params already finished; return its directory."""
        key = stable_hash({"kind": kind, "v": STAGE_VERSIONS[kind], **params})[:20]
        final = self.out / "stages" / kind / key
        if (final / done_file).exists():
            self.stats["reused"] += 1
            return final
        partial = final.with_name(key + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        start = time.perf_counter()
        log.info("stage %s %s: %s", kind, key, _describe(params))
        build(partial)
        atomic_write_json(partial / "stage.json", {"kind": kind, "key": key, "params": params,
                                                   "harmprune_version": __version__})
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        self.store.record_stage(key, kind, params, str(final), time.perf_counter() - start)
        self.stats["computed"] += 1
        return final

    def scores(self, model_name: str, data_name: str, method: str | None = None) -> Path:
        """Score file of ``model`` on ``data`` (computed once, reused by every selection)."""
        from harmprune.attribution import compute_scores, save_scores

        sc = self.config.scoring
        method = method or _first(sc["method"])
        fmt = sc.get("format") or self.model_format(model_name)
        params = {"model": self.model_hash(model_name), "data": self.data_hash(data_name), "method": method,
                  "format": fmt, "max_length": sc["max_length"], "modules": sc["modules"]}
        if method == "magnitude":
            params["data"] = None

        def build(d: Path) -> None:
            model, tok = self.model(model_name)
            records = [] if method == "magnitude" else [r for r in self.records(data_name) if r.response]
            scores = compute_scores(model, tok, records, method, fmt=fmt, max_length=sc["max_length"],
                                    batch_size=sc["batch_size"], modules=sc["modules"])
            scores.metadata.update({"model": self.model_path(model_name), "data": data_name})
            save_scores(scores, d / "scores.safetensors")

        return self.stage("scores", params, build, "scores.safetensors") / "scores.safetensors"

    def mask(self, model_name: str, q: float, p: float, *, harm_data: str | None = None,
             utility_data: str | None = None, method: str | None = None, granularity: str | None = None) -> Path:
        """Harm set (top-q) minus utility set (top-p) for ``model``."""
        from harmprune.selection import save_mask, select
        from harmprune.tensorfile import TensorFile

        sc = self.config.scoring
        harm_data = harm_data or sc["harm"]
        utility_data = utility_data if utility_data is not None else sc.get("utility")
        granularity = granularity or self.config.selection["granularity"]
        harm = self.scores(model_name, harm_data, method)
        util = self.scores(model_name, utility_data, method) if utility_data and p > 0 else None
        params = {"harm": sha256_file(harm), "utility": sha256_file(util) if util else None, "q": q, "p": p,
                  "granularity": granularity}

        def build(d: Path) -> None:
            mask = select(TensorFile(harm), TensorFile(util) if util else None, q, p, granularity)
            save_mask(mask, d / "mask.safetensors", harm_file=str(harm), utility_file=str(util or ""),
                      harm_sha256=params["harm"], utility_sha256=params["utility"] or "")

        return self.stage("mask", params, build, "mask.safetensors") / "mask.safetensors"

    def control(self, mask_path: Path, kind: str, seed: int, model_name: str,
                benign_data: str | None = None) -> Path:
        """A control mask with ``mask_path``'s per-matrix counts: random, magnitude-matched, or a benign task's."""
        from harmprune.selection import load_mask, magnitude_matched_random, random_like, save_mask, select_counts
        from harmprune.tensorfile import TensorFile

        params: dict[str, Any] = {"mask": sha256_file(mask_path), "kind": kind, "seed": seed}
        if kind == "magnitude-matched":
            params["model"] = self.model_hash(model_name)
        if kind == "benign-task":
            if not benign_data:
                raise ValueError("a benign-task control needs benign_data")
            benign_scores = self.scores(model_name, benign_data)
            params["benign_scores"] = sha256_file(benign_scores)

        def build(d: Path) -> None:
            mask = load_mask(mask_path)
            if kind == "random":
                ctrl = random_like(mask, seed)
            elif kind == "magnitude-matched":
                model, _ = self.model(model_name)
                ctrl = magnitude_matched_random(mask, dict(model.named_parameters()), seed)
            elif kind == "benign-task":
                ctrl = select_counts(TensorFile(benign_scores), mask.counts())
            else:
                raise ValueError(f"unknown control kind {kind!r}")
            save_mask(ctrl, d / "mask.safetensors", source_mask=str(mask_path))

        return self.stage("control", params, build, "mask.safetensors") / "mask.safetensors"

    def evaluate(self, model_name: str, evaluation: str, mask: Path | None = None) -> dict[str, Any]:
        """Metrics of one named evaluation on ``model`` with ``mask`` applied (None: unpruned)."""
        from harmprune.experiments.evaluations import run_evaluation
        from harmprune.pruning import pruned

        spec = dict(self.config.evaluations[evaluation])
        params = {"model": self.model_hash(model_name), "mask": sha256_file(mask) if mask else None,
                  "evaluation": spec, "data": {k: self.data_hash(v) for k, v in _data_refs(spec).items()},
                  "format": self.model_format(model_name), "seed": self.config.seed}

        def build(d: Path) -> None:
            model, tok = self.model(model_name)
            with pruned(model, mask):
                metrics = run_evaluation(self, model, tok, model_name, spec, d)
            atomic_write_json(d / "metrics.json", metrics)

        d = self.stage("evaluate", params, build, "metrics.json")
        return json.loads((d / "metrics.json").read_text())


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


def _data_refs(spec: dict[str, Any]) -> dict[str, str]:
    refs = {}
    for key, value in spec.items():
        if key.endswith("data") or key in ("prefill_from", "harmful", "benign"):
            for i, v in enumerate(value if isinstance(value, list) else [value]):
                refs[f"{key}[{i}]"] = v
    return refs


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, list) else value


def _describe(params: dict[str, Any]) -> str:
    short = {k: (v[:10] if isinstance(v, str) and len(v) == 64 else v) for k, v in params.items()}
    return json.dumps(short, default=str)[:200]
