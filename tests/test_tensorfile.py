"""TensorFile reads what safetensors itself loads, for every dtype, single or sharded, each read its own."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from harmprune.tensorfile import TensorFile, save_sharded, save_tensors


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {f"{d}": (torch.randn(7, 5, generator=g) * 50).to(d) for d in
           (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
            torch.int8, torch.uint8)}
    out["bool"] = torch.randn(3, 4, generator=g) > 0
    out["scalar"] = torch.tensor(2.5)
    out["empty"] = torch.zeros(0, 6)
    out["wide"] = torch.arange(12.0).reshape(1, 2, 3, 2)
    if hasattr(torch, "float8_e4m3fn"):
        out["fp8"] = torch.randn(4, 4, generator=g).to(torch.float8_e4m3fn)
    return out


def test_every_dtype_reads_back_as_safetensors_loads_it(tmp_path):
    path = save_tensors(tensors(), tmp_path / "t.safetensors", {"method": "snip"})
    want = load_file(path)
    f = TensorFile(path)
    assert sorted(f.names()) == sorted(want)
    for name, t in want.items():
        got = f.get(name)
        assert got.dtype == t.dtype and got.shape == t.shape, name
        as_bytes = lambda x: x.reshape(-1).view(torch.uint8) if x.dtype != torch.bool else x  # noqa: E731
        assert torch.equal(as_bytes(got), as_bytes(t)), name  # bit for bit (NaN and -0 included)


def test_each_read_owns_its_memory(tmp_path):
    """Each read maps the file anew; one safe_open handle kept for several reads would hand out views of one
    mapping, so an in-place change to one result would show in the next."""
    path = save_tensors({"a": torch.arange(10.0)}, tmp_path / "t.safetensors", {})
    f = TensorFile(path)
    first = f.get("a")
    first.mul_(-1)
    assert torch.equal(f.get("a"), torch.arange(10.0))


def test_sharded_set_reads_each_shard(tmp_path):
    shards = [{"a": torch.ones(3), "b": torch.zeros(2, 2)}, {"c": torch.full((4,), 7.0)}]
    f = TensorFile(save_sharded(shards, tmp_path / "s.safetensors", {"method": "snip"}))
    assert torch.equal(f.get("c"), torch.full((4,), 7.0)) and torch.equal(f.get("b"), torch.zeros(2, 2))
