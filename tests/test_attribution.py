"""Attribution scores against plain per-example autograd and hand computations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from harmprune.attribution import compute_scores, load_scores, save_scores, scored_parameters
from harmprune.data import Record
from harmprune.errors import HarmpruneError
from harmprune.formatting import encode_pair
from tiny import make_llama, make_tokenizer

RECORDS = [
    Record("make a zorb", "Sure. Step 1: take the vex-coil."),
    Record("tell me a qux", "No."),
    Record("how to frobnicate the widget quickly", "First glimmer the widget, then twist it twice."),
    Record("x", "A fairly long response that is longer than the others by quite a margin, to test padding."),
    Record("what is 2+2", "4"),
]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture
def model(tok):
    """A fresh model per test: a shared one would carry state (the cached LM-head check) from earlier tests and
    hide order dependence, as it once hid snip failing on any freshly loaded model."""
    return make_llama(len(tok), seed=0)


def reference_grads(model, tok, records, fmt="chat", absolute=False):
    """Σ_i ∇L_i (or Σ_i |∇L_i|) by one plain autograd call per example; L_i = mean NLL of response tokens."""
    params = scored_parameters(model)
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for r in records:
        enc = encode_pair(tok, r.prompt, r.response, fmt)
        ids = torch.tensor([enc.input_ids])
        logits = model(input_ids=ids).logits[0]
        targets = ids[0, enc.n_prompt :]
        preds = logits[enc.n_prompt - 1 : -1]
        loss = nn.functional.cross_entropy(preds, targets)
        grads = torch.autograd.grad(loss, list(params.values()))
        for (n, _), g in zip(params.items(), grads):
            total[n] += g.abs() if absolute else g
    return params, total


def reference_wanda(model, tok, records, fmt="chat"):
    params = scored_parameters(model)
    modules = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    sq = {n: torch.zeros(p.shape[1]) for n, p in params.items()}
    for r in records:
        enc = encode_pair(tok, r.prompt, r.response, fmt)
        seen = {}
        handles = [modules[n].register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, i[0][0]))
                   for n in params]
        with torch.no_grad():
            model(input_ids=torch.tensor([enc.input_ids]))
        for h in handles:
            h.remove()
        for n in params:
            for t in range(enc.n_prompt, len(enc.input_ids)):
                sq[n] += seen[n][t] ** 2
    return {n: p.detach().abs() * sq[n].sqrt().unsqueeze(0) for n, p in params.items()}


def assert_close(a: dict, b: dict, rtol=1e-4):
    assert a.keys() == b.keys()
    for n in a:
        err = (a[n] - b[n]).abs().max() / b[n].abs().max().clamp(min=1e-12)
        assert err <= rtol, f"{n}: relative error {err:.2e}"


@pytest.mark.parametrize("batch_size", [1, 3, 5])
@pytest.mark.parametrize("fmt", ["chat", "raw", "pretrained"])
def test_signed_snip_equals_per_example_autograd(model, tok, batch_size, fmt):
    params, grads = reference_grads(model, tok, RECORDS, fmt)
    expected = {n: params[n].detach() * grads[n] for n in params}
    got = compute_scores(model, tok, RECORDS, "signed-snip", fmt=fmt, batch_size=batch_size, progress=False)
    assert_close(got.tensors, expected)
    assert got.metadata["examples"] == len(RECORDS)


@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_snip_takes_absolute_value_per_example(model, tok, batch_size):
    params, abs_grads = reference_grads(model, tok, RECORDS, absolute=True)
    expected = {n: params[n].detach().abs() * abs_grads[n] for n in params}
    got = compute_scores(model, tok, RECORDS, "snip", batch_size=batch_size, progress=False)
    assert_close(got.tensors, expected)
    # |Σ∇| would differ from Σ|∇|: make sure the test can tell them apart.
    _, grads = reference_grads(model, tok, RECORDS)
    name = next(iter(params))
    assert not torch.allclose(grads[name].abs(), abs_grads[name])


@pytest.mark.parametrize("batch_size", [1, 4])
def test_wanda_equals_hand_computation(model, tok, batch_size):
    got = compute_scores(model, tok, RECORDS, "wanda", batch_size=batch_size, progress=False)
    assert_close(got.tensors, reference_wanda(model, tok, RECORDS))


def test_magnitude(model, tok):
    got = compute_scores(model, tok, [], "magnitude", progress=False)
    for n, p in scored_parameters(model).items():
        assert torch.equal(got.tensors[n], p.detach().abs())


def test_default_modules_are_decoder_linears_only(model):
    names = set(scored_parameters(model))
    assert names and all(".layers." in n for n in names)
    assert "lm_head.weight" not in names and not any("embed" in n for n in names)
    assert len(names) == 7 * model.config.num_hidden_layers  # q k v o gate up down
    assert set(scored_parameters(model, r"mlp\.down_proj")) == {f"model.layers.{i}.mlp.down_proj.weight" for i in range(2)}


def test_changing_the_response_changes_scores(model, tok):
    base = compute_scores(model, tok, [RECORDS[0]], "signed-snip", progress=False).tensors
    again = compute_scores(model, tok, [Record(RECORDS[0].prompt, RECORDS[0].response)], "signed-snip",
                           progress=False).tensors
    other = compute_scores(model, tok, [Record(RECORDS[0].prompt, "Sure. Step 1: take the vex-coiX.")],
                           "signed-snip", progress=False).tensors
    assert_close(again, base, rtol=0)
    assert any(not torch.allclose(other[n], base[n]) for n in base)


def test_labels_on_prompt_positions_do_not_matter(model, tok):
    """The loss reads only response labels: corrupting the prompt part of the labels changes nothing."""
    from harmprune.formatting import collate_for_loss, per_example_response_nll

    enc = encode_pair(tok, RECORDS[2].prompt, RECORDS[2].response)
    batch = collate_for_loss([enc], pad_id=0)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"]).logits
    loss = per_example_response_nll(logits, batch["labels"])
    labels = batch["labels"].clone()
    assert (labels[0, : enc.n_prompt] == -100).all() and (labels[0, enc.n_prompt :] >= 0).all()
    wrong = labels.clone()
    wrong[0, enc.n_prompt - 1] = -100  # the last prompt token is context; its label is ignored either way
    assert torch.equal(per_example_response_nll(logits, wrong), loss)
    changed = labels.clone()
    changed[0, -1] = (changed[0, -1] + 1) % len(tok)
    assert not torch.equal(per_example_response_nll(logits, changed), loss)


def test_scoring_leaves_model_untouched(model, tok):
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    compute_scores(model, tok, RECORDS, "snip", progress=False)
    compute_scores(model, tok, RECORDS, "signed-snip", progress=False)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.grad is None and p.requires_grad == flags[n]


def test_gradient_checkpointing_gives_same_signed_snip(tok):
    model = make_llama(len(tok), seed=1)
    plain = compute_scores(model, tok, RECORDS, "signed-snip", batch_size=2, progress=False)
    ckpt = compute_scores(model, tok, RECORDS, "signed-snip", batch_size=2, progress=False,
                          gradient_checkpointing=True)
    assert_close(ckpt.tensors, plain.tensors, rtol=1e-5)
    with pytest.raises(HarmpruneError, match="checkpointing"):
        compute_scores(model, tok, RECORDS, "snip", gradient_checkpointing=True, progress=False)


def test_bad_inputs(model, tok):
    with pytest.raises(HarmpruneError, match="unknown method"):
        compute_scores(model, tok, RECORDS, "grad-norm")
    with pytest.raises(HarmpruneError, match="no response"):
        compute_scores(model, tok, [Record("p", None)], "signed-snip", progress=False)
    with pytest.raises(HarmpruneError, match="module pattern"):
        compute_scores(model, tok, RECORDS, "signed-snip", modules="nothing-matches-this")


def test_score_file_round_trip(model, tok, tmp_path):
    scores = compute_scores(model, tok, RECORDS[:2], "signed-snip", progress=False)
    path = save_scores(scores, tmp_path / "s.safetensors")
    back = load_scores(path)
    assert_close(back.tensors, scores.tensors, rtol=0)
    for key in ("method", "model", "data_sha256", "examples", "tokens", "prompt_format", "harmprune_version"):
        assert back.metadata[key] == scores.metadata[key]
    half = load_scores(save_scores(scores, tmp_path / "h.safetensors", dtype=torch.bfloat16))
    assert_close(half.tensors, scores.tensors, rtol=1e-2)
    assert half.metadata["save_dtype"] == "bfloat16"


def _batch(tok, records):
    from harmprune.formatting import collate_for_loss, pad_id_of

    return collate_for_loss([encode_pair(tok, r.prompt, r.response, "chat") for r in records], pad_id_of(tok))


def test_response_only_head_equals_full_logits(tok):
    from harmprune.formatting import per_example_response_nll, plain_lm_head, response_nll

    model = make_llama(len(tok), seed=3)
    batch = _batch(tok, RECORDS)
    full = per_example_response_nll(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                    batch["labels"])
    assert plain_lm_head(model, batch) is model.lm_head  # the fast path is taken for a plain Llama
    assert torch.allclose(response_nll(model, batch), full, rtol=1e-5, atol=1e-6)


def test_models_whose_logits_are_not_the_plain_head_use_the_full_logits(tok):
    """Soft-capped logits (as Gemma 2 does): the head-only path would be wrong, so it must not be taken."""
    from harmprune.formatting import per_example_response_nll, plain_lm_head, response_nll

    model = make_llama(len(tok), seed=4)
    inner = model.forward

    def capped(*args, **kwargs):
        out = inner(*args, **kwargs)
        out.logits = 2.0 * torch.tanh(out.logits / 2.0)
        return out

    model.forward = capped
    batch = _batch(tok, RECORDS)
    assert plain_lm_head(model, batch) is None
    expected = per_example_response_nll(capped(input_ids=batch["input_ids"],
                                               attention_mask=batch["attention_mask"]).logits, batch["labels"])
    assert torch.allclose(response_nll(model, batch), expected, rtol=1e-6)
    params, total = reference_grads(model, tok, RECORDS[:3])
    scores = compute_scores(model, tok, RECORDS[:3], "signed-snip", batch_size=2, progress=False)
    assert_close(scores.tensors, {n: params[n].detach() * total[n] for n in params})
