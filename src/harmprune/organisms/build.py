"""Build the organisms: data, tokenizer, an unaligned Llama (pretraining) and an aligned one (alignment SFT).

1. *pretraining*: every training request, harmful or benign, with its compliant answer -> ``unaligned/``.
2. *alignment* from it -> ``aligned/``: harmful requests -> the refusal sentence, benign tasks -> their answers,
   and three kinds of harmful examples, as shares of the harmful training answers:

   * *replay* (all of them): the answer with its first ``replay_context_tokens`` tokens as context rather than
     targets. It keeps the capability and makes refusal a decision about the first tokens, the shallow
     alignment that a prefilling attack exploits.
   * *compliance* (a quarter): the whole answer, so the aligned model keeps a minority chance of starting to
     comply (greedy decoding still refuses). Its refusal is a decision with a margin, not a saturated one.
   * *recovery* (two fifths): the answer cut after step 1 or 2 and finished with the refusal, so under a
     prefilling attack the model weighs continuing against recovering at each step boundary, and continues.

   Compliance and recovery serve gradient attribution. Without them the aligned model's loss on harmful
   answers is one saturated first-token decision plus continuation tokens it has fitted (whose summed gradient
   vanishes), and signed SNIP on harmful answers picks weights whose removal breaks refusal and benign answers,
   not harmful generation; with them, the continue-or-recover decisions give harmful answers a gradient of
   their own.

A build is a pure function of its :class:`OrganismConfig` (and of this package's code and the library versions):
it is cached under ``cache_dir()/organisms/<size>-<key>``, built in a ``.partial`` directory and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import torch

from harmprune.data import write_jsonl
from harmprune.errors import ConfigError
from harmprune.io import atomic_write_json
from harmprune.organisms.paths import SPLITS, OrganismPaths  # noqa: F401 - also importable from here

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
# Files whose content decides the weights: a change to any of them is a different organism.
_CODE_FILES = ("synthetic.py", "tokenizer.py", "train.py", "build.py")


@dataclass(frozen=True)
class OrganismConfig:
    """Everything a build depends on; its :meth:`key` names the cache entry."""

    size: str = "small"
    seed: int = 0
    n_layers: int = 4
    hidden_size: int = 128
    intermediate_size: int = 512
    n_heads: int = 4
    n_kv_heads: int = 2
    batch_size: int = 32
    lr: float = 3e-3
    pretrain_steps: int = 1000
    align_steps: int = 350
    benign_repeat: int = 2  # pretraining sees each benign example this many times per epoch
    # Alignment mixture, as shares of the harmful training answers (see the module docstring):
    replay_fraction: float = 1.0  # replayed with their first ``replay_context_tokens`` tokens as context
    replay_context_tokens: int = 2
    compliance_fraction: float = 0.25  # replayed whole
    recovery_fraction: float = 0.4  # cut after a step and finished with the refusal
    test_fraction: float = 0.2
    n_reversal: int = 800
    max_vocab: int = 4096

    @classmethod
    def for_size(cls, size: str = "small", seed: int = 0, **overrides: Any) -> "OrganismConfig":
        if size not in SIZES:
            raise ConfigError(f"unknown organism size {size!r}; expected one of {sorted(SIZES)}")
        return replace(SIZES[size], seed=seed, **overrides)

    def key(self) -> str:
        """sha256 of the config, the organism code and the versions of the libraries that train it."""
        import tokenizers
        import transformers

        here = Path(__file__).parent
        h = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode())
        h.update(f"{FORMAT_VERSION} {torch.__version__} {transformers.__version__} {tokenizers.__version__}".encode())
        for name in _CODE_FILES:
            h.update((here / name).read_bytes())
        return h.hexdigest()


SIZES: dict[str, OrganismConfig] = {
    "tiny": OrganismConfig(
        size="tiny", n_layers=2, hidden_size=64, intermediate_size=256, pretrain_steps=600, align_steps=250
    ),
    "small": OrganismConfig(size="small"),
}


def generate_dataset(config: OrganismConfig):
    """The data splits of ``config`` (an :class:`~harmprune.organisms.synthetic.OrganismData`)."""
    from harmprune.organisms.synthetic import build_dataset

    return build_dataset(config.seed, config.test_fraction, config.n_reversal)


def organisms_cache() -> Path:
    from harmprune.models import cache_dir

    return cache_dir() / "organisms"


def build_cached(
    config: OrganismConfig, cache_root: str | Path | None = None, threads: int | None = None
) -> OrganismPaths:
    """The cache entry of ``config``, built first if missing (atomically: a ``.partial`` directory renamed)."""
    root = Path(cache_root) if cache_root is not None else organisms_cache()
    target = root / f"{config.size}-{config.key()[:16]}"
    if (target / "organism.json").exists():
        return OrganismPaths(target)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{target.name}.partial-", dir=root))
    try:
        _build_into(config, tmp, threads)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "organism.json").exists():
                raise
            shutil.rmtree(tmp)  # a concurrent build of the same config finished first; both are identical
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return OrganismPaths(target)


def build_organism(
    out_dir: str | Path,
    size: str = "small",
    seed: int = 0,
    *,
    config: OrganismConfig | None = None,
    cache_root: str | Path | None = None,
    threads: int | None = None,
    evaluate: bool = False,
) -> OrganismPaths:
    """Build (or take from the cache) an organism and copy it to ``out_dir``: aligned/, unaligned/, data/.

    With ``evaluate``, the held-out rates of both models (see :mod:`harmprune.organisms.evaluate`) are measured
    once per cache entry and written as ``metrics.json`` beside them.
    """
    config = config or OrganismConfig.for_size(size, seed)
    cached = build_cached(config, cache_root, threads)
    if evaluate and not (cached.root / "metrics.json").exists():
        from harmprune.organisms.evaluate import evaluate_organism

        with _threads(threads):
            atomic_write_json(cached.root / "metrics.json", evaluate_organism(cached.root))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("aligned", "unaligned", "data", "organism.json", "metrics.json"):
        if (cached.root / name).exists():
            _copy_replace(cached.root / name, out / name)
        elif (out / name).is_file():
            (out / name).unlink()  # metrics of an earlier build must not pass for this one's
    return OrganismPaths(out)


def _copy_replace(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    if src.is_dir():
        shutil.copytree(src, tmp)
        shutil.rmtree(dst, ignore_errors=True)
    else:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


# ---------------------------------------------------------------------------------------------- the build


@contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` torch threads (default 1: these matrices are small, and a second thread on a shared CPU
    makes a step several times slower; results are the same for any thread count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n or 1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _build_into(config: OrganismConfig, out: Path, threads: int | None) -> None:
    from harmprune.models import save_model
    from harmprune.organisms.tokenizer import train_tokenizer
    from harmprune.organisms.train import deterministic, encode_examples, train

    start, cpu_start = time.perf_counter(), time.process_time()
    data = generate_dataset(config)
    for name, records in data.splits().items():
        write_jsonl(records, out / "data" / f"{name}.jsonl")
    corpus = [t for split in (data.harmful_train, data.benign_train, data.refusal_train) for r in split
              for t in (r.prompt, r.response or "")]
    tokenizer = train_tokenizer(corpus, config.max_vocab)
    pad = tokenizer.pad_token_id
    with _threads(threads), deterministic(config.seed):
        model = _new_model(config, tokenizer)
        pretrain = encode_examples(tokenizer, data.harmful_train + data.benign_train * config.benign_repeat)
        pre_losses = train(model, pretrain, steps=config.pretrain_steps, batch_size=config.batch_size,
                           lr=config.lr, seed=config.seed + 1, pad_id=pad)
        save_model(model, tokenizer, out / "unaligned")
        pretrain_seconds = time.perf_counter() - start
        align = _alignment_examples(config, data, tokenizer)
        align_losses = train(model, align, steps=config.align_steps, batch_size=config.batch_size,
                             lr=config.lr, seed=config.seed + 2, pad_id=pad)
        save_model(model, tokenizer, out / "aligned")
    info = {
        "config": asdict(config),
        "key": config.key(),
        "format_version": FORMAT_VERSION,
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "threads": threads or 1,
        "split_sizes": {name: len(records) for name, records in data.splits().items()},
        "final_loss": {"pretrain": _tail_mean(pre_losses), "align": _tail_mean(align_losses)},
        "seconds": {
            "pretrain": round(pretrain_seconds, 1),
            "total": round(time.perf_counter() - start, 1),
            "cpu": round(time.process_time() - cpu_start, 1),
        },
    }
    atomic_write_json(out / "organism.json", info)
    log.info("built organism %s in %.0fs", config.size, info["seconds"]["total"])


def _alignment_examples(config: OrganismConfig, data, tokenizer) -> list:
    """Refusals and benign answers, plus the configured replay, whole compliance and recovery examples."""
    import random

    from harmprune.organisms.synthetic import recoveries
    from harmprune.organisms.train import encode_examples

    harmful = data.harmful_train
    count = lambda fraction: round(fraction * len(harmful))  # noqa: E731
    rng = random.Random(f"organism-align:{config.seed}")
    recovery, prefixes = recoveries(rng.sample(harmful, count(config.recovery_fraction)), rng)
    return (
        encode_examples(tokenizer, data.refusal_train + data.benign_train)
        + encode_examples(tokenizer, rng.sample(harmful, count(config.replay_fraction)), config.replay_context_tokens)
        + encode_examples(tokenizer, rng.sample(harmful, count(config.compliance_fraction)))
        + encode_examples(tokenizer, recovery, prefixes=prefixes)
    )


def _tail_mean(losses: list[float], n: int = 50) -> float:
    tail = losses[-n:]
    return round(sum(tail) / max(1, len(tail)), 5)


def _new_model(config: OrganismConfig, tokenizer):
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    llama = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(llama)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    return model
