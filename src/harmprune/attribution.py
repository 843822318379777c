"""Attribution scores: how much each weight supports the model's loss on a data set.

Methods are plug-ins of :mod:`harmprune.scoring_methods`, one module each (all stored raw; the direction that
counts as "supports harmful generation" is decided at selection):

* ``signed-snip``: W ⊙ Σ_i ∇_W L_i. Zeroing weight w changes the summed loss by about −(stored value), so the
  weights whose removal most *raises* the loss have the most negative scores.
* ``snip``: |W| ⊙ Σ_i |∇_W L_i|, the absolute value taken per example (Wei et al. 2024).
* ``wanda``: |W_jk| · ‖X_k‖₂, with X the layer's inputs at response positions.
* ``magnitude``: |W|.

This module is the one calibration loop they share.

L_i is the mean next-token NLL over example i's response tokens. One forward and one backward per batch cover
every scored module; gradients are folded into float32 accumulators by hooks as soon as they are produced, so no
full set of gradients is kept alive.

Batch size changes none of the results: the summed loss makes ∇ additive for ``signed-snip``; ``snip`` builds
each example's exact ``nn.Linear`` gradient from the layer input and output gradient (G_i = δ_iᵀ X_i) inside
the backward hook before taking its absolute value; ``wanda`` sums squares over positions.

The same additivity makes scoring distributable (see ``harmprune.distributed``): each rank scores its share of the
examples and the float32 sums are added across ranks before the scores are formed (for ``wanda``, the sums of
squares, before the square root).
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from harmprune import __version__
from harmprune.data import Record, records_digest
from harmprune.distributed import (
    DistContext, all_reduce_sum_, batches_per_rank, context, gather_rows, init_distributed, is_sharded, local,
    owners, rank_share, reduce_scatter_rows, save_shards, sum_count,
)
from harmprune.errors import HarmpruneError
from harmprune.formatting import (IGNORE_INDEX, PromptFormat, collate_for_loss, encode_pair, pad_id_of,
                                  warn_prompt_cuts)
from harmprune.formatting import per_example_response_nll, plain_lm_head, response_nll
from harmprune.models import model_id
from harmprune.scoring_methods import ScoringMethod, scoring_method
from harmprune.tensorfile import TensorFile, save_tensors

# Every nn.Linear weight inside the decoder blocks (Llama, Qwen, Mistral, Gemma, GPT-NeoX style names).
DEFAULT_MODULES = r"(^|\.)(layers|h|blocks)\.\d+\..*"


@dataclass
class Scores:
    """Per-weight scores keyed by ``model.named_parameters()`` names, with provenance metadata."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, object] = field(default_factory=dict)
    # FSDP-sharded scoring: the rank whose shard file holds each tensor; ``tensors`` holds this rank's only.
    owners: dict[str, int] | None = None

    @property
    def method(self) -> str:
        return str(self.metadata.get("method", ""))


def scored_parameters(model: nn.Module, modules: str | None = None) -> dict[str, nn.Parameter]:
    """The weights to score: ``nn.Linear`` weights whose parameter name matches ``modules`` (default: decoder blocks)."""
    pattern = re.compile(modules or DEFAULT_MODULES)
    chosen = {}
    for mod_name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            name = f"{mod_name}.weight"
            if pattern.search(name):
                chosen[name] = module.weight
    if not chosen:
        raise HarmpruneError(f"no nn.Linear weight matches the module pattern {pattern.pattern!r}")
    return chosen


def compute_scores(
    model: nn.Module,
    tokenizer,
    records: Sequence[Record],
    method: str,
    *,
    fmt: PromptFormat = "chat",
    max_length: int = 512,
    batch_size: int = 4,
    modules: str | None = None,
    progress: bool = True,
    gradient_checkpointing: bool = False,
    distributed: bool | None = None,
) -> Scores:
    """Score every selected weight of ``model`` on the (prompt, response) pairs in ``records``.

    ``distributed``: None scores across the torch.distributed job if one is running, True joins (or starts, from
    torchrun's environment) one, False scores in this process alone. Every rank passes the same records; an
    FSDP2-sharded model returns on each rank only the score tensors that rank's shard file will hold.
    """
    scorer = scoring_method(method)
    ctx = _job(model, distributed)
    sharded = ctx is not None and is_sharded(model)
    params = scored_parameters(model, modules)
    meta: dict[str, object] = {
        "method": method,
        "model": model_id(model),
        "harmprune_version": __version__,
        "modules": modules or DEFAULT_MODULES,
        "dtype": str(next(iter(params.values())).dtype).removeprefix("torch."),
    }
    if scorer.passes == "none":
        tensors = {n: scorer.finalise(local(p).detach().float(), None) for n, p in params.items()}
        return _result(tensors, params, {**meta, "examples": 0, "tokens": 0}, ctx if sharded else None)
    if gradient_checkpointing and not scorer.checkpointing:
        raise HarmpruneError(f"gradient checkpointing re-runs forward hooks; the {method} method does not support it")

    encoded = [_encode(tokenizer, r, fmt, max_length, i) for i, r in enumerate(records)]
    warn_prompt_cuts(encoded, max_length, "scored pairs")
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))  # less padding
    mine = rank_share(order, ctx.rank, ctx.world) if ctx else order
    batches = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
    # Sharded ranks all-gather weights in every pass, so a rank with fewer examples runs zero-weight passes.
    n_passes = batches_per_rank(len(order), ctx.world, batch_size) if sharded else len(batches)
    accumulators = _accumulators(scorer, params)
    reduce_rows, group = None, None
    backward = scorer.passes == "backward"
    if sharded and backward and not scorer.weight_gradients:  # whole-matrix sums built by the method's hooks
        group = torch.distributed.new_group(backend=torch.distributed.get_backend())  # apart from FSDP's traffic
        reduce_rows = lambda full: reduce_scatter_rows(full, ctx, group)  # noqa: E731
    n_tokens = 0
    device = next(model.parameters()).device
    pad = pad_id_of(tokenizer)
    show = progress and (ctx is None or ctx.is_main)

    def collate(chosen: list[int]) -> dict[str, torch.Tensor]:
        return {k: v.to(device) for k, v in collate_for_loss([encoded[i] for i in chosen], pad).items()}

    if backward and not sharded and batches:
        # The loss's one-time head check runs forwards of its own: run it before any scoring hook exists, so no
        # hook ever sees a forward that is not a scoring pass (whatever this model ran before, in any order).
        plain_lm_head(model, collate(batches[0]))
    with _scoring_mode(model, params, scorer, checkpointing=gradient_checkpointing):
        with scorer.collector(model, params, accumulators, reduce_rows) as hooks:
            for j in tqdm(range(n_passes), desc=f"scoring ({method})", disable=not show, unit="batch"):
                real = j < len(batches)
                batch = collate(batches[j] if real else order[:1])
                response = batch["labels"] != IGNORE_INDEX
                n_tokens += int(response.sum()) if real else 0
                hooks.begin_batch(response if real else torch.zeros_like(response))
                if not backward:
                    with torch.no_grad():
                        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
                else:
                    loss = _loss(model, batch, sharded)
                    (loss if real else loss * 0).backward()
    if group is not None:
        torch.distributed.destroy_process_group(group)
    if ctx is not None:
        if not sharded or not backward:  # sharded gradients were already summed by FSDP / the method's hooks
            all_reduce_sum_(accumulators.values())
        n_tokens = sum_count(n_tokens, device)
    tensors = {n: scorer.finalise(local(p).detach().float(), accumulators.pop(n)) for n, p in params.items()}
    meta.update({"examples": len(records), "tokens": n_tokens, "prompt_format": fmt, "max_length": max_length,
                 "data_sha256": records_digest(records)})
    return _result(tensors, params, meta, ctx if sharded else None)


def save_scores(scores: Scores, path: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write scores as safetensors (float32 unless ``dtype`` lowers it) with their metadata.

    In a torch.distributed job every rank calls it: rank 0 writes a whole-model file; FSDP-sharded scores are
    written as one shard per rank plus an index (``scores-0000r-of-0000N.safetensors``, ``.index.json``).
    """
    tensors = {n: t.to(dtype) for n, t in scores.tensors.items()}
    meta = {**scores.metadata, "save_dtype": str(dtype).removeprefix("torch.")}
    ctx = context()
    if scores.owners is not None:
        if ctx is None:
            raise HarmpruneError("sharded scores are saved by every rank of their torch.distributed job")
        return save_shards(tensors, scores.owners, path, meta, ctx)
    if ctx is not None and not ctx.is_main:
        return Path(path)
    return save_tensors(tensors, path, meta)


def load_scores(path: str | Path) -> Scores:
    """Read a (possibly sharded) score file into memory as float32."""
    f = TensorFile(path)
    return Scores({n: t.float() for n, t in f.items()}, dict(f.metadata))


# ---------------------------------------------------------------------------------------------- internals


def _loss(model: nn.Module, batch: dict[str, torch.Tensor], sharded: bool) -> torch.Tensor:
    """Σ_i L_i over the batch. FSDP-sharded models run whole (their root gathers the head's weights)."""
    if sharded:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        return per_example_response_nll(logits, batch["labels"]).sum()
    return response_nll(model, batch).sum()


def _job(model: nn.Module, distributed: bool | None) -> DistContext | None:
    ctx = context()
    if distributed is False:
        if ctx is not None and is_sharded(model):
            raise HarmpruneError("an FSDP-sharded model is scored by all ranks together (distributed=False given)")
        return None
    if distributed and ctx is None:
        ctx = init_distributed()
    return ctx


def _result(tensors: dict[str, torch.Tensor], params: dict[str, nn.Parameter], meta: dict[str, object],
            ctx: DistContext | None) -> Scores:
    """Scores as returned: whole tensors, or (FSDP) each matrix gathered onto the rank that will write it."""
    if ctx is None:
        return Scores(tensors, meta)
    shapes = {n: tuple(p.shape) for n, p in params.items()}
    owner_of = owners(shapes, ctx.world)
    mine = {}
    for name in params:
        full = gather_rows(tensors.pop(name), shapes[name], owner_of[name], ctx)
        if full is not None:
            mine[name] = full.cpu()
    return Scores(mine, meta, owners=owner_of)


def _accumulators(scorer: ScoringMethod, params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """float32 sums: this rank's rows of each weight's gradient sum, or (wanda) each input feature's Σ x²."""
    if scorer.per_feature:
        return {n: torch.zeros(p.shape[1], dtype=torch.float32, device=p.device) for n, p in params.items()}
    return {n: torch.zeros(local(p).shape, dtype=torch.float32, device=local(p).device) for n, p in params.items()}


def _encode(tokenizer, record: Record, fmt: PromptFormat, max_length: int, i: int):
    if not record.response:
        raise HarmpruneError(f"example {i} ({record.source or record.prompt[:40]!r}) has no response to score")
    from harmprune.calibration import split_unscored

    context, target = split_unscored(record)
    if not target:
        raise HarmpruneError(f"example {i} ({record.prompt[:40]!r}) has nothing after its unscored prefix to score")
    return encode_pair(tokenizer, record.prompt, target, fmt, max_length, context=context)


@contextmanager
def _scoring_mode(model: nn.Module, params: dict[str, nn.Parameter], scorer: ScoringMethod, checkpointing: bool):
    """Set which tensors need gradients, restoring every flag afterwards.

    A method with ``weight_gradients`` (signed-snip) needs the scored weights' gradients only; another backward
    method (snip) needs activation gradients only (it builds weight gradients itself), so the embedding output is
    made to require grad and no weight gradient is computed.
    """
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    scored = {id(p) for p in params.values()}
    was_training = model.training
    for p in model.parameters():
        p.requires_grad_(scorer.weight_gradients and id(p) in scored)
    embed_hook = None
    if scorer.passes == "backward" and not scorer.weight_gradients:
        embed_hook = model.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_())
    if checkpointing:
        _checkpointing(model, True)
    model.train(checkpointing)  # HF only checkpoints in train mode; none of our models use dropout at eval
    try:
        yield
    finally:
        if embed_hook is not None:
            embed_hook.remove()
        if checkpointing:
            _checkpointing(model, False)
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
            p.grad = None
        model.train(was_training)


def _checkpointing(model: nn.Module, on: bool) -> None:
    """Turn activation checkpointing on or off (transformers renamed the methods in 5.x)."""
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()
