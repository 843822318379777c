"""Named-tensor files (scores and masks): safetensors with string metadata, single or sharded.

A sharded set is written like a Hugging Face checkpoint: ``name-0000i-of-0000N.safetensors`` files plus
``name.safetensors.index.json`` mapping each tensor to its shard. Readers accept either form, list names in sorted
order either way, and read tensors one at a time, so nothing needs every score in memory at once.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Iterator, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from harmprune.errors import ScoreFileError
from harmprune.io import atomic_path, atomic_write_json, sha256_file


def save_tensors(tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, object]) -> Path:
    """Write tensors and metadata (values JSON-encoded unless already strings) atomically."""
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
        _canonicalise_header(tmp)
    return Path(path)


def _canonicalise_header(path: str | Path) -> None:
    """Rewrite a safetensors header with sorted keys, in place and at the same length.

    safetensors writes its JSON header in hash-map order, which changes from process to process; sorted, equal
    contents give byte-equal files, so content-hash cache keys agree across processes and machines.
    """
    with open(path, "r+b") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        text = json.dumps(json.loads(f.read(size)), sort_keys=True, separators=(",", ":")).encode()
        if len(text) <= size:
            f.seek(8)
            f.write(text + b" " * (size - len(text)))


def index_path(path: str | Path) -> Path:
    return Path(str(path) + ".index.json")


def shard_path(path: str | Path, i: int, n: int) -> Path:
    """The file of shard ``i`` (1-based) of ``n`` in the sharded set named ``path``."""
    path = Path(path)
    return path.parent / f"{path.name.removesuffix('.safetensors')}-{i:05d}-of-{n:05d}.safetensors"


def write_index(path: str | Path, weight_map: Mapping[str, str], metadata: Mapping[str, object]) -> Path:
    """Write the index of a sharded set whose shard files exist; an old single file at ``path`` is removed."""
    path = Path(path)
    path.unlink(missing_ok=True)  # readers prefer the single file, so a stale one would shadow the new set
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    atomic_write_json(index_path(path), {"metadata": meta, "weight_map": dict(weight_map)})
    return path


def save_sharded(shards: list[Mapping[str, torch.Tensor]], path: str | Path, metadata: Mapping[str, object]) -> Path:
    """Write one file per shard and an index JSON beside ``path`` (which itself is not written)."""
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, 1):
        shard_file = shard_path(path, i, len(shards))
        save_tensors(shard, shard_file, metadata)
        weight_map.update({name: shard_file.name for name in shard})
    return write_index(path, weight_map, metadata)


class TensorFile:
    """Read-only, lazy view of a (possibly sharded) named-tensor file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        idx = index_path(self.path)
        if self.path.exists():
            self._files = {self.path: None}
            try:
                with safe_open(str(self.path), framework="pt") as f:
                    self._names = {name: self.path for name in f.keys()}
                    raw_meta = f.metadata() or {}
            except Exception as e:
                raise ScoreFileError(f"{self.path}: not a readable safetensors file ({e})") from None
        elif idx.exists():
            try:
                index = json.loads(idx.read_text())
                raw_meta = index["metadata"]
                self._names = {n: idx.parent / f for n, f in sorted(index["weight_map"].items())}
            except (json.JSONDecodeError, KeyError) as e:
                raise ScoreFileError(f"{idx}: malformed index ({e})") from None
            for shard in set(self._names.values()):
                if not shard.exists():
                    raise ScoreFileError(f"{idx}: shard {shard.name} is missing")
        else:
            raise ScoreFileError(f"{self.path}: no such file (nor a sharded index {idx.name})")
        self.metadata = {k: _decode(v) for k, v in raw_meta.items()}
        self._shapes: dict[str, tuple[int, ...]] = {}

    def names(self) -> list[str]:
        return list(self._names)

    def __contains__(self, name: str) -> bool:
        return name in self._names

    def __len__(self) -> int:
        return len(self._names)

    def get(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise ScoreFileError(f"{self.path}: no tensor named {name!r}")
        with safe_open(str(self._names[name]), framework="pt") as f:
            return f.get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self._shapes:  # one header read per file, not one per tensor
            if name not in self._names:
                raise ScoreFileError(f"{self.path}: no tensor named {name!r}")
            with safe_open(str(self._names[name]), framework="pt") as f:
                self._shapes.update({n: tuple(f.get_slice(n).get_shape()) for n in f.keys()})
        return self._shapes[name]

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self._names:
            yield name, self.get(name)

    def load_all(self) -> dict[str, torch.Tensor]:
        return dict(self.items())

    def sha256(self) -> str:
        """Content hash: of the file, or of the index plus every shard for a sharded set."""
        if self.path.exists():
            return sha256_file(self.path)
        import hashlib

        h = hashlib.sha256(index_path(self.path).read_bytes())
        for shard in sorted(set(self._names.values())):
            h.update(sha256_file(shard).encode())
        return h.hexdigest()


def _decode(value: str) -> object:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value
