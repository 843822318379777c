"""The memory plan's arithmetic against hand computations and against real (tiny) models."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from harmprune.attribution import scored_parameters
from harmprune.cli import main
from harmprune.errors import ConfigError, ModelError
from harmprune.plan import (
    GIB, ModelShape, Workload, activation_bytes, files, fsdp_gpu, make_plan, model_shape, parse_size,
    shape_from_config, single_gpu,
)

TINY = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100, "tie_word_embeddings": False}


def tiny_shape() -> ModelShape:
    return shape_from_config(TINY, "tiny", "test")


def test_tiny_counts_by_hand():
    s = tiny_shape()
    # head_dim 8: q 32×32, k and v 16×32, o 32×32, gate and up 64×32, down 32×64
    assert s.scored_per_block() == 1024 + 512 + 512 + 1024 + 3 * 2048 == 9216
    assert s.block_params() == 9216 + 2 * 32  # two RMSNorm weights
    assert s.root_params() == 2 * 100 * 32 + 32  # embedding, head, final norm
    assert s.params() == 2 * 9280 + 6432 == 24992
    assert s.largest_matrix() == 2048


@pytest.mark.parametrize("cls,config", [
    (LlamaForCausalLM, LlamaConfig(**{k: v for k, v in TINY.items() if k != "model_type"})),
    (LlamaForCausalLM, LlamaConfig(**{**{k: v for k, v in TINY.items() if k != "model_type"},
                                      "tie_word_embeddings": True})),
    (Qwen2ForCausalLM, Qwen2Config(**{k: v for k, v in TINY.items() if k != "model_type"})),
    (Qwen3ForCausalLM, Qwen3Config(**{k: v for k, v in TINY.items() if k != "model_type"}, head_dim=16)),
])
def test_counts_match_the_built_model(cls, config):
    model = cls(config)
    shape = shape_from_config(config.to_dict(), "m", "test")
    assert shape.params() == sum(p.numel() for p in model.parameters())
    assert shape.scored() == sum(p.numel() for p in scored_parameters(model).values())


def test_builtin_configs_give_the_published_parameter_counts():
    assert model_shape("llama-3.1-8b").params() == 8_030_261_248
    assert model_shape("meta-llama/Llama-3.1-70B-Instruct").params() == 70_553_706_496
    assert model_shape("qwen2.5-32b-instruct").params() == 32_763_876_352  # via the alias's hub id
    assert model_shape("Qwen/Qwen3-32B").params() == 32_762_123_264


def test_activations_by_hand():
    s, w = tiny_shape(), Workload(dtype="float32", batch_size=2, max_length=16)
    t = 32
    layer = t * (4 * (4 * 32 + 4 * 32 + 3 * 16 + 4 * 64) + 4 * 32)
    logits = t * 100 * (4 + 12)
    assert activation_bytes(s, w) == 2 * layer + logits == 202752
    assert activation_bytes(s, w, checkpointing=True) == 2 * t * 32 * 4 + layer + logits
    assert activation_bytes(s, Workload(method="wanda", dtype="float32", batch_size=2, max_length=16)) == \
        t * (2 * 32 + 2 * 64) * 4 + t * 100 * 4


def saved_activation_bytes(model, batch: int, length: int) -> int:
    """Bytes autograd keeps for backward through the decoder blocks (unique storages, weights excluded)."""
    storages = {}
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    for n, p in model.named_parameters():
        p.requires_grad_(n in scored_parameters(model))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.model(input_ids=torch.randint(3, 100, (batch, length)), use_cache=False)
    return sum(storages.values())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_layer_activation_formula_is_close_to_what_autograd_keeps(dtype):
    torch.manual_seed(0)
    config = LlamaConfig(**{**{k: v for k, v in TINY.items() if k != "model_type"},
                            "hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 3})
    model = LlamaForCausalLM(config).to(getattr(torch, dtype)).eval()
    shape = shape_from_config(config.to_dict(), "m", "test")
    work = Workload(dtype=dtype, batch_size=2, max_length=64, method="signed-snip")
    logits = work.tokens * shape.vocab * (work.a + 12)
    predicted = activation_bytes(shape, work) - logits
    measured = saved_activation_bytes(model, 2, 64)
    assert 0.8 * measured <= predicted <= 1.25 * measured


def test_fsdp_by_hand():
    s, w = tiny_shape(), Workload(dtype="bfloat16", batch_size=1, max_length=8)
    got = fsdp_gpu(s, w, 2)
    assert got["weights"] == (24992 - 6432) * 2 / 2 + 6432 * 2 + 2 * 9280 * 2
    assert got["accumulators"] == 4 * 2 * 9216 / 2
    assert got["transients"] == 2048 * (2 + 4) + 9216 * (2 + 4)
    assert single_gpu(s, w)["accumulators"] == 4 * 2 * 9216


def test_files_by_hand():
    f = files(tiny_shape(), Workload(q=0.01, dtype="bfloat16"))
    assert f["score file (float32)"] == 4 * 18432 and f["score file (bfloat16)"] == 2 * 18432
    assert f["mask (int64 indices)"] == 184 * 8  # floor(0.01 × 18432) indices


def test_launch_choices():
    s = shape_from_config({**TINY, "num_hidden_layers": 24}, "deep", "test")
    w = Workload(dtype="float32", batch_size=1, max_length=4)
    need = sum(single_gpu(s, w).values())
    one = make_plan(s, w, gpus=1, gpu_memory=need * 2)
    assert one.launch == "1 GPU" and one.command.startswith("python -m harmprune score")
    dp = make_plan(s, w, gpus=4, gpu_memory=need * 2)
    assert dp.command.startswith("torchrun --nproc-per-node 4") and "--distributed" in dp.command
    fsdp_need = sum(fsdp_gpu(s, w, 3).values())
    assert fsdp_need < need
    sharded = make_plan(s, w, gpus=4, gpu_memory=int(fsdp_need / 0.9) + 1)
    assert sharded.fsdp_gpus == 4 and "--fsdp" in sharded.command and "fits on" in sharded.launch
    assert sum(sharded.fsdp.values()) <= 0.9 * sharded.gpu_memory
    nothing = make_plan(s, w, gpus=2, gpu_memory=1000)
    assert nothing.command is None and "does not fit" in nothing.launch
    many = make_plan(model_shape("llama-3.1-70b"), Workload(), gpus=8, gpu_memory=80 * GIB, gpus_per_node=4)
    assert "torchrun --nnodes 2 --nproc-per-node 4" in many.command and "--fsdp" in many.command


def test_parse_size():
    assert parse_size("80GiB") == 80 * GIB == parse_size("80G") == parse_size("80")
    assert parse_size("141GB") == 141 * 10**9
    assert parse_size("512 MiB") == 512 * 2**20
    with pytest.raises(ConfigError):
        parse_size("lots")


def test_model_shape_from_directory_and_unknown_names(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    assert model_shape(str(tmp_path)).params() == 24992
    with pytest.raises(ModelError, match="known name"):
        model_shape("no-such-model")


def test_cli(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    assert main(["plan", "--model", str(tmp_path), "--json", "--dtype", "float32"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["params"] == 24992 and plan["single"]["weights"] == 4 * 24992
    assert main(["plan", "--model", "llama-3.1-70b", "--gpus", "8", "--gpu-memory", "141GB"]) == 0
    out = capsys.readouterr().out
    assert "70.55 B parameters" in out and "torchrun --nproc-per-node" in out and "--fsdp" in out
