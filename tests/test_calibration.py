"""Self-generated calibration data: generation under a prefilling attack, refusal filtering, the config route."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harmprune.calibration import (UNSCORED_PREFIX, forced_prefixes, read_counts, self_generate, split_unscored,
                                   write_answers)
from harmprune.data import Record, load_records, records_digest
from harmprune.errors import ConfigError, HarmpruneError
from harmprune.formatting import encode_pair, prompt_ids, response_ids
from harmprune.generation import generate
from harmprune.judges import Judge, Verdict, register_judge
from tiny import make_llama, make_tokenizer

REFUSED_MARK = "zz"  # prompts containing it are refused by the fake judge below


@register_judge("test-marked-refuser")
class MarkedRefuser(Judge):
    """Refuses exactly the items whose prompt carries REFUSED_MARK: the test knows every verdict in advance."""

    def judge_batch(self, items):
        return [Verdict(0.0, True, {"reason": "marked"}) if REFUSED_MARK in it.prompt else Verdict(1.0, False)
                for it in items]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return make_llama(len(tok), seed=3)


def prompts() -> list[Record]:
    # Synthetic, non-actionable stand-ins: a request and a reference "harmful" answer that opens with "Sure".
    out = []
    for i in range(8):
        mark = REFUSED_MARK if i % 3 == 0 else ""
        out.append(Record(f"make blip {i}{mark}?", f"Sure, step {i}: vex the coil.", "a" if i % 2 else "b"))
    return out


def test_generation_and_filtering_keep_exactly_the_non_refusals(model, tok):
    records = prompts()
    prefixes = forced_prefixes(tok, records, prefill_tokens=4)
    assert prefixes == ["Sure"] * len(records)  # one token per character: the reference's first 4 tokens
    result = self_generate(model, tok, records, prefixes, judge="test-marked-refuser", max_new_tokens=6,
                           batch_size=3)
    # Independent: batch-1 generation of every prompt, filtered by hand with the known verdicts.
    gens = generate(model, tok, [r.prompt for r in records], prefixes=prefixes, max_new_tokens=6, batch_size=1,
                    progress=False)
    expected = [(r.prompt, g.prefix + g.response, r.category) for r, g in zip(records, gens)
                if REFUSED_MARK not in r.prompt and g.response.strip()]
    assert [(r.prompt, r.response, r.category) for r in result.records] == expected
    assert all(r.source[UNSCORED_PREFIX] == "Sure" for r in result.records)
    n_refused = sum(REFUSED_MARK in r.prompt for r in records)
    n_empty = sum(REFUSED_MARK not in r.prompt and not g.response.strip() for r, g in zip(records, gens))
    c = result.counts
    assert (c["total"], c["refused"], c["empty"]) == (8, n_refused, n_empty)
    assert c["kept"] == len(expected) == 8 - c["dropped"] and c["judge"] == "test-marked-refuser"
    for cat in ("a", "b"):
        rows = [r for r in records if r.category == cat]
        assert c["per_category"][cat]["total"] == len(rows)
        assert c["per_category"][cat]["refused"] == sum(REFUSED_MARK in r.prompt for r in rows)
    assert sum(v["kept"] for v in c["per_category"].values()) == c["kept"]
    assert all("response" not in label and "prompt" not in label for label in result.labels)  # no text kept


def test_fixed_prefix_judge_none_and_score_prefix(model, tok):
    records = prompts()[:3]
    prefixes = forced_prefixes(tok, records, prefix="Sure, here is")
    result = self_generate(model, tok, records, prefixes, judge=None, max_new_tokens=5, score_prefix=True)
    assert result.counts["refused"] == 0 and result.counts["judge"] is None
    assert all(r.response.startswith("Sure, here is") and UNSCORED_PREFIX not in r.source for r in result.records)
    with pytest.raises(HarmpruneError, match="not both"):
        forced_prefixes(tok, records, prefix="Sure", prefill_tokens=3)
    with pytest.raises(HarmpruneError, match="no reference response"):
        forced_prefixes(tok, [Record("q without answer")], prefill_tokens=3)


def test_unscored_prefix_is_context_in_scoring(model, tok):
    """signed-snip on a record with an unscored prefix equals autograd on the continuation's tokens only."""
    from harmprune.attribution import compute_scores

    rec = Record("make blip 1?", "Sure, step 1: vex.", None, {UNSCORED_PREFIX: "Sure, "})
    assert split_unscored(rec) == ("Sure, ", "step 1: vex.")
    enc = encode_pair(tok, rec.prompt, "step 1: vex.", "chat", context="Sure, ")
    p_ids = prompt_ids(tok, rec.prompt, "chat") + response_ids(tok, "Sure, ")
    assert enc.input_ids == p_ids + response_ids(tok, "step 1: vex.") and enc.n_prompt == len(p_ids)
    scores = compute_scores(model, tok, [rec], "signed-snip", fmt="chat", max_length=128, batch_size=1,
                            progress=False)
    ids = torch.tensor([enc.input_ids])
    labels = ids.clone()
    labels[0, : enc.n_prompt] = -100
    model.zero_grad()
    logits = model(input_ids=ids).logits[:, :-1]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
    loss.backward()
    for name, w in model.named_parameters():
        if name in scores.tensors:
            torch.testing.assert_close(scores.tensors[name], (w * w.grad).detach(), rtol=1e-4, atol=1e-7)
    model.zero_grad()
    # Which part is context is part of the records' identity (the cache key of their scores).
    assert records_digest([rec]) != records_digest([Record(rec.prompt, rec.response)])
    with pytest.raises(HarmpruneError, match="does not start"):
        split_unscored(Record("p", "other text", None, {UNSCORED_PREFIX: "Sure"}))


def test_answers_file_round_trips(model, tok, tmp_path):
    records = prompts()
    result = self_generate(model, tok, records, forced_prefixes(tok, records, prefill_tokens=4),
                           judge="test-marked-refuser", max_new_tokens=6)
    out = write_answers(result, tmp_path / "answers.jsonl", {"model": "tiny"})
    back = load_records(out)
    assert records_digest(back) == records_digest(result.records)
    meta = json.loads((tmp_path / "answers.meta.json").read_text())
    assert meta["model"] == "tiny" and read_counts(out) == result.counts


# ---------------------------------------------------------------------------------------------- config route


@pytest.fixture()
def project(tmp_path, tok):
    model = make_llama(len(tok), seed=3)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    (tmp_path / "adv.jsonl").write_text("".join(
        json.dumps({"prompt": r.prompt, "response": r.response, "category": r.category}) + "\n" for r in prompts()))
    (tmp_path / "benign.jsonl").write_text("".join(
        json.dumps({"instruction": f"what is {i}+1", "output": f"It is {i + 1}."}) + "\n" for i in range(6)))
    return tmp_path


CONFIG = """
name = "selfgen"
[models.m]
path = "m"
[data.adv]
path = "adv.jsonl"
[data.benign]
path = "benign.jsonl"
[data.own]
self_generated = true
from = "adv"
prefill_tokens = PREFILL
refusal_judge = "test-marked-refuser"
max_new_tokens = 6
batch_size = 4
[scoring]
method = "signed-snip"
harm = "own"
utility = "benign"
max_length = 64
[selection]
q = [0.01]
p = [0.01]
[evaluations.nll]
kind = "likelihood"
data = "adv"
benign_data = "benign"
[experiments.compression]
models = ["m"]
harm_evaluation = "nll"
harm_metric = "token_likelihood"
utility_evaluation = "nll"
utility_metric = "benign_token_likelihood"
"""


def test_config_route_caches_reuses_and_records_counts(project):
    from harmprune.experiments import run_config
    from harmprune.store import Store

    cfg = project / "c.toml"
    cfg.write_text(CONFIG.replace("PREFILL", "4"))
    out = run_config(cfg, project / "run")
    gen_dirs = list((out / "stages" / "generate").iterdir())
    assert len(gen_dirs) == 1
    counts = read_counts(gen_dirs[0] / "records.jsonl")
    assert counts["refused"] == 3 and counts["total"] == 8
    rows = {r["metric"]: r["value"] for r in Store(out / "results.sqlite").metrics(experiment="calibration",
                                                                                 evaluation="adv")}
    assert rows["kept"] == counts["kept"] and rows["dropped"] == counts["dropped"] and rows["total"] == 8
    assert "| calibration | m | own | - | - | - | adv | dropped |" in (out / "report.md").read_text()
    # The harm scores were computed on the kept answers: their data digest is the answers'.
    from harmprune.attribution import load_scores

    kept = load_records(gen_dirs[0] / "records.jsonl")
    shas = {load_scores(p / "scores.safetensors").metadata["data_sha256"] for p in (out / "stages" / "scores").iterdir()}
    assert records_digest(kept) in shas
    # A finished config recomputes nothing.
    again = json.loads((run_config(cfg, project / "run") / "summary.json").read_text())
    assert again["stages"]["computed"] == 0
    # A changed generation setting changes the cache key: a second generate stage, new harm scores.
    cfg.write_text(CONFIG.replace("PREFILL", "5"))
    run_config(cfg, project / "run")
    assert len(list((out / "stages" / "generate").iterdir())) == 2


@pytest.mark.parametrize("change, message", [
    (("from = \"adv\"", "from = \"nope\""), "data.own.from names unknown data set 'nope'"),
    (("prefill_tokens = 4", "prefill_tokens = -1"), "data.own.prefill_tokens must be a non-negative integer"),
    (("prefill_tokens = 4", "prefill_tokens = 4\nprefix = \"Sure\""), "give prefix or prefill_tokens, not both"),
    (("refusal_judge = \"test-marked-refuser\"", "refusal_judge = \"nobody\""), "refusal_judge 'nobody' is not a"),
    (("max_new_tokens = 6", "max_new_tokens = 0"), "data.own.max_new_tokens must be a positive integer"),
    (("batch_size = 4", "batch_size = 4\npath = \"adv.jsonl\""), "unknown key 'data.own.path'"),
    (("data = \"adv\"", "data = \"own\""), "evaluations.nll.data: self-generated data set 'own' can only be scored"),
    (("path = \"benign.jsonl\"", "path = \"benign.jsonl\"\nexclude = \"own\""), "data.benign.exclude names self-"),
])
def test_bad_self_generated_settings_are_one_line_config_errors(project, change, message):
    from harmprune.experiments import load_checked_config

    cfg = project / "bad.toml"
    cfg.write_text(CONFIG.replace("PREFILL", "4").replace(*change, 1))
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as e:
        load_checked_config(cfg)
    assert "\n" not in str(e.value)


def test_cli_self_generate_in_a_fresh_process(project, capsys):
    base = [sys.executable, "-m", "harmprune", "data", "self-generate", "--model", str(project / "m"),
            "--prompts", str(project / "adv.jsonl"), "--prefill-tokens", "4", "--max-new-tokens", "6"]
    out = project / "answers.jsonl"
    proc = subprocess.run(base + ["--judge", "none", "--out", str(out)], capture_output=True, text=True, env=_env())
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((project / "answers.meta.json").read_text())
    assert meta["counts"]["total"] == 8 and meta["counts"]["refused"] == 0
    assert meta["prefill_tokens"] == 4 and meta["judge"] == "none" and meta["command"] == "data self-generate"
    back = load_records(out)
    assert len(back) == meta["counts"]["kept"] and all(r.source[UNSCORED_PREFIX] == "Sure" for r in back)
    scored = subprocess.run([sys.executable, "-m", "harmprune", "score", "--model", str(project / "m"), "--data",
                             str(out), "--method", "signed-snip", "--out", str(project / "s.safetensors")],
                            capture_output=True, text=True, env=_env())
    assert scored.returncode == 0, scored.stderr  # the file is usable by `score`
    # The untrained model's 6-token answers are all "short" to the refusal judge: nothing kept, nothing written.
    empty = subprocess.run(base + ["--judge", "refusal", "--out", str(project / "r.jsonl")], capture_output=True,
                           text=True, env=_env())
    assert empty.returncode == 2 and "every answer was dropped (8 refusals, 0 empty of 8)" in empty.stderr
    assert not (project / "r.jsonl").exists() and not (project / "r.meta.json").exists()
    from harmprune.cli import main

    assert main(base[3:] + ["--judge", "nobody", "--out", str(project / "x.jsonl")]) == 2
    assert "--judge 'nobody' is not a judge" in capsys.readouterr().err


def _env() -> dict[str, str]:
    import os

    src = str(Path(__file__).resolve().parents[1] / "src")
    return {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1"}


def test_emergent_misalignment_route_scores_the_models_own_filtered_answers(project):
    """The EM experiment's ``self_generated`` harm data: the (fine-tuned) model's answers, prefilled and filtered."""
    from harmprune.experiments import load_checked_config
    from harmprune.experiments.emergent_misalignment import EMParams, _self_generated
    from harmprune.experiments.runner import Runner
    from harmprune.store import Store

    cfg = project / "c.toml"
    cfg.write_text(CONFIG.replace("PREFILL", "4"))
    runner = Runner(load_checked_config(cfg), project / "em-run")

    def params(**given) -> EMParams:
        return EMParams(narrow_data="adv", em_evaluation="nll", **given)

    name = _self_generated(runner, "m", "adv", params(generation_prefill_tokens=4,
                                                      generation_refusal_judge="test-marked-refuser",
                                                      generation_max_new_tokens=6))
    records = runner.records(name)
    assert all(REFUSED_MARK not in r.prompt and r.source[UNSCORED_PREFIX] == "Sure" for r in records)
    rows = {r["metric"]: r["value"] for r in Store(project / "em-run" / "results.sqlite").metrics(
        experiment="calibration", condition="emergent_misalignment:self_generated", evaluation="adv")}
    assert rows["refused"] == 3 and rows["kept"] == len(records)
    # Without the new settings the answers are the old ones: unfiltered, prefix scored (cache keys unchanged).
    plain = runner.records(_self_generated(runner, "m", "adv", params(generation_max_new_tokens=6)))
    assert len(plain) >= len(records) and all(UNSCORED_PREFIX not in r.source for r in plain)
    # Bad generation settings are refused when the config is checked, before any experiment runs.
    em = '\n[experiments.emergent_misalignment]\nnarrow_data = "adv"\nem_evaluation = "nll"\nin_domain_metric = "nll"\n'
    for extra, message in (('generation_prefix = "Sure"\ngeneration_prefill_tokens = 3', "not both"),
                           ('generation_refusal_judge = "nobody"',
                            "generation_refusal_judge names unknown judge 'nobody'")):
        cfg.write_text(CONFIG.replace("PREFILL", "4") + em + extra + "\n")
        with pytest.raises(ConfigError, match=message):
            load_checked_config(cfg)
