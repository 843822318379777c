"""Sweeps select every (q, p) from one read of the score files: the CLI's several --q/--p and the runner's grid."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

import harmprune.selection as selection
from harmprune.experiments import load_checked_config
from harmprune.experiments.runner import Runner
from harmprune.selection import load_mask, select
from harmprune.tensorfile import TensorFile, save_tensors
from test_runner import project, write_config  # noqa: F401 - the fixture is shared

SRC = str(Path(__file__).resolve().parents[1] / "src")


def harmprune(*argv) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC}
    return subprocess.run([sys.executable, "-m", "harmprune", *map(str, argv)], capture_output=True, text=True,
                          env=env, check=False)


def score_files(d: Path) -> tuple[Path, Path]:
    g = torch.Generator().manual_seed(0)
    harm = {f"model.layers.{i}.mlp.w": torch.randint(-4, 5, (30, 20), generator=g).float() for i in range(3)}
    util = {n: torch.randn(t.shape, generator=g) for n, t in harm.items()}
    save_tensors(harm, d / "h.safetensors", {"method": "signed-snip"})
    save_tensors(util, d / "u.safetensors", {"method": "snip"})
    return d / "h.safetensors", d / "u.safetensors"


def test_cli_select_writes_a_sweep_from_one_call(tmp_path):
    h, u = score_files(tmp_path)
    proc = harmprune("select", "--harm", h, "--utility", u, "--q", "0.1", "0.3", "--p", "0", "0.05",
                     "--granularity", "global", "--device", "cpu", "--out", tmp_path / "m_{q}_{p}.safetensors")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("wrote ") == 4
    for q in (0.1, 0.3):
        for p in (0.0, 0.05):
            mask = load_mask(tmp_path / f"m_{q:g}_{p:g}.safetensors")
            want = select(TensorFile(h), TensorFile(u), q, p, "global")
            assert mask.indices.keys() == want.indices.keys()
            assert all(torch.equal(mask.indices[n], want.indices[n]) for n in want.indices)
            assert mask.metadata["q"] == q and mask.metadata["p"] == p


def test_cli_select_sweep_needs_a_placeholder(tmp_path):
    h, u = score_files(tmp_path)
    proc = harmprune("select", "--harm", h, "--q", "0.1", "0.3", "--out", tmp_path / "m.safetensors")
    assert proc.returncode != 0
    assert "{q}" in proc.stderr and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "m.safetensors").exists()


def test_runner_selects_a_grid_once_and_caches_each_point(project, tmp_path, monkeypatch):  # noqa: F811
    runner = Runner(load_checked_config(write_config(project)), tmp_path / "run")
    calls = []
    real = selection.select_grid

    def counting(*args, **kwargs):
        calls.append(args[2:4])
        return real(*args, **kwargs)

    monkeypatch.setattr(selection, "select_grid", counting)
    qs, ps = [0.01, 0.05, 0.2], [0.0, 0.01]
    paths = runner.masks("aligned", qs, ps)
    assert len(calls) == 1 and list(paths) == [(q, p) for p in ps for q in qs]
    harm = TensorFile(runner.scores("aligned", "harmful"))
    util = TensorFile(runner.scores("aligned", "benign"))
    for (q, p), path in paths.items():
        mask = load_mask(path)
        want = select(harm, util if p > 0 else None, q, p)
        assert all(torch.equal(mask.indices[n], want.indices[n]) for n in want.indices), (q, p)
        assert mask.metadata["utility_method"] == (None if p == 0 else "signed-snip")
        assert mask.metadata["utility_sha256"] == (util.sha256() if p > 0 else "")
    calls.clear()
    assert runner.mask("aligned", 0.05, 0.01) == paths[(0.05, 0.01)]  # the same cached stage
    assert runner.masks("aligned", qs, ps) == paths and not calls  # all cached: nothing selected again
