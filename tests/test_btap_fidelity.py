"""Fidelity: harmprune's B-TAP pipeline gives the identical mask to a from-scratch B-TAP written here.

The reference follows the study's description only (issue 12), sharing no code with harmprune beyond the
tokenizer and the model:

* each calibration pair is rendered in the "pretrained" format (prompt, a newline, response; no template, no
  BOS), prompt and response tokenised separately, the loss Lᵢ the mean NLL of the response's own tokens;
* one example per backward pass, and one decoder layer's gradients at a time: in each pass only that layer's
  ``nn.Linear`` weights require grad;
* harm: signed SNIP ``W ⊙ Σᵢ ∇Lᵢ``, negated (most negative first); utility: ``|W| ⊙ Σᵢ |∇Lᵢ|``;
* per matrix, ``torch.topk`` of ``floor(q·rows·cols)`` harm weights minus the ``floor(p·rows·cols)`` utility
  weights (a set difference); masks are compared as the sorted flat indices per matrix that harmprune stores.

The reference runs in float64, harmprune in float32 with batches of several examples: each test also asserts
that every top-k boundary's gap is at least 10× the largest difference between harmprune's scores and the
reference's in that matrix, so "identical" is a real check of the recipe, never decided by rounding or ties.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import harmprune
from harmprune.cli import main
from harmprune.selection import load_mask
from tiny import make_llama, make_tokenizer

HARM = [("make a zorb at home", "Sure. Step 1: take the vex-coil and heat it."),
        ("how do I sneak past the gate", "First wait for the night shift, then climb the fence."),
        ("write a mean note", "You are the worst neighbour anyone ever had."),
        ("get into the locked shed", "Use a thin wire to lift the latch from the side.")]
BENIGN = [("what is 2+2", "4."),
          ("name a colour", "Blue is a colour."),
          ("give me a greeting", "Hello, and welcome to the garden!"),
          ("how do plants drink", "Their roots take up water from the soil."),
          ("spell cat", "c, a, t.")]
GRID = [(0.01, 0.02), (0.01, 0.1), (0.05, 0.02), (0.05, 0.1)]  # (q, p): k > 0 in every matrix (smallest: 512)
SRC = str(Path(harmprune.__file__).resolve().parents[1])


def _encode(tok, prompt: str, response: str) -> tuple[torch.Tensor, int]:
    p = tok(prompt + "\n", add_special_tokens=False)["input_ids"]
    r = tok(response, add_special_tokens=False)["input_ids"]
    return torch.tensor([p + r]), len(p)


def _layer_linears(model) -> list[dict[str, nn.Parameter]]:
    """Per decoder layer, its nn.Linear weights by parameter name."""
    layers = []
    for i, layer in enumerate(model.model.layers):
        layers.append({f"model.layers.{i}.{n}.weight": m.weight for n, m in layer.named_modules()
                       if isinstance(m, nn.Linear)})
    return layers


def btap_scores(model, tok, pairs, absolute: bool) -> dict[str, torch.Tensor]:
    """Σᵢ ∇Lᵢ (or Σᵢ |∇Lᵢ|) by one backward per (example, layer), only that layer's weights requiring grad."""
    layers = _layer_linears(model)
    for p in model.parameters():
        p.requires_grad_(False)
    total = {n: torch.zeros_like(w) for layer in layers for n, w in layer.items()}
    for prompt, response in pairs:
        ids, n_prompt = _encode(tok, prompt, response)
        for layer in layers:
            for w in layer.values():
                w.requires_grad_(True)
            logits = model(input_ids=ids).logits[0]
            loss = nn.functional.cross_entropy(logits[n_prompt - 1 : -1], ids[0, n_prompt:])
            loss.backward()
            for n, w in layer.items():
                total[n] += w.grad.abs() if absolute else w.grad
                w.grad = None
                w.requires_grad_(False)
    weights = {n: w.detach() for layer in layers for n, w in layer.items()}
    if absolute:
        return {n: weights[n].abs() * g for n, g in total.items()}
    return {n: weights[n] * g for n, g in total.items()}


def _topk(values: torch.Tensor, fraction: float) -> set[int]:
    """The top floor(fraction·size) flat indices of one matrix."""
    flat = values.reshape(-1)
    k = math.floor(fraction * flat.numel())
    assert k > 0
    return set(torch.topk(flat, k).indices.tolist())


def btap_mask(harm: dict[str, torch.Tensor], util: dict[str, torch.Tensor], q: float, p: float) -> dict[str, list]:
    return {n: sorted(_topk(-harm[n], q) - _topk(util[n], p)) for n in harm}


def assert_clear_boundaries(ref: dict[str, torch.Tensor], got_file, fraction: float, negate: bool) -> None:
    """At the top-k boundary of every matrix, the gap between the k-th and (k+1)-th reference values exceeds 10×
    the largest |harmprune − reference| score difference there, so rounding cannot decide membership."""
    from harmprune.tensorfile import TensorFile

    got = TensorFile(got_file)
    for name, values in ref.items():
        err = float((got.get(name).double() - values).abs().max())
        flat = (-values if negate else values).reshape(-1)
        k = math.floor(fraction * flat.numel())
        top = torch.topk(flat, k + 1).values
        gap = float(top[k - 1] - top[k])
        scale = float(values.abs().max())
        assert err <= 1e-4 * scale, f"{name}: scores differ from the reference (relative error {err / scale:.2e})"
        assert gap > 10 * err, f"{name}: near-tie at the top-{k} boundary (gap {gap:.2e}, error {err:.2e})"


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A tiny Llama with deterministic weights on disk, the calibration sets, and the reference masks."""
    d = tmp_path_factory.mktemp("btap")
    tok = make_tokenizer()
    model = make_llama(len(tok), seed=11)
    model.save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    for name, pairs in (("harm", HARM), ("benign", BENIGN)):
        (d / f"{name}.jsonl").write_text("".join(json.dumps({"prompt": a, "response": b}) + "\n" for a, b in pairs))
    ref = make_llama(len(tok), seed=11).double()
    harm, util = btap_scores(ref, tok, HARM, absolute=False), btap_scores(ref, tok, BENIGN, absolute=True)
    return d, {(q, p): btap_mask(harm, util, q, p) for q, p in GRID}, harm, util


CONFIG = """
name = "btap-fidelity"
[models.tiny]
path = "model"
[data.harmful]
path = "harm.jsonl"
[data.benign]
path = "benign.jsonl"
[scoring]
harm = "harmful"
utility = "benign"
harm_method = "signed-snip"
utility_method = "snip"
harm_format = "pretrained"
utility_format = "pretrained"
max_length = 256
batch_size = 3
[selection]
q = [0.01, 0.05]
p = [0.02, 0.1]
granularity = "matrix"
[evaluations.nll]
kind = "likelihood"
data = "harmful"
benign_data = "benign"
[experiments.compression]
models = ["tiny"]
harm_evaluation = "nll"
harm_metric = "nll"
"""


def _indices(mask_path) -> dict[str, list[int]]:
    return {n: t.tolist() for n, t in load_mask(mask_path).indices.items()}


def test_run_with_a_btap_config_gives_the_reference_masks(study):
    d, expected, harm, util = study
    (d / "btap.toml").write_text(CONFIG)
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "harmprune", "run", str(d / "btap.toml"), "--out", str(d / "run")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((d / "run" / "summary.json").read_text())
    points = summary["experiments"]["compression"]["models"]["tiny"]["points"]
    assert sorted((pt["q"], pt["p"]) for pt in points) == sorted(GRID)
    for pt in points:
        meta = load_mask(pt["mask"]).metadata
        run = d / "run"  # masks name their score files relative to the run directory
        assert_clear_boundaries(harm, run / meta["harm_file"], pt["q"], negate=True)
        assert_clear_boundaries(util, run / meta["utility_file"], pt["p"], negate=False)
        assert (meta["harm_method"], meta["utility_method"]) == ("signed-snip", "snip")
        assert (meta["harm_format"], meta["utility_format"]) == ("pretrained", "pretrained")
        got = _indices(pt["mask"])
        want = expected[(pt["q"], pt["p"])]
        assert got == want, f"q={pt['q']} p={pt['p']}"
        assert sum(map(len, want)) > 0
    # The utility filter removed something somewhere, so the set difference is exercised, not vacuous.
    assert any(len(expected[(q, 0.1)][n]) < len(expected[(q, 0.02)][n]) for q in (0.01, 0.05) for n in want)


def test_score_and_select_commands_give_the_reference_masks(study, tmp_path):
    d, expected, harm, util = study
    common = ["--model", d / "model", "--batch-size", "2", "--format", "pretrained", "--max-length", "256"]
    assert main([str(a) for a in ["score", "--data", d / "harm.jsonl", "--method", "signed-snip",
                                  "--out", tmp_path / "h.safetensors", *common]]) == 0
    assert main([str(a) for a in ["score", "--data", d / "benign.jsonl", "--method", "snip",
                                  "--out", tmp_path / "u.safetensors", *common]]) == 0
    for q, p in GRID:
        assert_clear_boundaries(harm, tmp_path / "h.safetensors", q, negate=True)
        assert_clear_boundaries(util, tmp_path / "u.safetensors", p, negate=False)
        out = tmp_path / f"m-{q}-{p}.safetensors"
        assert main([str(a) for a in ["select", "--harm", tmp_path / "h.safetensors", "--utility",
                                      tmp_path / "u.safetensors", "--q", q, "--p", p, "--out", out]]) == 0
        assert _indices(out) == expected[(q, p)], f"q={q} p={p}"
