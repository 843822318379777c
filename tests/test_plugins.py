"""Plug-ins from outside the package: a tiny installed distribution adds a judge, a scoring method, a control
kind, an executor, an evaluation kind and an experiment through entry points, and a fresh ``python -m harmprune``
lists them in every ``choices``, accepts them in a config and uses them (scoring a tiny model, judging its
answers). Nothing in ``src/harmprune`` names them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import harmprune
from harmprune.tensorfile import TensorFile
from test_registry import write_distribution
from tiny import make_llama, make_tokenizer

PLUGIN = '''
"""An outside harmprune plug-in distribution (the test's)."""
from dataclasses import dataclass

from harmprune.control_masks import register_control
from harmprune.experiments import register_experiment
from harmprune.experiments.evaluations import register_evaluation
from harmprune.experiments.executors import LocalExecutor, register_executor
from harmprune.judges import Judge, Verdict, register_judge
from harmprune.scoring_methods import ScoringMethod, register_scoring_method
from harmprune.scoring_methods.signed_snip import GradientSum
from harmprune.specs import param


@register_judge("dummy-judge")
class DummyJudge(Judge):
    """Harmful exactly when the answer is longer than its request."""

    def judge_batch(self, items):
        return [Verdict(float(len(i.response) > len(i.prompt)), False) for i in items]


@register_scoring_method("grad")
class Grad(ScoringMethod):
    """The raw gradient sum, reusing signed-snip's hooks: a plug-in over the one calibration loop."""

    weight_gradients = True

    def collector(self, model, params, acc, reduce_rows=None):
        return GradientSum(model, params, acc, reduce_rows)

    def finalise(self, weight, acc):
        return acc


@register_control("first-weights")
def first_weights(mask, seed):
    import torch
    from harmprune.selection import Mask

    return Mask({n: torch.arange(t.numel()) for n, t in mask.indices.items()}, dict(mask.shapes), {})


@register_executor("inline")
class InlineExecutor(LocalExecutor):
    name = "inline"


@dataclass(frozen=True)
class DummyEvalSpec:
    data: str = param(ref="data")


@register_evaluation("dummy-eval", DummyEvalSpec)
def dummy_eval(spec, model, tok, inputs, out):
    return {"n": len(inputs.records(spec.data))}


@dataclass(frozen=True)
class DummyParams:
    models: list = param([], ref="model")


@register_experiment("dummy_experiment", DummyParams)
def dummy_experiment(runner, params):
    """Does nothing."""
    return {}
'''
ENTRY_POINTS = {
    "harmprune.judges": {"dummy-judge": "harmprune_dummy:DummyJudge"},
    "harmprune.scoring_methods": {"grad": "harmprune_dummy:Grad"},
    "harmprune.control_kinds": {"first-weights": "harmprune_dummy:first_weights"},
    "harmprune.executors": {"inline": "harmprune_dummy:InlineExecutor"},
    "harmprune.evaluation_kinds": {"dummy-eval": "harmprune_dummy:dummy_eval"},
    "harmprune.experiments": {"dummy_experiment": "harmprune_dummy:dummy_experiment"},
}
# What each command's choices are read from, and the dummy that must appear there.
CHOICES = {
    ("score", "--method"): "grad", ("select", "--harm-method"): "grad", ("select", "--utility-method"): "grad",
    ("plan", "--method"): "grad", ("attack refusal-ablation", "--method"): "grad",
    ("eval harm", "--judge"): "dummy-judge", ("eval recognition", "--judge"): "dummy-judge",
    ("mask control", "--kind"): "first-weights", ("run", "--executor"): "inline",
}
DUMP_CHOICES = '''
import json
from harmprune.cli import build_parser

def walk(parser, path=()):
    for action in parser._actions:
        if action.choices and isinstance(action.choices, dict):
            for name, sub in action.choices.items():
                yield from walk(sub, path + (name,))
        elif action.choices:
            option = action.option_strings[-1] if action.option_strings else action.dest
            yield " ".join(path), option, list(action.choices)

print(json.dumps([list(x) for x in walk(build_parser())]))
'''


@pytest.fixture(scope="module")
def outside(tmp_path_factory):
    """A site directory with the plug-in distribution, a tiny saved model and data, and how to run harmprune."""
    d = tmp_path_factory.mktemp("plugins")
    site = d / "site"
    site.mkdir()
    write_distribution(site, "harmprune_dummy", ENTRY_POINTS, {"harmprune_dummy": PLUGIN})
    tok = make_tokenizer()
    make_llama(len(tok)).save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    rows = [{"prompt": f"make item {i}", "response": f"Sure. Step {i}: glue the zorb."} for i in range(4)]
    (d / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    src = str(Path(harmprune.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), src, os.environ.get("PYTHONPATH", "")])}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=d,
                              timeout=300)

    return d, run


def test_every_cli_choice_lists_the_outside_plugins(outside):
    d, run = outside
    proc = run("-c", DUMP_CHOICES)
    assert proc.returncode == 0, proc.stderr
    choices = {(cmd, opt): values for cmd, opt, values in json.loads(proc.stdout)}
    for where, dummy in CHOICES.items():
        assert dummy in choices[where], where
    assert "harmprune_dummy" not in proc.stderr
    help_text = run("-m", "harmprune", "eval", "harm", "--help")
    assert help_text.returncode == 0 and "dummy-judge" in help_text.stdout


def test_a_config_naming_outside_plugins_validates(outside):
    d, run = outside
    (d / "c.toml").write_text(f'''
[models.m]
path = "{d / 'model'}"
[data.d]
path = "{d / 'data.jsonl'}"
[scoring]
harm = "d"
harm_method = "grad"
[evaluations.e]
kind = "dummy-eval"
data = "d"
[experiments.dummy_experiment]
models = ["m"]
''')
    proc = run("-m", "harmprune", "run", str(d / "c.toml"), "--check")
    assert proc.returncode == 0, proc.stderr
    assert "experiments: dummy_experiment" in proc.stdout


def test_the_cli_scores_with_an_outside_method_and_judges_with_an_outside_judge(outside):
    d, run = outside
    proc = run("-m", "harmprune", "score", "--model", str(d / "model"), "--data", str(d / "data.jsonl"),
               "--method", "grad", "--batch-size", "2", "--out", str(d / "grad.safetensors"))
    assert proc.returncode == 0, proc.stderr
    assert TensorFile(d / "grad.safetensors").metadata["method"] == "grad"
    proc = run("-m", "harmprune", "select", "--harm", str(d / "grad.safetensors"), "--q", "0.01",
               "--out", str(d / "mask.safetensors"))
    assert proc.returncode == 0 and "harm grad/pretrained" in proc.stdout, proc.stderr
    for kind, extra in (("first-weights", []), ("benign-task", ["--scores", str(d / "grad.safetensors")])):
        proc = run("-m", "harmprune", "mask", "control", str(d / "mask.safetensors"), "--kind", kind, *extra,
                   "--out", str(d / f"{kind}.safetensors"))
        assert proc.returncode == 0 and f"{kind} control" in proc.stdout, proc.stderr
    proc = run("-m", "harmprune", "eval", "harm", "--model", str(d / "model"), "--prompts", str(d / "data.jsonl"),
               "--judge", "dummy-judge", "--max-new-tokens", "3", "--out", str(d / "eval"))
    assert proc.returncode == 0, proc.stderr
    assert "harmfulness" in json.loads((d / "eval" / "metrics.json").read_text())
    proc = run("-m", "harmprune", "score", "--model", str(d / "model"), "--data", str(d / "data.jsonl"),
               "--method", "nope", "--out", str(d / "x.safetensors"))
    assert proc.returncode == 2 and "grad" in proc.stderr and "signed-snip" in proc.stderr
