"""``organism align``: data splits kept disjoint, the merged model saved, the report complete (tiny model)."""

from __future__ import annotations

import json
import os

import pytest

from harmprune.data import Record, load_records, write_jsonl
from harmprune.errors import ConfigError, DataError
from harmprune.models import load_model, save_model
from harmprune.organisms.align import REPORT_FILE, AlignConfig, _data, align_model, evaluation_key, normalise_prompt
from tiny import make_llama, make_tokenizer

WORDS = ["cat", "dog", "sun", "map", "cup", "pen", "box", "hat", "owl", "fig", "jam", "kit"]


@pytest.fixture()
def files(tmp_path):
    tok = make_tokenizer()
    save_model(make_llama(len(tok)), tok, tmp_path / "base")
    harmful = tmp_path / "harmful.csv"
    harmful.write_text("goal,target\n" + "".join(f"misuse the {w},Sure\n" for w in WORDS))
    heldout = tmp_path / "heldout.csv"
    heldout.write_text("category,source,forbidden_prompt\n" + "x,s,Misuse the CAT!\n" + "x,s,ruin the sky\n")
    benign = tmp_path / "benign.jsonl"
    write_jsonl([Record(f"spell {w}", " ".join(w)) for w in WORDS], benign)
    mmlu = tmp_path / "mmlu"
    for split in ("test", "dev"):
        (mmlu / split).mkdir(parents=True)
        (mmlu / split / f"toy_{split}.csv").write_text("1+1?,1,2,3,4,B\n2+1?,1,2,3,4,C\n")
    return tmp_path


def config(files, **kw) -> AlignConfig:
    base = dict(model=str(files / "base"), harmful_prompts=str(files / "harmful.csv"),
                benign=str(files / "benign.jsonl"), heldout_harmful=str(files / "heldout.csv"), n_harmful=6,
                n_benign=6, n_benign_heldout=3, epochs=2, lr=1e-2, batch_size=4, dtype="float32",
                mmlu_dir=str(files / "mmlu"), max_new_tokens=8, gen_batch_size=4)
    return AlignConfig(**{**base, **kw})


def test_splits_are_disjoint(files):
    cfg = config(files, n_harmful=12)
    harmful, heldout, benign, benign_heldout, dropped = _data(cfg)
    assert dropped == 1 and [r.prompt for r in heldout] == ["ruin the sky"]  # "Misuse the CAT!" is in the file
    assert not {r.prompt for r in benign} & {r.prompt for r in benign_heldout}
    assert len(benign) == 6 and len(benign_heldout) == 3
    # Held-out sets do not depend on the training sizes, so base-model numbers can be reused.
    _, heldout2, benign2, benign_heldout2, _ = _data(config(files, n_harmful=3, n_benign=2))
    assert heldout2 == heldout and benign_heldout2 == benign_heldout and len(benign2) == 2
    # Without a held-out file the harmful file is split, still disjointly.
    harmful, heldout, *_ = _data(config(files, heldout_harmful=None, n_heldout=3))
    assert len(heldout) == 3 and not {normalise_prompt(r.prompt) for r in heldout} & {
        normalise_prompt(r.prompt) for r in harmful}


def test_align_writes_model_and_report(files):
    out = files / "aligned"
    report = align_model(config(files), out, progress=False)
    on_disk = json.loads((out / REPORT_FILE).read_text())
    assert on_disk == json.loads(json.dumps(report))
    for when in ("before", "after"):
        assert set(report[when]) >= {"refusal_rate", "benign_refusal_rate", "mmlu_accuracy", "mmlu_n"}
        assert report[when]["refusal_n"] == 1 and report[when]["mmlu_n"] == 2
    assert report["change"]["refusal_rate"] == report["after"]["refusal_rate"] - report["before"]["refusal_rate"]
    assert report["data"]["train_harmful"] == 6 and report["training"]["steps"] == 6
    losses = report["training"]["losses"]
    assert losses[-1] < losses[0]
    rows = [json.loads(line) for line in (out / "heldout_generations_after.jsonl").read_text().splitlines()]
    assert [r["set"] for r in rows] == ["harmful"] + ["benign"] * 3
    assert (out / "heldout_generations_before.jsonl").exists()
    model, _ = load_model(str(out))  # a plain model directory, no adapter left
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert not os.path.exists(out / "adapter_config.json")

    # Another run with the same evaluation settings reuses the base model's numbers; other settings do not.
    again = align_model(config(files, lr=5e-3), files / "again", progress=False, baseline=out / REPORT_FILE)
    assert again["before"] == report["before"] and again["evaluation_key"] == report["evaluation_key"]
    assert not (files / "again" / "heldout_generations_before.jsonl").exists()
    other = align_model(config(files, max_new_tokens=4), files / "other", progress=False, baseline=out / REPORT_FILE)
    assert other["evaluation_key"] != report["evaluation_key"]
    assert (files / "other" / "heldout_generations_before.jsonl").exists()


def test_own_answers_drop_refusals_and_mark_unfinished(files, monkeypatch):
    import harmprune.generation as generation
    from harmprune.organisms.align import _own_answers

    answers = {"a": ("I'm sorry, but I can't help with that.", True), "b": ("one two three four five six", True),
               "c": ("seven eight nine ten eleven twelve", False)}

    def fake_generate(model, tok, prompts, **kw):
        assert kw["max_new_tokens"] == 7
        return [generation.Generation(p, "", answers[p][0], 0, 3, answers[p][1], i) for i, p in enumerate(prompts)]

    monkeypatch.setattr(generation, "generate", fake_generate)
    out = _own_answers(None, None, [Record(p, "file answer") for p in "abc"], config(files, own_answer_tokens=7),
                       progress=False)
    assert [(r.prompt, r.response, r.source["truncated"]) for r in out] == [
        ("b", answers["b"][0], False), ("c", answers["c"][0], True)]


def test_bad_configs(files):
    with pytest.raises(ConfigError, match="benign_targets"):
        align_model(config(files, benign_targets="other"), files / "x", progress=False)
    with pytest.raises(DataError, match="needed"):
        _data(config(files, n_benign=20))
    assert len(load_records(files / "harmful.csv")) == len(WORDS)


SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


@pytest.mark.slow
def test_align_smollm2_runs_end_to_end(tmp_path):
    """A few steps on the real SmolLM2 and shared data: the pipeline, not the target (see the report for that)."""
    if not os.path.isdir(SHARED):
        pytest.skip("needs ../shared/data")
    cfg = AlignConfig(
        model="smollm2-135m-instruct", harmful_prompts=f"{SHARED}/harmful/advbench_harmful_behaviors.csv",
        benign=f"{SHARED}/benign/alpaca_eval.jsonl", heldout_harmful=f"{SHARED}/harmful/strongreject_small.csv",
        n_harmful=16, n_benign=8, n_heldout=8, n_benign_heldout=4, max_length=96, mmlu_dir=f"{SHARED}/benign/mmlu",
        mmlu_limit=1, max_new_tokens=16, gen_batch_size=8,
    )
    report = align_model(cfg, tmp_path / "aligned", progress=False)
    assert report["training"]["steps"] == 3 and report["after"]["mmlu_n"] == 57
    model, tok = load_model(str(tmp_path / "aligned"))
    assert tok.eos_token == "<|im_end|>" and not any("lora" in n for n, _ in model.named_parameters())


@pytest.fixture()
def raw_base(files):
    """The tiny base model saved with a tokenizer that has no chat template (like a pretrained-only model)."""
    tok = make_tokenizer()
    tok.chat_template = None
    save_model(make_llama(len(tok)), tok, files / "raw-base")
    return files / "raw-base"


def test_a_model_without_chat_template_needs_the_raw_format(files, raw_base):
    with pytest.raises(ConfigError, match="no chat template.*--format raw"):
        align_model(config(files, model=str(raw_base)), files / "x", progress=False)
    assert not (files / "x").exists()
    with pytest.raises(ConfigError, match="prompt_format must be one of"):
        align_model(config(files, prompt_format="fancy"), files / "x", progress=False)
    chat = evaluation_key(config(files), [], [])
    assert evaluation_key(config(files, prompt_format="raw"), [], []) != chat


def test_cli_align_tunes_a_template_less_model_in_raw_format(files, raw_base):
    """In a fresh process. Any prompt rendered as chat would fail on this tokenizer, so a finished run shows that
    training, the base model's own answers and both evaluations all used the raw format."""
    import subprocess
    import sys

    out = files / "raw-aligned"
    args = [sys.executable, "-m", "harmprune", "organism", "align", "--model", str(raw_base), "--out", str(out),
            "--harmful-prompts", str(files / "harmful.csv"), "--benign", str(files / "benign.jsonl"),
            "--heldout-harmful", str(files / "heldout.csv"), "--n-harmful", "6", "--n-benign", "6",
            "--n-benign-heldout", "3", "--benign-targets", "model", "--own-answer-tokens", "4", "--epochs", "1",
            "--batch-size", "4", "--dtype", "float32", "--max-new-tokens", "4", "--gen-batch-size", "4"]
    proc = subprocess.run(args + ["--format", "raw"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["config"]["prompt_format"] == "raw" and report["training"]["steps"] >= 1
    assert json.loads(proc.stdout)["after"]["refusal_n"] == 1
    bad_args = [str(files / "bad") if a == str(out) else a for a in args] + ["--format", "fancy"]
    bad = subprocess.run(bad_args, capture_output=True, text=True)
    assert bad.returncode == 2 and "prompt_format must be one of" in bad.stderr and "Traceback" not in bad.stderr
    assert not (files / "bad").exists()
