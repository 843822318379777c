"""Pruning: bit-exact restore, checks before change, and the first-order sanity of harm-support."""

from __future__ import annotations

import pytest
import torch

from harmprune.attribution import compute_scores, scored_parameters
from harmprune.data import Record
from harmprune.errors import ScoreFileError
from harmprune.formatting import collate_for_loss, encode_pair, per_example_response_nll
from harmprune.pruning import apply_mask, pruned
from harmprune.selection import Mask, random_like, save_mask, select
from tiny import make_llama, make_tokenizer


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_prune_context_restores_bit_exact(tok, tmp_path):
    model = make_llama(len(tok))
    before = state(model)
    scores = {n: torch.randn(p.shape) for n, p in scored_parameters(model).items()}
    mask = select(scores, None, 0.1, 0.0, harm_method="snip")
    path = save_mask(mask, tmp_path / "m.safetensors")
    with pruned(model, path):
        for n, idx in mask.indices.items():
            w = dict(model.named_parameters())[n].view(-1)
            assert (w[idx] == 0).all()
            untouched = torch.ones(w.numel(), dtype=torch.bool)
            untouched[idx] = False
            assert torch.equal(w[untouched], before[n].view(-1)[untouched])
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])  # bit-exact, NaN-free weights


def test_restore_after_exception_and_bf16(tok):
    model = make_llama(len(tok)).to(torch.bfloat16)
    before = state(model)
    name = "model.layers.0.mlp.up_proj.weight"
    mask = Mask({name: torch.tensor([0, 5, 9])}, {name: tuple(before[name].shape)})
    with pytest.raises(RuntimeError):
        with pruned(model, mask, alpha=0.5):
            assert torch.equal(dict(model.named_parameters())[name].view(-1)[:1], before[name].view(-1)[:1] * 0.5)
            raise RuntimeError("boom")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_bad_masks_fail_before_any_change(tok):
    model = make_llama(len(tok))
    before = state(model)
    good = "model.layers.0.mlp.up_proj.weight"
    shape = tuple(before[good].shape)
    cases = [
        (Mask({good: torch.tensor([0]), "nope.weight": torch.tensor([0])}, {good: shape, "nope.weight": (2, 2)}),
         "does not have"),
        (Mask({good: torch.tensor([0, before[good].numel()])}, {good: shape}), "outside"),
        (Mask({good: torch.tensor([0])}, {good: (3, 3)}), "shape"),
    ]
    for mask, msg in cases:
        with pytest.raises(ScoreFileError, match=msg):
            apply_mask(model, mask)
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def harmful_loss(model, tok, records):
    batch = collate_for_loss([encode_pair(tok, r.prompt, r.response) for r in records], pad_id=0)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return per_example_response_nll(logits, batch["labels"]).mean().item()


def test_zeroing_top_harm_support_raises_loss_more_than_random(tok):
    """First-order sanity on a tiny trained model: the signed-SNIP harm set matters more than random weights."""
    torch.manual_seed(0)
    model = make_llama(len(tok), seed=3, hidden=48)
    records = [Record(f"request {i}", f"Sure. Step {i}: add vex-coil and glimmerdust.") for i in range(8)]
    batch = collate_for_loss([encode_pair(tok, r.prompt, r.response) for r in records], pad_id=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(60):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = per_example_response_nll(logits, batch["labels"]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    base = harmful_loss(model, tok, records)
    scores = compute_scores(model, tok, records, "signed-snip", progress=False)
    mask = select(scores.tensors, None, 0.002, 0.0, harm_method="signed-snip")
    assert mask.count() > 0
    with pruned(model, mask):
        targeted = harmful_loss(model, tok, records)
    random_losses = []
    for seed in range(5):
        with pruned(model, random_like(mask, seed=seed)):
            random_losses.append(harmful_loss(model, tok, records))
    assert targeted - base > 5 * max(max(r - base for r in random_losses), 1e-3)
