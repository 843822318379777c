"""The experiment runner: config validation, caching, resuming, the store, and the report."""

from __future__ import annotations

import json
import sqlite3

import pytest
import torch

from harmprune.cli import main
from harmprune.errors import ConfigError
from harmprune.experiments import load_checked_config, run_config
from tiny import make_llama, make_tokenizer


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    d = tmp_path_factory.mktemp("runner")
    tok = make_tokenizer()
    for name, seed in (("aligned", 0), ("unaligned", 1)):
        model = make_llama(len(tok), seed=seed)
        model.save_pretrained(d / name)
        tok.save_pretrained(d / name)
    harm = [{"messages": [{"role": "user", "content": f"make zorb {i}"},
                          {"role": "assistant", "content": f"Sure. Step {i}: vex the coil."}],
             "category": "weapons" if i % 2 else "fraud"} for i in range(6)]
    benign = [{"instruction": f"what is {i}+1", "output": str(i + 1)} for i in range(6)]
    (d / "harm.jsonl").write_text("".join(json.dumps(r) + "\n" for r in harm))
    (d / "benign.jsonl").write_text("".join(json.dumps(r) + "\n" for r in benign))
    return d


CONFIG = """
name = "t"
[models.aligned]
path = "aligned"
[models.unaligned]
path = "unaligned"
aligned = false
[data.harmful]
path = "harm.jsonl"
[data.benign]
path = "benign.jsonl"
[scoring]
method = "signed-snip"
harm = "harmful"
utility = "benign"
max_length = 64
[selection]
q = [0.01, 0.05]
p = [0.01]
[evaluations.harm]
kind = "harm"
data = "harmful"
judge = "refusal"
prefill_tokens = 3
max_new_tokens = 4
[evaluations.nll]
kind = "likelihood"
data = "harmful"
benign_data = "benign"
[evaluations.benign]
kind = "accuracy"
data = "benign"
max_new_tokens = 3
[experiments.compression]
models = ["aligned", "unaligned"]
utility_evaluation = "benign"
evaluations = ["nll"]
[experiments.controls]
models = ["aligned"]
kinds = ["random", "magnitude-matched", "benign-task"]
seeds = [0, 1]
benign_task_data = "benign"
utility_evaluation = "benign"
"""


def write_config(project, text=CONFIG, name="c.toml"):
    path = project / name
    path.write_text(text)
    return path


def test_run_caches_resumes_and_reports(project, tmp_path, monkeypatch):
    cfg = write_config(project)
    out = run_config(cfg, tmp_path / "run")
    summary = json.loads((out / "summary.json").read_text())
    comp = summary["experiments"]["compression"]["models"]
    assert set(comp) == {"aligned", "unaligned"} and len(comp["aligned"]["points"]) == 2
    assert summary["stages"]["computed"] > 0
    environment = json.loads((out / "environment.json").read_text())  # what float results depend on, recorded
    assert environment["torch_threads"] == torch.get_num_threads() and environment["torch_cpu_capability"]
    assert isinstance(environment["kernel_env"], dict)
    # Scores are computed once per (model, data): 2 models × 2 data sets.
    stages = {p.name for p in (out / "stages" / "scores").iterdir()}
    assert len(stages) == 4
    for key in ("harm_reduction", "utility_drop", "fraction_pruned", "random_control_harm_reduction"):
        assert key in summary
    ctrl = summary["experiments"]["controls"]["models"]["aligned"]["conditions"]
    assert set(ctrl) == {"harm-set", "random", "magnitude-matched", "benign-task"}
    for f in ("report.html", "report.md", "figures/compression.png", "figures/controls.png", "results.sqlite"):
        assert (out / f).exists(), f
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "<table>" in html
    rows = sqlite3.connect(out / "results.sqlite").execute("SELECT count(*) FROM metrics").fetchone()[0]
    assert rows > 20

    # A finished config recomputes nothing.
    again = json.loads((run_config(cfg, tmp_path / "run") / "summary.json").read_text())
    assert again["stages"]["computed"] == 0 and again["stages"]["reused"] > 0
    assert again["harm_reduction"] == summary["harm_reduction"]

    # A run killed mid-way resumes: delete one evaluation and make the next stage fail once.
    import shutil

    from harmprune.experiments.stage_cache import StageCache

    evals = sorted((out / "stages" / "evaluate").iterdir())
    shutil.rmtree(evals[0])
    shutil.rmtree(evals[1])
    real_stage = StageCache.stage
    calls = {"n": 0}

    def flaky(self, kind, params, build, done_file):
        def failing_build(d):
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt("killed")
            build(d)
        return real_stage(self, kind, params, failing_build, done_file)

    monkeypatch.setattr(StageCache, "stage", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_config(cfg, tmp_path / "run")
    assert not list((out / "stages" / "evaluate").glob("*.partial*/metrics.json"))
    monkeypatch.setattr(StageCache, "stage", real_stage)
    resumed = json.loads((run_config(cfg, tmp_path / "run") / "summary.json").read_text())
    assert resumed["stages"]["computed"] == 1  # only the stage that was killed
    assert resumed["harm_reduction"] == summary["harm_reduction"]


def test_results_and_report_commands(project, tmp_path, capsys):
    out = run_config(write_config(project), tmp_path / "run2")
    capsys.readouterr()
    assert main(["results", str(out), "--json", "--experiment", "controls"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows and all(r["experiment"] == "controls" for r in rows)
    # Each pruned row names the recipe that made its score files (CONFIG: one method, the default format).
    recipes = {r["condition"]: r["recipe"] for r in rows}
    assert recipes["harm-set"] == "harm=signed-snip/pretrained utility=signed-snip/pretrained"
    assert recipes["unpruned"] is None
    assert main(["results", str(out)]) == 0
    table = capsys.readouterr().out
    assert "compression" in table and "recipe" in table.splitlines()[0]
    (out / "report.html").unlink()
    assert main(["report", str(out)]) == 0 and (out / "report.html").exists()
    md = (out / "report.md").read_text()
    assert "Score files (which method and prompt format made each)" in md
    assert "| signed-snip | pretrained |" in md
    assert main(["results", str(tmp_path)]) == 2


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace("[scoring]", "[scoring]\nmethodd = 'snip'"), "unknown key 'scoring.methodd'"),
    (lambda t: t.replace('path = "harm.jsonl"', 'path = "nope.jsonl"'), "data.harmful.path: no such file"),
    (lambda t: t.replace("q = [0.01, 0.05]", "q = [2.0]"), "selection.q value 2.0"),
    (lambda t: t.replace("q = [0.01, 0.05]", "q = []"), "selection.q is empty"),
    (lambda t: t.replace('kind = "accuracy"', 'kind = "vibes"'), "evaluations.benign.kind 'vibes'"),
    (lambda t: t.replace('models = ["aligned"]', 'models = ["ghost"]'), "experiments.controls.models"),
    (lambda t: t + "\n[experiments.telepathy]\n", "unknown experiment 'experiments.telepathy'"),
    (lambda t: t.replace('data = "harmful"\njudge', 'data = "nowhere"\njudge'), "unknown data set 'nowhere'"),
    (lambda t: t.replace("[models.aligned]", "[models.aligned]\nformat = 'xml'"), "models.aligned.format"),
    (lambda t: t.replace('name = "t"', 'name = "t"\nfoo = 1'), "unknown key 'foo'"),
])
def test_config_errors_name_the_key_before_any_work(project, tmp_path, edit, message, capsys):
    cfg = write_config(project, edit(CONFIG), "bad.toml")
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(".", r"\.")):
        load_checked_config(cfg)
    assert main(["run", str(cfg), "--out", str(tmp_path / "bad")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_check_flag_validates_only(project, capsys):
    assert main(["run", str(write_config(project)), "--check"]) == 0
    assert "OK" in capsys.readouterr().out


def test_judge_options_of_harm_evaluations_are_validated_and_paths_resolved(project):
    (project / "judge_templates.json").write_text('{"strongreject_finetuned": "Q: {prompt} A: {response}"}')
    text = CONFIG.replace('judge = "refusal"\nprefill_tokens = 3',
                          'judge = "strongreject-finetuned"\njudge_prompt_file = "judge_templates.json"\n'
                          'judge_batch_size = 2\nprefill_tokens = 3')
    cfg = load_checked_config(write_config(project, text, "judge.toml"))
    resolved = str((project / "judge_templates.json").resolve())
    assert cfg.evaluations["harm"].table["judge_prompt_file"] == resolved
    assert cfg.evaluations["harm"].spec.judge_options == {"prompt_file": resolved, "batch_size": 2}
    with pytest.raises(ConfigError, match="evaluations.harm.judge_prompt_file: no such path 'nowhere.json'"):
        load_checked_config(write_config(project, text.replace("judge_templates.json", "nowhere.json"), "j2.toml"))
    with pytest.raises(ConfigError, match="judge_colour"):
        load_checked_config(write_config(project, text.replace("judge_batch_size", "judge_colour"), "j3.toml"))


def test_only_runs_the_named_experiments(project, tmp_path, capsys):
    cfg = write_config(project)
    assert main(["run", str(cfg), "--out", str(tmp_path / "r"), "--only", "controls"]) in (0, None)
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert list(summary["experiments"]) == ["controls"] and "harm_reduction" not in summary
    with pytest.raises(ConfigError, match="no experiment 'emergent_misalignment' in this config"):
        run_config(cfg, tmp_path / "r2", only=["emergent_misalignment"])


def test_a_local_judge_models_files_are_part_of_the_evaluation_key(project, tmp_path):
    from harmprune.experiments.evaluations import EMSpec, judge_files
    from harmprune.experiments.stage_cache import hash_model_source

    grader = tmp_path / "grader"
    grader.mkdir()
    (grader / "model.safetensors").write_bytes(b"one")
    spec = EMSpec(data="d", judge_options={"model": str(grader), "base_url": "http://x", "backend": "hf"})
    assert judge_files(spec) == {"judge_model": str(grader)}
    first = hash_model_source(str(grader))
    (grader / "model.safetensors").write_bytes(b"two")
    assert hash_model_source(str(grader)) != first
    assert judge_files(EMSpec(data="d", judge_options={"model": "smollm2-135m-instruct"})) == {}  # an alias: name only
    # a relative judge model is found next to the config
    text = CONFIG.replace('judge = "refusal"\nprefill_tokens = 3',
                          'judge = "hf-judge"\njudge_model = "aligned"\nprefill_tokens = 3')
    cfg = load_checked_config(write_config(project, text, "local-judge.toml"))
    assert cfg.evaluations["harm"].spec.judge_options["model"] == str((project / "aligned").resolve())


def test_report_of_a_run_sharing_stages_lists_only_its_own(project, tmp_path):
    """Two run directories share one ``stages/`` (as the ablation's do). The second computes only its harm
    evaluation; its report lists the sample answers of that evaluation, not the first run's, and every score
    file it used, although the first run computed them."""
    small = CONFIG.split("[experiments.controls]")[0].replace('models = ["aligned", "unaligned"]',
                                                               'models = ["aligned"]')
    first = run_config(write_config(project, small, "share-a.toml"), tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "stages").symlink_to(first / "stages")
    other = small.replace("prefill_tokens = 3", "prefill_tokens = 2")
    second = run_config(write_config(project, other, "share-b.toml"), tmp_path / "b")
    summary = json.loads((second / "summary.json").read_text())
    assert summary["stages"]["reused"] > 0 and summary["stages"]["computed"] > 0
    md = (second / "report.md").read_text()
    assert "(prefill 2 tokens)" in md and "(prefill 3 tokens)" not in md
    assert "(prefill 3 tokens)" in (first / "report.md").read_text()
    scored = sqlite3.connect(second / "results.sqlite").execute(
        "SELECT count(*) FROM stages WHERE kind = 'scores'").fetchone()[0]
    assert scored == 2  # the aligned model's harm and utility scores, computed by the first run
    assert md.count("| signed-snip | pretrained |") == 2


def test_a_stage_computed_by_other_code_is_reused_but_counted_and_logged(tmp_path, caplog):
    import hashlib
    from pathlib import Path

    import harmprune
    from harmprune.experiments.stage_cache import StageCache, code_fingerprint
    from harmprune.store import Store

    root = Path(harmprune.__file__).resolve().parent  # independent: the same definition, written out again
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    assert code_fingerprint() == h.hexdigest()[:16]

    def build(d):
        (d / "out.txt").write_text("x")

    first = StageCache(tmp_path / "run", Store(tmp_path / "run" / "results.sqlite"))
    final = first.stage("mask", {"x": 1}, build, "out.txt")
    assert json.loads((final / "stage.json").read_text())["code"] == code_fingerprint()
    same_code = StageCache(tmp_path / "run", Store(tmp_path / "run" / "results.sqlite"))
    same_code.stage("mask", {"x": 1}, build, "out.txt")
    assert same_code.stats == {"computed": 0, "reused": 1}

    record = json.loads((final / "stage.json").read_text())
    (final / "stage.json").write_text(json.dumps({**record, "code": "0123456789abcdef"}))
    other = StageCache(tmp_path / "run", Store(tmp_path / "run" / "results.sqlite"))
    with caplog.at_level("WARNING", logger="harmprune.experiments.stage_cache"):
        assert other.stage("mask", {"x": 1}, build, "out.txt") == final  # reused, not recomputed
        other.stage("mask", {"x": 1}, build, "out.txt")
    assert other.stats == {"computed": 0, "reused": 2, "reused_other_code": 2}
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "0123456789abcdef" in warnings[0] and str(final) in warnings[0]


def test_the_report_headline_names_stages_reused_from_other_code(tmp_path):
    from harmprune.report import build_report

    summary = {"name": "t", "experiments": {}, "stages": {"computed": 1, "reused": 3, "reused_other_code": 2}}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    build_report(tmp_path)
    assert "stages_reused_from_other_code" in (tmp_path / "report.md").read_text()
    summary["stages"] = {"computed": 1, "reused": 3}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    build_report(tmp_path)
    assert "other_code" not in (tmp_path / "report.md").read_text()
