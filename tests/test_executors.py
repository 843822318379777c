"""Executors: the runner's independent stages as Ray tasks give the same run as the local executor."""

from __future__ import annotations

import json
import os
import socket

import pytest

from harmprune.errors import ConfigError, HarmpruneError
from harmprune.experiments import load_checked_config, run_config
from harmprune.experiments.executors import LocalExecutor, StageCall, make_executor
from harmprune.experiments.runner import Runner
from test_runner import project, write_config  # noqa: F401 - the fixture is shared


def test_stage_calls_compare_by_value_and_name_themselves():
    from pathlib import Path

    a = StageCall.of("evaluate", "aligned", "harm", Path("/m/mask.safetensors"))
    b = StageCall.of("evaluate", "aligned", "harm", "/m/mask.safetensors")
    assert a == b and len({a, b}) == 1
    assert str(StageCall.of("scores", "m", "d", method="snip")) == "scores('m', 'd', method='snip')"
    assert isinstance(make_executor("local"), LocalExecutor)
    with pytest.raises(ConfigError, match="unknown executor 'dask'"):
        make_executor("dask")


def test_stage_finished_by_another_process_is_kept_and_dead_partials_are_removed(project, tmp_path):
    runner = Runner(load_checked_config(write_config(project)), tmp_path / "run")
    host = socket.gethostname().replace("-", "_")

    def racing_build(d):
        (d / "out.txt").write_text("mine")
        other = d.parent / d.name.split(".partial")[0]  # another worker renames its result into place meanwhile
        other.mkdir()
        (other / "out.txt").write_text("theirs")

    final = runner.cache.stage("mask", {"x": 1}, racing_build, "out.txt")
    assert (final / "out.txt").read_text() == "theirs" and runner.stats["reused"] == 1
    assert not list(final.parent.glob("*.partial*"))

    from harmprune.experiments.stage_cache import STAGE_VERSIONS, stable_hash

    key = stable_hash({"kind": "mask", "v": STAGE_VERSIONS["mask"], "x": 2})[:20]
    dead = final.parent / f"{key}.partial-{host}-999999999-deadbeef"  # a killed run's leftover
    live = final.parent / f"{key}.partial-{host}-{os.getpid()}-cafecafe"  # a live process's build: kept
    other_dead = final.parent / f"{'0' * 20}.partial-{host}-999999999-deadbeef"  # another stage's, never rebuilt
    dead.mkdir()
    live.mkdir()
    other_dead.mkdir()
    runner.cache.stage("mask", {"x": 2}, lambda d: (d / "out.txt").write_text("x"), "out.txt")
    assert not dead.exists() and not other_dead.exists() and live.exists()
    live.rmdir()

    with pytest.raises(RuntimeError):  # a failing build leaves nothing behind
        runner.cache.stage("mask", {"x": 4}, lambda d: (_ for _ in ()).throw(RuntimeError("boom")), "out.txt")
    assert not [p for p in final.parent.iterdir() if ".partial" in p.name]


@pytest.fixture(scope="module")
def ray_instance():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield ray
    ray.shutdown()


def test_ray_executor_gives_the_local_run_and_computes_stages_in_workers(project, tmp_path, ray_instance):
    cfg = write_config(project)
    local = json.loads((run_config(cfg, tmp_path / "local") / "summary.json").read_text())
    out = run_config(cfg, tmp_path / "ray", executor="ray", num_cpus=1)
    remote = json.loads((out / "summary.json").read_text())

    def stripped(summary):  # paths differ by run directory only
        return json.loads(json.dumps(summary["experiments"]).replace(str(tmp_path / "local"), "RUN")
                          .replace(str(tmp_path / "ray"), "RUN"))

    assert stripped(remote) == stripped(local)
    assert remote["stages"]["computed"] == local["stages"]["computed"]
    names = {r: {k: sorted(p.name for p in (tmp_path / r / "stages" / k).iterdir()) for k in ("scores", "evaluate")}
             for r in ("local", "ray")}
    assert names["ray"]["scores"] == names["local"]["scores"]  # the same cache keys (masks name their run's files)
    assert len(names["ray"]["evaluate"]) == len(names["local"]["evaluate"])
    for kind in ("scores", "evaluate"):  # computed by Ray workers, not by the driver
        pids = {json.loads((p / "stage.json").read_text())["pid"] for p in (out / "stages" / kind).iterdir()}
        assert os.getpid() not in pids and len(pids) >= 1

    again = json.loads((run_config(cfg, tmp_path / "ray", executor="ray") / "summary.json").read_text())
    assert again["stages"]["computed"] == 0


def test_ray_failure_names_the_stage_and_keeps_the_finished_ones(project, tmp_path, ray_instance):
    runner = Runner(load_checked_config(write_config(project)), tmp_path / "run",
                    executor=make_executor("ray", num_cpus=1))
    good = StageCall.of("evaluate", "aligned", "nll", None)
    bad = StageCall.of("evaluate", "aligned", "no-such-evaluation", None)
    with pytest.raises(HarmpruneError, match=r"1 of 2 Ray stage task\(s\) failed[\s\S]*no-such-evaluation"):
        runner.prefetch([good, bad, good])
    assert len(list((tmp_path / "run" / "stages" / "evaluate").iterdir())) == 1
    assert runner.stats == {"computed": 1, "reused": 0}  # counted by the worker
    runner.evaluate("aligned", "nll")  # the driver finds the worker's result
    assert runner.stats == {"computed": 1, "reused": 1}
