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
