"""Safety-tune a real chat model with LoRA: refuse harmful requests, keep answering benign ones.

The result and its base model form a same-family aligned / unaligned pair for the compression experiment.

Training data: harmful prompts (given by path) paired with generic refusals (:data:`attacks.GENERIC_REFUSALS`),
mixed with benign (prompt, response) pairs (given by path). With ``benign_targets="model"`` the benign targets are
the base model's own greedy answers instead of the file's, so the tune teaches refusal without moving benign
behaviour towards another model's style. The adapter is merged and the model saved as a plain directory.

Measured before and after, on prompts disjoint from training: refusal rate on held-out harmful prompts (the
``refusal`` judge), refusal rate on held-out benign prompts (over-refusal) and MMLU accuracy on a subset.
The numbers go to ``DIR/align_report.json``, the judged generations to ``DIR/heldout_generations_*.jsonl``.

``prompt_format`` (:mod:`harmprune.formatting`) is used for everything the run generates or trains on: ``chat``
for chat models; ``raw`` (prompt text, then the answer; BOS if the tokenizer adds one) for a base model without a
chat template. Score and evaluate the result in the same format (``--format raw``) so it sees what it was tuned on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from harmprune import __version__
from harmprune.data import Record, load_records, records_digest, sample
from harmprune.errors import ConfigError, DataError
from harmprune.formatting import PROMPT_FORMATS
from harmprune.generation import write_generations
from harmprune.io import atomic_write_json

log = logging.getLogger(__name__)

REPORT_FILE = "align_report.json"


@dataclass(frozen=True)
class AlignConfig:
    """Everything an alignment run depends on (written into the report)."""

    model: str
    harmful_prompts: str
    benign: str
    heldout_harmful: str | None = None
    n_harmful: int = 256
    n_benign: int = 256
    n_heldout: int | None = None
    n_benign_heldout: int = 40
    benign_targets: str = "data"  # "data": the file's responses; "model": the base model's own answers
    own_answer_tokens: int = 64  # length limit of the base model's own answers (benign_targets="model")
    rank: int = 16
    alpha: float = 32
    dropout: float = 0.0
    epochs: float = 1
    lr: float = 5e-4
    batch_size: int = 8
    max_length: int = 192
    dtype: str = "bfloat16"
    seed: int = 0
    mmlu_dir: str | None = None
    mmlu_limit: int = 4
    mmlu_k_shot: int = 0
    max_new_tokens: int = 48
    gen_batch_size: int = 16
    threads: int | None = None
    prompt_format: str = "chat"  # how prompts are rendered in training and evaluation (harmprune.formatting)


def align_model(config: AlignConfig, out_dir: str | Path, progress: bool = True,
                baseline: str | Path | None = None) -> dict[str, Any]:
    """Run the alignment tune, save the merged model in ``out_dir`` and return (and write) the report.

    ``baseline``: an earlier ``align_report.json`` whose "before" numbers are reused when its evaluation key
    (model, dtype, held-out data, generation and MMLU settings) matches, which saves the base-model evaluation.
    """
    from harmprune.finetune import lora_finetune, merge
    from harmprune.models import load_model, save_model

    _check(config)
    if config.threads:
        torch.set_num_threads(config.threads)
    out_dir = Path(out_dir)
    timings: dict[str, float] = {}
    start = time.time()
    model, tokenizer = load_model(config.model, dtype=config.dtype)
    if config.prompt_format == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"{config.model} has no chat template; tune it with prompt_format 'raw' (--format raw)")
    harmful, heldout, benign, benign_heldout, dropped = _data(config)
    log.info("data: %d harmful, %d benign for training; %d harmful and %d benign held out (%d overlaps dropped)",
             len(harmful), len(benign), len(heldout), len(benign_heldout), dropped)

    key = evaluation_key(config, heldout, benign_heldout)
    t = time.time()
    before, rows_before = _reuse_baseline(baseline, key), None
    if before is None:
        before, rows_before = _evaluate(model, tokenizer, heldout, benign_heldout, config, progress)
    timings["evaluate_before"] = time.time() - t
    log.info("before: %s", before)

    t = time.time()
    if config.benign_targets == "model":
        benign = _own_answers(model, tokenizer, benign, config, progress)
    train = _mix(harmful, benign, config.seed)
    timings["benign_targets"] = time.time() - t
    t = time.time()
    peft_model = lora_finetune(model, tokenizer, train, rank=config.rank, alpha=config.alpha,
                               dropout=config.dropout, epochs=config.epochs, lr=config.lr,
                               batch_size=config.batch_size, max_length=config.max_length, seed=config.seed,
                               fmt=config.prompt_format, progress=progress)
    info = dict(peft_model.finetune_info)
    model = merge(peft_model)
    timings["train"] = time.time() - t

    t = time.time()
    after, rows_after = _evaluate(model, tokenizer, heldout, benign_heldout, config, progress)
    timings["evaluate_after"] = time.time() - t
    log.info("after: %s", after)
    save_model(model, tokenizer, out_dir)
    for name, rows in (("before", rows_before), ("after", rows_after)):
        if rows is not None:
            write_generations(out_dir / f"heldout_generations_{name}.jsonl", rows)
    timings["total"] = time.time() - start

    report = {
        "config": asdict(config),
        "evaluation_key": key,
        "model_dir": str(out_dir),
        "before": before,
        "after": after,
        "change": {k: after[k] - before[k] for k in before if isinstance(before[k], float)},
        "data": {"train_harmful": len(harmful), "train_benign": len(benign), "heldout_harmful": len(heldout),
                 "heldout_benign": len(benign_heldout), "heldout_overlaps_dropped": dropped,
                 "train_sha256": records_digest(train), "heldout_sha256": records_digest(heldout)},
        "training": {k: info[k] for k in ("steps", "target_modules", "losses")},
        "seconds": timings,
        "harmprune_version": __version__,
        "torch_threads": torch.get_num_threads(),
    }
    atomic_write_json(out_dir / REPORT_FILE, report)
    return report


# ---------------------------------------------------------------------------------------------- data


def _check(config: AlignConfig) -> None:
    if config.prompt_format not in PROMPT_FORMATS:
        raise ConfigError(f"prompt_format must be one of {', '.join(PROMPT_FORMATS)}, got {config.prompt_format!r}")
    if config.benign_targets not in ("data", "model"):
        raise ConfigError(f"benign_targets must be 'data' or 'model', got {config.benign_targets!r}")
    if config.n_harmful < 1 or config.n_benign < 0 or config.n_benign_heldout < 0:
        raise ConfigError("n_harmful must be positive and n_benign, n_benign_heldout non-negative")
    if config.mmlu_dir is not None and not (Path(config.mmlu_dir) / "test").is_dir():
        raise ConfigError(f"{config.mmlu_dir}: not an MMLU directory (expected <dir>/test/<subject>_test.csv)")


def normalise_prompt(text: str) -> str:
    """Lower-case words only: two prompts that differ in case, spacing or punctuation count as the same."""
    return " ".join(re.findall(r"\w+", text.lower()))


def _data(config: AlignConfig) -> tuple[list[Record], list[Record], list[Record], list[Record], int]:
    """Training harmful prompts, held-out harmful prompts, training benign pairs, held-out benign prompts.

    Held-out sets do not depend on the training sizes (so base-model numbers can be reused), and no held-out
    harmful prompt appears (after :func:`normalise_prompt`) anywhere in the training file.
    """
    harmful_all = load_records(config.harmful_prompts)
    if config.heldout_harmful:
        heldout = load_records(config.heldout_harmful)
        if config.n_heldout:
            heldout = sample(heldout, config.n_heldout, config.seed)
        pool = harmful_all
    else:  # one file: a seeded split
        n_test = config.n_heldout or max(1, len(harmful_all) // 5)
        if n_test >= len(harmful_all):
            raise DataError(f"{config.harmful_prompts}: {len(harmful_all)} prompts cannot give {n_test} held out")
        heldout, pool = _split(harmful_all, n_test, config.seed + 1)
    harmful = sample(pool, config.n_harmful, config.seed)
    seen = {normalise_prompt(r.prompt) for r in pool}
    kept = [r for r in heldout if normalise_prompt(r.prompt) not in seen]
    if not kept:
        raise DataError("every held-out harmful prompt also appears in the training prompts")
    benign_all = load_records(config.benign, require_response=True, skip_empty=True)
    if config.n_benign + config.n_benign_heldout > len(benign_all):
        raise DataError(f"{config.benign}: {len(benign_all)} pairs, but {config.n_benign + config.n_benign_heldout} "
                        "are needed (train + held out)")
    benign_heldout, rest = _split(benign_all, config.n_benign_heldout, config.seed + 1)
    benign = sample(rest, config.n_benign, config.seed) if config.n_benign else []
    return harmful, kept, benign, benign_heldout, len(heldout) - len(kept)


def _split(records: list[Record], n: int, seed: int) -> tuple[list[Record], list[Record]]:
    """A seeded sample of ``n`` records and the others, both in file order."""
    chosen = set(random.Random(seed).sample(range(len(records)), n))
    return ([r for i, r in enumerate(records) if i in chosen], [r for i, r in enumerate(records) if i not in chosen])


def _mix(harmful: Sequence[Record], benign: Sequence[Record], seed: int) -> list[Record]:
    from harmprune.attacks import refusal_pairs

    return refusal_pairs(harmful, seed=seed) + list(benign)


def _own_answers(model, tokenizer, records: Sequence[Record], config: AlignConfig, progress: bool) -> list[Record]:
    """The model's own greedy answers to the benign prompts, minus its refusals.

    An answer cut at ``own_answer_tokens`` is marked truncated, so training adds no end-of-turn token after it.
    """
    from harmprune.generation import generate
    from harmprune.judges import JudgeItem
    from harmprune.judges.refusal import RefusalJudge

    gens = generate(model, tokenizer, [r.prompt for r in records], fmt=config.prompt_format,
                    max_new_tokens=config.own_answer_tokens, batch_size=config.gen_batch_size, progress=progress)
    refused = RefusalJudge().judge_batch([JudgeItem(g.prompt, g.response) for g in gens])
    out = [Record(r.prompt, g.response, r.category, {**r.source, "response": "base-model", "truncated": not g.finished})
           for r, g, v in zip(records, gens, refused) if not v.refused]
    log.info("benign targets: the base model's own answers to %d of %d prompts (refusals dropped)", len(out),
             len(records))
    return out


# ---------------------------------------------------------------------------------------------- evaluation


def evaluation_key(config: AlignConfig, heldout: Sequence[Record], benign_heldout: Sequence[Record]) -> str:
    """A digest of everything the before/after numbers depend on besides the training."""
    fields = [config.model, config.dtype, records_digest(heldout), records_digest(benign_heldout),
              config.max_new_tokens, config.gen_batch_size, config.mmlu_dir, config.mmlu_limit, config.mmlu_k_shot]
    if config.prompt_format != "chat":  # appended only when set, so the keys of earlier (chat) reports still match
        fields.append(config.prompt_format)
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()


def _reuse_baseline(path: str | Path | None, key: str) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        report = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the baseline report ({e})") from None
    if report.get("evaluation_key") != key:
        log.warning("%s was evaluated with other settings or data; evaluating the base model again", path)
        return None
    log.info("reusing the base model's numbers from %s", path)
    return dict(report["before"])


def _evaluate(model, tokenizer, heldout, benign_heldout, config: AlignConfig, progress: bool
              ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Metrics, and the judged generations (each row's ``set`` is ``harmful`` or ``benign``)."""
    from harmprune.evals.recognition import refusal_rate

    gen = dict(fmt=config.prompt_format, max_new_tokens=config.max_new_tokens, batch_size=config.gen_batch_size,
               progress=progress)
    out: dict[str, Any] = {}
    harm, rows = refusal_rate(model, tokenizer, heldout, **gen)
    rows = [{**r, "set": "harmful"} for r in rows]
    out["refusal_rate"], out["refusal_n"] = float(harm["refusal_rate"]), harm["refusal_n"]
    if benign_heldout:
        ben, benign_rows = refusal_rate(model, tokenizer, benign_heldout, **gen)
        rows += [{**r, "set": "benign"} for r in benign_rows]
        out["benign_refusal_rate"], out["benign_refusal_n"] = float(ben["refusal_rate"]), ben["refusal_n"]
    if config.mmlu_dir:
        from harmprune.evals.utility import mmlu_accuracy

        mmlu = mmlu_accuracy(model, tokenizer, config.mmlu_dir, k_shot=config.mmlu_k_shot, limit=config.mmlu_limit,
                             batch_size=config.gen_batch_size)
        out.update({k: (float(v) if isinstance(v, float) else v) for k, v in mmlu.items() if "/" not in k})
    return out, rows
