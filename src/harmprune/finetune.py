"""Fine-tuning on (prompt, response) pairs: LoRA (peft) or all weights, with a plain, seeded torch loop.

One function serves the fine-tuning attack, recovery after pruning, alignment of an organism and narrow
(emergent-misalignment) fine-tunes: :func:`lora_finetune` returns a ``PeftModel`` that can be saved as an adapter
(:func:`save_adapter`), loaded onto any copy of the base model, pruned or not (:func:`load_adapter`), or merged
into plain weights (:func:`merge`).

Loss: the mean over examples of each example's mean response-token NLL (the attribution loss), with the
end-of-turn token appended to every response that ``max_length`` did not cut, so the model learns to stop.
Runs are deterministic for a given ``seed`` and leave the caller's global RNG state untouched.

**Pruned weights.** A LoRA delta ΔW = B·A·(alpha/rank) is dense, so plain LoRA on a pruned model regrows the
pruned positions: W_eff = W_pruned + ΔW. With ``keep_pruned=mask`` the mask is applied to the base weights and
the delta is zeroed at the masked positions in every forward pass, W_eff = W_pruned + ΔW ⊙ (1 − M): during
training, whenever the adapter is loaded again (the mask is saved beside it), and in the merged weights, where
the masked positions are exactly zero. Without ``keep_pruned`` the merge keeps the regrown values.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from harmprune import __version__
from harmprune.data import Record, records_digest
from harmprune.errors import DataError, HarmpruneError
from harmprune.formatting import (IGNORE_INDEX, Encoded, PromptFormat, collate_for_loss, encode_pair, pad_id_of,
                                  warn_prompt_cuts)
from harmprune.formatting import per_example_response_nll, response_ids
from harmprune.io import atomic_write_json
from harmprune.models import model_id
from harmprune.pruning import apply_mask, check_mask_fits
from harmprune.selection import Mask, load_mask, save_mask

if TYPE_CHECKING:
    from peft import PeftModel

log = logging.getLogger(__name__)

INFO_FILE = "harmprune_finetune.json"
MASK_FILE = "keep_pruned_mask.safetensors"
_BLOCK_LINEAR = re.compile(r"(^|\.)(layers|h|blocks)\.\d+\.")


# ---------------------------------------------------------------------------------------------- data


def encode_for_training(
    tokenizer, records: Sequence[Record], fmt: PromptFormat = "chat", max_length: int = 256, append_eos: bool = True
) -> list[Encoded]:
    """Tokenised pairs; a response kept whole gets the EOS token appended as a target if it fits.

    A record whose ``source["truncated"]`` is true (e.g. a generation cut at its token limit) gets no EOS.
    """
    eos = tokenizer.eos_token_id
    out = []
    for i, r in enumerate(records):
        if not r.response or not r.response.strip():
            raise DataError(f"example {i} ({r.prompt[:40]!r}) has no response to train on")
        try:
            enc = encode_pair(tokenizer, r.prompt, r.response, fmt, max_length)
        except ValueError as e:
            raise DataError(f"example {i}: {e}") from None
        whole = enc.n_response == len(response_ids(tokenizer, r.response))
        ended = whole and not r.source.get("truncated", False)
        if append_eos and eos is not None and ended and len(enc.input_ids) < max_length:
            enc = Encoded(enc.input_ids + [int(eos)], enc.n_prompt)
        out.append(enc)
    warn_prompt_cuts(out, max_length, "training pairs")
    return out


# ---------------------------------------------------------------------------------------------- LoRA


def default_target_modules(model: nn.Module) -> list[str]:
    """Names of every ``nn.Linear`` inside the decoder blocks, e.g. q_proj … down_proj (never the LM head)."""
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and _BLOCK_LINEAR.search(name)
    }
    if not names:
        raise HarmpruneError("no nn.Linear layer inside decoder blocks; pass target_modules explicitly")
    return sorted(names)


def lora_finetune(
    model: nn.Module,
    tokenizer,
    records: Sequence[Record],
    *,
    rank: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    target_modules: Sequence[str] | None = None,
    epochs: float = 1,
    lr: float = 2e-4,
    batch_size: int = 8,
    max_length: int = 256,
    fmt: PromptFormat = "chat",
    seed: int = 0,
    max_steps: int | None = None,
    warmup_ratio: float = 0.05,
    weight_decay: float = 0.0,
    keep_pruned: Mask | None = None,
    gradient_checkpointing: bool = False,
    progress: bool = True,
) -> PeftModel:
    """Train a LoRA adapter on the response tokens of ``records``; ``model`` is wrapped in place (peft).

    ``keep_pruned`` applies that mask to the base weights and holds the pruned weights at zero (module docstring).
    The returned ``PeftModel`` is in eval mode and carries ``finetune_info`` (hyper-parameters, losses).
    """
    from peft import LoraConfig, get_peft_model

    _check_hparams(rank, epochs, lr, batch_size, max_steps)
    targets = list(target_modules) if target_modules else default_target_modules(model)
    examples = encode_for_training(tokenizer, records, fmt, max_length)
    if keep_pruned is not None:
        apply_mask(model, keep_pruned)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none",
                        task_type="CAUSAL_LM")
    with _seeded(seed, model):
        peft_model = get_peft_model(model, config)
        if keep_pruned is not None:
            _install_keep_pruned(peft_model, keep_pruned)
        trainable = [p for p in peft_model.parameters() if p.requires_grad]
        losses = _train(peft_model, trainable, examples, pad_id_of(tokenizer), epochs=epochs, lr=lr,
                        batch_size=batch_size, max_steps=max_steps, warmup_ratio=warmup_ratio,
                        weight_decay=weight_decay, seed=seed, checkpointing=gradient_checkpointing, progress=progress)
    peft_model.finetune_info = _info(model, records, losses, keep_pruned, method="lora", rank=rank, alpha=alpha,
                                     dropout=dropout, target_modules=targets, epochs=epochs, lr=lr,
                                     batch_size=batch_size, max_length=max_length, prompt_format=fmt, seed=seed,
                                     max_steps=max_steps, warmup_ratio=warmup_ratio, weight_decay=weight_decay)
    return peft_model


def save_adapter(peft_model: PeftModel, out_dir: str | Path) -> Path:
    """Write the adapter (peft format), its ``harmprune_finetune.json`` and any keep-pruned mask, atomically."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    peft_model.save_pretrained(tmp)
    keep = _keep_state(peft_model)
    if keep is not None:
        save_mask(keep.mask, tmp / MASK_FILE)
    atomic_write_json(tmp / INFO_FILE, getattr(peft_model, "finetune_info", {}))
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir


def load_adapter(model: nn.Module, adapter_dir: str | Path, keep_pruned: Mask | bool = True,
                 is_trainable: bool = False) -> PeftModel:
    """Put a saved adapter on ``model`` (in place), e.g. a pruned copy of the base model.

    ``keep_pruned``: ``True`` uses the mask saved with the adapter if there is one, ``False`` none, or a Mask.
    The mask is applied to the base weights and the delta is zeroed at its positions.
    """
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").exists():
        raise HarmpruneError(f"{adapter_dir}: not a LoRA adapter directory (no adapter_config.json)")
    mask = keep_pruned if isinstance(keep_pruned, Mask) else None
    if keep_pruned is True and (adapter_dir / MASK_FILE).exists():
        mask = load_mask(adapter_dir / MASK_FILE)
    if mask is not None:
        apply_mask(model, mask)
    peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=is_trainable)
    if mask is not None:
        _install_keep_pruned(peft_model, mask)
    info_path = adapter_dir / INFO_FILE
    if info_path.exists():
        peft_model.finetune_info = json.loads(info_path.read_text(encoding="utf-8"))
    peft_model.eval()
    return peft_model


def merge(peft_model: PeftModel) -> nn.Module:
    """Fold the adapter into the base weights and return the plain model; keep-pruned weights are re-zeroed."""
    keep = _keep_state(peft_model)
    if keep is not None:
        keep.remove()
    model = peft_model.merge_and_unload()
    if keep is not None:
        apply_mask(model, keep.mask)
    model.eval()
    return model


# ---------------------------------------------------------------------------------------------- all weights


def full_finetune(
    model: nn.Module,
    tokenizer,
    records: Sequence[Record],
    *,
    epochs: float = 1,
    lr: float = 1e-5,
    batch_size: int = 8,
    max_length: int = 256,
    fmt: PromptFormat = "chat",
    seed: int = 0,
    max_steps: int | None = None,
    warmup_ratio: float = 0.05,
    weight_decay: float = 0.0,
    keep_pruned: Mask | None = None,
    gradient_checkpointing: bool = False,
    progress: bool = True,
) -> nn.Module:
    """Train every weight in place (the same loop and loss as LoRA); ``keep_pruned`` weights stay exactly zero."""
    _check_hparams(1, epochs, lr, batch_size, max_steps)
    examples = encode_for_training(tokenizer, records, fmt, max_length)
    after_step = None
    if keep_pruned is not None:
        apply_mask(model, keep_pruned)
        params = check_mask_fits(model, keep_pruned)

        def after_step() -> None:  # AdamW moves a weight whose gradient is zero only through its moments
            with torch.no_grad():
                for name, p in params.items():
                    p.view(-1)[keep_pruned.indices[name].to(p.device)] = 0

    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(True)
    try:
        with _seeded(seed, model):
            losses = _train(model, list(model.parameters()), examples, pad_id_of(tokenizer), epochs=epochs, lr=lr,
                            batch_size=batch_size, max_steps=max_steps, warmup_ratio=warmup_ratio,
                            weight_decay=weight_decay, seed=seed, checkpointing=gradient_checkpointing,
                            progress=progress, after_step=after_step)
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
    model.finetune_info = _info(model, records, losses, keep_pruned, method="full", epochs=epochs, lr=lr,
                                batch_size=batch_size, max_length=max_length, prompt_format=fmt, seed=seed,
                                max_steps=max_steps, warmup_ratio=warmup_ratio, weight_decay=weight_decay)
    return model


# ---------------------------------------------------------------------------------------------- the loop


def planned_steps(n_examples: int, batch_size: int, epochs: float, max_steps: int | None) -> int:
    """Optimiser steps a run takes: ceil(epochs × batches per epoch), capped by ``max_steps``."""
    steps = math.ceil(epochs * math.ceil(n_examples / batch_size))
    return min(steps, max_steps) if max_steps is not None else steps


def _train(model, params, examples, pad_id, *, epochs, lr, batch_size, max_steps, warmup_ratio, weight_decay, seed,
           checkpointing, progress, after_step=None) -> list[float]:
    steps = planned_steps(len(examples), batch_size, epochs, max_steps)
    warmup = math.ceil(warmup_ratio * steps)
    optim = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    # Linear warm-up, then linear decay towards zero.
    sched = torch.optim.lr_scheduler.LambdaLR(
        optim, lambda s: min((s + 1) / max(1, warmup), (steps - s) / max(1, steps - warmup)))
    batches = _batches([len(e.input_ids) for e in examples], batch_size, torch.Generator().manual_seed(seed))
    device = next(model.parameters()).device
    losses: list[float] = []
    if checkpointing:
        _checkpointing(model, True)
    model.train()
    try:
        bar = _progress(range(steps), progress)
        for _ in bar:
            batch = collate_for_loss([examples[i] for i in next(batches)], pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = response_nll(model, batch).mean()
            optim.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optim.step()
            sched.step()
            if after_step is not None:
                after_step()
            losses.append(loss.item())
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
    finally:
        if checkpointing:
            _checkpointing(model, False)
        model.eval()
        optim.zero_grad(set_to_none=True)
    if losses:
        log.info("fine-tuned %d steps: loss %.4f -> %.4f", len(losses), losses[0], losses[-1])
    return losses


def response_nll(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-example response NLL, with the LM head run only from the first position that predicts a target."""
    labels = batch["labels"]
    first_target = int((labels != IGNORE_INDEX).int().argmax(dim=1).min())
    keep = labels.shape[1] - max(first_target - 1, 0)
    kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    try:
        logits = model(**kwargs, logits_to_keep=keep).logits
    except TypeError:  # a model without logits_to_keep computes every position
        return per_example_response_nll(model(**kwargs).logits, labels)
    return per_example_response_nll(logits, labels[:, labels.shape[1] - keep :])


def _batches(lengths: list[int], batch_size: int, generator: torch.Generator) -> Iterator[list[int]]:
    """Endless batches: each epoch a fresh permutation; within windows of 16 batches, similar lengths together."""
    n = len(lengths)
    window = batch_size * 16
    while True:
        perm = torch.randperm(n, generator=generator).tolist()
        epoch = []
        for s in range(0, n, window):
            chunk = sorted(perm[s : s + window], key=lambda i: lengths[i])
            epoch.extend(chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size))
        for k in torch.randperm(len(epoch), generator=generator).tolist():
            yield epoch[k]


def _check_hparams(rank, epochs, lr, batch_size, max_steps) -> None:
    if rank < 1 or batch_size < 1 or epochs <= 0 or lr <= 0 or (max_steps is not None and max_steps < 1):
        raise HarmpruneError(
            f"fine-tuning needs rank, batch_size, epochs, lr and max_steps positive (got rank={rank}, "
            f"batch_size={batch_size}, epochs={epochs}, lr={lr}, max_steps={max_steps})"
        )


@contextmanager
def _seeded(seed: int, model: nn.Module) -> Iterator[None]:
    """Seed torch for a run, restoring the caller's RNG state afterwards."""
    dev = next(model.parameters()).device
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def _checkpointing(model: nn.Module, on: bool) -> None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if on:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(base, "enable_input_require_grads"):
            base.enable_input_require_grads()
    else:
        base.gradient_checkpointing_disable()


def _progress(steps: range, enabled: bool):
    if not enabled:
        return steps
    from tqdm.auto import tqdm

    return tqdm(steps, desc="fine-tune", unit="step")


def _info(model, records, losses, keep_pruned: Mask | None, **hparams) -> dict[str, object]:
    return {
        **hparams,
        "base_model": model_id(model),
        "examples": len(records),
        "data_sha256": records_digest(records),
        "steps": len(losses),
        "losses": losses,
        "keep_pruned": None if keep_pruned is None else {"selected": keep_pruned.count(),
                                                          "metadata": dict(keep_pruned.metadata)},
        "harmprune_version": __version__,
    }


# ---------------------------------------------------------------------------------------------- keep pruned


@dataclass
class _KeepPruned:
    """Hooks that zero the LoRA delta at a mask's positions, and the mask itself."""

    mask: Mask
    handles: list = field(default_factory=list)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def _keep_state(peft_model) -> _KeepPruned | None:
    return peft_model.__dict__.get("_harmprune_keep_pruned")


def _install_keep_pruned(peft_model, mask: Mask) -> None:
    """Subtract ΔW⊙M·x from each adapted layer's LoRA branch, so the layer computes (W + ΔW⊙(1−M))·x.

    The LoRA branch is lora_B(lora_A(dropout(x)))·s; a hook on the dropout keeps its output, a hook on lora_B
    subtracts (B·A)⊙M applied to it before peft scales and adds the branch. Merged or disabled adapters never
    call these modules, so the hooks then do nothing.
    """
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model()
    state = _KeepPruned(mask)
    for name, module in base.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        weight_name = f"{name}.weight"
        idx = mask.indices.get(weight_name)
        if idx is None or idx.numel() == 0:
            continue
        for adapter in module.lora_A:
            stash: list[torch.Tensor] = []
            state.handles.append(module.lora_dropout[adapter].register_forward_hook(
                lambda m, inputs, out, stash=stash: stash.append(out)))
            state.handles.append(module.lora_B[adapter].register_forward_hook(
                _subtract_pruned(module.lora_A[adapter], idx.to(module.lora_A[adapter].weight.device), stash)))
    peft_model.__dict__["_harmprune_keep_pruned"] = state


def _subtract_pruned(lora_a: nn.Linear, idx: torch.Tensor, stash: list[torch.Tensor]):
    def hook(lora_b: nn.Linear, inputs, out: torch.Tensor) -> torch.Tensor:
        x = stash.pop()
        delta = (lora_b.weight @ lora_a.weight).reshape(-1)
        pruned = torch.zeros_like(delta).index_copy(0, idx, delta[idx]).view(lora_b.weight.shape[0], -1)
        return out - F.linear(x.to(pruned.dtype), pruned)

    return hook
