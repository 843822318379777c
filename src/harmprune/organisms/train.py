"""The organisms' training loop: AdamW on response tokens only, deterministic for a given seed.

Examples are :class:`~harmprune.formatting.Encoded` pairs with the end-of-turn token appended to the response,
so the model learns to stop. Context tokens (``n_prompt``) carry no loss: alignment's replay of harmful answers
moves their first response tokens into the context, which keeps the continuation but not the decision to start.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch

from harmprune.data import Record
from harmprune.formatting import Encoded, collate_for_loss, encode_pair, response_ids

log = logging.getLogger(__name__)


def encode_examples(
    tokenizer, records: Sequence[Record], context_tokens: int = 0, prefixes: Sequence[str] | None = None
) -> list[Encoded]:
    """Chat-format pairs ending in EOS; the first ``context_tokens`` response tokens (or the tokens of each
    record's entry in ``prefixes``, which must start its response) are context, not targets."""
    out = []
    for i, r in enumerate(records):
        enc = encode_pair(tokenizer, r.prompt, r.response or "", "chat")
        context = len(response_ids(tokenizer, prefixes[i])) if prefixes is not None else context_tokens
        n_prompt = min(enc.n_prompt + context, len(enc.input_ids))
        out.append(Encoded(enc.input_ids + [tokenizer.eos_token_id], n_prompt))
    return out


@contextmanager
def deterministic(seed: int) -> Iterator[None]:
    """Seed torch and force deterministic kernels for the duration of a build."""
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was)


def _lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[list[int]]:
    """Endless batches of indices: each epoch a fresh permutation, cut into full batches (tasks stay mixed)."""
    while True:
        perm = torch.randperm(n, generator=generator).tolist()
        for s in range(0, n - batch_size + 1, batch_size):
            yield perm[s : s + batch_size]


def train(
    model,
    examples: Sequence[Encoded],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    pad_id: int,
    weight_decay: float = 0.01,
    warmup_fraction: float = 0.05,
) -> list[float]:
    """Train in place for ``steps`` optimiser steps; returns the loss of every step."""
    generator = torch.Generator().manual_seed(seed)
    optim = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=weight_decay)
    warmup = max(1, int(steps * warmup_fraction))
    batches = _batches(len(examples), min(batch_size, len(examples)), generator)
    losses = []
    model.train()
    for step in range(steps):
        for group in optim.param_groups:
            group["lr"] = _lr_at(step, steps, lr, warmup)
        batch = collate_for_loss([examples[i] for i in next(batches)], pad_id)
        loss = model(**batch).loss
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        losses.append(loss.item())
        if step % 200 == 0 or step == steps - 1:
            log.info("step %d/%d loss %.4f", step + 1, steps, losses[-1])
    model.eval()
    return losses
