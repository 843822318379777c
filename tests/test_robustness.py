"""Bad input as a new user would give it: each case is one clear line on stderr, exit code 2, nothing written.

Every CLI case runs ``python -m harmprune`` in a fresh process, so what is checked is what a user sees: the exit
code, a single ``harmprune <command>: error: ...`` line (no traceback), and no file at ``--out``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import harmprune
from tiny import make_llama, make_tokenizer

SRC = str(Path(harmprune.__file__).resolve().parents[1])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("robust")
    tok = make_tokenizer()
    model = make_llama(len(tok))
    model.save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    raw_tok = make_tokenizer()
    raw_tok.chat_template = None
    model.save_pretrained(d / "raw-model")
    raw_tok.save_pretrained(d / "raw-model")
    rows = [{"messages": [{"role": "user", "content": f"make item {i}"},
                          {"role": "assistant", "content": f"Sure. Step {i}: glue the zorb."}]} for i in range(4)]
    (d / "harm.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def cli(*argv, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "harmprune", *map(str, argv)], capture_output=True, text=True,
                          env=env, cwd=cwd)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str, out: Path | None = None) -> str:
    """Exit code 2, exactly one non-empty stderr line of the CLI's error form naming each needle, no --out file."""
    lines = [line for line in proc.stderr.splitlines()
             if line.strip() and not line.startswith(("INFO ", "WARNING ")) and "%|" not in line]  # logs, bars
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and ": error: " in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    if out is not None:
        assert not out.exists() and not list(out.parent.glob(f".{out.name}*")), list(out.parent.iterdir())
    return lines[0]


# ---------------------------------------------------------------------------------------------- (a) errors


def test_chat_format_without_a_chat_template_is_one_line(workdir):
    out = workdir / "x.safetensors"
    proc = cli("score", "--model", workdir / "raw-model", "--data", workdir / "harm.jsonl", "--method", "snip",
               "--format", "chat", "--out", out)
    assert_one_line_error(proc, "chat template", "--format raw", out=out)


def test_a_missing_command_module_is_not_skipped(monkeypatch):
    from harmprune import cli as cli_module

    monkeypatch.setattr(cli_module, "COMMAND_MODULES", (*cli_module.COMMAND_MODULES, "no_such_group"))
    with pytest.raises(ModuleNotFoundError, match="no_such_group"):
        cli_module.build_parser()


def test_runner_user_errors_are_harmprune_errors(tmp_path):
    from harmprune.errors import ConfigError, DataError
    from harmprune.experiments.config import load_config
    from harmprune.experiments.runner import Runner
    from harmprune.organisms.build import OrganismPaths
    from harmprune.selection import Mask, save_mask

    (tmp_path / "c.toml").write_text('[models.m]\npath = "org/model"\n')
    runner = Runner(load_config(tmp_path / "c.toml"), tmp_path / "run")
    runner.model_hash = lambda name: "h"  # type: ignore[method-assign]  # no model is loaded before the error
    name = "w"
    mask = save_mask(Mask({name: torch.tensor([0])}, {name: (2, 2)}), tmp_path / "m.safetensors")
    with pytest.raises(ConfigError, match="unknown control kind 'randm'"):
        runner.control(mask, "randm", 0, "m")
    with pytest.raises(ConfigError, match="benign_data"):
        runner.control(mask, "benign-task", 0, "m")
    from harmprune.data import Record

    runner.derived_data("d", [Record("a", "b")])
    with pytest.raises(DataError, match="already names different records"):
        runner.derived_data("d", [Record("a", "c")])
    with pytest.raises(ConfigError, match="unknown organism split"):
        OrganismPaths(tmp_path).split("tset")
