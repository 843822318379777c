"""Batched teacher-forced scoring shared by the evaluations: response NLL sums and next-token log-probabilities.

Two batched forwards, each exact up to floating point against one sequence at a time:

* :func:`response_nll_sums` right-pads (positions of real tokens are unchanged) and sums the NLL of every
  target token of each :class:`~harmprune.formatting.Encoded` example.
* :func:`next_token_logprobs` left-pads with explicit position ids, keeps only the last position's logits (so a
  batch never materialises a (batch, length, vocab) tensor), and returns the log-probabilities of chosen tokens.

Sequences are sorted by length (longest first) and cut into batches by a token budget: a batch holds at most
``batch_size`` sequences and at most ``max_batch_tokens`` padded tokens (rows × its longest sequence), so short
sequences travel in large batches and long ones in small; a sequence longer than the budget goes alone. Results
are returned in input order and do not depend on the batching beyond floating point.
"""

from __future__ import annotations

from typing import Sequence

import torch

from harmprune.formatting import Encoded, collate_for_loss, response_token_nll_sums


def model_device(model) -> torch.device:
    return next(model.parameters()).device


DEFAULT_BATCH_TOKENS = 4096  # padded tokens per forward-only batch: B x T activations, logits kept per position


def token_batches(lengths: Sequence[int], batch_size: int, max_batch_tokens: int | None = None) -> list[list[int]]:
    """Indices grouped longest first into batches of ≤ ``batch_size`` rows and ≤ ``max_batch_tokens`` padded
    tokens (None: no token limit)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if max_batch_tokens is not None and max_batch_tokens < 1:
        raise ValueError(f"max_batch_tokens must be positive, got {max_batch_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and len(batches[-1]) < batch_size and (
                max_batch_tokens is None or (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= max_batch_tokens):
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


@torch.no_grad()
def response_nll_sums(
    model, examples: Sequence[Encoded], pad_id: int, batch_size: int = 4, max_batch_tokens: int | None = None
) -> tuple[list[float], list[int]]:
    """Per example: the summed next-token NLL of its response tokens, and how many tokens that sum covers."""
    sums: list[float] = [0.0] * len(examples)
    counts: list[int] = [0] * len(examples)
    device = model_device(model)
    for batch in token_batches([len(e.input_ids) for e in examples], batch_size, max_batch_tokens):
        enc = {k: v.to(device) for k, v in collate_for_loss([examples[i] for i in batch], pad_id).items()}
        batch_sums, batch_counts = response_token_nll_sums(model, enc)
        for row, i in enumerate(batch):
            sums[i] = float(batch_sums[row])
            counts[i] = int(batch_counts[row])
    return sums, counts


@torch.no_grad()
def next_token_logprobs(
    model, sequences: Sequence[Sequence[int]], token_ids: Sequence[int], pad_id: int, batch_size: int = 8,
    max_batch_tokens: int | None = None,
) -> torch.Tensor:
    """log p(token | sequence) for each sequence and each of ``token_ids``: a float tensor (len(sequences), len(token_ids))."""
    out = torch.empty(len(sequences), len(token_ids), dtype=torch.float64)
    device = model_device(model)
    wanted = torch.tensor(list(token_ids), dtype=torch.long, device=device)
    for batch in token_batches([len(s) for s in sequences], batch_size, max_batch_tokens):
        width = max(len(sequences[i]) for i in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            seq = list(sequences[i])
            if not seq:
                raise ValueError("cannot score the next token of an empty sequence")
            ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq) :] = 1
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        logits = _last_logits(model, ids.to(device), mask.to(device), positions.to(device))
        logprobs = torch.log_softmax(logits.float(), dim=-1)[:, wanted]
        for row, i in enumerate(batch):
            out[i] = logprobs[row].double().cpu()
    return out


def _last_logits(model, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Logits at the last position, (batch, vocab); models without ``logits_to_keep`` compute them all."""
    kwargs = dict(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
    try:
        logits = model(**kwargs, logits_to_keep=1).logits
    except TypeError:
        logits = model(**kwargs).logits
    return logits[:, -1, :]
