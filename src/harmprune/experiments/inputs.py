"""The inputs layer: what a run's stages read, by name, from one config.

Data sets (loaded, sampled and held out as the config says, plus the derived sets experiments make: category
subsets, a model's own answers), models (one kept in memory at a time; content hashes memoised) and the
evaluations (with the derived copies experiments make). Nothing here writes a stage: that is
:mod:`harmprune.experiments.stages`, over :mod:`harmprune.experiments.stage_cache`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from harmprune.data import Record, filter_categories, load_records, records_digest, sample
from harmprune.errors import ConfigError, DataError
from harmprune.experiments.config import Config, Evaluation
from harmprune.experiments.stage_cache import hash_model_source, stable_hash


class Inputs:
    """Memoised models and data sets of one config, and the derived ones experiments add during a run."""

    def __init__(self, config: Config):
        self.config = config
        self._records: dict[str, list[Record]] = {}
        self._model_hashes: dict[str, str] = {}
        self._loaded: tuple[str, Any, Any] | None = None
        self.generation_counts: dict[str, dict[str, Any]] = {}  # derived answer set -> kept/dropped counts

    # ------------------------------------------------------------------------------------------ data

    def records(self, data_name: str) -> list[Record]:
        if data_name not in self._records:
            self._records[data_name] = self._load(data_name)
        return self._records[data_name]

    def _load(self, data_name: str) -> list[Record]:
        spec = self.config.data[data_name]
        if spec.options.get("self_generated"):
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
        return records

    def data_hash(self, data_name: str) -> str:
        return records_digest(self.records(data_name))

    def derived(self) -> dict[str, list[Record]]:
        """The data sets that exist only in memory (made during the run), for a worker process."""
        return {n: r for n, r in self._records.items() if n not in self.config.data}

    def derived_data(self, name: str, records: list[Record]) -> str:
        """Make ``records`` usable wherever a data-set name is (scores, masks, evaluations); return ``name``.

        Every stage keys data by the records' digest, never by name, so a derived set is cached like any other.
        """
        if not records:
            raise DataError(f"derived data set {name!r} is empty")
        if name in self._records and records_digest(self._records[name]) != records_digest(records):
            raise DataError(f"derived data set {name!r} already names different records")
        self._records[name] = list(records)
        return name

    def records_subset(self, data_name: str, category: str | list[str] | None = None,
                       exclude: str | list[str] | None = None) -> str:
        """The records of ``data_name`` in ``category`` and not in ``exclude``, as a derived data set's name."""
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

    # ------------------------------------------------------------------------------------------ models

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

    def fresh_model(self, model_name: str):
        """A copy of ``model`` loaded for changing in place (a fine-tune); the memoised one is not kept."""
        self._loaded = None
        loaded = self.model(model_name)
        self._loaded = None
        return loaded

    def model_format(self, model_name: str) -> str:
        spec = self.config.models.get(model_name)
        return spec.format if spec else "chat"

    def register_model(self, name: str, path: str | Path, like: str) -> None:
        """Make a derived model (e.g. a fine-tuned copy) addressable by name, with ``like``'s settings."""
        self.config.models[name] = replace(self.config.models[like], name=name, path=str(path))

    # ------------------------------------------------------------------------------------------ recipe

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

    # ------------------------------------------------------------------------------------------ evaluations

    def derived_evaluation(self, evaluation: str, **overrides: Any) -> str:
        """A copy of a configured evaluation with some parameters replaced (e.g. its data); return its name."""
        ev = self.config.evaluations[evaluation]
        name = f"{evaluation}@{stable_hash(overrides)[:10]}"
        self.config.evaluations[name] = Evaluation(name, ev.kind, replace(ev.spec, **overrides),
                                                   {**ev.table, **overrides})
        return name

    def eval_inputs(self, model_name: str):
        """What an evaluation of ``model`` reads besides the model: this run's data sets, its format, the seed."""
        from harmprune.experiments.evaluations import EvalInputs

        return EvalInputs(self.records, self.model_format(model_name), self.config.seed,
                          {n: s.path for n, s in self.config.data.items()})


def _as_names(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return sorted({value} if isinstance(value, str) else set(value))
