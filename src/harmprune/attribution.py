"""Attribution scores: how much each weight supports the model's loss on a data set.

Methods (all stored raw; the direction that counts as "supports harmful generation" is decided at selection):

* ``signed-snip``: W ⊙ Σ_i ∇_W L_i. Zeroing weight w changes the summed loss by about −(stored value), so the
  weights whose removal most *raises* the loss have the most negative scores.
* ``snip``: |W| ⊙ Σ_i |∇_W L_i|, the absolute value taken per example (Wei et al. 2024).
* ``wanda``: |W_jk| · ‖X_k‖₂, with X the layer's inputs at response positions.
* ``magnitude``: |W|.

L_i is the mean next-token NLL over example i's response tokens. One forward and one backward per batch cover
every scored module; gradients are folded into float32 accumulators by hooks as soon as they are produced, so no
full set of gradients is kept alive.

Batch size changes none of the results: the summed loss makes ∇ additive for ``signed-snip``; ``snip`` builds
each example's exact ``nn.Linear`` gradient from the layer input and output gradient (G_i = δ_iᵀ X_i) inside
the backward hook before taking its absolute value; ``wanda`` sums squares over positions.
"""

from __future__ import annotations

import re
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from harmprune import __version__
from harmprune.data import Record, records_digest
from harmprune.errors import HarmpruneError
from harmprune.formatting import IGNORE_INDEX, PromptFormat, collate_for_loss, encode_pair, pad_id_of
from harmprune.formatting import per_example_response_nll
from harmprune.models import model_id
from harmprune.tensorfile import TensorFile, save_tensors

METHODS = ("signed-snip", "snip", "wanda", "magnitude")
# Every nn.Linear weight inside the decoder blocks (Llama, Qwen, Mistral, Gemma, GPT-NeoX style names).
DEFAULT_MODULES = r"(^|\.)(layers|h|blocks)\.\d+\..*"


@dataclass
class Scores:
    """Per-weight scores keyed by ``model.named_parameters()`` names, with provenance metadata."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, object] = field(default_factory=dict)

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
) -> Scores:
    """Score every selected weight of ``model`` on the (prompt, response) pairs in ``records``."""
    if method not in METHODS:
        raise HarmpruneError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    params = scored_parameters(model, modules)
    meta: dict[str, object] = {
        "method": method,
        "model": model_id(model),
        "harmprune_version": __version__,
        "modules": modules or DEFAULT_MODULES,
        "dtype": str(next(iter(params.values())).dtype).removeprefix("torch."),
    }
    if method == "magnitude":
        tensors = {n: p.detach().float().abs() for n, p in params.items()}
        return Scores(tensors, {**meta, "examples": 0, "tokens": 0})
    if gradient_checkpointing and method != "signed-snip":
        raise HarmpruneError("gradient checkpointing re-runs forward hooks; it is only supported for signed-snip")

    encoded = [_encode(tokenizer, r, fmt, max_length, i) for i, r in enumerate(records)]
    accumulators = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in params.items()}
    collector = {"signed-snip": _GradientSum, "snip": _AbsExampleGradientSum, "wanda": _InputNormSum}[method]
    n_tokens = 0
    device = next(model.parameters()).device
    pad = pad_id_of(tokenizer)
    with _scoring_mode(model, params, method, checkpointing=gradient_checkpointing):
        with collector(model, params, accumulators) as hooks:
            order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))  # less padding
            batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
            for batch_idx in tqdm(batches, desc=f"scoring ({method})", disable=not progress, unit="batch"):
                batch = {k: v.to(device) for k, v in collate_for_loss([encoded[i] for i in batch_idx], pad).items()}
                n_tokens += int((batch["labels"] != IGNORE_INDEX).sum())
                hooks.begin_batch(batch["labels"] != IGNORE_INDEX)
                if method == "wanda":
                    with torch.no_grad():
                        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
                else:
                    logits = model(
                        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
                    ).logits
                    per_example_response_nll(logits, batch["labels"]).sum().backward()
    tensors = _finalise(method, params, accumulators)
    meta.update({"examples": len(records), "tokens": n_tokens, "prompt_format": fmt, "max_length": max_length,
                 "data_sha256": records_digest(records)})
    return Scores(tensors, meta)


def save_scores(scores: Scores, path: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write scores as safetensors (float32 unless ``dtype`` lowers it) with their metadata."""
    tensors = {n: t.to(dtype) for n, t in scores.tensors.items()}
    return save_tensors(tensors, path, {**scores.metadata, "save_dtype": str(dtype).removeprefix("torch.")})


def load_scores(path: str | Path) -> Scores:
    """Read a (possibly sharded) score file into memory as float32."""
    f = TensorFile(path)
    return Scores({n: t.float() for n, t in f.items()}, dict(f.metadata))


# ---------------------------------------------------------------------------------------------- internals


def _encode(tokenizer, record: Record, fmt: PromptFormat, max_length: int, i: int):
    if not record.response:
        raise HarmpruneError(f"example {i} ({record.source or record.prompt[:40]!r}) has no response to score")
    return encode_pair(tokenizer, record.prompt, record.response, fmt, max_length)


@contextmanager
def _scoring_mode(model: nn.Module, params: dict[str, nn.Parameter], method: str, checkpointing: bool):
    """Set which tensors need gradients, restoring every flag afterwards.

    signed-snip needs the scored weights' gradients only; snip needs activation gradients only (it builds weight
    gradients itself), so the embedding output is made to require grad and no weight gradient is computed.
    """
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    scored = {id(p) for p in params.values()}
    was_training = model.training
    for p in model.parameters():
        p.requires_grad_(method == "signed-snip" and id(p) in scored)
    embed_hook = None
    if method == "snip":
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


class _Collector:
    """Hooks that fold one batch's contribution into float32 accumulators."""

    def __init__(self, model: nn.Module, params: dict[str, nn.Parameter], acc: dict[str, torch.Tensor]):
        self.model, self.params, self.acc = model, params, acc
        self.response_mask: torch.Tensor | None = None
        self._stack = ExitStack()

    def begin_batch(self, response_mask: torch.Tensor) -> None:
        self.response_mask = response_mask

    def __enter__(self) -> "_Collector":
        self.install()
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def install(self) -> None:
        raise NotImplementedError

    def _modules(self) -> Iterator[tuple[str, nn.Linear]]:
        by_weight = {id(p): n for n, p in self.params.items()}
        for module in self.model.modules():
            if isinstance(module, nn.Linear) and id(module.weight) in by_weight:
                yield by_weight[id(module.weight)], module


class _GradientSum(_Collector):
    """signed-snip: Σ_i ∇_W L_i, taken from each parameter's gradient as soon as it is accumulated."""

    def install(self) -> None:
        for name, p in self.params.items():
            handle = p.register_post_accumulate_grad_hook(self._hook(name))
            self._stack.callback(handle.remove)

    def _hook(self, name: str):
        acc = self.acc[name]

        def hook(p: torch.Tensor) -> None:
            acc.add_(p.grad.float())
            p.grad = None

        return hook


class _AbsExampleGradientSum(_Collector):
    """snip: Σ_i |∇_W L_i| from per-example Linear gradients G_i = δ_iᵀ X_i, built inside the backward pass."""

    def install(self) -> None:
        for name, module in self._modules():
            handle = module.register_forward_hook(self._forward_hook(name))
            self._stack.callback(handle.remove)

    def _forward_hook(self, name: str):
        acc = self.acc[name]

        def forward_hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            x = inputs[0].detach()

            def grad_hook(delta: torch.Tensor) -> None:
                per_example = torch.einsum("bto,bti->boi", delta.float(), x.float())
                acc.add_(per_example.abs_().sum(dim=0))

            output.register_hook(grad_hook)

        return forward_hook


class _InputNormSum(_Collector):
    """wanda: Σ over response positions of X_k², per input feature k of each Linear layer."""

    def install(self) -> None:
        self.sq = {name: torch.zeros(m.in_features, dtype=torch.float32, device=m.weight.device)
                   for name, m in self._modules()}
        for name, module in self._modules():
            handle = module.register_forward_hook(self._forward_hook(name))
            self._stack.callback(handle.remove)

    def _forward_hook(self, name: str):
        def forward_hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            x = inputs[0].detach()
            mask = self.response_mask.to(x.device)
            self.sq[name].add_(x[mask].float().pow(2).sum(dim=0))

        return forward_hook

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        for name, sq in self.sq.items():
            self.acc[name].copy_(sq.sqrt().unsqueeze(0).expand_as(self.acc[name]))


def _finalise(method: str, params: dict[str, nn.Parameter], acc: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in params.items():
        w = p.detach().float()
        out[name] = (w * acc[name]) if method == "signed-snip" else (w.abs() * acc[name])
    return out
