"""How a (prompt, response) pair becomes tokens, and which of them carry the loss.

Three prompt formats:

* ``chat``: the tokenizer's chat template renders the user turn and opens the assistant turn; the response
  follows as the assistant's text.
* ``raw``: the prompt text immediately followed by the response text, with no template and no separator.
* ``pretrained``: the study's "pretrained format" for scoring (B-TAP): the prompt text and a newline, then the
  response; no chat template and no special tokens, even on chat models.

  What the study's release does (orgadhadas/harm_pruning, ``src/data_utils.py``, ``get_align`` with
  ``prune_pretrained_format``): it tokenises ``prompt + "\n"`` and the response separately, both with
  ``add_special_tokens=False`` (so no BOS is added), concatenates the ids and masks the prompt's ids out of the
  loss. This format follows that exactly: the newline ends the prompt and is never a loss target. (Its loader
  for the raw Alpaca utility set attaches the newline to the response instead, ``"\n" + response``, making the
  newline one extra target per utility example; harmprune uses the one rule above for both sets.)

Prompt and response are tokenised separately and concatenated, so the boundary between context and targets is
exact: the loss (labels != -100) covers the response tokens only.

A pair longer than ``max_length`` keeps its whole prompt and cuts the response's tail when the prompt leaves room;
a prompt too long for that loses its head instead, so that at least min(len(response), max_length // 2) response
tokens stay scored (never a single one). Callers report how many pairs lost prompt tokens with
:func:`warn_prompt_cuts`, once per data set.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal, Sequence

import torch

from harmprune.errors import DataError, ModelError

PromptFormat = Literal["chat", "raw", "pretrained"]
PROMPT_FORMATS: tuple[str, ...] = ("chat", "raw", "pretrained")
IGNORE_INDEX = -100


@dataclass(frozen=True)
class Encoded:
    """Token ids of one example; ``n_prompt`` leading ids are context, the rest are response targets."""

    input_ids: list[int]
    n_prompt: int
    prompt_cut: int = 0  # leading prompt tokens dropped to fit max_length

    @property
    def n_response(self) -> int:
        return len(self.input_ids) - self.n_prompt


def render_prompt(tokenizer, prompt: str, fmt: PromptFormat = "chat") -> str:
    """The text the model sees before its answer starts."""
    if fmt == "raw":
        return prompt
    if fmt == "pretrained":
        return prompt + "\n"
    if fmt == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise ModelError("prompt format 'chat' needs a tokenizer with a chat template; use --format raw")
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    raise DataError(f"unknown prompt format {fmt!r}; expected one of {PROMPT_FORMATS}")


def prompt_ids(tokenizer, prompt: str, fmt: PromptFormat = "chat") -> list[int]:
    """Token ids of the rendered prompt. Raw prompts get the tokenizer's BOS token if it adds one; chat prompts
    carry the template's own special tokens; pretrained-format prompts get none (as the study's code does)."""
    text = render_prompt(tokenizer, prompt, fmt)
    return list(tokenizer(text, add_special_tokens=(fmt == "raw"))["input_ids"])


def response_ids(tokenizer, response: str) -> list[int]:
    return list(tokenizer(response, add_special_tokens=False)["input_ids"])


def encode_pair(
    tokenizer, prompt: str, response: str, fmt: PromptFormat = "chat", max_length: int | None = None,
    context: str = "",
) -> Encoded:
    """Tokenise a pair; if too long, cut the response's tail, and the prompt's head only if it alone is too long.

    ``context`` is text of the answer that is context, not target (a prefilled start the model did not write): it
    is tokenised on its own after the prompt and carries no loss; ``response`` is what follows it.
    """
    p_ids = prompt_ids(tokenizer, prompt, fmt) + (response_ids(tokenizer, context) if context else [])
    r_ids = response_ids(tokenizer, response)
    if not r_ids:
        raise DataError(f"empty response for prompt {prompt[:60]!r}")
    if max_length is not None and max_length < 2:
        raise DataError(f"max_length must be at least 2 (a context token and a target), got {max_length}")
    cut = 0
    if max_length is not None and len(p_ids) + len(r_ids) > max_length:
        keep_response = min(len(r_ids), max(max_length - len(p_ids), max_length // 2))
        cut = max(0, len(p_ids) - (max_length - keep_response))
        p_ids = p_ids[cut:]
        r_ids = r_ids[: max_length - len(p_ids)]
    return Encoded(p_ids + r_ids, len(p_ids), cut)


def warn_prompt_cuts(examples: Sequence[Encoded], max_length: int | None, what: str = "pairs") -> int:
    """Log one warning if any example lost prompt tokens to ``max_length``; return how many did."""
    cut = [e.prompt_cut for e in examples if e.prompt_cut]
    if cut:
        logging.getLogger(__name__).warning(
            "%d of %d %s have a prompt too long for max_length %s: their first tokens (up to %d) were cut so the "
            "response keeps at least min(its length, max_length // 2) tokens", len(cut), len(examples), what,
            max_length, max(cut))
    return len(cut)


def collate_for_loss(examples: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch with labels that are -100 everywhere but on response tokens."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, e.n_prompt : n] = torch.tensor(e.input_ids[e.n_prompt :])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def response_nll_sums_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL over each example's response tokens and their count, both (batch,).
    Logits (B, T, V), labels (B, T)."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    token_nll = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(shift_labels.shape)
    return token_nll.sum(dim=1), (shift_labels != IGNORE_INDEX).sum(dim=1)


def per_example_response_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL over each example's response tokens: shape (batch,). Logits (B, T, V), labels (B, T)."""
    sums, counts = response_nll_sums_from_logits(logits, labels)
    return sums / counts.clamp(min=1)


def response_token_nll_sums(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example of ``batch`` (from :func:`collate_for_loss`): the summed next-token NLL of its response tokens
    and how many tokens that sum covers, both of shape (batch,).

    The LM head runs only at the positions that predict a response token, so prompt and padding positions never
    become vocabulary-sized logits (with their log-softmax and gradient, most of a batch's activation memory for
    50k-150k vocabularies). Used when :func:`plain_lm_head` confirms the model's logits are just its head applied
    to its decoder's last hidden state; otherwise the full logits are computed.
    """
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    head = plain_lm_head(model, batch)
    if head is None:
        return response_nll_sums_from_logits(model(**inputs).logits, batch["labels"])
    hidden = model.get_decoder()(**inputs).last_hidden_state
    token_nll = torch.nn.functional.cross_entropy(head(hidden[:, :-1][keep]).float(), targets[keep], reduction="none")
    sums = torch.zeros(targets.size(0), dtype=token_nll.dtype, device=token_nll.device)
    return sums.index_add(0, keep.nonzero()[:, 0], token_nll), keep.sum(dim=1)


def response_nll(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``per_example_response_nll`` of the model on ``batch`` (shape (batch,)), by :func:`response_token_nll_sums`."""
    sums, counts = response_token_nll_sums(model, batch)
    return sums / counts.clamp(min=1)


def plain_lm_head(model, batch: dict[str, torch.Tensor]) -> torch.nn.Module | None:
    """The model's output head if ``model(x).logits == head(decoder(x))`` (checked once per model on one example
    of ``batch``), else None: logit soft-capping or scaling, wrappers, or no separable decoder."""
    cached = getattr(model, "_harmprune_plain_head", None)
    if cached is not None:
        return None if cached is False else cached
    head = None
    try:
        decoder, candidate = model.get_decoder(), model.get_output_embeddings()
        one = {k: batch[k][:1] for k in ("input_ids", "attention_mask")}
        with torch.no_grad():
            full = model(**one, use_cache=False).logits.float()
            fast = candidate(decoder(**one, use_cache=False).last_hidden_state).float()
        if full.shape == fast.shape and (full - fast).abs().max() <= 1e-3 * max(1.0, float(full.abs().max())):
            head = candidate
    except (AttributeError, TypeError, ValueError, NotImplementedError):
        head = None
    try:
        object.__setattr__(model, "_harmprune_plain_head", False if head is None else head)  # not a submodule
    except AttributeError:
        pass
    return head


def pad_id_of(tokenizer) -> int:
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id
    if pad is None:
        raise ModelError("tokenizer has neither a pad nor an EOS token")
    return int(pad)
