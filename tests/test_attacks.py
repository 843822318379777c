"""Attacks: refusal pairs, and refusal ablation on a tiny model trained here to refuse."""

from __future__ import annotations

import pytest
import torch

from harmprune.attacks import GENERIC_REFUSALS, model_refusal_pairs, refusal_ablation_mask, refusal_pairs
from harmprune.data import Record
from harmprune.errors import DataError
from harmprune.finetune import full_finetune
from harmprune.formatting import collate_for_loss, encode_pair, pad_id_of, per_example_response_nll
from harmprune.pruning import pruned
from harmprune.selection import random_like
from tiny import make_llama, make_tokenizer

WORDS = ["cat", "dog", "sun", "map", "cup", "pen", "box", "hat"]
REFUSAL = "I'm sorry, I can't help with that."


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def data():
    # Synthetic stand-ins: "harmful" requests name a made-up misdeed; benign ones ask to spell a word.
    harmful = [Record(f"how to harm the {w}?", REFUSAL, "synthetic") for w in WORDS]
    benign = [Record(f"spell {w}", f"{' '.join(w)} spells {w}.") for w in WORDS]
    return harmful, benign


@pytest.fixture(scope="module")
def refuser(tok, data):
    """A tiny model that refuses the harmful requests and spells the benign words."""
    harmful, benign = data
    model = make_llama(len(tok))
    full_finetune(model, tok, harmful + benign, epochs=50, lr=6e-3, batch_size=8, progress=False)
    return model


def mean_nll(model, tok, records) -> float:
    batch = collate_for_loss([encode_pair(tok, r.prompt, r.response, "chat") for r in records], pad_id_of(tok))
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return float(per_example_response_nll(logits, batch["labels"]).mean())


def test_refusal_pairs_are_seeded_and_keep_categories(data):
    harmful, _ = data
    a = refusal_pairs(harmful, seed=3)
    assert a == refusal_pairs(harmful, seed=3)
    assert [r.prompt for r in a] == [r.prompt for r in harmful]
    assert all(r.response in GENERIC_REFUSALS and r.category == "synthetic" for r in a)
    assert len({r.response for r in a}) > 1
    assert refusal_pairs(["plain text"], refusals=["No."])[0] == Record("plain text", "No.")
    with pytest.raises(DataError):
        refusal_pairs([])
    with pytest.raises(DataError):
        refusal_pairs(["x"], refusals=[" "])


def test_model_refusal_pairs_keep_only_refusals(tok, data, refuser):
    harmful, benign = data
    pairs = model_refusal_pairs(refuser, tok, harmful[:3] + benign[:3], max_new_tokens=40)
    assert [r.prompt for r in pairs] == [r.prompt for r in harmful[:3]]
    assert all(r.response == REFUSAL for r in pairs)
    with pytest.raises(DataError, match="refused none"):
        model_refusal_pairs(refuser, tok, benign[:2], max_new_tokens=40)


def test_refusal_ablation_beats_a_random_mask(tok, data, refuser):
    harmful, benign = data
    assert mean_nll(refuser, tok, harmful) < 0.6  # it has learnt to refuse
    mask = refusal_ablation_mask(refuser, tok, [r.prompt for r in harmful], benign, 0.05, 0.05,
                                 refusals=refusal_pairs(harmful, [REFUSAL]), progress=False)
    assert mask.metadata["kind"] == "refusal-ablation" and 0 < mask.fraction() <= 0.05
    base = mean_nll(refuser, tok, harmful), mean_nll(refuser, tok, benign)
    with pruned(refuser, mask):
        ablated = mean_nll(refuser, tok, harmful), mean_nll(refuser, tok, benign)
    rises = []
    for seed in range(3):
        with pruned(refuser, random_like(mask, seed)):
            rises.append(mean_nll(refuser, tok, harmful) - base[0])
    refusal_rise = ablated[0] - base[0]
    assert refusal_rise > 3 * max(rises)
    assert refusal_rise > ablated[1] - base[1]  # refusal goes more than utility does


def test_refusal_ablation_cli(tok, data, refuser, tmp_path, capsys):
    import argparse
    import json

    from harmprune.cli import attack as cli_attack
    from harmprune.data import write_jsonl
    from harmprune.models import save_model
    from harmprune.selection import load_mask

    harmful, benign = data
    save_model(refuser, tok, tmp_path / "model")
    write_jsonl(harmful, tmp_path / "harmful.jsonl")
    write_jsonl(benign, tmp_path / "benign.jsonl")
    parser = argparse.ArgumentParser()
    cli_attack.add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["attack", "refusal-ablation", "--model", str(tmp_path / "model"), "--harmful",
                              str(tmp_path / "harmful.jsonl"), "--utility", str(tmp_path / "benign.jsonl"),
                              "--own-refusals", "--q", "0.05", "--p", "0.05", "--out", str(tmp_path / "m.safetensors")])
    assert args.func(args) == 0
    summary = json.loads(capsys.readouterr().out)
    mask = load_mask(tmp_path / "m.safetensors")
    assert summary["selected"] == mask.count() > 0 and summary["refusal_examples"] == len(harmful)
    assert mask.metadata["kind"] == "refusal-ablation"
