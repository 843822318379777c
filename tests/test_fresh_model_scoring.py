"""Every scoring method on a model that has never run anything: through the CLI in a fresh process, the API and a
config, in any call order, against plain autograd written here.

The regression: ``snip`` crashed on any freshly loaded model ("cannot register a hook on a tensor that doesn't
require gradient") because the loss's one-time LM-head check ran a no-grad forward while snip's hooks were
installed; a test that shared one model across tests had the check cached and passed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import harmprune
from harmprune.attribution import compute_scores, scored_parameters
from harmprune.data import Record
from harmprune.tensorfile import TensorFile
from tiny import make_llama, make_tokenizer

PAIRS = [
    ("make a zorb", "Sure. Step 1: take the vex-coil."),
    ("tell me a qux", "No."),
    ("how to frobnicate the widget", "First glimmer the widget, then twist it twice."),
    ("what is 2+2", "4, as everyone knows."),
]
SRC = str(Path(harmprune.__file__).resolve().parents[1])


def _pretrained_ids(tok, prompt: str, response: str) -> tuple[list[int], int]:
    """The study's pretrained format, tokenised here independently: prompt + newline, then the response; no BOS."""
    p = tok(prompt + "\n", add_special_tokens=False)["input_ids"]
    r = tok(response, add_special_tokens=False)["input_ids"]
    return p + r, len(p)


def reference_scores(model, tok, method: str) -> dict[str, torch.Tensor]:
    """Per-example autograd: signed-snip W·Σᵢ∇Lᵢ, snip |W|·Σᵢ|∇Lᵢ|; wanda |W|·‖X‖ over response positions."""
    params = scored_parameters(model)
    if method == "magnitude":
        return {n: p.detach().abs() for n, p in params.items()}
    modules = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    total = {n: torch.zeros(p.shape if method != "wanda" else p.shape[1]) for n, p in params.items()}
    for prompt, response in PAIRS:
        ids, n_prompt = _pretrained_ids(tok, prompt, response)
        x = torch.tensor([ids])
        if method == "wanda":
            seen = {}
            hooks = [modules[n].register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, i[0][0]))
                     for n in params]
            with torch.no_grad():
                model(input_ids=x)
            for h in hooks:
                h.remove()
            for n in params:
                total[n] += (seen[n][n_prompt:] ** 2).sum(dim=0)
            continue
        logits = model(input_ids=x).logits[0]
        loss = nn.functional.cross_entropy(logits[n_prompt - 1 : -1], x[0, n_prompt:])
        for (n, _), g in zip(params.items(), torch.autograd.grad(loss, list(params.values()))):
            total[n] += g.abs() if method == "snip" else g
    if method == "wanda":
        return {n: p.detach().abs() * total[n].sqrt().unsqueeze(0) for n, p in params.items()}
    return {n: (p.detach().abs() if method == "snip" else p.detach()) * total[n] for n, p in params.items()}


def assert_close(got: dict, expected: dict, rtol: float = 1e-4) -> None:
    assert got.keys() == expected.keys()
    for n in expected:
        err = float((got[n] - expected[n]).abs().max() / expected[n].abs().max().clamp(min=1e-12))
        assert err < rtol, f"{n}: relative error {err:.2e}"


@pytest.fixture
def fresh(tmp_path):
    """A tiny Llama saved to disk (never run), its tokenizer, and the pairs as a JSONL file."""
    tok = make_tokenizer()
    model = make_llama(len(tok), seed=7)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in PAIRS))
    return tmp_path, model, tok


@pytest.mark.parametrize("method, batch_size, fresh_process", [
    ("snip", 1, False), ("snip", 3, True), ("signed-snip", 2, True), ("wanda", 2, True), ("magnitude", 2, True)])
def test_cli_scores_a_fresh_model(fresh, method, batch_size, fresh_process):
    """Every method in its own ``python -m harmprune score`` process; snip at batch size 1 also through the CLI
    in this process (the model is loaded from disk, never run: the state the bug needed)."""
    d, model, tok = fresh
    out = d / f"{method}.safetensors"
    argv = ["score", "--model", str(d / "model"), "--data", str(d / "pairs.jsonl"), "--method", method,
            "--out", str(out), "--batch-size", str(batch_size), "--device", "cpu"]
    if fresh_process:
        env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run([sys.executable, "-m", "harmprune", *argv], capture_output=True, text=True, env=env,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
    else:
        from harmprune.cli import main

        assert main(argv) == 0
    f = TensorFile(out)
    assert f.metadata["method"] == method
    if method != "magnitude":
        assert f.metadata["prompt_format"] == "pretrained"  # the score command's default: the study's format
    assert_close({n: t.float() for n, t in f.items()}, reference_scores(model, tok, method))


@pytest.mark.parametrize("method", ["signed-snip", "snip", "wanda"])
def test_api_any_call_order(fresh, method):
    """First call on a fresh model, and after other work (a likelihood pass, another method) on the same model."""
    from harmprune.evals.likelihood import harmful_likelihood

    d, model, tok = fresh
    records = [Record(p, r) for p, r in PAIRS]
    expected = reference_scores(model, tok, method)
    first = compute_scores(model, tok, records, method, fmt="pretrained", batch_size=3, progress=False)
    assert_close(first.tensors, expected)
    other = make_llama(len(tok), seed=7)  # the same weights, a fresh object: warm it up differently first
    harmful_likelihood(other, tok, records[:2], fmt="chat", batch_size=2)  # runs and caches the head check
    compute_scores(other, tok, records[:1], "signed-snip" if method != "signed-snip" else "snip", fmt="raw",
                   progress=False)
    again = compute_scores(other, tok, records, method, fmt="pretrained", batch_size=2, progress=False)
    assert_close(again.tensors, expected)


def test_config_scores_snip_first_on_a_fresh_model(fresh):
    """A runner whose first stage is the utility set's snip scores (the study's default recipe)."""
    from harmprune.experiments import load_checked_config
    from harmprune.experiments.runner import Runner

    d, model, tok = fresh
    (d / "c.toml").write_text('name = "fresh"\n[models.m]\npath = "model"\n[data.pairs]\npath = "pairs.jsonl"\n'
                              '[scoring]\nharm = "pairs"\nutility = "pairs"\nbatch_size = 3\n')
    runner = Runner(load_checked_config(d / "c.toml"), d / "run")
    path = runner.scores("m", "pairs", "utility")
    f = TensorFile(path)
    assert (f.metadata["method"], f.metadata["prompt_format"]) == ("snip", "pretrained")
    assert_close({n: t.float() for n, t in f.items()}, reference_scores(model, tok, "snip"))


def _family(name: str, vocab: int):
    """A tiny randomly initialised model of one supported architecture (seeded)."""
    import transformers as tf

    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    configs = {
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, {}),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM, {}),
        "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM, {"head_dim": 8, "final_logit_softcapping": 30.0}),
        "gemma3": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, {"head_dim": 8}),
    }
    config_cls, model_cls, extra = configs[name]
    torch.manual_seed(3)
    return model_cls(config_cls(**common, **extra)).eval()


@pytest.mark.parametrize("family", ["qwen2", "mistral", "gemma2", "gemma3"])
def test_snip_on_a_freshly_loaded_model_of_each_family(tmp_path, family):
    """Gemma 2's soft-capped logits take the full-logit path, the others the head-only one; both start with the
    head check, which must not meet snip's hooks."""
    from harmprune.models import load_model

    tok = make_tokenizer()
    _family(family, len(tok)).save_pretrained(tmp_path / family)
    tok.save_pretrained(tmp_path / family)
    model, tok = load_model(str(tmp_path / family), dtype="float32", device="cpu")
    records = [Record(p, r) for p, r in PAIRS]
    got = compute_scores(model, tok, records, "snip", fmt="pretrained", batch_size=3, progress=False)
    assert_close(got.tensors, reference_scores(model, tok, "snip"))
