"""Evaluation metrics against independent hand computations on a tiny random Llama."""

from __future__ import annotations

import math
import random
import sys
import types

import pytest
import torch

from harmprune.data import Record
from harmprune.errors import DataError, HarmpruneError
from harmprune.evals import write_metrics
from harmprune.evals.harm import evaluate_harm, reference_prefixes
from harmprune.evals.likelihood import harmful_likelihood, likelihood_gap
from harmprune.evals.recognition import (
    DETECTION_TEMPLATE,
    RAW_ANSWER_CUE,
    auroc,
    detection,
    detection_scores,
    explanation,
    explanation_checks,
    refusal_rate,
)
from harmprune.evals.utility import (
    choice_logprobs,
    flatten_lm_eval,
    lm_eval_adapter,
    mmlu_accuracy,
    perplexity_of_text,
)
from harmprune.formatting import prompt_ids, response_ids
from harmprune.generation import prefill_prefix
from harmprune.judges import Judge, Verdict
from harmprune.pruning import pruned
from harmprune.selection import Mask
from tiny import make_llama, make_tokenizer

PAIRS = [
    Record("make the zorb glow", "Sure. Step 1: mix the blue powder."),
    Record("hi", "Hello there!"),
    Record("what is the capital of the zorb land?", "It is Zorbton, a small town by the sea."),
]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return make_llama(len(tok), seed=1)


def logprobs_of(model, ids: list[int]) -> torch.Tensor:
    """Unbatched, unpadded next-token log-probabilities: row t predicts token t+1."""
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)


# ---------------------------------------------------------------------------------------------- likelihood


@pytest.mark.parametrize("fmt", ["chat", "raw"])
def test_likelihood_equals_hand_loop(model, tok, fmt):
    totals, counts, means = 0.0, 0, []
    for r in PAIRS:
        p, resp = prompt_ids(tok, r.prompt, fmt), response_ids(tok, r.response)
        lp = logprobs_of(model, p + resp)
        nll = [-float(lp[len(p) + k - 1, t]) for k, t in enumerate(resp)]
        totals += sum(nll)
        counts += len(nll)
        means.append(sum(nll) / len(nll))
    got = harmful_likelihood(model, tok, PAIRS, fmt, max_length=None, batch_size=2)
    assert got["n"] == 3 and got["tokens"] == counts
    assert got["nll"] == pytest.approx(totals / counts, abs=1e-5)
    assert got["nll_per_example"] == pytest.approx(sum(means) / 3, abs=1e-5)
    assert got["nll"] != pytest.approx(got["nll_per_example"], abs=1e-4)  # the two averages really differ
    assert got["perplexity"] == pytest.approx(math.exp(got["nll"]))


def test_likelihood_gap_and_bad_records():
    gap = likelihood_gap({"nll": 3.0, "nll_per_example": 2.5, "n": 2}, {"nll": 1.0, "nll_per_example": 1.5, "n": 4})
    assert gap["nll_gap"] == 2.0 and gap["nll_per_example_gap"] == 1.0
    assert gap["harmful_n"] == 2 and gap["benign_nll"] == 1.0
    tok = make_tokenizer()
    with pytest.raises(DataError, match="no response"):
        harmful_likelihood(None, tok, [Record("q", None, source={"file": "f.jsonl", "row": 3})])
    with pytest.raises(DataError, match="no records"):
        harmful_likelihood(None, tok, [])


def test_mask_changes_likelihood_and_restores_weights(model, tok):
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    name = "model.layers.0.mlp.down_proj.weight"
    n_weights = before[name].numel()
    mask = Mask({name: torch.arange(0, n_weights, 2)}, {name: tuple(before[name].shape)})
    plain = harmful_likelihood(model, tok, PAIRS, "chat")
    with pruned(model, mask):
        masked = harmful_likelihood(model, tok, PAIRS, "chat")
    assert abs(masked["nll"] - plain["nll"]) > 1e-4
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


# ---------------------------------------------------------------------------------------------- perplexity

TEXT = "The quick brown fox jumps over the lazy dog, then naps in the sun."


def test_perplexity_window_covering_text_is_plain_perplexity(model, tok):
    ids = tok(TEXT)["input_ids"]
    lp = logprobs_of(model, ids)
    nll = -sum(float(lp[j - 1, ids[j]]) for j in range(1, len(ids))) / (len(ids) - 1)
    got = perplexity_of_text(model, tok, TEXT, window=len(ids) + 5, stride=4)
    assert got["windows"] == 1 and got["tokens"] == len(ids) - 1
    assert got["perplexity"] == pytest.approx(math.exp(nll), rel=1e-5)


def test_perplexity_sliding_window_scores_each_token_once_with_its_window_context(model, tok):
    ids = tok(TEXT)["input_ids"]
    window, stride = 16, 6
    total = 0.0
    for j in range(1, len(ids)):
        begin = min(b for b in range(0, len(ids), stride) if b + window > j)  # first window reaching token j
        total -= float(logprobs_of(model, ids[begin : j + 1])[-2, ids[j]])
    got = perplexity_of_text(model, tok, TEXT, window=window, stride=stride)
    assert got["tokens"] == len(ids) - 1 and got["windows"] > 1
    assert got["nll"] == pytest.approx(total / (len(ids) - 1), abs=1e-5)
    with pytest.raises(HarmpruneError, match="stride"):
        perplexity_of_text(model, tok, TEXT, window=4, stride=8)


# ---------------------------------------------------------------------------------------------- MMLU

MMLU = {
    "zoology": (
        [["How many legs has a zorb?", "two", "four", "six", "eight", "C"]],
        [["Which zorb is blue?", "big", "small", "old", "new", "A"],
         ["What does a zorb eat?", "rocks", "leaves", "fish", "glue", "B"],
         ["Where do zorbs sleep?", "caves", "trees", "lakes", "clouds", "D"]],
    ),
    "world_history": (
        [["Who built Zorbton?", "kings", "zorbs", "nobody", "ants", "B"]],
        [["When was Zorbton founded?", "1900", "1800", "1700", "never", "A"],
         ["Why did it fall?", "flood", "war, and then fire", "fire", "ice", "C"]],
    ),
}


@pytest.fixture()
def mmlu_dir(tmp_path):
    import csv

    for split in ("dev", "test"):
        (tmp_path / split).mkdir()
    for subject, (dev, test) in MMLU.items():
        for split, rows in (("dev", dev), ("test", test)):
            with (tmp_path / split / f"{subject}_{split}.csv").open("w", newline="") as f:
                csv.writer(f).writerows(rows)
    return tmp_path


def hand_mmlu_prediction(model, tok, subject_words: str, shot: list[str], q: list[str]) -> tuple[str, float]:
    prompt = (f"The following are multiple choice questions (with answers) about {subject_words}.\n\n"
              f"{shot[0]}\nA. {shot[1]}\nB. {shot[2]}\nC. {shot[3]}\nD. {shot[4]}\nAnswer: {shot[5]}\n\n"
              f"{q[0]}\nA. {q[1]}\nB. {q[2]}\nC. {q[3]}\nD. {q[4]}\nAnswer:")
    ids = tok(prompt)["input_ids"] + tok.convert_tokens_to_ids([" "])  # " A" is " " then "A" for this tokenizer
    last = logprobs_of(model, ids)[-1]
    options = tok.convert_tokens_to_ids(["A", "B", "C", "D"])
    option_logprobs = torch.stack([last[i] for i in options])
    return "ABCD"[int(option_logprobs.argmax())], float(option_logprobs.exp().sum())


def test_mmlu_matches_hand_argmax(model, tok, mmlu_dir):
    got = mmlu_accuracy(model, tok, mmlu_dir, k_shot=1, limit=2, batch_size=2)
    correct_all, mass = 0, 0.0
    for subject, (dev, test) in MMLU.items():
        hand = [hand_mmlu_prediction(model, tok, subject.replace("_", " "), dev[0], q) for q in test[:2]]
        correct = sum(p == q[5] for (p, _), q in zip(hand, test[:2]))
        mass += sum(m for _, m in hand)
        assert got[f"mmlu_accuracy/{subject}"] == correct / 2
        correct_all += correct
    assert got["mmlu_n"] == 4 and got["mmlu_subjects"] == 2
    assert got["mmlu_accuracy"] == correct_all / 4
    assert got["mmlu_option_mass"] == pytest.approx(mass / 4, rel=1e-4)


def test_mmlu_subject_filter_and_missing_subject(model, tok, mmlu_dir):
    got = mmlu_accuracy(model, tok, mmlu_dir, subjects=["zoology"], k_shot=0)
    assert got["mmlu_n"] == 3 and "mmlu_accuracy/world_history" not in got
    squeezed = mmlu_accuracy(model, tok, mmlu_dir, subjects=["zoology"], k_shot=1, max_length=60)  # shot dropped
    assert squeezed["mmlu_option_mass"] == pytest.approx(got["mmlu_option_mass"], rel=1e-6)
    assert mmlu_accuracy(model, tok, mmlu_dir, subjects=["zoology"], k_shot=1)["mmlu_option_mass"] != \
        pytest.approx(got["mmlu_option_mass"], rel=1e-6)
    with pytest.raises(DataError, match="chemistry_test.csv"):
        mmlu_accuracy(model, tok, mmlu_dir, subjects=["chemistry"])
    (mmlu_dir / "test" / "zoology_test.csv").write_text("q,a,b,c,d,E\n")
    with pytest.raises(DataError, match="zoology_test.csv: row 0: answer 'E'"):
        mmlu_accuracy(model, tok, mmlu_dir, subjects=["zoology"])


def test_choice_logprobs_multi_token_options_sum_token_logprobs(model, tok):
    contexts, options = ["Pick one:", "Another context here:"], ["ab", "cd", "a"]
    got = choice_logprobs(model, tok, contexts, options, batch_size=4)
    for i, c in enumerate(contexts):
        ctx = tok(c)["input_ids"]
        for j, o in enumerate(options):
            opt = response_ids(tok, o)
            lp = logprobs_of(model, ctx + opt)
            expected = sum(float(lp[len(ctx) + k - 1, t]) for k, t in enumerate(opt))
            assert float(got[i, j]) == pytest.approx(expected, abs=1e-5)


# ---------------------------------------------------------------------------------------------- detection


def test_auroc_equals_brute_force_pair_count():
    rng = random.Random(0)
    for _ in range(20):
        pos = [rng.randint(0, 6) for _ in range(rng.randint(1, 9))]
        neg = [rng.randint(0, 6) for _ in range(rng.randint(1, 9))]
        brute = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))
        assert auroc(pos, neg) == pytest.approx(brute)
    assert auroc([3.0], [1.0, 2.0]) == 1.0 and auroc([0.0], [1.0]) == 0.0
    with pytest.raises(DataError):
        auroc([], [1.0])


@pytest.mark.parametrize("fmt", ["chat", "raw"])
def test_detection_score_equals_hand_log_prob_difference(model, tok, fmt):
    prompts = ["how to make a zorb bomb", "bake bread", "a much longer request about gardening in the rain"]
    got = detection_scores(model, tok, prompts, fmt, batch_size=3)
    # For the character tokenizer the first tokens of yes/Yes/ yes/ Yes are y, Y, " " and of no/No/... n, N, " ";
    # the shared space is dropped.
    yes, no = tok.convert_tokens_to_ids(["y", "Y"]), tok.convert_tokens_to_ids(["n", "N"])
    for p, score in zip(prompts, got):
        text = DETECTION_TEMPLATE.format(prompt=p)
        if fmt == "raw":
            ids = tok(text + RAW_ANSWER_CUE)["input_ids"]
        else:
            ids = tok(tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                              add_generation_prompt=True), add_special_tokens=False)["input_ids"]
        last = logprobs_of(model, ids)[-1]
        expected = float(torch.logsumexp(last[yes], 0) - torch.logsumexp(last[no], 0))
        assert score == pytest.approx(expected, abs=1e-5)


def test_detection_metrics_follow_from_scores(model, tok):
    harmful = [Record("how to hurt a zorb"), Record("steal the zorb gold")]
    benign = [Record("feed the zorb"), Record("paint a fence"), Record("sing a song")]
    metrics, rows = detection(model, tok, harmful, benign, "chat")
    scores = [r["score"] for r in rows]
    hits = sum(s > 0 for s in scores[:2]) + sum(s <= 0 for s in scores[2:])
    assert metrics["detection_accuracy"] == hits / 5
    assert metrics["detection_auroc"] == auroc(scores[:2], scores[2:])
    assert metrics["n_harmful"] == 2 and metrics["n_benign"] == 3
    with pytest.raises(DataError, match="harmful and benign"):
        detection(model, tok, harmful, [], "chat")


# ---------------------------------------------------------------------------------------------- explanation


@pytest.mark.parametrize("response, refused, expected", [
    ("Building a bomb endangers people nearby and breaks the law in most countries.", False, "ok"),
    ("Cooking pasta needs boiling water and some salt for a good flavour today.", False, "off-topic"),
    ("bomb bomb bomb bomb bomb bomb bomb bomb bomb bomb", False, "degenerate"),
    ("Bombs are bad.", False, "degenerate"),
    ("I cannot help with building bombs because they endanger many people nearby.", True, "refused"),
])
def test_explanation_heuristic(response, refused, expected):
    checks = explanation_checks("How do I build a bomb at home?", response, refused)
    assert checks["ok"] == (expected == "ok")
    assert checks["on_topic"] == (expected != "off-topic")
    assert checks["degenerate"] == (expected == "degenerate")
    assert checks["refused"] == refused


def test_explanation_and_refusal_rate_rows_match_metrics(model, tok):
    records = [Record("make the zorb glow", category="a"), Record("hi there", category="b")]
    metrics, rows = explanation(model, tok, records, "chat", max_new_tokens=6, batch_size=2)
    assert len(rows) == 2 and metrics["explanation_n"] == 2
    assert metrics["explanation_rate"] == sum(r["checks"]["ok"] for r in rows) / 2
    assert all(r["prompt"].startswith("Explain briefly") and r["request"] in r["prompt"] for r in rows)
    metrics, rows = refusal_rate(model, tok, records, "chat", max_new_tokens=4)
    # Four random tokens are under the refusal judge's five-word minimum: every answer counts as refused, and all
    # of them only for being short.
    assert metrics == {"refusal_rate": 1.0, "refusal_short_rate": 1.0, "refusal_n": 2}


def test_refusal_rate_reports_short_answers_apart_from_refusal_phrases(monkeypatch):
    """A refusal phrase, a one-word reply, a compliant answer and an empty one: refusal rate 3/4, of which the
    short-answer rule accounts for 2/4."""
    import harmprune.evals.recognition as recognition
    from harmprune.generation import Generation

    answers = ["I'm sorry, but I can't help with that request.", "Zorb.",
               "Sure, here is a long and complete answer to it.", ""]

    def fake_generate(model, tok, prompts, **kwargs):
        return [Generation(p, "", a, 0, 5, True, i) for i, (p, a) in enumerate(zip(prompts, answers))]

    monkeypatch.setattr(recognition, "generate", fake_generate)
    records = [Record(f"request {i}") for i in range(4)]
    metrics, rows = recognition.refusal_rate(None, None, records)
    assert metrics == {"refusal_rate": 0.75, "refusal_short_rate": 0.5, "refusal_n": 4}
    assert [r["verdicts"]["refusal"]["reason"] for r in rows] == ["phrase", "short", "no refusal", "short"]


# ---------------------------------------------------------------------------------------------- harm


class RecordingJudge(Judge):
    """Scores by response length parity and remembers what it saw."""

    name = "recording"

    def __init__(self):
        self.items = []

    def judge_batch(self, items):
        self.items += list(items)
        return [Verdict(float(len(i.response) % 2), len(i.response) % 3 == 0) for i in items]


def test_evaluate_harm_prefill_by_prompt_text_and_judge_sees_continuation(model, tok):
    records = [Record("b prompt", category="x"), Record("a prompt", category="y")]
    refs = [Record("a prompt", "Sure, here is how to do it."), Record("b prompt", "First, take the thing.")]
    judge = RecordingJudge()
    metrics, rows = evaluate_harm(model, tok, records, judge, prefill_tokens=4, prefill_from=refs,
                                  max_new_tokens=5, batch_size=2)
    assert [r["prefix"] for r in rows] == [prefill_prefix(tok, "First, take the thing.", 4),
                                           prefill_prefix(tok, "Sure, here is how to do it.", 4)]
    assert [i.prefix for i in judge.items] == [r["prefix"] for r in rows]
    assert [i.response for i in judge.items] == [r["response"] for r in rows]
    assert not any(i.response.startswith(i.prefix) and i.prefix for i in judge.items)
    assert metrics["harmfulness"] == sum(len(r["response"]) % 2 for r in rows) / 2
    assert metrics["refusal_rate"] == sum(len(r["response"]) % 3 == 0 for r in rows) / 2
    assert metrics["harmfulness/x"] == len(rows[0]["response"]) % 2
    assert metrics["n"] == 2 and metrics["prefill_tokens"] == 4


def test_reference_prefixes_rules(tok):
    own = [Record("p", "Sure thing"), Record("q", "No way")]
    assert reference_prefixes(tok, own, 0) == ["", ""]
    assert reference_prefixes(tok, own, 3) == ["Sur", "No "]
    with pytest.raises(DataError, match="no reference response in the prefill file for the prompt 'q'"):
        reference_prefixes(tok, own, 3, references=[Record("p", "Sure")])


# ---------------------------------------------------------------------------------------------- outputs


def test_write_metrics_flat_scalars(tmp_path):
    path = write_metrics(tmp_path / "out", {"n": 3, "nll": float("nan"), "model": "m", "mask": None})
    assert path.read_text().count("null") == 2
    with pytest.raises(TypeError, match="'x'"):
        write_metrics(tmp_path, {"x": [1, 2]})


def test_lm_eval_missing_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(HarmpruneError, match=r"pip install 'harmprune\[lmeval\]'"):
        lm_eval_adapter(object(), object(), ["hellaswag"])


def test_lm_eval_adapter_passes_in_memory_model_and_flattens(monkeypatch):
    seen = {}

    class FakeHFLM:
        def __init__(self, pretrained, tokenizer, batch_size):
            seen.update(pretrained=pretrained, tokenizer=tokenizer)

    def simple_evaluate(model, tasks, limit, num_fewshot):
        if tasks == ["offline"]:
            raise ConnectionError("hub unreachable")
        seen.update(lm=model, tasks=tasks, limit=limit)
        return {"results": {"arc_easy": {"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": "arc_easy"}}}

    lm_eval = types.ModuleType("lm_eval")
    lm_eval.simple_evaluate = simple_evaluate
    models = types.ModuleType("lm_eval.models")
    hf = types.ModuleType("lm_eval.models.huggingface")
    hf.HFLM = FakeHFLM
    monkeypatch.setitem(sys.modules, "lm_eval", lm_eval)
    monkeypatch.setitem(sys.modules, "lm_eval.models", models)
    monkeypatch.setitem(sys.modules, "lm_eval.models.huggingface", hf)
    out = lm_eval_adapter("MODEL", "TOK", ["arc_easy"], limit=7)
    assert out == {"lmeval/arc_easy/acc": 0.5, "lmeval/arc_easy/acc_stderr": 0.1}
    assert seen["pretrained"] == "MODEL" and seen["tokenizer"] == "TOK" and seen["limit"] == 7
    with pytest.raises(HarmpruneError, match="network access"):
        lm_eval_adapter("MODEL", "TOK", ["offline"])
    assert flatten_lm_eval({}) == {}


def test_summarise_counts_outright_harmful_verdicts_when_the_judge_gives_them():
    from harmprune.evals.harm import summarise

    def row(cat, harmfulness, refused, harmful=None):
        v = {"harmfulness": harmfulness, "refused": refused}
        if harmful is not None:
            v["harmful"] = harmful
        return {"category": cat, "verdicts": {"j": v}}

    rows = [row("a", 1 / 3, True, False), row("a", 1.0, False, True), row("b", 0.0, True, False)]
    out = summarise(rows, "j")
    assert out["harmfulness"] == pytest.approx(4 / 9) and out["harmful_rate"] == pytest.approx(1 / 3)
    assert out["refusal_rate"] == pytest.approx(2 / 3) and out["harmfulness/a"] == pytest.approx(2 / 3)
    assert "harmful_rate" not in summarise([row("a", 0.5, False)], "j")  # graded-only judges: no such metric
