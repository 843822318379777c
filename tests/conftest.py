"""Shared pytest fixtures."""

from __future__ import annotations

import pytest
import torch

# Tests use tiny models: one thread is several times faster than two for their small matrices (no OpenMP
# barrier waits), and keeps the suite fast on a shared 2-core machine.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_organism(tmp_path_factory):
    """The tiny model organism (aligned/, unaligned/, data/): built once into harmprune's cache, then copied."""
    from harmprune.organisms import build_organism

    return build_organism(tmp_path_factory.mktemp("organism"), size="tiny", seed=0)


@pytest.fixture
def built_artefacts(tmp_path, monkeypatch):
    """Stand-ins for the artefacts shipped configs name and a command builds (the harm-classifier directory of
    `harmprune judge train-harm-classifier`), found from the current directory: paths resolve against the
    config's folder, then the current one."""
    (tmp_path / "runs" / "harm-classifier").mkdir(parents=True)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
