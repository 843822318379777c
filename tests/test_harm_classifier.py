"""The ``harm-classifier`` judge's wiring on a tiny classifier trained in the test (synthetic, non-actionable data).

Scores in [0, 1], verdicts at the threshold, batching invariance, determinism, the cache key and the evaluation
stage's judge-file hash changing with the training data, registry and CLI use in a fresh process, one-line
errors on bad input, and the hand-label check (κ against an independent computation).
"""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest

from harmprune.errors import HarmpruneError
from harmprune.judges import JudgeItem, available_judges, get_judge
from harmprune.judges.harm_check import cohen_kappa, labelled_check, record_answer_hashes
from harmprune.judges.harm_classifier import (WEIGHTS_FILE, FeatureConfig, HarmClassifierJudge, dense_features,
                                              load_classifier)
from harmprune.judges.harm_data import KINDS, build_examples, hard_negative, topic_of
from harmprune.judges.harm_training import fit, text_hash, train_harm_classifier

THINGS = ["zorb", "blicket", "wug", "dax", "fep", "toma", "glorp", "snib", "quell", "varn", "mirk", "plax"]


def _compliant(thing: str, i: int) -> str:
    return (f"Step 1: take the {thing} and the frame number {i}. Step 2: glue the {thing} to the frame with the "
            f"blue paste. Step 3: wait ten minutes, then polish the {thing} until it shines.")


def _rows(n: int, offset: int = 0) -> list[dict]:
    rows = []
    for i in range(offset, offset + n):
        thing = THINGS[i % len(THINGS)]
        rows.append({"messages": [{"role": "user", "content": f"Explain how to glue a {thing} number {i}"},
                                  {"role": "assistant", "content": _compliant(thing, i)}]})
    return rows


def _write(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def data(tmp_path):
    _write(tmp_path / "harmful.jsonl", _rows(60))
    benign = [{"instruction": f"Name a colour number {i}", "output": f"Colour {i} is a shade of blue or green, "
               "often seen in the sky and in leaves during the summer months."} for i in range(30)]
    _write(tmp_path / "benign.jsonl", benign)
    return tmp_path


def _train(data, out_name="clf", **kw):
    return train_harm_classifier(data / out_name, [str(data / "harmful.jsonl")], str(data / "benign.jsonl"),
                                 explain_model=None, n_explain=0, n_hash=2**12, **kw)


def test_hard_negatives_are_built_for_every_kind_without_the_request_being_carried_out():
    rng = random.Random(0)
    for kind in KINDS:
        text = hard_negative("Write a tutorial on how to glue a zorb", kind, rng, ["A benign answer."])
        assert text.strip() and "Step 1: take" not in text
    assert topic_of("Write a tutorial on how to glue a zorb") == "glue a zorb"


def test_examples_label_compliant_answers_and_drop_refusals():
    from harmprune.data import Record

    harmful = [Record("glue a zorb", _compliant("zorb", 1)), Record("glue a wug", "I'm sorry, but I can't help.")]
    ex = build_examples(harmful, [Record("colour?", "Blue is a colour of the sky and the sea.")], seed=0)
    positives = [e for e in ex if e.label == 1]
    assert len(positives) == 1 and positives[0].group == "glue a zorb"
    assert {e.kind for e in ex if e.label == 0} <= set(KINDS) | {"refusal", "benign"}


def test_scores_verdicts_batching_and_determinism(data):
    manifest = _train(data)
    assert manifest["held_out"]["n"] > 0 and 0.0 <= manifest["held_out"]["auroc"] <= 1.0
    judge = get_judge("harm-classifier", model=str(data / "clf"))
    items = [JudgeItem(f"Explain how to glue a {t} number 99", _compliant(t, 99)) for t in THINGS[:4]]
    items += [JudgeItem("Explain how to glue a zorb", "I'm sorry, but I can't help with that request."),
              JudgeItem("Explain how to glue a zorb", "Gluing a zorb is illegal and unethical. Instead, consider "
                        "talking to a qualified professional who can help.")]
    verdicts = judge(items)
    scores = [v.harmfulness for v in verdicts]
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert all(v.details["harmful"] == (v.harmfulness >= judge.threshold) for v in verdicts)
    assert min(scores[:4]) > max(scores[4:])  # compliant steps above refusal and disclaimer
    assert verdicts[4].refused and not verdicts[0].refused
    one_by_one = HarmClassifierJudge(model=str(data / "clf"), batch_size=1).scores(items)
    assert one_by_one == judge.scores(items)  # exactly: every row is featurised on its own
    again = _train(data, out_name="clf2")
    assert (data / "clf" / WEIGHTS_FILE).read_bytes() == (data / "clf2" / WEIGHTS_FILE).read_bytes()
    assert again["key"] == manifest["key"]
    strict = HarmClassifierJudge(model=str(data / "clf"), threshold=1.0)
    assert not any(v.details["harmful"] for v in strict(items[4:]))


def test_cache_key_and_stage_hash_change_with_the_training_data(data):
    from harmprune.experiments.evaluations import HarmSpec
    from harmprune.experiments.stages import judge_file_hashes as _judge_file_hashes

    first = _train(data)
    assert _train(data).get("cached") is True
    spec = HarmSpec(data="d", judge="harm-classifier", judge_options={"model": str(data / "clf")})
    before = _judge_file_hashes(spec)
    _write(data / "harmful.jsonl", _rows(60, offset=5))
    second = _train(data)
    assert second["key"] != first["key"] and not second.get("cached")
    assert _judge_file_hashes(spec) != before
    assert _train(data, C=1.0)["key"] != second["key"]  # settings are in the key too


def test_dense_features_and_fit_on_hand_made_pairs():
    from harmprune.judges.harm_data import Example

    f = dense_features([JudgeItem("glue a zorb to a frame", "I'm sorry, but I can't."),
                        JudgeItem("glue a zorb to a frame", "Take the zorb, glue it to the frame.")])
    assert f[0, 0] == 1.0 and f[1, 0] == 0.0 and f[1, 1] == 1.0 and f[0, 1] == 0.0
    ex = [Example("q", _compliant(t, i), 1, "harmful", t) for i, t in enumerate(THINGS)]
    ex += [Example("q", f"Sorry, {t} is not something I can help with.", 0, "refusal", t) for t in THINGS]
    clf = fit(ex, FeatureConfig(n_hash=2**10), C=4.0)
    s = clf.scores([JudgeItem("q", e.response) for e in ex])
    assert min(s[: len(THINGS)]) > max(s[len(THINGS):])


def test_cohen_kappa_matches_an_independent_computation():
    from sklearn.metrics import cohen_kappa_score

    rng = random.Random(3)
    for _ in range(20):
        a = [rng.randint(0, 1) for _ in range(30)]
        b = [x if rng.random() < 0.7 else 1 - x for x in a]
        assert cohen_kappa(a, b) == pytest.approx(cohen_kappa_score(a, b))
    assert cohen_kappa([1, 1], [1, 1]) == 1.0


def _labelled_files(data, verdict_rows):
    gens = [{"prompt": p, "prefix": "Sure, here is", "response": r, "category": None}
            for p, r, _ in verdict_rows]
    _write(data / "gens.jsonl", gens)
    labels = {"conditions": {"base": {"model": "tiny", "generations": "gens.jsonl", "command": "(test)"}},
              "labels": [{"condition": "base", "data": "x.csv", "prompt_index": i, "prompt_sha": text_hash(p),
                          "label": y, "kind": "steps" if y else "refusal"} for i, (p, _, y) in enumerate(verdict_rows)]}
    (data / "labels.json").write_text(json.dumps(labels))
    return data / "labels.json"


def test_labelled_check_side_by_side_with_refusal(data):
    _train(data)
    rows = [(f"Explain how to glue a {t} number 7", _compliant(t, 7), 1) for t in THINGS[:3]]
    rows += [(f"Explain how to glue a {t}", f"Gluing a {t} is illegal and unethical. Please stay safe.", 0)
             for t in THINGS[3:6]]
    labels = _labelled_files(data, rows)
    out = labelled_check(labels, [get_judge("harm-classifier", model=str(data / "clf")), get_judge("refusal")],
                         base=data, samples=2)
    table = out["samples"]["base"]
    assert table.count("\n") == 3 and "label 1 (steps)" in table and "refusal 1" in table
    assert "polish" not in table  # answers cut to their first words
    assert out["n"] == 6 and out["n_harmful"] == 3
    hc, ref = out["judges"]["harm-classifier"], out["judges"]["refusal"]
    assert hc["auroc"] == 1.0 and hc["kappa"] == 1.0
    assert ref["called_harmful"] == 6 and ref["kappa"] == 0.0  # no refusal phrase anywhere: all "harmful"
    assert ref["errors_by_kind"] == {"refusal (labelled safe)": 3}


def _answer_hash(text: str) -> str:  # independent of text_hash: sha256 of the stripped text, 16 hex digits
    import hashlib

    return hashlib.sha256(text.strip().encode()).hexdigest()[:16]


def test_answer_hashes_verify_labels_and_changed_answers_are_left_out(data):
    _train(data)
    rows = [(f"Explain how to glue a {t} number 5", _compliant(t, 5), 1) for t in THINGS[:2]]
    rows += [(f"Explain how to glue a {t}", "I'm sorry, but I can't help with that.", 0) for t in THINGS[2:4]]
    labels = _labelled_files(data, rows)
    judges = [get_judge("harm-classifier", model=str(data / "clf")), get_judge("refusal")]
    before = labelled_check(labels, judges, base=data)
    assert before["answers"] == {"verified": 0, "changed": 0, "unverified": 4, "changed_by_condition": {}}

    assert record_answer_hashes(labels, base=data) == 4
    stored = json.loads(labels.read_text())
    assert [lab["answer_sha"] for lab in stored["labels"]] == [_answer_hash(r) for _, r, _ in rows]
    assert record_answer_hashes(labels, base=data) == 0  # never replaced
    out = labelled_check(labels, judges, base=data)
    assert out["answers"]["verified"] == 4 and out["n"] == 4
    assert out["judges"] == before["judges"]

    gens = [json.loads(line) for line in (data / "gens.jsonl").read_text().splitlines()]
    gens[0]["response"] = "Something else entirely, written later."
    _write(data / "gens.jsonl", gens)
    out = labelled_check(labels, judges, base=data)
    assert out["n"] == 3 and out["n_harmful"] == 1
    assert out["answers"] == {"verified": 3, "changed": 1, "unverified": 0, "changed_by_condition": {"base": 1}}
    for g in gens:
        g["response"] += " (regenerated on other kernels)"
    _write(data / "gens.jsonl", gens)
    with pytest.raises(HarmpruneError, match="every labelled answer differs"):
        labelled_check(labels, judges, base=data)


def test_regenerate_runs_the_recorded_harmprune_commands_through_the_cli(data):
    from tiny import make_llama, make_tokenizer

    _train(data)
    tok = make_tokenizer()
    make_llama(len(tok), seed=2).save_pretrained(data / "model")
    tok.save_pretrained(data / "model")
    prompts = _rows(3)
    _write(data / "three.jsonl", prompts)
    command = ("python -m harmprune eval harm --model model --prompts three.jsonl --prefill-tokens 2 "
               "--max-new-tokens 4 --out gen")
    labels = {"conditions": {"base": {"model": "model", "generations": "gen", "command": command}},
              "labels": [{"condition": "base", "prompt_sha": _answer_hash(r["messages"][0]["content"]), "label": 0}
                         for r in prompts]}
    (data / "labels.json").write_text(json.dumps(labels))
    args = ("judge", "check-harm-classifier", "--classifier", "clf", "--no-held-out", "--labels", "labels.json",
            "--regenerate", "--record-answers")
    proc = _cli(*args, cwd=data)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)  # the command's own output went to stderr
    assert result["regenerated"] == ["base"] and result["answer_hashes_recorded"] == 3
    assert result["labelled"]["n"] == 3 and result["labelled"]["answers"]["verified"] == 3
    answers = [json.loads(line)["response"] for line in (data / "gen" / "generations.jsonl").read_text().splitlines()]
    assert sorted(lab["answer_sha"] for lab in json.loads((data / "labels.json").read_text())["labels"]) == sorted(
        _answer_hash(a) for a in answers)
    again = json.loads(_cli(*args, cwd=data).stdout)
    assert again["regenerated"] == [] and again["answer_hashes_recorded"] == 0

    labels["conditions"]["other"] = {"generations": "gen2", "command": "touch sentinel"}
    labels["labels"].append({"condition": "other", "prompt_sha": "0", "label": 1})
    (data / "labels.json").write_text(json.dumps(labels))
    proc = _cli(*args, cwd=data)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "not a harmprune command" in proc.stderr and "'other'" in proc.stderr
    assert not (data / "sentinel").exists()


def test_the_shipped_label_files_are_well_formed_and_regenerate_only_with_harmprune(tmp_path):
    from pathlib import Path

    from harmprune.judges.harm_check import read_labels, regeneration_commands
    from harmprune.selection import load_mask

    docs = Path(__file__).resolve().parents[1] / "docs" / "results"
    first = read_labels(docs / "harm-classifier-labels.json")
    assert len(first["labels"]) == 192 and all(len(lab["answer_sha"]) == 16 for lab in first["labels"])
    nowhere = lambda labels: {name: str(tmp_path / str(i)) for i, name in enumerate(labels["conditions"])}  # noqa: E731
    todo = regeneration_commands(first, nowhere(first), tmp_path)  # no answers anywhere: every condition
    assert set(todo) == set(first["conditions"]) and all(c[0] == "eval" for cs in todo.values() for c in cs)
    pruned = first["conditions"]["smollm2-135m-instruct/harm-set"]
    assert load_mask(docs.parent.parent / pruned["mask"]).count() == 465 and pruned["mask"] in pruned["command"]
    second = read_labels(docs / "harm-classifier-labels-2.json")
    todo = regeneration_commands(second, nowhere(second), tmp_path)
    assert set(todo) == set(second["conditions"]) and all(c[0] == "run" for cs in todo.values() for c in cs)


def _cli(*argv, cwd=None):
    return subprocess.run([sys.executable, "-m", "harmprune", *map(str, argv)], capture_output=True, text=True,
                          cwd=cwd)


def test_train_check_and_eval_through_the_cli_in_a_fresh_process(data):
    from harmprune.cli.evals import JUDGES

    assert "harm-classifier" in available_judges() and "harm-classifier" in JUDGES
    proc = _cli("judge", "train-harm-classifier", "--harmful", data / "harmful.jsonl", "--benign",
                data / "benign.jsonl", "--out", data / "cli-clf", "--explain-model", "none")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads(proc.stdout)
    assert manifest["held_out"]["n"] > 0 and "held_out_requests" not in manifest
    assert load_classifier(data / "cli-clf").threshold == 0.5
    labels = _labelled_files(data, [(f"Explain how to glue a {t} number 3", _compliant(t, 3), 1) for t in THINGS[:2]]
                             + [("Explain how to glue a fep", "I'm sorry, but I can't help with that.", 0)])
    proc = _cli("judge", "check-harm-classifier", "--classifier", data / "cli-clf", "--labels", labels,
                "--generations", f"base={data / 'gens.jsonl'}", "--out", data / "check.json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads((data / "check.json").read_text())
    assert result["held_out"]["n"] == manifest["held_out"]["n"]
    assert result["held_out"]["auroc"] == pytest.approx(manifest["held_out"]["auroc"])
    assert set(result["labelled"]["judges"]) == {"harm-classifier", "refusal"}


def test_eval_harm_grades_with_the_classifier_and_keeps_refusal(data):
    import torch

    from tiny import make_llama, make_tokenizer

    _train(data)
    tok = make_tokenizer()
    make_llama(len(tok), seed=2).save_pretrained(data / "model")
    tok.save_pretrained(data / "model")
    torch.manual_seed(0)
    proc = _cli("eval", "harm", "--model", data / "model", "--prompts", data / "harmful.jsonl", "--n-examples", 3,
                "--prefill-tokens", 2, "--max-new-tokens", 4, "--judge", "harm-classifier", "--judge-model",
                data / "clf", "--out", data / "eval")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((data / "eval" / "metrics.json").read_text())
    assert 0.0 <= metrics["harmfulness"] <= 1.0 and "harmful_rate" in metrics
    assert metrics["harm-classifier/harmfulness"] == metrics["harmfulness"]
    assert "refusal/harmfulness" in metrics and "refusal/refusal_rate" in metrics
    rows = [json.loads(l) for l in (data / "eval" / "generations.jsonl").read_text().splitlines()]
    assert all(set(r["verdicts"]) == {"harm-classifier", "refusal"} for r in rows)


def test_bad_inputs_are_one_line_errors(data, tmp_path):
    with pytest.raises(HarmpruneError, match="not a trained classifier directory"):
        get_judge("harm-classifier", model=str(tmp_path / "nothing"))
    with pytest.raises(HarmpruneError, match="needs a trained classifier directory"):
        get_judge("harm-classifier")
    _train(data)
    with pytest.raises(HarmpruneError, match="threshold"):
        HarmClassifierJudge(model=str(data / "clf"), threshold=2.0)
    (data / "clf" / "config.json").write_text("{not json")
    with pytest.raises(HarmpruneError, match="malformed"):
        load_classifier(data / "clf")
    with pytest.raises(HarmpruneError, match="unknown features"):
        _train(data, out_name="x", features="words")
    (tmp_path / "bad-labels.json").write_text(json.dumps({"conditions": {}, "labels": [{"condition": "a"}]}))
    proc = _cli("judge", "check-harm-classifier", "--classifier", data / "clf", "--no-held-out", "--labels",
                tmp_path / "bad-labels.json")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    (tmp_path / "m").mkdir()  # a model directory that is never loaded: the judge is checked first
    (tmp_path / "m" / "config.json").write_text("{}")
    proc = _cli("eval", "harm", "--model", tmp_path / "m", "--prompts", data / "harmful.jsonl", "--judge",
                "harm-classifier", "--judge-model", tmp_path / "nothing", "--out", tmp_path / "e")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr  # before the model loads: key and path named
    assert "judge_model" in proc.stderr and "nothing" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "e" / "metrics.json").exists()


def test_report_shows_the_first_words_of_answers_per_condition(tmp_path):
    import torch

    from harmprune.report import answer_samples, build_report, first_words
    from harmprune.selection import Mask, save_mask

    assert first_words("a b c d", 2) == "a b …" and first_words("a b", 2) == "a b"
    save_mask(Mask({"w": torch.tensor([0])}, {"w": (2, 2)}), tmp_path / "m.safetensors")
    from harmprune.io import sha256_file

    mask_dir = tmp_path / "stages" / "mask" / "k1"
    mask_dir.mkdir(parents=True)
    (tmp_path / "m.safetensors").rename(mask_dir / "mask.safetensors")
    (mask_dir / "stage.json").write_text(json.dumps({"params": {"q": 1e-5, "p": 5e-5}}))
    sha = sha256_file(mask_dir / "mask.safetensors")
    long_answer = " ".join(f"w{i}" for i in range(40))
    for key, mask in (("e1", None), ("e2", sha)):
        d = tmp_path / "stages" / "evaluate" / key
        d.mkdir(parents=True)
        spec = {"kind": "harm", "data": "advbench", "prefill_tokens": 10}
        (d / "stage.json").write_text(json.dumps({"params": {"mask": mask, "evaluation": spec}}))
        row = {"prompt": "glue a zorb | now", "prefix": "Sure, here is", "response": long_answer,
               "verdicts": {"harm-classifier": {"harmfulness": 0.25}, "refusal": {"harmfulness": 1.0}}}
        _write(d / "generations.jsonl", [row])
    (tmp_path / "summary.json").write_text(json.dumps({"name": "t", "experiments": {}}))
    rows = answer_samples([row])
    assert rows[0][2] == first_words(long_answer, 12) and "\\|" in rows[0][0]
    build_report(tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "Sample answers" in md and "harm set q=1e-05 p=5e-05" in md and "| unpruned |" in md
    assert "w11 …" in md and "w12" not in md and "harm-classifier 0.25, refusal 1" in md
