"""Every shipped config validates (needs ../shared, where the configs' data sets live)."""

from __future__ import annotations

from pathlib import Path

import pytest

from harmprune.experiments import load_checked_config

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


@pytest.mark.skipif(not SHARED.exists(), reason="../shared/data is not present")
@pytest.mark.parametrize("config", sorted((ROOT / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_config_is_valid(config, built_artefacts):
    cfg = load_checked_config(config)
    assert cfg.experiments and cfg.models
