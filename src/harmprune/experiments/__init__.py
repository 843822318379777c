"""Experiments: each composes the runner's cached stages into one claim of the study.

An experiment is a function ``run(runner, params) -> summary`` registered under a name with the spec of its
parameters (a dataclass, :mod:`harmprune.specs`): ``@register_experiment(name, ParamsClass)`` in one module of this
package, or in another distribution's module named by an entry point in the group ``harmprune.experiments``. The
config's ``[experiments.<name>]`` tables choose which run and with what, and each table is checked against its spec
before any experiment starts. :func:`run_config` validates the whole config first, runs the experiments in the
order the config lists them, and writes ``summary.json`` and the report.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from harmprune.registry import Registry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Experiment:
    name: str
    params: type  # the dataclass of its parameters; ``run`` gets an instance
    run: Callable[..., dict[str, Any]]
    description: str


EXPERIMENTS: Registry[Experiment] = Registry("experiment", "harmprune.experiments", "register_experiment", [__name__])


def register_experiment(name: str, params: type, description: str = ""):
    def deco(fn: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
        EXPERIMENTS.add(name, Experiment(name, params, fn, description or (fn.__doc__ or "").strip()), source=fn)
        return fn

    return deco


def experiments() -> dict[str, Experiment]:
    return {name: EXPERIMENTS.get(name) for name in EXPERIMENTS.names()}


def load_checked_config(path: str | Path, overrides: Sequence[str] = ()):
    """Load a config (``overrides``: ``KEY=VALUE`` strings, as ``run --set`` takes them) and validate it against
    the registered experiments, evaluation kinds and judges."""
    from harmprune.experiments.config import load_config

    return load_config(path, overrides)


def run_config(path: str | Path, out_dir: str | Path | None = None, executor: str = "local",
               only: list[str] | None = None, overrides: Sequence[str] = (), **executor_options: Any) -> Path:
    """Run the experiments a config lists (or those named in ``only``, in the config's order); return the run
    directory (with summary.json and the report). ``overrides`` (``KEY=VALUE``) change the config's values; the
    run directory's config.toml is then the config as run, with the overrides in its header.

    ``executor`` is where independent stages run (:mod:`harmprune.experiments.executors`: ``local`` or ``ray``,
    with ``executor_options`` such as ``address``, ``num_cpus``, ``num_gpus``).
    """
    from harmprune.environment import describe as describe_environment
    from harmprune.errors import ConfigError
    from harmprune.experiments.executors import make_executor
    from harmprune.experiments.runner import Runner
    from harmprune.io import atomic_write_json, atomic_write_text

    config = load_checked_config(path, overrides)
    if only:
        unknown = [name for name in only if name not in config.experiments]
        if unknown:
            raise ConfigError(f"{path}: no experiment {', '.join(map(repr, unknown))} in this config "
                              f"(it has: {', '.join(config.experiments)})")
        config.experiments = {k: v for k, v in config.experiments.items() if k in only}
    out = Path(out_dir) if out_dir else Path("runs") / config.name
    runner = Runner(config, out, executor=make_executor(executor, **executor_options))
    atomic_write_text(out / "config.toml", _config_as_run(path, overrides))
    atomic_write_json(out / "environment.json", describe_environment())
    summary: dict[str, Any] = {"name": config.name, "experiments": {}}
    try:
        for name, params in config.experiments.items():
            log.info("experiment %s", name)
            summary["experiments"][name] = EXPERIMENTS.get(name).run(runner, params)
            atomic_write_json(out / "summary.json", {**summary, **_headline(summary)})
    finally:
        runner.executor.close()
    summary.update(_headline(summary))
    summary["stages"] = dict(runner.stats)
    atomic_write_json(out / "summary.json", summary)
    from harmprune.report import build_report

    build_report(out)
    return out


def _config_as_run(path: str | Path, overrides: Sequence[str]) -> str:
    """The config text a run directory keeps: the file itself, or with overrides, the tables they produced."""
    text = Path(path).read_text(encoding="utf-8")
    if not overrides:
        return text
    import tomli_w

    from harmprune.experiments.config import read_raw_config

    header = [f"# {path} run with:", *(f"#   --set {o}" for o in overrides),
              "# (relative paths resolve against the original file's directory)", ""]
    return "\n".join(header) + tomli_w.dumps(read_raw_config(path, overrides))


def _headline(summary: dict[str, Any]) -> dict[str, Any]:
    """The flat top-level keys each experiment contributes (e.g. ``harm_reduction``)."""
    flat: dict[str, Any] = {}
    for result in summary["experiments"].values():
        flat.update(result.get("headline", {}))
    return flat
