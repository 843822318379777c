"""Distributed scoring on 2 CPU processes (Gloo) against the single-process scores.

One spawned job scores a tiny Llama with every method twice — data-parallel replicas, then an FSDP2-sharded
model loaded through ``load_sharded_model`` — and writes score files the parent compares with its own
single-process scores. Matrix sizes are odd so the FSDP row shards are uneven.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from transformers import LlamaConfig, LlamaForCausalLM

from harmprune.attribution import compute_scores, scored_parameters
from harmprune.cli import main
from harmprune.data import Record
from harmprune.distributed import batches_per_rank, owners, rank_share, row_range
from harmprune.tensorfile import TensorFile, index_path
from tiny import make_tokenizer

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("signed-snip", "snip", "wanda", "magnitude")
RECORDS = [
    Record("make a zorb", "Sure. Step 1: take the vex-coil."),
    Record("tell me a qux", "No."),
    Record("how to frobnicate the widget quickly", "First glimmer the widget, then twist it twice."),
    Record("x", "A fairly long response, longer than the others, to make the padding differ."),
    Record("what is 2+2", "4"),
]  # 5 examples on 2 ranks with batch size 2: rank 0 runs 2 batches, rank 1 one (FSDP adds a zero-weight pass)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def odd_llama(vocab: int) -> LlamaForCausalLM:
    """Rows 30 (q, o, down), 10 (k, v) and 45 (gate, up): 45 splits 23/22 over two ranks."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=30, intermediate_size=45, num_hidden_layers=2,
                         num_attention_heads=3, num_key_value_heads=1, max_position_embeddings=256,
                         tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config).eval()


def _worker(rank: int, world: int, port: int, model_dir: str, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from harmprune.attribution import save_scores
    from harmprune.distributed import init_distributed, load_sharded_model, shutdown
    from harmprune.models import load_model

    ctx = init_distributed()
    out = Path(out_dir)
    model, tok = load_model(model_dir)
    for method in METHODS:
        scores = compute_scores(model, tok, RECORDS, method, batch_size=2, progress=False)
        save_scores(scores, out / f"dp-{method}.safetensors")
    sharded, tok = load_sharded_model(model_dir, "float32", ctx)
    for method in METHODS:
        scores = compute_scores(sharded, tok, RECORDS, method, batch_size=2, progress=False)
        save_scores(scores, out / f"fsdp-{method}.safetensors")
    shutdown()


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """Run the 2-rank job once; return the output folder and the single-process scores."""
    d = tmp_path_factory.mktemp("dist")
    tok = make_tokenizer()
    model = odd_llama(len(tok))
    model.save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    from harmprune.models import load_model

    model, tok = load_model(str(d / "model"))
    mp.spawn(_worker, args=(2, free_port(), str(d / "model"), str(d)), nprocs=2)
    single = {m: compute_scores(model, tok, RECORDS, m, batch_size=2, progress=False) for m in METHODS}
    return d, single


def assert_close(got: TensorFile, want: dict[str, torch.Tensor], rtol: float = 1e-5) -> None:
    assert sorted(got.names()) == sorted(want)
    for n, t in want.items():
        g = got.get(n)
        assert g.shape == t.shape, n
        err = float((g - t).abs().max() / t.abs().max().clamp(min=1e-12))
        assert err <= rtol, f"{n}: relative error {err:.1e}"


@pytest.mark.parametrize("method", METHODS)
def test_data_parallel_equals_single_process(job, method):
    d, single = job
    f = TensorFile(d / f"dp-{method}.safetensors")
    assert (d / f"dp-{method}.safetensors").exists()  # one whole-model file, written by rank 0
    assert_close(f, single[method].tensors)
    meta = {k: v for k, v in f.metadata.items() if k != "save_dtype"}
    assert meta == json.loads(json.dumps(single[method].metadata))


@pytest.mark.parametrize("method", METHODS)
def test_fsdp_sharded_scores_equal_single_process(job, method):
    d, single = job
    path = d / f"fsdp-{method}.safetensors"
    assert not path.exists() and index_path(path).exists()
    weight_map = json.loads(index_path(path).read_text())["weight_map"]
    assert set(weight_map.values()) == {f"fsdp-{method}-00001-of-00002.safetensors",
                                        f"fsdp-{method}-00002-of-00002.safetensors"}
    f = TensorFile(path)
    assert_close(f, single[method].tensors)
    meta = {k: v for k, v in f.metadata.items() if k != "save_dtype"}
    assert meta == json.loads(json.dumps(single[method].metadata))
    assert meta["examples"] == (0 if method == "magnitude" else len(RECORDS))


def test_sharded_scores_feed_select(job):
    from harmprune.selection import select

    d, single = job
    sharded = TensorFile(d / "fsdp-signed-snip.safetensors")
    whole = {n: t for n, t in TensorFile(d / "dp-signed-snip.safetensors").items()}
    for granularity in ("matrix", "global"):
        a = select(sharded, None, 0.1, 0.0, granularity)
        b = select(whole, None, 0.1, 0.0, granularity, harm_method="signed-snip")
        assert a.count() == b.count() > 0
        overlap = sum(int(torch.isin(a.indices[n], b.indices[n]).sum()) for n in a.indices)
        assert overlap >= 0.99 * a.count()  # float32 summation order may swap a few near-ties


def _cli_setup(tmp_path: Path) -> list[str]:
    tok = make_tokenizer()
    model = odd_llama(len(tok))
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    rows = [{"prompt": r.prompt, "response": r.response} for r in RECORDS]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ["score", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "d.jsonl"),
            "--method", "signed-snip", "--batch-size", "2"]


def _torchrun(*argv: str) -> subprocess.CompletedProcess:
    torchrun = Path(sys.executable).parent / "torchrun"
    return subprocess.run(
        [str(torchrun), "--nnodes", "1", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
         "--master-port", str(free_port()), "-m", "harmprune", *argv],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=ROOT,
    )


# Slow tier: under heavy CPU load a rank intermittently aborts at exit ("terminate called without an active
# exception") after the score file is written, which torchrun reports as a failure. Open issue; see the note.
@pytest.mark.slow
def test_torchrun_cli_data_parallel(tmp_path):
    common = _cli_setup(tmp_path)
    proc = _torchrun(*common, "--distributed", "--out", str(tmp_path / "dist.safetensors"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote") == 1 and "on 2 ranks" in proc.stdout
    assert main([*common, "--out", str(tmp_path / "one.safetensors")]) == 0
    dist, one = TensorFile(tmp_path / "dist.safetensors"), TensorFile(tmp_path / "one.safetensors")
    assert_close(dist, one.load_all())
    assert dist.metadata == one.metadata


@pytest.mark.slow
def test_torchrun_cli_fsdp_with_checkpointing(tmp_path):
    common = _cli_setup(tmp_path)
    proc = _torchrun(*common, "--fsdp", "--gradient-checkpointing", "--out", str(tmp_path / "fsdp.safetensors"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FSDP, sharded file" in proc.stdout and index_path(tmp_path / "fsdp.safetensors").exists()
    assert main([*common, "--out", str(tmp_path / "one.safetensors")]) == 0
    sharded, one = TensorFile(tmp_path / "fsdp.safetensors"), TensorFile(tmp_path / "one.safetensors")
    assert_close(sharded, one.load_all())
    assert sharded.metadata == one.metadata


def test_distributed_flag_needs_torchrun(tmp_path, capsys, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(var, raising=False)
    code = main(["score", "--model", "unused", "--data", "unused.jsonl", "--method", "snip", "--distributed",
                 "--out", str(tmp_path / "x.safetensors")])
    assert code == 2 and "torchrun" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- work split


@pytest.mark.parametrize("n,world", [(0, 2), (1, 3), (5, 2), (17, 4)])
def test_every_example_is_scored_exactly_once(n, world):
    order = list(range(n))[::-1]
    shares = [rank_share(order, r, world) for r in range(world)]
    assert sorted(i for s in shares for i in s) == list(range(n))
    for batch_size in (1, 2, 5):
        assert batches_per_rank(n, world, batch_size) == max(-(-len(s) // batch_size) for s in shares)


@pytest.mark.parametrize("rows,world", [(45, 2), (10, 3), (2, 4), (64, 8)])
def test_row_range_matches_torch_chunk(rows, world):
    chunks = torch.arange(rows).chunk(world) + (torch.empty(0),) * world
    for r in range(world):
        lo, hi = row_range(rows, r, world)
        assert torch.equal(torch.arange(lo, hi), chunks[r].long())


def test_owners_are_contiguous_and_balanced():
    model = odd_llama(64)
    shapes = {n: tuple(p.shape) for n, p in scored_parameters(model).items()}
    for world in (1, 2, 3, 20):
        own = owners(shapes, world)
        ranks = list(own.values())
        assert ranks == sorted(ranks) and set(ranks) <= set(range(world))
        if world <= len(shapes) // 4:
            sizes = [sum(torch.Size(shapes[n]).numel() for n in own if own[n] == r) for r in range(world)]
            biggest = max(torch.Size(s).numel() for s in shapes.values())
            assert max(sizes) - min(sizes) <= 2 * biggest
