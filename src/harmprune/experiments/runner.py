"""The experiment runner: one config's cached, resumable stages in one run directory, for the experiments.

Three layers, each its own module: the inputs (:mod:`~harmprune.experiments.inputs`: models, data sets and the
derived ones experiments add), the stage cache (:mod:`~harmprune.experiments.stage_cache`: keys, atomic outputs,
partial-directory cleanup), and the stage functions over both (:mod:`~harmprune.experiments.stages`: score →
select → control → evaluate, own answers, fine-tunes). :class:`Runner` binds them to one run directory and an
executor, and is what experiments receive.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harmprune.data import Record
from harmprune.experiments import stages
from harmprune.experiments.config import Config
from harmprune.experiments.inputs import Inputs
from harmprune.experiments.stage_cache import StageCache
from harmprune.store import Store


class Runner:
    """The stages of one config over one run directory (``inputs``, ``cache`` and ``store`` are public)."""

    def __init__(self, config: Config, out_dir: str | Path, executor=None):
        from harmprune.experiments.executors import LocalExecutor

        self.config = config
        self.executor = executor or LocalExecutor()
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.inputs = Inputs(config)
        self.store = Store(self.out / "results.sqlite", recipe_of_model=self.inputs.recipe_label)
        self.cache = StageCache(self.out, self.store)
        self.results: dict[str, Any] = {}  # what one experiment leaves for the next (e.g. operating points)

    @property
    def stats(self) -> dict[str, int]:
        """Stages computed and reused so far (the ``stages`` entry of summary.json)."""
        return self.cache.stats

    def prefetch(self, calls: list) -> None:
        """Compute a batch of independent stages (:class:`~harmprune.experiments.executors.StageCall`) ahead of
        the sequential code that reads them: a no-op locally, parallel tasks on Ray."""
        self.executor.run(self, calls)

    def worker_state(self) -> dict[str, Any]:
        """What another process needs to act as this runner: the config (with derived models and evaluations)
        and the derived data sets, which exist only in memory."""
        return {"config": self.config, "out": str(self.out), "derived": self.inputs.derived()}

    @classmethod
    def from_worker_state(cls, state: dict[str, Any]) -> "Runner":
        runner = cls(state["config"], state["out"])
        for name, records in state["derived"].items():
            runner.inputs.derived_data(name, records)
        return runner

    # ---------------------------------------------------------------------- inputs (harmprune.experiments.inputs)

    def records(self, data_name: str) -> list[Record]:
        return self.inputs.records(data_name)

    def derived_data(self, name: str, records: list[Record]) -> str:
        return self.inputs.derived_data(name, records)

    def records_subset(self, data_name: str, category: str | list[str] | None = None,
                       exclude: str | list[str] | None = None) -> str:
        return self.inputs.records_subset(data_name, category, exclude)

    def derived_evaluation(self, evaluation: str, **overrides: Any) -> str:
        return self.inputs.derived_evaluation(evaluation, **overrides)

    def register_model(self, name: str, path: str | Path, like: str) -> None:
        self.inputs.register_model(name, path, like)

    # ---------------------------------------------------------------------- stages (harmprune.experiments.stages)

    def scores(self, model_name: str, data_name: str, role: str = "harm", **kwargs: Any) -> Path:
        return stages.scores(self.inputs, self.cache, model_name, data_name, role, **kwargs)

    def masks(self, model_name: str, qs: list[float], ps: list[float], **kwargs: Any) -> dict[tuple[float, float], Path]:
        return stages.masks(self.inputs, self.cache, model_name, qs, ps, **kwargs)

    def mask(self, model_name: str, q: float, p: float, **kwargs: Any) -> Path:
        """Harm set (top-q) minus utility set (top-p) for ``model``, each set scored with its role's recipe."""
        return self.masks(model_name, [q], [p], **kwargs)[(q, p)]

    def control(self, mask_path: Path, kind: str, seed: int, model_name: str, benign_data: str | None = None) -> Path:
        return stages.control(self.inputs, self.cache, mask_path, kind, seed, model_name, benign_data)

    def saved_mask(self, mask, provenance: dict[str, Any]) -> Path:
        return stages.saved_mask(self.cache, mask, provenance)

    def evaluate(self, model_name: str, evaluation: str, mask: Path | None = None) -> dict[str, Any]:
        return stages.evaluate(self.inputs, self.cache, model_name, evaluation, mask)

    def generated_data(self, model_name: str, data_name: str, **kwargs: Any) -> str:
        return stages.generated_data(self.inputs, self.cache, model_name, data_name, **kwargs)

    def record_generation_counts(self, model_name: str, label: str, derived: str, source: str) -> None:
        stages.record_generation_counts(self.inputs, self.cache, model_name, label, derived, source)

    def finetuned(self, model_name: str, data_name: str, **kwargs: Any) -> str:
        return stages.finetuned(self.inputs, self.cache, model_name, data_name, **kwargs)
