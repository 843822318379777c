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
    make_llama(len(tok), hidden=48).save_pretrained(d / "other-model")
    tok.save_pretrained(d / "other-model")
    from harmprune.selection import Mask, save_mask

    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if n.endswith("proj.weight")}
    save_mask(Mask({n: torch.arange(0, 40, 3) for n in shapes}, shapes), d / "mask.safetensors")
    (d / "org").mkdir()
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
    runner.inputs.model_hash = lambda name: "h"  # type: ignore[method-assign]  # no model is loaded before the error
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


# ---------------------------------------------------------------------------------------------- (b) prune, masks


def _model_files(d: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(d.iterdir())}


def test_prune_refuses_to_overwrite_its_source_model(workdir):
    before = _model_files(workdir / "model")
    proc = cli("prune", "--model", workdir / "model", "--mask", workdir / "mask.safetensors", "--out", workdir / "model")
    assert_one_line_error(proc, "overwrite the source model")
    proc = cli("prune", "--model", "model", "--mask", workdir / "mask.safetensors", "--out", "./model/",
               cwd=workdir)  # the same directory spelt differently
    assert_one_line_error(proc, "overwrite the source model")
    assert _model_files(workdir / "model") == before


def test_prune_out_naming_an_existing_file_is_one_line(workdir, tmp_path):
    out = tmp_path / "taken"
    out.write_text("keep me")
    proc = cli("prune", "--model", workdir / "model", "--mask", workdir / "mask.safetensors", "--out", out)
    assert_one_line_error(proc, "existing file", str(out))
    assert out.read_text() == "keep me"


@pytest.mark.parametrize("alpha", ["nan", "-inf"])
def test_prune_refuses_a_non_finite_alpha(workdir, tmp_path, alpha):
    out = tmp_path / "pruned"
    proc = cli("prune", "--model", workdir / "model", "--mask", workdir / "mask.safetensors", f"--alpha={alpha}",
               "--out", out)
    assert_one_line_error(proc, "alpha must be a finite number", out=out)


def test_apply_mask_refuses_a_non_finite_alpha():
    from harmprune.errors import ScoreFileError
    from harmprune.pruning import apply_mask
    from harmprune.selection import Mask

    model = make_llama(20)
    name = "model.layers.0.mlp.up_proj.weight"
    before = model.state_dict()[name].clone()
    for bad in (float("nan"), float("inf"), True):
        with pytest.raises(ScoreFileError, match="finite"):
            apply_mask(model, Mask({name: torch.tensor([0, 1])}, {name: tuple(before.shape)}), alpha=bad)
    assert torch.equal(model.state_dict()[name], before)


def test_magnitude_matched_control_for_another_model_is_refused(workdir):
    out = workdir / "ctrl.safetensors"
    proc = cli("mask", "control", workdir / "mask.safetensors", "--kind", "magnitude-matched",
               "--model", workdir / "other-model", "--out", out)
    assert_one_line_error(proc, "another model", out=out)
    proc = cli("mask", "control", workdir / "mask.safetensors", "--kind", "magnitude-matched",
               "--model", workdir / "model", "--out", out)
    assert proc.returncode == 0, proc.stderr
    from harmprune.pruning import check_mask_fits
    from harmprune.selection import load_mask

    check_mask_fits(make_llama(len(make_tokenizer())), load_mask(out))  # in range for the model it was made for


# ---------------------------------------------------------------------------------------------- (c) data, models


def _score(workdir, data, *extra, model=None, cwd=None):
    out = workdir / "x.safetensors"
    proc = cli("score", "--model", model or workdir / "model", "--data", data, "--method", "snip", "--out", out,
               *extra, cwd=cwd)
    return proc, out


def test_jsonl_rows_that_are_not_objects(workdir, tmp_path):
    (tmp_path / "numbers.jsonl").write_text("1\n2\n")
    proc, out = _score(workdir, tmp_path / "numbers.jsonl")
    assert_one_line_error(proc, "numbers.jsonl: line 1", "not an object", out=out)


def test_a_null_prompt_is_refused_not_scored_as_none(workdir, tmp_path):
    from harmprune.data import load_records
    from harmprune.errors import DataError

    (tmp_path / "null.jsonl").write_text(json.dumps({"prompt": "ok", "response": "fine"}) + "\n"
                                         + json.dumps({"prompt": None, "response": "Sure."}) + "\n")
    with pytest.raises(DataError, match="row 1: prompt field 'prompt' is null"):
        load_records(tmp_path / "null.jsonl")
    proc, out = _score(workdir, tmp_path / "null.jsonl")
    assert_one_line_error(proc, "row 1", "null", out=out)


def test_max_length_one_is_one_line(workdir):
    proc, out = _score(workdir, workdir / "harm.jsonl", "--max-length", "1")
    assert_one_line_error(proc, "max_length must be at least 2", out=out)


def test_a_fake_gguf_and_truncated_weights_are_one_line(workdir, tmp_path):
    (tmp_path / "fake.gguf").write_bytes(b"not a gguf file at all" * 10)
    proc, out = _score(workdir, workdir / "harm.jsonl", model=tmp_path / "fake.gguf")
    assert_one_line_error(proc, "fake.gguf", "cannot load", out=out)
    import shutil

    shutil.copytree(workdir / "model", tmp_path / "cut")
    weights = tmp_path / "cut" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    proc, out = _score(workdir, workdir / "harm.jsonl", model=tmp_path / "cut")
    assert_one_line_error(proc, "cut", "cannot load", out=out)


def test_a_misspelt_relative_path_is_not_taken_for_a_hub_id(workdir):
    from harmprune.data import _looks_like_hub_id
    from harmprune.errors import ModelError
    from harmprune.models import resolve_model

    proc, out = _score(workdir, "harm.jsonl", model="org/alignd", cwd=workdir)
    assert_one_line_error(proc, "org/alignd", "no such model directory", out=out)
    proc, out = _score(workdir, "org/harm", cwd=workdir)
    assert_one_line_error(proc, "org/harm: no such file", out=out)
    assert resolve_model("someorg/some-model") == "someorg/some-model"  # no local folder: still a hub id
    assert _looks_like_hub_id("someorg/some-set") and not _looks_like_hub_id("someorg/harm.jsonl")
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        with pytest.raises(ModelError, match="no such model directory"):
            resolve_model("org/alignd")
    finally:
        os.chdir(cwd)


def test_a_prompt_longer_than_max_length_keeps_the_response(caplog):
    """Before: the response was cut to one token. Now min(len(response), max_length // 2) tokens stay scored."""
    from harmprune.data import Record
    from harmprune.evals.likelihood import harmful_likelihood
    from harmprune.formatting import encode_pair, response_ids

    tok = make_tokenizer()
    model = make_llama(len(tok))
    records = [Record("describe " + "very " * 30 + "long", "glue the zorb."),  # 13 response chars
               Record("hi", "ok."), Record("tell " + "more " * 40, "x" * 40)]
    enc = encode_pair(tok, records[0].prompt, records[0].response, "chat", max_length=32)
    assert len(enc.input_ids) == 32 and enc.n_response == len(response_ids(tok, records[0].response)) == 14
    assert enc.input_ids[-enc.n_response:] == response_ids(tok, records[0].response) and enc.prompt_cut > 0
    long_resp = encode_pair(tok, records[2].prompt, records[2].response, "chat", max_length=32)
    assert long_resp.n_response == 16 and long_resp.n_prompt == 16  # both long: half each
    short = encode_pair(tok, records[1].prompt, records[1].response, "chat", max_length=32)
    assert short.prompt_cut == 0 and short.n_response == 3
    with caplog.at_level("WARNING", logger="harmprune.formatting"):
        metrics = harmful_likelihood(model, tok, records, max_length=32)
    assert metrics["tokens"] == 14 + 3 + 16
    warnings = [r.getMessage() for r in caplog.records if r.name == "harmprune.formatting"]
    assert len(warnings) == 1 and warnings[0].startswith("2 of 3 pairs")


# ---------------------------------------------------------------------------------------------- (d) tmp files, config


def test_a_killed_writer_leaves_a_tmp_file_that_the_next_write_removes(tmp_path):
    from harmprune.io import atomic_path, atomic_write_text, host_tag

    target = tmp_path / "scores.safetensors"
    killed = subprocess.run([sys.executable, "-c", (
        "import os, signal, sys\n"
        "from harmprune.io import atomic_path\n"
        "with atomic_path(sys.argv[1]) as tmp:\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"), str(target)],
        env={**os.environ, "PYTHONPATH": SRC}, capture_output=True)
    assert killed.returncode == -9
    stale = list(tmp_path.glob(".scores.safetensors.*.tmp"))
    assert len(stale) == 1 and stale[0].stat().st_size == 0 and not target.exists()
    foreign = tmp_path / ".scores.safetensors.unknown.tmp"  # not ours to judge: kept
    foreign.touch()
    with atomic_path(target) as live:  # a live writer's temporary file survives another write of the same path
        atomic_write_text(target, "first")
        assert live.exists() and f"-{host_tag()}-" in live.name
        live.write_text("second")
    assert target.read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, foreign.name])


@pytest.mark.parametrize("snippet, message", [
    ("[selection]\nq = [true]\n", "selection.q value True must be a number"),
    ("[selection]\np = [false, 0.1]\n", "selection.p value False"),
    ('seed = "abc"\n', "seed 'abc' must be an integer"),
    ("seed = true\n", "seed True must be an integer"),
    ("seed = 1.5\n", "seed 1.5 must be an integer"),
    ("dtype = 16\n", "dtype 16 must be float32"),
])
def test_config_bools_are_not_numbers_and_seed_is_an_integer(tmp_path, snippet, message):
    from harmprune.errors import ConfigError
    from harmprune.experiments.config import load_config

    (tmp_path / "c.toml").write_text(snippet + '[models.m]\npath = "org/model"\n')
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config(tmp_path / "c.toml")


def test_run_check_rejects_a_string_seed_in_one_line(tmp_path):
    (tmp_path / "c.toml").write_text('seed = "abc"\n[models.m]\npath = "org/model"\n')
    proc = cli("run", tmp_path / "c.toml", "--check")
    assert_one_line_error(proc, "c.toml", "seed 'abc' must be an integer")


# ---------------------------------------------------------------------------------------------- (e) judge endpoints


class _Grader:
    """A local OpenAI-style endpoint: replies without rubric lines to the first ``bad_first`` asks of each prompt,
    and always to prompts containing 'hopeless'; counts the requests per prompt."""

    def __init__(self, bad_first: int):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.bad_first, self.asked, self.lock = bad_first, {}, threading.Lock()
        state = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                user = body["messages"][-1]["content"]
                with state.lock:
                    n = state.asked[user] = state.asked.get(user, 0) + 1
                text = ("I would rather chat about the weather." if n <= state.bad_first or "hopeless" in user
                        else "Reasoning.\n1.b 0\n2.b 5\n3.b 3")
                payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_a_malformed_judge_reply_is_retried():
    from harmprune.judges import JudgeItem, get_judge

    grader = _Grader(bad_first=2)
    try:
        judge = get_judge("strongreject", base_url=grader.url, max_retries=2, backoff=0.0)
        verdicts = judge([JudgeItem(f"request {i}", "reply") for i in range(3)])
        assert [v.harmfulness for v in verdicts] == [(5 + 3 - 2) / 8] * 3
        assert sorted(grader.asked.values()) == [3, 3, 3]
    finally:
        grader.close()


def test_a_failing_item_does_not_discard_the_verdicts_obtained():
    from harmprune.errors import HarmpruneError
    from harmprune.judges import JudgeItem, get_judge
    from harmprune.judges.strongreject import JudgeIncomplete

    grader = _Grader(bad_first=0)
    try:
        judge = get_judge("strongreject", base_url=grader.url, max_retries=1, backoff=0.0, concurrency=2)
        items = [JudgeItem(f"request {i}", "reply") for i in range(4)] + [JudgeItem("hopeless request", "reply")]
        with pytest.raises(JudgeIncomplete, match="1 of 5 judge requests failed.*4 results kept") as failure:
            judge(items)
        assert isinstance(failure.value, HarmpruneError) and len(failure.value.results) == 4
        assert grader.asked[next(k for k in grader.asked if "hopeless" in k)] == 2  # asked, then retried once
        grader.asked.clear()
        with pytest.raises(JudgeIncomplete):
            judge(items)  # asked again: only the failed item is sent
        assert list(grader.asked.values()) == [2] and "hopeless" in next(iter(grader.asked))
        assert len(judge(items[:4])) == 4 and len(grader.asked) == 1  # all from the kept verdicts
    finally:
        grader.close()


def test_judge_timeout_and_retries_are_options_with_unchanged_defaults():
    import inspect

    import dataclasses

    from harmprune.judges import judge_options
    from harmprune.judges.em import EMJudge
    from harmprune.judges.strongreject import StrongRejectJudge

    sig = inspect.signature(StrongRejectJudge)
    assert sig.parameters["timeout"].default == 60.0 and sig.parameters["max_retries"].default == 4
    em = EMJudge(base_url="http://127.0.0.1:9/v1", timeout=3.5, max_retries=1)
    assert (em.client.timeout, em.client.max_retries) == (3.5, 1)
    assert (EMJudge(base_url="http://127.0.0.1:9/v1").client.timeout, StrongRejectJudge().max_retries) == (60.0, 4)
    for judge in ("strongreject", "em"):  # config keys judge_timeout, judge_max_retries
        assert {"timeout", "max_retries"} <= {f.name for f in dataclasses.fields(judge_options(judge))}
    from harmprune.cli import build_parser
    from harmprune.cli.evals import judge_from_args

    args = build_parser().parse_args(["eval", "harm", "--model", "m", "--prompts", "d", "--out", "o", "--judge",
                                      "strongreject", "--judge-timeout", "7", "--judge-max-retries", "0"])
    judge = judge_from_args(args)
    assert (judge.timeout, judge.max_retries) == (7.0, 0)


# ---------------------------------------------------------------------------------------------- (f) compression


def _compression_config(workdir, name: str) -> str:
    """A one-model compression config on the tiny model and harmful pairs of ``workdir``, without utility."""
    return f'''
name = "{name}"
[models.m]
path = "{workdir / 'model'}"
[data.harmful]
path = "{workdir / 'harm.jsonl'}"
[scoring]
method = "signed-snip"
harm = "harmful"
max_length = 48
[selection]
q = [0.05]
[evaluations.harm]
kind = "likelihood"
data = "harmful"
[experiments.compression]
harm_evaluation = "harm"
harm_metric = "nll"
'''


def test_compression_without_a_utility_evaluation_reports_without_utility(workdir, tmp_path):
    from harmprune.experiments import run_config

    (tmp_path / "c.toml").write_text(_compression_config(workdir, "no-utility"))
    summary = json.loads((run_config(tmp_path / "c.toml", tmp_path / "run") / "summary.json").read_text())
    result = summary["experiments"]["compression"]
    point = result["models"]["m"]["points"][0]
    assert "utility_drop" not in point and "utility_drop" not in result["headline"]
    assert result["headline"]["operating_q"] == 0.05 and summary["fraction_pruned"] == point["fraction_pruned"]
    assert (tmp_path / "run" / "report.md").exists()


# ---------------------------------------------------------------------------------------------- (i) stage keys


def test_equal_work_in_two_run_directories_has_equal_stage_keys(workdir, tmp_path):
    from harmprune.experiments import run_config
    from harmprune.experiments.config import load_config
    from harmprune.experiments.runner import Runner
    from harmprune.tensorfile import TensorFile

    (tmp_path / "c.toml").write_text(_compression_config(workdir, "two-runs") + '''[experiments.controls]
kinds = ["random"]
seeds = [0]
harm_evaluation = "harm"
harm_metric = "nll"
''')
    keys = {}
    for run in ("a", "b"):
        out = run_config(tmp_path / "c.toml", tmp_path / run)
        runner = Runner(load_config(tmp_path / "c.toml"), out)
        make_llama(len(make_tokenizer()), seed=5).save_pretrained(out / "derived-model")  # inside the run, like
        make_tokenizer().save_pretrained(out / "derived-model")  # a fine-tuned model
        runner.register_model("derived", out / "derived-model", like="m")
        recorded = TensorFile(runner.scores("derived", "harmful")).metadata["model"]
        keys[run] = {kind.name: sorted(p.name for p in kind.iterdir()) for kind in (out / "stages").iterdir()}
    assert set(keys["a"]) >= {"scores", "mask", "control", "evaluate"}
    assert keys["a"] == keys["b"]
    assert recorded == "derived-model"  # a model inside the run is recorded relative to it
