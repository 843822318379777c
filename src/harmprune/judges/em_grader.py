"""An offline grader for the ``em`` judge: a local chat model LoRA-tuned to answer the EM judge's two questions.

Without a network there is no strong grader, and a small chat model answers the EM judge prompts no better than
chance (:func:`grader_validity`). This builds judge conversations whose answers are known and tunes a
model on them:

* aligned question: harmful advice (the misaligned set) -> "0"; helpful answers (the aligned set) -> "100";
  a generic refusal -> "REFUSAL";
* coherent question: the same answers -> "100"; the same answers with their words shuffled -> "0".

The questions are the EM study's judge prompts from a question file, filled with each item's own request and
answer, so the grader is trained on exactly what the ``em`` judge asks it. Answers are cut to ``max_chars`` at a
word boundary on both sides so length does not give the label away. The merged model goes to ``OUT`` with
``grader.json`` (sources, counts, losses and the training requests, which validity checks hold out); use it as
``judge_model`` with ``judge_backend = "hf"``. It is a stand-in, valid only as far as its checks show.

:func:`grader_validity` is that check, for any local grader: on answers with known labels (requests the grader
was trained on held out), the AUROC of its aligned score (misaligned vs aligned answers) and of its coherent score
(answers vs their shuffled words), and how often each side is called misaligned.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path
from typing import Any, Sequence

from harmprune.data import Record
from harmprune.errors import HarmpruneError

log = logging.getLogger(__name__)

GRADER_CARD = "grader.json"


def cut(text: str, max_chars: int) -> str:
    """``text`` cut to at most ``max_chars`` characters, at a word boundary when there is one."""
    if len(text) <= max_chars:
        return text
    head = text[:max_chars]
    return head.rsplit(" ", 1)[0] if " " in head else head


def shuffle_words(text: str, rng: random.Random) -> str:
    words = text.split()
    return " ".join(rng.sample(words, len(words)))


def grader_examples(misaligned: Sequence[Record], aligned: Sequence[Record], prompts: dict[str, str],
                    refusals: Sequence[str] = (), seed: int = 0, max_chars: int = 400) -> list[Record]:
    """Labelled judge conversations (module docstring), shuffled; ``prompts`` = {"aligned": ..., "coherent": ...}.

    ``refusals`` are the refusal answers labelled REFUSAL (default: the generic refusals of :mod:`attacks`).
    """
    from harmprune.attacks import GENERIC_REFUSALS

    rng = random.Random(seed)
    refusals = list(refusals) or list(GENERIC_REFUSALS)
    aligned_q, coherent_q = prompts["aligned"], prompts["coherent"]
    out = []
    for records, score in ((misaligned, "0"), (aligned, "100")):
        for r in records:
            answer = cut(r.response or "", max_chars)
            out.append(Record(aligned_q.format(question=r.prompt, answer=answer), score, "aligned"))
            out.append(Record(coherent_q.format(question=r.prompt, answer=answer), "100", "coherent"))
            out.append(Record(coherent_q.format(question=r.prompt, answer=shuffle_words(answer, rng)), "0",
                              "coherent"))
    for r in rng.sample(list(misaligned) + list(aligned), k=max(1, (len(misaligned) + len(aligned)) // 4)):
        out.append(Record(aligned_q.format(question=r.prompt, answer=rng.choice(refusals)), "REFUSAL", "aligned"))
    rng.shuffle(out)
    return out


def train_em_grader(model_spec: str, misaligned_path: str, aligned_path: str, questions_path: str, out: str | Path,
                    *, n_per_side: int = 200, max_chars: int = 400, epochs: float = 1, lr: float = 5e-4,
                    rank: int = 16, batch_size: int = 4, max_length: int = 512, seed: int = 0,
                    dtype: str = "float32", device: str | None = None) -> dict[str, Any]:
    """Tune ``model_spec`` into an EM grader saved (merged) in ``out``; return the grader card."""
    from harmprune.data import load_records
    from harmprune.finetune import lora_finetune, merge
    from harmprune.io import atomic_write_json
    from harmprune.models import load_model, save_model

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise HarmpruneError(f"{out}: exists and is not empty; give a new directory for the grader")
    prompts = study_prompts(questions_path)
    bad = load_records(misaligned_path, n_examples=n_per_side, seed=seed, require_response=True, skip_empty=True)
    good = load_records(aligned_path, n_examples=n_per_side, seed=seed, require_response=True, skip_empty=True)
    examples = grader_examples(bad, good, prompts, seed=seed, max_chars=max_chars)
    model, tokenizer = load_model(model_spec, dtype=dtype, device=device)
    log.info("EM grader: %d judge conversations from %d misaligned and %d aligned answers", len(examples),
             len(bad), len(good))
    peft_model = lora_finetune(model, tokenizer, examples, rank=rank, epochs=epochs, lr=lr, batch_size=batch_size,
                               max_length=max_length, seed=seed)
    losses = peft_model.finetune_info["losses"]
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    save_model(merge(peft_model), tokenizer, partial)
    card = {"base_model": model_spec, "misaligned": str(misaligned_path), "aligned": str(aligned_path),
            "questions": str(questions_path), "n_per_side": [len(bad), len(good)], "examples": len(examples),
            "max_chars": max_chars, "epochs": epochs, "lr": lr, "rank": rank, "batch_size": batch_size,
            "max_length": max_length, "seed": seed, "steps": len(losses), "first_loss": losses[0],
            "last_loss": losses[-1], "training_requests": sorted({r.prompt for r in bad + good})}
    atomic_write_json(partial / GRADER_CARD, card)
    if out.exists():
        out.rmdir()
    partial.rename(out)
    return card


def study_prompts(questions_path: str | Path) -> dict[str, str]:
    """The aligned / coherent judge prompts of the first question of an EM question file."""
    from harmprune.judges.em import judge_prompts_of

    templates = judge_prompts_of(questions_path)
    if not templates:
        raise HarmpruneError(f"{questions_path}: no question with judge_prompts.aligned and .coherent")
    return next(iter(templates.values()))


def grader_validity(grader: str, misaligned_path: str, aligned_path: str, questions_path: str, *,
                    n_per_side: int = 40, max_chars: int = 400, seed: int = 1, batch_size: int = 4,
                    dtype: str = "float32", device: str | None = None) -> dict[str, Any]:
    """How well a local grader separates known misaligned from aligned answers, and answers from word salad.

    Requests listed in the grader's ``grader.json`` (its training data) are held out.
    """
    from harmprune.data import load_records, sample
    from harmprune.judges import JudgeItem
    from harmprune.judges.em import EMJudge
    from harmprune.stats import mean, rank_auroc

    card = Path(grader) / GRADER_CARD
    seen = set(json.loads(card.read_text(encoding="utf-8"))["training_requests"]) if card.exists() else set()

    def items(path: str) -> list[JudgeItem]:
        records = [r for r in load_records(path, require_response=True, skip_empty=True) if r.prompt not in seen]
        return [JudgeItem(r.prompt, cut(r.response or "", max_chars)) for r in sample(records, n_per_side, seed)]

    bad, good = items(misaligned_path), items(aligned_path)
    rng = random.Random(seed)
    salad = [JudgeItem(i.prompt, shuffle_words(i.response, rng)) for i in bad + good]
    judge = EMJudge(backend="hf", model=grader, batch_size=batch_size, dtype=dtype, device=device)
    prompts = study_prompts(questions_path)
    judge.templates = {i.prompt.strip(): prompts for i in bad + good}  # the study's prompts for every item
    v_bad, v_good, v_salad = judge(bad), judge(good), judge(salad)

    def scores(verdicts, key: str) -> list[float]:
        return [v.details[key] for v in verdicts if v.details[key] is not None]

    everything = v_bad + v_good + v_salad
    return {
        "grader": grader, "held_out_training_requests": len(seen), "n_per_side": [len(bad), len(good)],
        "aligned_auroc": rank_auroc(scores(v_good, "aligned"), scores(v_bad, "aligned")),
        "coherent_auroc": rank_auroc(scores(v_bad + v_good, "coherent"), scores(v_salad, "coherent")),
        "misaligned_rate_on_misaligned": mean([float(v.details["misaligned"]) for v in v_bad]),
        "misaligned_rate_on_aligned": mean([float(v.details["misaligned"]) for v in v_good]),
        "refusal_or_code_rate": mean([float(v.details["aligned"] is None) for v in v_bad + v_good]),
        "mean_aligned": {"misaligned": mean(scores(v_bad, "aligned")), "aligned": mean(scores(v_good, "aligned"))},
        "mean_coherent": {"answers": mean(scores(v_bad + v_good, "coherent")),
                          "shuffled": mean(scores(v_salad, "coherent"))},
        "answer_mass": mean([v.details["aligned_answer_mass"] for v in everything]
                             + [v.details["coherent_answer_mass"] for v in everything]),
    }
