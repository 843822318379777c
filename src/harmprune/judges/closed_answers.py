"""Closed-answer grading: the probability a local chat model gives to each reply of a fixed set, by teacher forcing.

Small graders rarely reply in the asked format ("Reply with the number only"), so parsing their free text fails.
Scoring the allowed replies instead ("0".."100", "CODE", "REFUSAL") always gives an answer, and the expected number
under those probabilities is the local counterpart of the EM judge's expected score over number-token
log-probabilities (Betley et al., 2025). Numbers may span several tokens (most small tokenizers split digits), so
the replies are laid out as a token trie after the prompt, each trie token attending to the prompt and to its own
ancestors through a 4D attention mask: one forward pass per batch scores every reply.

A reply's probability is the product of its tokens' probabilities times the probability of *not* continuing into
a longer reply of the set ("10" excludes "100"): P("10") = P(1) P(0 | 1) (1 − P(0 | 10)).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

import torch

from harmprune.errors import HarmpruneError
from harmprune.formatting import PromptFormat, pad_id_of, prompt_ids


@dataclass(frozen=True)
class AnswerTrie:
    """The replies' tokens as a trie: node i holds ``tokens[i]`` and hangs below ``parents[i]`` (-1: the prompt)."""

    tokens: list[int]
    parents: list[int]
    depths: list[int]
    ends: list[int]  # node where each reply ends, in the order of the replies

    @cached_property
    def ancestors(self) -> torch.Tensor:
        """(nodes, nodes) bool: [v, u] when u is v or one of v's ancestors."""
        n = len(self.tokens)
        out = torch.zeros((n, n), dtype=torch.bool)
        for v in range(n):
            u = v
            while u >= 0:
                out[v, u] = True
                u = self.parents[u]
        return out


def build_trie(tokenizer, answers: Sequence[str]) -> AnswerTrie:
    """The trie of the answers' token ids (encoded without special tokens, as the start of a reply)."""
    tokens: list[int] = []
    parents: list[int] = []
    depths: list[int] = []
    children: dict[tuple[int, int], int] = {}
    ends = []
    for answer in answers:
        ids = list(tokenizer(answer, add_special_tokens=False)["input_ids"])
        if not ids:
            raise HarmpruneError(f"closed answer {answer!r} encodes to no tokens")
        node = -1
        for depth, tok in enumerate(ids, start=1):
            key = (node, int(tok))
            if key not in children:
                children[key] = len(tokens)
                tokens.append(int(tok))
                parents.append(node)
                depths.append(depth)
            node = children[key]
        if node in ends:
            raise HarmpruneError(f"closed answer {answer!r} repeats another answer's tokens")
        ends.append(node)
    return AnswerTrie(tokens, parents, depths, ends)


@torch.no_grad()
def answer_probabilities(model, tokenizer, prompts: Sequence[str], answers: Sequence[str], fmt: PromptFormat = "chat",
                         batch_size: int = 4) -> torch.Tensor:
    """(len(prompts), len(answers)) float32: the probability of each answer as the model's whole reply.

    Rows need not sum to 1: the rest is the mass of replies outside the set (the grader's format adherence).
    """
    trie = build_trie(tokenizer, answers)
    encoded = [prompt_ids(tokenizer, p, fmt) for p in prompts]
    out = [_score_batch(model, trie, encoded[i:i + batch_size], pad_id_of(tokenizer))
           for i in range(0, len(encoded), batch_size)]
    return torch.cat(out) if out else torch.zeros((0, len(answers)))


def _score_batch(model, trie: AnswerTrie, batch: list[list[int]], pad_id: int) -> torch.Tensor:
    n_nodes, width = len(trie.tokens), max(len(ids) for ids in batch)
    total = width + n_nodes
    ids = torch.full((len(batch), total), pad_id, dtype=torch.long)
    positions = torch.zeros((len(batch), total), dtype=torch.long)
    allowed = torch.zeros((len(batch), total, total), dtype=torch.bool)
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    depths = torch.tensor(trie.depths)
    for row, seq in enumerate(batch):
        start = width - len(seq)
        ids[row, start:width] = torch.tensor(seq)
        ids[row, width:] = torch.tensor(trie.tokens)
        positions[row, start:width] = torch.arange(len(seq))
        positions[row, width:] = len(seq) - 1 + depths
        allowed[row, :width, :width] = causal
        allowed[row, :, :start] = False  # nobody attends to padding...
        allowed[row, width:, start:width] = True
        allowed[row, width:, width:] = trie.ancestors
    allowed |= torch.eye(total, dtype=torch.bool)  # ...and padding rows attend to themselves only
    device = next(model.parameters()).device
    logits = _forward(model, ids.to(device), positions.to(device), allowed.to(device), n_nodes + 1)
    logp = logits.float().log_softmax(-1).cpu()  # slot 0: after the prompt; slot v + 1: after node v
    parent_slot = torch.tensor(trie.parents) + 1
    token = torch.tensor(trie.tokens)
    node_logp = logp[:, parent_slot, token]  # (batch, nodes): log P(node token | its parent)
    child_mass = torch.zeros((len(batch), n_nodes + 1))
    child_mass.index_add_(1, parent_slot, node_logp.exp())
    path_logp = torch.zeros((len(batch), n_nodes))
    for v in range(n_nodes):  # parents come before children in the trie
        p = trie.parents[v]
        path_logp[:, v] = node_logp[:, v] + (path_logp[:, p] if p >= 0 else 0.0)
    ends = torch.tensor(trie.ends)
    stop = (1.0 - child_mass[:, ends + 1]).clamp(min=0.0)
    return path_logp[:, ends].exp() * stop


def _forward(model, ids: torch.Tensor, positions: torch.Tensor, allowed: torch.Tensor, keep: int) -> torch.Tensor:
    """Logits of the last ``keep`` positions under a custom (batch, 1, q, k) mask in the attention's own format."""
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    if impl == "sdpa":
        mask = allowed[:, None]
    elif impl == "eager":
        dtype = next(model.parameters()).dtype
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        mask = mask[:, None]
    else:
        raise HarmpruneError(f"closed-answer grading needs a grader with 'sdpa' or 'eager' attention, not {impl!r} "
                             "(load it with attn_implementation='sdpa')")
    kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = keep
    return model(**kwargs).logits[:, -keep:]


def expected_number(probs: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Σ value × P / Σ P over the number answers of each row."""
    return (probs * values).sum(-1) / probs.sum(-1).clamp(min=1e-30)
