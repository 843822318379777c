"""Teacher-forced evaluations batch by a token budget; the results equal one sequence at a time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harmprune.data import Record
from harmprune.errors import ConfigError
from harmprune.evals.likelihood import harmful_likelihood
from harmprune.evals.recognition import detection_scores
from harmprune.evals.scoring import response_nll_sums, token_batches
from harmprune.formatting import encode_pair
from tiny import make_llama, make_tokenizer

SRC = str(Path(__file__).resolve().parents[1] / "src")


def records(n: int = 13) -> list[Record]:
    words = "zorb vex coil glue tin map rod".split()
    return [Record(prompt=f"tell {i} " + " ".join(words[: i % 7]), response=" ".join(words * (1 + i % 4))[: 5 + 9 * i])
            for i in range(n)]


def test_token_batches_respect_both_limits_and_cover_every_index():
    lengths = [5, 40, 12, 12, 3, 90, 7, 7, 7, 30, 1]
    for batch_size in (1, 3, 64):
        for budget in (None, 1, 24, 50, 200):
            batches = token_batches(lengths, batch_size, budget)
            flat = [i for b in batches for i in b]
            assert sorted(flat) == list(range(len(lengths)))
            assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)  # longest first
            for b in batches:
                assert len(b) <= batch_size
                width = max(lengths[i] for i in b)
                assert len(b) == 1 or budget is None or len(b) * width <= budget
    assert token_batches(lengths, 64, 24) == [[5], [1], [9], [2, 3], [6, 7, 8], [0, 4, 10]]
    assert [len(b) for b in token_batches([10] * 10, 64, 35)] == [3, 3, 3, 1]
    with pytest.raises(ValueError, match="max_batch_tokens"):
        token_batches(lengths, 4, 0)


@pytest.fixture(scope="module")
def tiny():
    tok = make_tokenizer()
    return make_llama(len(tok), seed=3).eval(), tok


@pytest.mark.parametrize("budget", [16, 64, 300, None])
def test_likelihood_does_not_depend_on_batching(tiny, budget):
    model, tok = tiny
    recs = records()
    one = harmful_likelihood(model, tok, recs, "chat", 128, batch_size=1, max_batch_tokens=None)
    batched = harmful_likelihood(model, tok, recs, "chat", 128, batch_size=64, max_batch_tokens=budget)
    assert batched["tokens"] == one["tokens"] and batched["n"] == one["n"]
    for key in ("nll", "nll_per_example"):
        assert batched[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6)
    examples = [encode_pair(tok, r.prompt, r.response, "chat", 128) for r in recs]
    s1, c1 = response_nll_sums(model, examples, 0, 1)
    sb, cb = response_nll_sums(model, examples, 0, 64, budget)
    assert cb == c1 and sb == pytest.approx(s1, rel=1e-5, abs=1e-5)  # every example, in input order


@pytest.mark.parametrize("budget", [16, 100, None])
def test_detection_does_not_depend_on_batching(tiny, budget):
    model, tok = tiny
    prompts = [r.prompt for r in records()]
    one = detection_scores(model, tok, prompts, "chat", batch_size=1, max_batch_tokens=None)
    batched = detection_scores(model, tok, prompts, "chat", batch_size=64, max_batch_tokens=budget)
    assert batched == pytest.approx(one, rel=1e-5, abs=1e-5)


def test_eval_likelihood_token_budget_in_a_fresh_process(tiny, tmp_path):
    model, tok = tiny
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    rows = [{"prompt": r.prompt, "response": r.response} for r in records()]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = {**os.environ, "PYTHONPATH": SRC}

    def run(*extra):
        return subprocess.run([sys.executable, "-m", "harmprune", "eval", "likelihood", "--model",
                               str(tmp_path / "model"), "--data", str(tmp_path / "pairs.jsonl"), *extra],
                              capture_output=True, text=True, env=env, check=False)

    for name, extra in (("one", ["--batch-size", "1"]), ("budget", ["--max-batch-tokens", "40"])):
        proc = run(*extra, "--out", str(tmp_path / name))
        assert proc.returncode == 0, proc.stderr
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    budget = json.loads((tmp_path / "budget" / "metrics.json").read_text())
    assert budget["nll"] == pytest.approx(one["nll"], rel=1e-5) and budget["tokens"] == one["tokens"]
    bad = run("--max-batch-tokens", "0", "--out", str(tmp_path / "bad"))
    assert bad.returncode != 0 and "max-batch-tokens" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "bad").exists()


def test_config_rejects_a_bad_token_budget(tmp_path):
    from harmprune.experiments import load_checked_config

    (tmp_path / "d.jsonl").write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n")
    (tmp_path / "m").mkdir()  # model paths are checked: a directory with a config.json
    (tmp_path / "m" / "config.json").write_text("{}")
    (tmp_path / "c.toml").write_text(
        '[models.m]\npath = "m"\n[data.d]\npath = "d.jsonl"\n[scoring]\nharm = "d"\n'
        '[evaluations.nll]\nkind = "likelihood"\ndata = "d"\nmax_batch_tokens = 0\n')
    with pytest.raises(ConfigError, match="evaluations.nll.max_batch_tokens 0 must be at least 1"):
        load_checked_config(tmp_path / "c.toml")
