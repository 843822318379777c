"""Where the runner's stages run: in this process (``local``) or as tasks on a Ray cluster (``ray``).

Experiments are plain sequential code over the runner's cached stages. Before a batch of stages that do not
depend on each other (the score files of several data sets, the evaluations of every point of a sweep) an
experiment hands the batch to :meth:`Runner.prefetch`. The local executor does nothing there, so each stage is
computed when the sequential code reaches it. The Ray executor runs the batch as Ray tasks with the configured
resource requests; each task rebuilds a runner on the same run directory and computes its stage into the shared
content-hash cache, so the sequential code afterwards only reads cached outputs. A failed task leaves no output
(stages are written atomically): the error names the stage, and rerunning the config computes only what is missing.

On a multi-node cluster the run directory must be on a file system every node sees. Another executor is a class
registered with ``@register_executor(name)`` (here, or in a module named by an entry point in the group
``harmprune.executors``) whose instances have ``run(runner, calls)`` and ``close()``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

from harmprune.errors import ConfigError, HarmpruneError
from harmprune.registry import Registry

log = logging.getLogger(__name__)

EXECUTORS: Registry[type] = Registry("executor", "harmprune.executors", "register_executor", [__name__], ConfigError)


def register_executor(name: str) -> Callable[[type], type]:
    return EXECUTORS.register(name)


@dataclass(frozen=True)
class StageCall:
    """One call of a runner stage method (``scores``, ``mask``, ``control``, ``evaluate``, ...) with its args."""

    method: str
    args: tuple = ()
    kwargs: tuple = ()  # sorted (name, value) pairs, so equal calls hash equal

    @classmethod
    def of(cls, method: str, /, *args: Any, **kwargs: Any) -> "StageCall":
        return cls(method, tuple(str(a) if isinstance(a, Path) else a for a in args), tuple(sorted(kwargs.items())))

    def run(self, runner) -> Any:
        return getattr(runner, self.method)(*self.args, **dict(self.kwargs))

    def __str__(self) -> str:
        args = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs]
        return f"{self.method}({', '.join(args)})"


@register_executor("local")
class LocalExecutor:
    """Stages run in this process, in order, when the experiment reaches them."""

    name = "local"

    def run(self, runner, calls: list[StageCall]) -> None:
        return None

    def close(self) -> None:
        return None


@register_executor("ray")
@dataclass
class RayExecutor:
    """Independent stages as Ray tasks, each asking for ``num_cpus`` CPUs and ``num_gpus`` GPUs.

    ``address`` is passed to ``ray.init`` (None: join ``RAY_ADDRESS`` if set, else start a local instance).
    """

    address: str | None = None
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    max_retries: int = 0
    init_kwargs: dict[str, Any] = field(default_factory=dict)
    name: ClassVar[str] = "ray"
    _started: bool = field(default=False, init=False, repr=False)

    def _ray(self):
        try:
            import ray
        except ImportError as e:
            raise ConfigError("--executor ray needs Ray: pip install 'harmprune[ray]'") from e
        if not ray.is_initialized():
            ray.init(address=self.address, include_dashboard=False, log_to_driver=False, **self.init_kwargs)
            self._started = True
        return ray

    def run(self, runner, calls: list[StageCall]) -> None:
        calls = list(dict.fromkeys(calls))
        if not calls:
            return
        ray = self._ray()
        task = ray.remote(_run_stage).options(num_cpus=self.num_cpus, num_gpus=self.num_gpus,
                                              max_retries=self.max_retries)
        state = runner.worker_state()
        state_ref = ray.put(state)
        log.info("ray: %d stage(s) as tasks (%g CPU, %g GPU each)", len(calls), self.num_cpus, self.num_gpus)
        rebuild = type(runner).from_worker_state
        refs = {task.remote(rebuild, state_ref, call): call for call in calls}
        failures = []
        pending = list(refs)
        while pending:  # wait for every task, so one failure does not discard the others' finished stages
            done, pending = ray.wait(pending, num_returns=1)
            try:
                stats = ray.get(done[0])
                for k, v in stats.items():
                    runner.stats[k] = runner.stats.get(k, 0) + v
            except Exception as e:  # noqa: BLE001 - reported below with the stage it belongs to
                failures.append(f"{refs[done[0]]}: {_root_cause(e)}")
        if failures:
            raise HarmpruneError(f"{len(failures)} of {len(calls)} Ray stage task(s) failed (finished stages are "
                                 "cached; rerun to retry the rest):\n  " + "\n  ".join(failures))

    def close(self) -> None:
        if self._started:
            import ray

            ray.shutdown()
            self._started = False


def make_executor(name: str = "local", **options: Any):
    """The executor called ``name`` with the ``options`` that are given (Ray: address, num_cpus, num_gpus,
    max_retries; local: none)."""
    return EXECUTORS.get(name)(**{k: v for k, v in options.items() if v is not None})


def _run_stage(rebuild: Callable[[dict[str, Any]], Any], state: dict[str, Any], call: StageCall) -> dict[str, int]:
    """Ray task body: a runner rebuilt on the shared run directory computes (or finds) one stage.

    ``rebuild`` (the runner class's ``from_worker_state``) comes with the task, so this module does not import
    the runner, which imports it."""
    runner = rebuild(state)
    call.run(runner)
    return dict(runner.stats)


def _root_cause(error: BaseException) -> str:
    cause = getattr(error, "cause", None) or error  # RayTaskError wraps the task's own exception
    return f"{type(cause).__name__}: {cause}".splitlines()[0][:500]
