"""Streaming selection: the same indices as the in-memory selection, reading one score tensor at a time."""

from __future__ import annotations

import weakref

import pytest
import torch

import harmprune.selection as selection
from harmprune.selection import difference, select, select_global, select_global_streaming, sort_keys, support
from harmprune.tensorfile import TensorFile, save_sharded, save_tensors

FRACTIONS = (0.0, 0.001, 0.013, 0.1, 0.37, 0.5, 0.999, 1.0)


def tied_tensors(seed: int, kind: str) -> dict[str, torch.Tensor]:
    """A few matrices of random shapes whose values repeat a lot (or are special floats)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(int(torch.randint(1, 6, (1,), generator=g))):
        shape = tuple(int(x) for x in torch.randint(1, 40, (2,), generator=g))
        if kind == "integers":
            t = torch.randint(-3, 4, shape, generator=g).float()
        elif kind == "special":
            t = torch.randint(-3, 4, shape, generator=g).float()
            t[t == 3] = float("nan")
            t[t == -3] = -0.0
            t[t == 2] = float("inf")
            t[t == -2] = -float("inf")
        elif kind == "tiny":
            t = torch.randn(shape, generator=g) * 1e-38  # subnormals share high radix digits
        else:
            t = torch.randn(shape, generator=g)
        out[f"model.layers.{i}.w"] = t
    return out


def test_sort_keys_order_like_torch_sort():
    v = torch.tensor([1.0, float("nan"), -0.0, 0.0, -float("nan"), float("inf"), -float("inf"), 1e-45, -1e-45,
                      -2.5, 3.0e38, -3.0e38, 0.0, -0.0])
    by_value = torch.sort(v, descending=True, stable=True).indices
    by_key = torch.sort(sort_keys(v), descending=True, stable=True).indices
    assert torch.equal(by_value, by_key)


@pytest.mark.parametrize("kind", ["integers", "special", "tiny", "normal"])
@pytest.mark.parametrize("chunk", [7, 1 << 22])
def test_streaming_global_equals_in_memory(kind, chunk, monkeypatch):
    monkeypatch.setattr(selection, "_CHUNK", chunk)  # 7: ties straddle the chunks inside a tensor
    for seed in range(12):
        tensors = tied_tensors(seed, kind)
        for fraction in FRACTIONS:
            want = select_global(tensors, fraction)
            got = select_global_streaming(list(tensors), tensors.__getitem__, fraction)
            assert want.keys() == got.keys()
            for n in want:
                assert torch.equal(got[n], want[n]), (kind, seed, fraction, n)


def reference_select(harm: dict, util: dict, q: float, p: float, method: str) -> dict[str, torch.Tensor]:
    """In-memory harm-minus-utility over all tensors at once."""
    h = select_global({n: support(t, method) for n, t in harm.items()}, q)
    u = select_global({n: support(t, method) for n, t in util.items()}, p)
    return {n: difference(h[n], u[n]) for n in h}


@pytest.mark.parametrize("sharded", [False, True])
def test_select_global_from_files_equals_in_memory(tmp_path, sharded):
    harm = dict(sorted(tied_tensors(3, "integers").items()))  # files list names sorted
    util = {n: torch.randint(-2, 3, t.shape, generator=torch.Generator().manual_seed(1)).float()
            for n, t in harm.items()}
    meta = {"method": "signed-snip"}
    if sharded:
        names = list(harm)
        split = [names[: len(names) // 2], names[len(names) // 2 :]]
        save_sharded([{n: harm[n] for n in part} for part in split], tmp_path / "h.safetensors", meta)
        save_sharded([{n: util[n] for n in part} for part in split], tmp_path / "u.safetensors", meta)
    else:
        save_tensors(harm, tmp_path / "h.safetensors", meta)
        save_tensors(util, tmp_path / "u.safetensors", meta)
    hf, uf = TensorFile(tmp_path / "h.safetensors"), TensorFile(tmp_path / "u.safetensors")
    for q, p in ((0.1, 0.05), (0.3, 0.3), (0.5, 0.0), (1.0, 0.2)):
        mask = select(hf, uf, q, p, "global")
        want = reference_select(harm, util, q, p, "signed-snip")
        for n in harm:
            assert torch.equal(mask.indices[n], want[n]), (q, p, n)


class CountingFile(TensorFile):
    """A TensorFile that records how many tensors it handed out are still alive at each read."""

    def __init__(self, path):
        super().__init__(path)
        self.handed: list[weakref.ref] = []
        self.max_alive = 0

    def get(self, name):
        t = super().get(name)
        self.max_alive = max(self.max_alive, sum(r() is not None for r in self.handed))
        self.handed.append(weakref.ref(t))
        return t

    def load_all(self):
        raise AssertionError("selection must not load every tensor")

    def items(self):
        raise AssertionError("selection must read tensors by name, one at a time")


@pytest.mark.parametrize("granularity", ["matrix", "row", "global"])
def test_select_reads_one_tensor_at_a_time(tmp_path, granularity):
    g = torch.Generator().manual_seed(0)
    harm = {f"model.layers.{i}.w": torch.randn(16, 24, generator=g) for i in range(6)}
    util = {n: torch.randn(16, 24, generator=g) for n in harm}
    save_tensors(harm, tmp_path / "h.safetensors", {"method": "snip"})
    save_tensors(util, tmp_path / "u.safetensors", {"method": "snip"})
    hf, uf = CountingFile(tmp_path / "h.safetensors"), CountingFile(tmp_path / "u.safetensors")
    mask = select(hf, uf, 0.2, 0.1, granularity)
    assert mask.count() > 0
    assert hf.max_alive == 0 and uf.max_alive == 0  # each tensor released before the next is read
    in_memory = select(harm, util, 0.2, 0.1, granularity, harm_method="snip", utility_method="snip")
    assert all(torch.equal(mask.indices[n], in_memory.indices[n]) for n in harm)


def test_saved_files_are_byte_identical_whatever_the_metadata_order(tmp_path):
    """safetensors orders its header by hash map; harmprune sorts it, so content hashes agree across processes."""
    import subprocess
    import sys

    from harmprune.io import sha256_file
    from harmprune.tensorfile import TensorFile, save_tensors

    tensors = {"b.weight": torch.arange(6.0).reshape(2, 3), "a.weight": torch.ones(4, dtype=torch.bfloat16)}
    meta = {f"key{i}": f"value{i}" for i in range(12)}
    save_tensors(tensors, tmp_path / "x.safetensors", meta)
    save_tensors(dict(reversed(tensors.items())), tmp_path / "y.safetensors", dict(reversed(meta.items())))
    code = ("import torch, sys; from harmprune.tensorfile import save_tensors; "
            f"save_tensors({{'a.weight': torch.ones(4, dtype=torch.bfloat16), 'b.weight': torch.arange(6.0)"
            f".reshape(2, 3)}}, sys.argv[1], {meta!r})")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "z.safetensors")], check=True)
    digests = {sha256_file(tmp_path / f"{n}.safetensors") for n in "xyz"}
    assert len(digests) == 1
    f = TensorFile(tmp_path / "z.safetensors")
    assert torch.equal(f.get("b.weight"), tensors["b.weight"]) and f.metadata["key3"] == "value3"
