"""Scoring on several processes with torch.distributed: data-parallel replicas or FSDP2-sharded models.

Launched with ``torchrun``, which sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``. The backend is NCCL on CUDA and Gloo on CPU.

* Data-parallel (the model fits one device): every rank holds the whole model, scores its share of the examples
  and the float32 accumulators are summed across ranks (``all_reduce``) before the scores are formed, so the
  result equals the single-process one up to float32 summation order. Rank 0 writes the file.
* FSDP2 (the model does not fit one device): ``fully_shard`` per decoder block and on the root. Every parameter
  is a DTensor sharded on dim 0, so each rank accumulates only its rows of each scored matrix. At the end each
  matrix is gathered whole onto one *owner* rank (owners take contiguous runs of matrices of about equal bytes),
  and every rank writes the whole matrices it owns as ``scores-0000r-of-0000N.safetensors``; rank 0 writes the
  index. Shards thus hold whole named tensors, like a Hugging Face checkpoint, and every reader is unchanged.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

from harmprune.errors import ConfigError
from harmprune.tensorfile import save_tensors, shard_path, write_index

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# Decoder blocks (Llama/Qwen/Mistral ``layers.i``, GPT-2/NeoX ``h.i``, ``blocks.i``): the FSDP2 wrapping unit.
BLOCK_PATTERN = r"(^|\.)(layers|h|blocks)\.\d+$"


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job: rank, world size, and the device it computes on."""

    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None = None) -> DistContext:
    """Join the job torchrun started (from its environment variables), unless torch.distributed already runs."""
    if not dist.is_available():
        raise ConfigError("this torch build has no torch.distributed")
    if not dist.is_initialized():
        missing = [v for v in TORCHRUN_ENV if v not in os.environ]
        if missing:
            raise ConfigError(f"distributed scoring is launched with torchrun (missing {', '.join(missing)}); "
                              "e.g. torchrun --nproc-per-node 2 -m harmprune score --distributed ...")
        local_rank = int(os.environ["LOCAL_RANK"])
        dev = _device(device, local_rank)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, dev)
    ctx = context()
    assert ctx is not None
    return ctx if device is None else DistContext(ctx.rank, ctx.world, ctx.local_rank, torch.device(device))


def context() -> DistContext | None:
    """The running job, or None when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    backend = dist.get_backend()
    dev = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, dev)


def shutdown() -> None:
    """Leave the job (a no-op when none runs)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _device(device: str | None, local_rank: int) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


# ---------------------------------------------------------------------------------------------- work split


def rank_share(order: Sequence[int], rank: int, world: int) -> list[int]:
    """This rank's examples: every world-th of ``order`` (length-sorted, so ranks get similar lengths)."""
    return list(order[rank::world])


def batches_per_rank(n_examples: int, world: int, batch_size: int) -> int:
    """Batches the busiest rank runs; FSDP ranks must all run this many (collectives in every pass)."""
    return math.ceil(math.ceil(n_examples / world) / batch_size) if n_examples else 0


def all_reduce_sum_(tensors: Iterable[torch.Tensor]) -> None:
    """Sum each tensor across ranks, in place."""
    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)


def sum_count(value: int, device: torch.device) -> int:
    """An integer summed across ranks."""
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return int(t.item())


# ---------------------------------------------------------------------------------------------- FSDP2


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` was wrapped by FSDP2's ``fully_shard``."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def local(t: torch.Tensor) -> torch.Tensor:
    """The part of a (possibly DTensor-sharded) tensor that lives on this rank."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def shard_model(model: nn.Module, ctx: DistContext, block_pattern: str = BLOCK_PATTERN) -> nn.Module:
    """FSDP2: ``fully_shard`` each decoder block, then the root, on a 1-D mesh over all ranks.

    Gradients are reduced in float32 and summed, not averaged, since every rank scores different examples and
    the scores need Σ over all examples.
    """
    import re

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(ctx.device.type, (ctx.world,))
    policy = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    pattern = re.compile(block_pattern)
    blocks = [m for name, m in model.named_modules() if pattern.search(name)]
    if not blocks:
        raise ConfigError(f"no decoder blocks match {block_pattern!r}; cannot shard {type(model).__name__}")
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # plain SUM: Gloo has no PREMUL_SUM
    return model


def load_sharded_model(spec: str, dtype: str, ctx: DistContext, concurrency: int = 1):
    """Load a model on CPU and shard it with FSDP2, ``concurrency`` ranks at a time to bound host memory.

    Each loading rank briefly holds the whole model in host memory; ``fully_shard`` moves its rows to the device
    block by block, so a node needs about ``concurrency`` × the model's size in RAM.
    """
    from harmprune.models import load_model

    model = tokenizer = None
    for wave in range(math.ceil(ctx.world / max(1, concurrency))):
        if ctx.rank // max(1, concurrency) == wave:
            model, tokenizer = load_model(spec, dtype=dtype, device=None)
            shard_model(model, ctx)
        barrier()
    return model, tokenizer


def row_range(rows: int, rank: int, world: int) -> tuple[int, int]:
    """Rows of a dim-0-sharded matrix held by ``rank`` (FSDP2 chunks like ``torch.chunk``)."""
    per = math.ceil(rows / world)
    return min(rows, rank * per), min(rows, (rank + 1) * per)


def reduce_scatter_rows(full: torch.Tensor, ctx: DistContext, group=None) -> torch.Tensor:
    """Σ over ranks of ``full`` (one per rank, same shape), keeping only this rank's rows."""
    per = math.ceil(full.shape[0] / ctx.world)
    padded = full.new_zeros((per * ctx.world, *full.shape[1:]))
    padded[: full.shape[0]] = full
    out = full.new_empty((per, *full.shape[1:]))
    dist.reduce_scatter_tensor(out, padded, op=dist.ReduceOp.SUM, group=group)
    lo, hi = row_range(full.shape[0], ctx.rank, ctx.world)
    return out[: hi - lo]


def owners(shapes: Mapping[str, Sequence[int]], world: int) -> dict[str, int]:
    """Which rank writes each tensor: contiguous runs, in name order, of about total/world elements each."""
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    total = max(1, sum(sizes.values()))
    out, before = {}, 0
    for name, size in sizes.items():
        out[name] = min(world - 1, int(world * (before + size / 2) // total))
        before += size
    return out


def gather_rows(local_rows: torch.Tensor, shape: Sequence[int], owner: int, ctx: DistContext) -> torch.Tensor | None:
    """Assemble a dim-0-sharded matrix whole on ``owner`` (None on the other ranks)."""
    per = math.ceil(shape[0] / ctx.world)
    padded = local_rows.new_zeros((per, *shape[1:]))
    padded[: local_rows.shape[0]] = local_rows
    if ctx.rank != owner:
        dist.gather(padded, None, dst=owner)
        return None
    full = local_rows.new_empty((per * ctx.world, *shape[1:]))
    dist.gather(padded, list(full.chunk(ctx.world)), dst=owner)
    return full[: shape[0]]


def save_shards(tensors: Mapping[str, torch.Tensor], owner_of: Mapping[str, int], path: str | Path,
                metadata: Mapping[str, object], ctx: DistContext) -> Path:
    """Every rank writes the tensors it owns as its shard; rank 0 writes the index once all shards exist."""
    path = Path(path)
    mine = {n: t for n, t in tensors.items() if owner_of[n] == ctx.rank}
    save_tensors(mine, shard_path(path, ctx.rank + 1, ctx.world), metadata)
    barrier()
    if ctx.is_main:
        write_index(path, {n: shard_path(path, r + 1, ctx.world).name for n, r in owner_of.items()}, metadata)
    barrier()
    return path
