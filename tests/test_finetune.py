"""Fine-tuning: LoRA on response tokens, adapters on pruned models checked by hand, keep-pruned, determinism."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from harmprune.attribution import scored_parameters
from harmprune.data import Record
from harmprune.errors import DataError, HarmpruneError
from harmprune.finetune import (
    INFO_FILE, MASK_FILE, default_target_modules, encode_for_training, full_finetune, load_adapter, lora_finetune,
    merge, planned_steps, response_nll, save_adapter,
)
from harmprune.formatting import collate_for_loss, encode_pair, pad_id_of, per_example_response_nll
from harmprune.generation import generate
from harmprune.pruning import apply_mask
from harmprune.selection import Mask
from tiny import make_llama, make_tokenizer

LAYER = "model.layers.0.self_attn.q_proj"
WORDS = ["cat", "dog", "sun", "map", "cup", "pen", "box", "hat"]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def records():
    return [Record(f"echo {w}", "ok.") for w in WORDS]


def mean_nll(model, tok, records) -> float:
    batch = collate_for_loss([encode_pair(tok, r.prompt, r.response, "chat") for r in records], pad_id_of(tok))
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return float(per_example_response_nll(logits, batch["labels"]).mean())


def random_mask(model, fraction=0.3, seed=0) -> Mask:
    gen = torch.Generator().manual_seed(seed)
    params = scored_parameters(model)
    idx = {n: torch.randperm(p.numel(), generator=gen)[: int(fraction * p.numel())].sort().values
           for n, p in params.items()}
    return Mask(idx, {n: tuple(p.shape) for n, p in params.items()}, {"kind": "test"})


def layer_io(peft_model, layer_name, input_ids):
    """Input and output of one adapted layer during a forward pass."""
    module = dict(peft_model.get_base_model().named_modules())[layer_name]
    seen = {}
    handle = module.register_forward_hook(lambda m, i, o: seen.update(x=i[0].detach(), y=o.detach()))
    with torch.no_grad():
        peft_model(input_ids=input_ids)
    handle.remove()
    return module, seen["x"], seen["y"]


def lora_delta(module) -> torch.Tensor:
    return (module.lora_B["default"].weight @ module.lora_A["default"].weight).detach() * module.scaling["default"]


def test_default_targets_are_block_linears_only(tok):
    model = make_llama(len(tok))
    assert default_target_modules(model) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj",
                                             "v_proj"]


def test_encoding_appends_eos_only_to_whole_responses(tok):
    whole, cut, unfinished = encode_for_training(
        tok, [Record("hi", "abc"), Record("hi", "x" * 50), Record("hi", "abc", source={"truncated": True})],
        max_length=30)
    assert whole.input_ids[-1] == tok.eos_token_id and whole.n_response == 4
    assert len(cut.input_ids) == 30 and cut.input_ids[-1] != tok.eos_token_id
    assert unfinished.input_ids == whole.input_ids[:-1]
    with pytest.raises(DataError, match="no response"):
        encode_for_training(tok, [Record("hi", None)])


def test_response_nll_skips_prompt_logits_exactly(tok):
    model = make_llama(len(tok))
    pairs = [("a much longer prompt here", "ok"), ("hi", "a longer answer"), ("mid prompt", "x")]
    batch = collate_for_loss(encode_for_training(tok, [Record(p, r) for p, r in pairs]), pad_id_of(tok))
    with torch.no_grad():
        full = per_example_response_nll(model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits,
                                         batch["labels"])
        torch.testing.assert_close(response_nll(model, batch), full)


def test_planned_steps():
    assert planned_steps(10, 4, 1, None) == 3
    assert planned_steps(10, 4, 2.5, None) == 8
    assert planned_steps(10, 4, 3, 5) == 5


def test_lora_learns_is_deterministic_and_keeps_global_rng(tok, records):
    base_nll = mean_nll(make_llama(len(tok)), tok, records)
    runs = []
    for _ in range(2):
        model = make_llama(len(tok))
        torch.manual_seed(123)
        # The tiny model's random LM head caps its logits near zero, so the head is adapted too.
        targets = [*default_target_modules(model), "lm_head"]
        peft_model = lora_finetune(model, tok, records, rank=4, epochs=10, lr=2e-2, batch_size=4,
                                   target_modules=targets, progress=False)
        after_rng = torch.rand(1)
        runs.append((peft_model, after_rng))
    (a, rng_a), (b, rng_b) = runs
    torch.manual_seed(123)
    assert torch.equal(rng_a, torch.rand(1))  # the caller's RNG stream is untouched
    state_a, state_b = a.state_dict(), b.state_dict()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    info = a.finetune_info
    assert info["steps"] == 20 and info["examples"] == len(records) and info["rank"] == 4
    assert info["losses"][-1] < 0.5 * info["losses"][0]
    assert mean_nll(a, tok, records) < 0.5 * base_nll
    assert not any(p.requires_grad for n, p in a.named_parameters() if "lora_" not in n)


def test_adapter_on_pruned_model_equals_hand_computation(tok, records, tmp_path):
    trained = lora_finetune(make_llama(len(tok)), tok, records, rank=4, max_steps=5, lr=1e-2, progress=False)
    save_adapter(trained, tmp_path / "adapter")
    assert (tmp_path / "adapter" / INFO_FILE).exists() and not (tmp_path / "adapter" / MASK_FILE).exists()

    model = make_llama(len(tok))
    mask = random_mask(model)
    apply_mask(model, mask)
    w_pruned = model.get_parameter(f"{LAYER}.weight").detach().clone()
    peft_model = load_adapter(model, tmp_path / "adapter")
    ids = torch.tensor([encode_pair(tok, "echo sun", "sun", "chat").input_ids])
    module, x, y = layer_io(peft_model, LAYER, ids)
    delta = lora_delta(module)
    assert delta.abs().max() > 1e-4  # the adapter has learned something
    torch.testing.assert_close(y, F.linear(x, w_pruned + delta), rtol=1e-5, atol=1e-6)
    # The plain adapter regrows pruned weights: the merged weight is W_pruned + ΔW everywhere.
    with torch.no_grad():
        logits = peft_model(input_ids=ids).logits
    merged = merge(peft_model)
    torch.testing.assert_close(merged.get_parameter(f"{LAYER}.weight"), w_pruned + delta, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, logits, rtol=1e-4, atol=1e-5)


def test_keep_pruned_holds_pruned_weights_at_zero(tok, records, tmp_path):
    model = make_llama(len(tok))
    mask = random_mask(model, seed=1)
    peft_model = lora_finetune(model, tok, records, rank=4, epochs=5, lr=2e-2, batch_size=4, keep_pruned=mask,
                               progress=False)
    assert peft_model.finetune_info["keep_pruned"]["selected"] == mask.count()
    ids = torch.tensor([encode_pair(tok, "echo cup", "cup", "chat").input_ids])
    module, x, y = layer_io(peft_model, LAYER, ids)
    w_pruned = module.base_layer.weight.detach()
    keep = ~mask.dense(f"{LAYER}.weight")
    assert (w_pruned[~keep] == 0).all()
    delta = lora_delta(module)
    torch.testing.assert_close(y, F.linear(x, w_pruned + delta * keep), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(y, F.linear(x, w_pruned + delta), atol=1e-4)  # the masking did something

    save_adapter(peft_model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / MASK_FILE).exists()
    with torch.no_grad():
        logits = peft_model(input_ids=ids).logits
    texts = [g.response for g in generate(peft_model, tok, WORDS[:3], max_new_tokens=6, progress=False)]
    merged = merge(peft_model)
    assert [g.response for g in generate(merged, tok, WORDS[:3], max_new_tokens=6, progress=False)] == texts
    for name, idx in mask.indices.items():
        assert (merged.get_parameter(name).view(-1)[idx] == 0).all()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, logits, rtol=1e-4, atol=1e-5)

    # Loading onto a fresh, unpruned copy applies the saved mask and reproduces the same model.
    reloaded = load_adapter(make_llama(len(tok)), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, logits, rtol=1e-4, atol=1e-5)
    assert reloaded.finetune_info["steps"] == peft_model.finetune_info["steps"]


def test_full_finetune_keeps_pruned_zero_and_learns(tok, records):
    model = make_llama(len(tok))
    base_nll = mean_nll(model, tok, records)
    mask = random_mask(model, seed=2)
    full_finetune(model, tok, records, epochs=20, lr=3e-3, batch_size=4, weight_decay=0.1, keep_pruned=mask,
                  progress=False)
    for name, idx in mask.indices.items():
        assert (model.get_parameter(name).view(-1)[idx] == 0).all()
    assert mean_nll(model, tok, records) < 0.5 * base_nll
    assert not model.training


def test_bad_arguments(tok, records, tmp_path):
    with pytest.raises(HarmpruneError, match="positive"):
        lora_finetune(make_llama(len(tok)), tok, records, rank=0, progress=False)
    with pytest.raises(HarmpruneError, match="not a LoRA adapter"):
        load_adapter(make_llama(len(tok)), tmp_path)


def run_cli(module, argv: list[str]) -> int:
    """Run one command group's handler through its own parser (independent of the top-level wiring)."""
    import argparse

    parser = argparse.ArgumentParser()
    module.add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_finetune_cli_with_mask_and_merge(tok, records, tmp_path, capsys):
    import json

    from harmprune.cli import finetune as cli_finetune
    from harmprune.data import write_jsonl
    from harmprune.models import load_model, save_model
    from harmprune.selection import save_mask

    model = make_llama(len(tok))
    save_model(model, tok, tmp_path / "base")
    mask = random_mask(model, seed=3)
    save_mask(mask, tmp_path / "mask.safetensors")
    write_jsonl(records, tmp_path / "data.jsonl")
    out = tmp_path / "adapter"
    assert run_cli(cli_finetune, ["finetune", "--model", str(tmp_path / "base"), "--data", str(tmp_path / "data.jsonl"),
                                  "--out", str(out), "--mask", str(tmp_path / "mask.safetensors"), "--keep-pruned",
                                  "--rank", "2", "--epochs", "3", "--max-steps", "2", "--lr", "1e-2", "--merge"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 2 and (out / MASK_FILE).exists()
    merged, _ = load_model(summary["merged"])
    for name, idx in mask.indices.items():
        assert (merged.get_parameter(name).view(-1)[idx] == 0).all()
    with pytest.raises(HarmpruneError, match="needs --mask"):
        run_cli(cli_finetune, ["finetune", "--model", str(tmp_path / "base"), "--data", str(tmp_path / "data.jsonl"),
                               "--out", str(out), "--keep-pruned"])
