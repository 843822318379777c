"""Typed specs (issue 15): ``run --check`` refuses, before any work, every bad value of every experiment, evaluation
and judge option, naming the key; evaluation cache keys come from declared data references; the CLI and configs
run evaluations through one function with one set of metric names."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import harmprune
from harmprune.errors import ConfigError
from harmprune.experiments import load_checked_config
from tiny import make_llama, make_tokenizer

SRC = str(Path(harmprune.__file__).resolve().parents[1])

CONFIG = """
name = "specs"
[models.aligned]
path = "model"
[data.harmful]
path = "harm.jsonl"
[data.benign]
path = "benign.jsonl"
[scoring]
harm = "harmful"
utility = "benign"
max_length = 48
[selection]
q = [0.05]
p = [0.01]
[evaluations.harm]
kind = "harm"
data = "harmful"
judge = "refusal"
max_new_tokens = 4
[evaluations.nll]
kind = "likelihood"
data = "harmful"
benign_data = "benign"
[evaluations.recognition]
kind = "recognition"
harmful = "harmful"
benign = "benign"
[experiments.controls]
kinds = ["random"]
seeds = [0]
[experiments.dissociation]
refusal_data = "harmful"
likelihood_evaluation = "nll"
likelihood_metric = "harmful_nll"
recovery_steps = 2
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    d = tmp_path_factory.mktemp("specs")
    tok = make_tokenizer()
    make_llama(len(tok)).save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    harm = [{"prompt": f"make zorb {i}", "response": f"Sure. Step {i}: vex the coil."} for i in range(4)]
    benign = [{"prompt": f"what is {i}+1", "response": str(i + 1)} for i in range(4)]
    (d / "harm.jsonl").write_text("".join(json.dumps(r) + "\n" for r in harm))
    (d / "benign.jsonl").write_text("".join(json.dumps(r) + "\n" for r in benign))
    return d


def write(project: Path, text: str, name: str = "c.toml") -> Path:
    path = project / name
    path.write_text(text)
    return path


def check(config: Path, *extra: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "harmprune", "run", str(config), *extra], capture_output=True,
                          text=True, env=env, cwd=cwd)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith(("INFO ", "WARNING "))]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("harmprune run: error: "), proc.stderr
    return lines[0]


# ---------------------------------------------------------------------------------------------- run --check


def test_the_base_config_passes(project):
    cfg = load_checked_config(write(project, CONFIG))
    assert cfg.experiments["controls"].seeds == [0] and cfg.experiments["dissociation"].recovery_steps == 2


@pytest.mark.parametrize("old, new, key, words", [
    ('kinds = ["random"]', 'kinds = ["randm"]', "experiments.controls.kinds", "'randm' is not one of"),
    ("seeds = [0]", 'seeds = "0, 1"', "experiments.controls.seeds", "must be a list of integers"),
    ("recovery_steps = 2", 'recovery_steps = "thirty"', "experiments.dissociation.recovery_steps",
     "must be an integer"),
    ('judge = "refusal"', 'judge = "refusal"\njudge_base_url = "http://x/v1"', "evaluations.harm.judge_base_url",
     "judge 'refusal' takes no option 'base_url'"),
    ("q = [0.05]", "q = [true]", "selection.q", "must be a number in [0, 1]"),
    ('judge = "refusal"', 'judge = "refusal"\nextra_judges = ["organism"]\n'
     'extra_judge_options = { organism = { min_terms = "two" } }', "evaluations.harm.extra_judge_options.organism."
     "min_terms", "must be an integer"),
])
def test_run_check_refuses_a_bad_value_in_one_line_and_writes_nothing(project, tmp_path, old, new, key, words):
    cfg = write(project, CONFIG.replace(old, new), "bad.toml")
    line = one_error_line(check(cfg, "--check", cwd=tmp_path))
    assert "bad.toml" in line and key in line and words in line, line
    assert not list(tmp_path.iterdir())  # no runs/ directory
    one_error_line(check(cfg, "--out", str(tmp_path / "run")))  # run itself checks before any work
    assert not (tmp_path / "run").exists()


def test_set_overrides_are_read_as_toml_values_and_checked_like_the_file(project):
    cfg = write(project, CONFIG)
    loaded = load_checked_config(cfg, ["experiments.controls.seeds=[1, 2]", "scoring.harm=benign",
                                       "selection.q=1e-5", 'evaluations.harm.judge="refusal"'])
    assert loaded.experiments["controls"].seeds == [1, 2] and loaded.scoring["harm"] == "benign"
    assert loaded.selection["q"] == [1e-5]
    for override, message in [("selection.q=[true]", "selection.q value True must be a number in [0, 1]"),
                              ("scoring.harm=nothing", "scoring.harm"),
                              ("scoring", "--set 'scoring' must be KEY=VALUE"),
                              ("scoring.max_length.x=1", "--set scoring.max_length.x: scoring.max_length is a value"),
                              ("experiments.controls.kinds=[\"randm\"]", "'randm' is not one of")]:
        with pytest.raises(ConfigError, match=_escaped(message)) as e:
            load_checked_config(cfg, [override])
        assert "--set" in str(e.value) and "\n" not in str(e.value)


def test_run_set_from_the_cli_and_the_config_a_run_directory_keeps(project, tmp_path):
    import tomllib

    from harmprune.experiments import _config_as_run
    from harmprune.experiments.config import read_raw_config

    cfg = write(project, CONFIG)
    line = one_error_line(check(cfg, "--check", "--set", "experiments.controls.seeds=abc", cwd=tmp_path))
    assert "experiments.controls.seeds" in line and "--set experiments.controls.seeds=abc" in line, line
    ok = check(cfg, "--check", "--set", "selection.q=[0.01, 0.02]", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    overrides = ["selection.q=[0.01, 0.02]", "scoring.utility_method=signed-snip"]
    text = _config_as_run(cfg, overrides)
    assert "--set scoring.utility_method=signed-snip" in text.splitlines()[2]
    assert tomllib.loads(text) == read_raw_config(cfg, overrides)
    assert tomllib.loads(text)["selection"]["q"] == [0.01, 0.02]
    assert _config_as_run(cfg, []) == cfg.read_text()


@pytest.mark.parametrize("old, new, message", [
    ("[experiments.controls]", '[experiments.controls]\nharm_metric = "harmfulnes"',
     "experiments.controls.harm_metric 'harmfulnes' is not a metric of evaluation 'harm'; did you mean 'harmfulness'"),
    ("likelihood_metric = \"harmful_nll\"", 'likelihood_metric = "nll_gapp"',
     "experiments.dissociation.likelihood_metric 'nll_gapp' is not a metric of evaluation 'nll'"),
    ("max_length = 48", 'max_length = "48"', "scoring.max_length '48' must be an integer"),
    ('judge = "refusal"', 'judge = "refusall"', "evaluations.harm.judge names unknown judge 'refusall'"),
    ('judge = "refusal"', 'judge = "strongreject"\njudge_adapter = "x"',
     "evaluations.harm.judge_adapter: judge 'strongreject' takes no option 'adapter'"),
    ('judge = "refusal"', 'judge = "strongreject"\njudge_timeout = "soon"',
     "evaluations.harm.judge_timeout 'soon' must be a number"),
    ('path = "model"', 'path = "./no-such-model"', "models.aligned.path: ./no-such-model: not a directory"),
    ("recovery_steps = 2", "recovery_steps = true", "experiments.dissociation.recovery_steps True must be an integer"),
    ("recovery_steps = 2", "recovery_lr = [0.1]", "experiments.dissociation.recovery_lr [0.1] must be a number"),
    ("[experiments.controls]", "[experiments.controls]\nq = true", "experiments.controls.q True must be a number"),
    ('kinds = ["random"]', 'kinds = ["benign-task"]', "experiments.controls.benign_task_data: the benign-task "
     "control needs a data set"),
    ("refusal_data = \"harmful\"\n", "", "experiments.dissociation.refusal_data is missing"),
    ('[evaluations.recognition]', '[evaluations.recognitio]', "experiments.dissociation.recognition_evaluation "
     "names unknown evaluation 'recognition'"),  # a default that names nothing in this config
    ("seeds = [0]", "seeds = [0]\nmodels = [\"alligned\"]", "names unknown model 'alligned'; did you mean 'aligned'"),
    ('benign_data = "benign"', 'benign_data = "benign"\nmax_length = 1', "evaluations.nll.max_length 1 must be at least 2"),
    ('kind = "likelihood"', 'kind = "utility"', "evaluations.nll.data: unknown key"),
    ('judge = "refusal"', 'judge = "refusal"\nextra_judge_options = { organism = { min_terms = 2 } }',
     "evaluations.harm.extra_judge_options.organism: 'organism' is not in 'evaluations.harm.extra_judges' (empty)"),
    ('judge = "refusal"', 'judge = "refusal"\nextra_judges = ["organism"]\nextra_judge_options = ["organism"]',
     "evaluations.harm.extra_judge_options must be a table of option tables"),
    ('judge = "refusal"', 'judge = "refusal"\nextra_judges = ["organism"]\n'
     'extra_judge_options = { organism = { min_term = 2 } }', "evaluations.harm.extra_judge_options.organism.min_term: "
     "judge 'organism' takes no option 'min_term'; did you mean 'min_terms'"),
    ('judge = "refusal"', 'judge = "refusal"\nextra_judges = ["organism"]\n'
     'extra_judge_options = { organism = { min_terms = "two" } }',
     "evaluations.harm.extra_judge_options.organism.min_terms 'two' must be an integer"),
])
def test_every_section_is_checked_before_any_work(project, old, new, message):
    cfg = write(project, CONFIG.replace(old, new, 1), "bad.toml")
    with pytest.raises(ConfigError, match=_escaped(message)) as e:
        load_checked_config(cfg)
    assert "\n" not in str(e.value)


def test_configs_reach_every_kind_and_metric(project):
    """lm-eval tasks and the benign refusal rate from a config, accuracy and em kinds, with checked metrics."""
    extra = '''
[evaluations.tasks]
kind = "utility"
lm_eval_tasks = ["arc_easy"]
[evaluations.over_refusal]
kind = "recognition"
harmful = "harmful"
benign = "benign"
benign_refusal = true
[evaluations.answers]
kind = "accuracy"
data = "benign"
match = "contains"
[experiments.compression]
harm_evaluation = "over_refusal"
harm_metric = "benign_refusal_rate"
utility_evaluation = "answers"
'''
    cfg = load_checked_config(write(project, CONFIG + extra, "all.toml"))
    assert cfg.evaluations["tasks"].spec.lm_eval_tasks == ["arc_easy"]
    bad = write(project, (CONFIG + extra).replace('match = "contains"', 'match = "fuzzy"'), "bad.toml")
    with pytest.raises(ConfigError, match="evaluations.answers.match 'fuzzy' is not one of 'exact', 'contains'"):
        load_checked_config(bad)
    no_benign = write(project, (CONFIG + extra).replace("benign_refusal = true\n", ""), "bad2.toml")
    with pytest.raises(ConfigError, match="harm_metric 'benign_refusal_rate' is not a metric of evaluation"):
        load_checked_config(no_benign)


def _escaped(text: str) -> str:
    import re

    return re.escape(text)


# ---------------------------------------------------------------------------------------------- cache keys


def _evaluation_key(project: Path, text: str, evaluation: str) -> dict:
    from harmprune.experiments.runner import Runner

    captured = []
    stub = project / "stub-stage"
    stub.mkdir(exist_ok=True)
    (stub / "metrics.json").write_text("{}")
    runner = Runner(load_checked_config(write(project, text, "key.toml")), project / "key-run")
    runner.inputs.model_hash = lambda name: "model"  # type: ignore[method-assign]
    runner.cache.stage = lambda kind, params, build, done: captured.append(params) or stub  # type: ignore
    runner.evaluate("aligned", evaluation)
    return captured[0]


def test_a_changed_data_set_changes_the_key_whatever_the_field_is_called(project, monkeypatch):
    """An evaluation kind whose data field is not named ``*data`` (``prompts``): before, key names decided what was
    hashed, so changed prompts reused the old result."""
    from harmprune.experiments import evaluations
    from harmprune.specs import param

    @dataclass(frozen=True)
    class EchoSpec:
        prompts: str = param(ref="data")

    monkeypatch.setitem(evaluations.EVALUATIONS._entries, "echo",
                        evaluations.EvaluationKind(EchoSpec, lambda *a: {}, lambda s: None))
    (project / "prompts.jsonl").write_text(json.dumps({"prompt": "one", "response": "a"}) + "\n")
    text = CONFIG + '[data.questions]\npath = "prompts.jsonl"\n[evaluations.echo]\nkind = "echo"\nprompts = "questions"\n'
    before = _evaluation_key(project, text, "echo")
    (project / "prompts.jsonl").write_text(json.dumps({"prompt": "two", "response": "a"}) + "\n")
    after = _evaluation_key(project, text, "echo")
    assert set(before["data"]) == {"prompts[0]"} and before["data"] != after["data"]
    # recognition's harmful/benign sets are found by declaration too, not by a list of names
    recognition = _evaluation_key(project, CONFIG, "recognition")
    assert set(recognition["data"]) == {"harmful[0]", "benign[0]"}


def test_extra_judges_take_options_that_reach_the_judge_and_the_key(project, monkeypatch):
    """``extra_judge_options`` gives each extra judge its options, checked like ``judge_<option>``; a relative
    grader path is found next to the config, and the options and the grader's files are part of the key."""
    from harmprune.experiments import evaluations

    base = CONFIG.replace('judge = "refusal"', 'judge = "refusal"\nextra_judges = ["organism", "hf-judge"]')
    text = base.replace('extra_judges = ["organism", "hf-judge"]', 'extra_judges = ["organism", "hf-judge"]\n'
                        'extra_judge_options = { organism = { min_terms = 3 }, hf-judge = { model = "model" } }')
    spec = load_checked_config(write(project, text, "extra.toml")).evaluations["harm"].spec
    assert spec.extra_judge_options == {"organism": {"min_terms": 3},
                                        "hf-judge": {"model": str((project / "model").resolve())}}
    assert evaluations.judge_files(spec) == {"extra_judge_hf-judge_model": str((project / "model").resolve())}
    assert _evaluation_key(project, text, "harm") != _evaluation_key(project, base, "harm")
    made = []
    monkeypatch.setattr("harmprune.judges.get_judge", lambda name, **o: made.append((name, o)) or name)
    monkeypatch.setattr("harmprune.evals.harm.evaluate_harm", lambda *a, **k: ({}, []))
    evaluations._harm(spec, None, None, type("Inputs", (), {"records": lambda self, n: [], "fmt": "chat",
                                                            "seed": 0})(), project)
    assert made[1:] == [("organism", {"min_terms": 3}), ("hf-judge", {"model": str((project / "model").resolve())})]


def test_evaluation_keys_hash_the_table_as_written(project):
    """Defaults filled in by the spec are not in the key, so keys of configs written before the specs stay."""
    key = _evaluation_key(project, CONFIG, "harm")
    assert key["evaluation"] == {"kind": "harm", "data": "harmful", "judge": "refusal", "max_new_tokens": 4}
    assert set(key["data"]) == {"data[0]"}


# ---------------------------------------------------------------------------------------------- one path


def test_cli_and_config_give_the_same_metrics_by_the_same_function(project, tmp_path):
    from harmprune.cli import main
    from harmprune.experiments.runner import Runner

    out = tmp_path / "cli"
    assert main(["eval", "likelihood", "--model", str(project / "model"), "--data", str(project / "harm.jsonl"),
                 "--benign", str(project / "benign.jsonl"), "--format", "chat", "--out", str(out)]) == 0
    cli = json.loads((out / "metrics.json").read_text())
    runner = Runner(load_checked_config(write(project, CONFIG, "same.toml")), tmp_path / "run")
    config = runner.evaluate("aligned", "nll")
    assert set(config) <= set(cli)
    assert all(cli[k] == pytest.approx(v) for k, v in config.items())


def test_the_cli_checks_judge_options_against_the_chosen_judge(project, tmp_path, capsys):
    from harmprune.cli import main

    out = tmp_path / "harm"
    assert main(["eval", "harm", "--model", str(project / "model"), "--prompts", str(project / "harm.jsonl"),
                 "--judge", "refusal", "--judge-base-url", "http://x/v1", "--out", str(out)]) == 2
    assert "judge 'refusal' takes no option 'base_url'" in capsys.readouterr().err and not out.exists()
