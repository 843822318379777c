"""Generation against a hand-written greedy loop and batch-1 runs; the generations.jsonl record."""

from __future__ import annotations

import json

import pytest
import torch

from harmprune.errors import HarmpruneError
from harmprune.formatting import prompt_ids, response_ids
from harmprune.generation import (
    generate,
    judge_generations,
    prefill_prefix,
    read_generations,
    write_generations,
)
from harmprune.judges import get_judge
from tiny import make_llama, make_tokenizer

PROMPTS = [
    "hi",
    "how do I bake bread at home quickly?",
    "x",
    "tell me a story about a cat that learns to fly",
    "abc def",
    "what is 1+1?",
    "please list three colours",
]
PREFIXES = ["", "Sure", "", "Once upon", "", "", "Red, gr"]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return make_llama(len(tok), seed=1)


def greedy_reference(model, ids: list[int], n_new: int, eos: set[int]) -> list[int]:
    """Greedy decoding by full forward passes on the unpadded sequence: no cache, no padding, no generate()."""
    seq = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(n_new):
            nxt = int(model(torch.tensor([seq])).logits[0, -1].argmax())
            out.append(nxt)
            if nxt in eos:
                break
            seq.append(nxt)
    return out


@pytest.mark.parametrize("fmt", ["chat", "raw"])
def test_batched_greedy_equals_reference_loop(model, tok, fmt):
    gens = generate(model, tok, PROMPTS, fmt=fmt, prefixes=PREFIXES, max_new_tokens=12, batch_size=4, progress=False)
    assert [g.prompt for g in gens] == PROMPTS and [g.prompt_index for g in gens] == list(range(len(PROMPTS)))
    for g, prompt, prefix in zip(gens, PROMPTS, PREFIXES):
        ids = prompt_ids(tok, prompt, fmt) + (response_ids(tok, prefix) if prefix else [])
        ref = greedy_reference(model, ids, 12, {tok.eos_token_id})
        assert g.response == tok.decode([t for t in ref if t != tok.eos_token_id], skip_special_tokens=True)
        assert g.prefix == prefix and g.n_new_tokens == len(ref) and g.sample_index == 0


def test_batch_size_does_not_change_greedy_outputs(model, tok):
    runs = [
        generate(model, tok, PROMPTS, prefixes=PREFIXES, max_new_tokens=16, batch_size=bs, progress=False)
        for bs in (1, 3, 8)
    ]
    assert runs[0] == runs[1] == runs[2]


def test_stops_at_eos_even_when_batch_neighbours_continue(tok):
    model = make_llama(len(tok), seed=1)
    free = generate(model, tok, PROMPTS[:3], max_new_tokens=10, batch_size=3, progress=False)
    first_ids = response_ids(tok, free[1].response)
    stop_token = first_ids[3]
    cut = first_ids.index(stop_token)
    model.generation_config.eos_token_id = [tok.eos_token_id, stop_token]
    for bs in (1, 3):
        gens = generate(model, tok, PROMPTS[:3], max_new_tokens=10, batch_size=bs, progress=False)
        assert gens[1].finished and gens[1].n_new_tokens == cut + 1
        assert gens[1].response == tok.decode(first_ids[:cut])
        for g, f in zip(gens, free):
            assert f.response.startswith(g.response)


def test_prefill_prefix_is_first_k_tokens(tok):
    reference = "Sure, here is a synthetic plan for the zorb."
    assert prefill_prefix(tok, reference, k=10) == reference[:10]  # one token per character
    assert prefill_prefix(tok, reference, k=0) == ""
    assert prefill_prefix(tok, "short", k=10) == "short"
    with pytest.raises(HarmpruneError):
        prefill_prefix(tok, reference, k=-1)


def test_sampling_is_seeded_and_ordered(model, tok):
    kw = dict(do_sample=True, n_samples=3, max_new_tokens=8, temperature=1.5, top_p=0.95, progress=False)
    a = generate(model, tok, PROMPTS[:2], seed=5, **kw)
    b = generate(model, tok, PROMPTS[:2], seed=5, **kw)
    c = generate(model, tok, PROMPTS[:2], seed=6, **kw)
    assert a == b and a != c
    assert [(g.prompt_index, g.sample_index) for g in a] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert len({g.response for g in a}) > 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_samples": 2},
        {"prefixes": ["a"]},
        {"max_new_tokens": 0},
        {"do_sample": True, "temperature": 0.0},
        {"fmt": "nope"},
    ],
)
def test_bad_arguments_raise(model, tok, kwargs):
    with pytest.raises(HarmpruneError):
        generate(model, tok, PROMPTS[:2], progress=False, **kwargs)


def test_chat_format_needs_a_template(model, tok):
    no_template = make_tokenizer()
    no_template.chat_template = None
    with pytest.raises(HarmpruneError, match="chat template"):
        generate(model, no_template, ["hi"], progress=False)


def test_generations_jsonl_round_trip(model, tok, tmp_path):
    prompts = ["make a zorb", "tell me a qux"]
    gens = generate(model, tok, prompts, prefixes=["Sure", ""], max_new_tokens=6, progress=False)
    records = judge_generations(gens, [get_judge("refusal")], categories=["synthetic", None])
    path = write_generations(tmp_path / "out" / "generations.jsonl", records)
    rows = read_generations(path)
    assert [r["prompt"] for r in rows] == ["make a zorb", "tell me a qux"]
    assert rows[0]["prefix"] == "Sure" and rows[0]["response"] == gens[0].response
    assert rows[0]["category"] == "synthetic" and rows[1]["category"] is None
    verdict = rows[0]["verdicts"]["refusal"]
    assert set(verdict) >= {"harmfulness", "refused", "reason"} and verdict["refused"] is True  # 6 chars: short
    assert sorted(p.name for p in path.parent.iterdir()) == ["generations.jsonl"]  # no temporary file left
    plain = write_generations(tmp_path / "plain.jsonl", gens)
    assert read_generations(plain)[1]["verdicts"] == {}


def test_write_is_atomic_on_error(tmp_path):
    path = tmp_path / "generations.jsonl"
    path.write_text('{"old": 1}\n')

    def rows():
        yield {"prompt": "a"}
        raise RuntimeError("judge crashed")

    with pytest.raises(RuntimeError):
        write_generations(path, rows())
    assert json.loads(path.read_text()) == {"old": 1}


@pytest.mark.slow
def test_smollm2_batched_greedy_equals_batch_1():
    from harmprune.models import load_model

    model, tokenizer = load_model("smollm2-135m-instruct")
    prompts = ["Name three primary colours.", "What is the capital of France?", "Write a haiku about rain.", "Hi!"]
    prefixes = ["", "The capital", "", ""]
    one = generate(model, tokenizer, prompts, prefixes=prefixes, max_new_tokens=24, batch_size=1, progress=False)
    four = generate(model, tokenizer, prompts, prefixes=prefixes, max_new_tokens=24, batch_size=4, progress=False)
    assert one == four
    assert all(g.response.strip() for g in four) and not four[1].response.startswith("The capital")
