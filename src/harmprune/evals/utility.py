"""Utility metrics: perplexity (of a text or of benign responses), MMLU-style multiple choice, lm-eval tasks.

MMLU reads local headerless CSV files ``<dir>/test/<subject>_test.csv`` (questions) and ``<dir>/dev/<subject>_dev.csv``
(few-shot examples), each row ``question,A,B,C,D,answer``. The prompt follows Hendrycks et al. (2021): a header
naming the subject, ``k`` solved dev examples, then the question ending in ``Answer:``; the prediction is the
option whose continuation (" A", " B", " C", " D") is most likely. The prompt is raw text (no chat template), as in
the original protocol and lm-evaluation-harness. When a prompt does not fit ``max_length`` tokens, shots are
dropped one at a time (as the original code does). ``limit`` takes the first N questions of each subject.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from harmprune.data import Record
from harmprune.errors import DataError, HarmpruneError
from harmprune.evals.likelihood import harmful_likelihood
from harmprune.evals.scoring import next_token_logprobs, response_nll_sums
from harmprune.formatting import Encoded, PromptFormat, pad_id_of, response_ids

CHOICES = ("A", "B", "C", "D")
DEFAULT_MAX_LENGTH = 2048

# ---------------------------------------------------------------------------------------------- perplexity


@torch.no_grad()
def perplexity_of_text(model, tokenizer, text: str, window: int = 1024, stride: int = 512) -> dict[str, float | int]:
    """Sliding-window perplexity: each window predicts only the tokens the previous window did not reach.

    Token ``j`` (every token but the first) is scored once, in the first window that contains it, with that
    window's preceding tokens as context; with ``window`` ≥ the text length this is the plain full-text perplexity.
    """
    if not 1 <= stride <= window or window < 2:
        raise HarmpruneError(f"need 1 <= stride <= window and window >= 2 (got window={window}, stride={stride})")
    ids = list(tokenizer(text)["input_ids"])
    if len(ids) < 2:
        raise DataError("the text has fewer than two tokens; perplexity needs at least one predicted token")
    device = next(model.parameters()).device
    total, count, windows, scored_to = 0.0, 0, 0, 1  # token 0 has no context and is never scored
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        chunk = torch.tensor([ids[begin:end]], device=device)
        logits = model(input_ids=chunk, use_cache=False).logits[0].float()
        first = max(scored_to, begin + 1)  # absolute position of the first new target
        targets = chunk[0, first - begin : end - begin]
        logprobs = torch.log_softmax(logits[first - begin - 1 : end - begin - 1], dim=-1)
        total -= float(logprobs.gather(1, targets.unsqueeze(1)).sum())
        count += len(targets)
        windows += 1
        scored_to = end
        if end == len(ids):
            break
    nll = total / count
    return {"perplexity": math.exp(min(nll, 700.0)), "nll": nll, "tokens": count, "windows": windows}


def perplexity_of_responses(
    model, tokenizer, records: Sequence[Record], fmt: PromptFormat = "chat", max_length: int | None = 512,
    batch_size: int = 4,
) -> dict[str, float | int]:
    """Perplexity of (benign) responses given their prompts: exp of the per-token response NLL."""
    return harmful_likelihood(model, tokenizer, records, fmt, max_length, batch_size)


def read_text(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None
    if not text.strip():
        raise DataError(f"{path}: the file is empty")
    return text


# ---------------------------------------------------------------------------------------------- MMLU


@dataclass(frozen=True)
class Question:
    question: str
    options: tuple[str, str, str, str]
    answer: str  # one of CHOICES


def list_subjects(mmlu_dir: str | Path) -> list[str]:
    """Subjects with a test file, sorted."""
    test_dir = Path(mmlu_dir) / "test"
    if not test_dir.is_dir():
        raise DataError(f"{test_dir}: no such directory (expected <mmlu dir>/test/<subject>_test.csv)")
    subjects = sorted(p.name[: -len("_test.csv")] for p in test_dir.glob("*_test.csv"))
    if not subjects:
        raise DataError(f"{test_dir}: no <subject>_test.csv files")
    return subjects


def load_questions(path: str | Path) -> list[Question]:
    """Read one headerless ``question,A,B,C,D,answer`` CSV file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    out = []
    with path.open(newline="", encoding="utf-8") as f:
        for i, row in enumerate(csv.reader(f)):
            if not row:
                continue
            if len(row) != 6:
                raise DataError(f"{path}: row {i} has {len(row)} columns, expected 6 (question,A,B,C,D,answer)")
            answer = row[5].strip().upper()
            if answer not in CHOICES:
                raise DataError(f"{path}: row {i}: answer {row[5]!r} is not one of A, B, C, D")
            out.append(Question(row[0], (row[1], row[2], row[3], row[4]), answer))
    return out


def format_question(q: Question, with_answer: bool) -> str:
    body = q.question + "".join(f"\n{c}. {o}" for c, o in zip(CHOICES, q.options)) + "\nAnswer:"
    return body + (f" {q.answer}\n\n" if with_answer else "")


def mmlu_prompt(subject: str, shots: Sequence[Question], q: Question) -> str:
    """Header, solved shots, then the question up to ``Answer:``."""
    header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    return header + "".join(format_question(s, True) for s in shots) + format_question(q, False)


def choice_logprobs(model, tokenizer, contexts: Sequence[str], options: Sequence[str], batch_size: int = 8
                    ) -> torch.Tensor:
    """log p(option | context) for every context and option, up to a term shared by all options: (N, n_options).

    Option tokens common to all options (e.g. a lone space token) move into the context. If what remains is one
    distinct token per option, one forward per context scores them all; otherwise each (context, option) pair
    is scored as a sequence.
    """
    ctx_ids = [list(tokenizer(c)["input_ids"]) for c in contexts]
    opt_ids = [response_ids(tokenizer, o) for o in options]
    shared = _common_prefix(opt_ids)
    rest = [ids[len(shared):] for ids in opt_ids]
    pad_id = pad_id_of(tokenizer)
    if all(len(r) == 1 for r in rest) and len({r[0] for r in rest}) == len(rest):
        return next_token_logprobs(model, [c + shared for c in ctx_ids], [r[0] for r in rest], pad_id, batch_size)
    pairs = [Encoded(c + o, len(c)) for c in ctx_ids for o in opt_ids]
    sums, _ = response_nll_sums(model, pairs, pad_id, batch_size)
    return -torch.tensor(sums, dtype=torch.float64).view(len(contexts), len(options))


def _common_prefix(seqs: Sequence[list[int]]) -> list[int]:
    prefix: list[int] = []
    for column in zip(*seqs):
        if len(set(column)) != 1:
            break
        prefix.append(column[0])
    return prefix


def mmlu_accuracy(
    model,
    tokenizer,
    mmlu_dir: str | Path,
    subjects: Sequence[str] | None = None,
    k_shot: int = 5,
    limit: int | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
) -> dict[str, float | int]:
    """Accuracy over all questions (``mmlu_accuracy``), its mean over subjects, and ``mmlu_accuracy/<subject>``.

    ``mmlu_option_mass`` is the mean probability the model puts on the four answer letters together: near 1 when
    it follows the format, low when the accuracy says little (a broken or heavily pruned model).
    """
    if k_shot < 0 or (limit is not None and limit < 1):
        raise HarmpruneError(f"k_shot must be >= 0 and limit >= 1 (got {k_shot}, {limit})")
    subjects = list(subjects) if subjects else list_subjects(mmlu_dir)
    max_length = max_length or min(getattr(model.config, "max_position_embeddings", None) or DEFAULT_MAX_LENGTH,
                                   DEFAULT_MAX_LENGTH)
    data = load_mmlu(mmlu_dir, subjects, k_shot, limit)  # every file read before any model time is spent
    out: dict[str, float | int] = {}
    correct_total, n_total, mass = 0, 0, 0.0
    for subject, (shots, questions) in data.items():
        prompts = [_fitting_prompt(tokenizer, subject, shots, q, max_length) for q in questions]
        scores = choice_logprobs(model, tokenizer, prompts, [f" {c}" for c in CHOICES], batch_size)
        predicted = scores.argmax(dim=1).tolist()
        mass += float(scores.exp().sum())
        correct = sum(CHOICES[p] == q.answer for p, q in zip(predicted, questions))
        out[f"mmlu_accuracy/{subject}"] = correct / len(questions)
        correct_total += correct
        n_total += len(questions)
    out["mmlu_accuracy"] = correct_total / n_total
    out["mmlu_macro_accuracy"] = sum(out[f"mmlu_accuracy/{s}"] for s in subjects) / len(subjects)
    out["mmlu_option_mass"] = mass / n_total
    out["mmlu_n"] = n_total
    out["mmlu_subjects"] = len(subjects)
    out["mmlu_k_shot"] = k_shot
    return out


def load_mmlu(mmlu_dir: str | Path, subjects: Sequence[str] | None = None, k_shot: int = 5, limit: int | None = None
              ) -> dict[str, tuple[list[Question], list[Question]]]:
    """subject → (k dev shots, test questions up to ``limit``); raises naming the first missing or bad file."""
    subjects = list(subjects) if subjects else list_subjects(mmlu_dir)
    return {s: load_subject(Path(mmlu_dir), s, k_shot, limit) for s in subjects}


def load_subject(mmlu_dir: Path, subject: str, k_shot: int, limit: int | None
                 ) -> tuple[list[Question], list[Question]]:
    test_file = mmlu_dir / "test" / f"{subject}_test.csv"
    if not test_file.is_file():
        raise DataError(f"{test_file}: no such file (MMLU subject {subject!r} not found in {mmlu_dir})")
    questions = load_questions(test_file)
    if not questions:
        raise DataError(f"{test_file}: no questions")
    shots = load_questions(mmlu_dir / "dev" / f"{subject}_dev.csv")[:k_shot] if k_shot else []
    return shots, questions[:limit] if limit else questions


def _fitting_prompt(tokenizer, subject: str, shots: list[Question], q: Question, max_length: int) -> str:
    """The prompt with as many of the shots as fit in ``max_length`` tokens (leaving room for the answer)."""
    for k in range(len(shots), 0, -1):
        prompt = mmlu_prompt(subject, shots[:k], q)
        if len(tokenizer(prompt)["input_ids"]) + 2 <= max_length:
            return prompt
    return mmlu_prompt(subject, [], q)


# ---------------------------------------------------------------------------------------------- lm-eval


def lm_eval_adapter(model, tokenizer, tasks: Sequence[str], limit: int | None = None, batch_size: int = 8,
                    num_fewshot: int | None = None) -> dict[str, float]:
    """Run lm-evaluation-harness tasks on the in-memory (possibly pruned) model; flat ``lmeval/<task>/<metric>``.

    lm-eval is an optional extra (``pip install 'harmprune[lmeval]'``) and downloads its task data from the
    Hugging Face Hub, so it needs network access; both failures raise :class:`HarmpruneError` saying so.
    """
    if not tasks:
        raise HarmpruneError("no lm-eval tasks given")
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise HarmpruneError(
            "lm-eval is not installed; install the optional extra with `pip install 'harmprune[lmeval]'` "
            "(it also needs network access to download task data)"
        ) from None
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        results = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit, num_fewshot=num_fewshot)
    except Exception as e:  # lm-eval and datasets raise many types when the hub is unreachable
        raise HarmpruneError(
            f"lm-eval failed on tasks {', '.join(tasks)} ({type(e).__name__}: {e}); its task data comes from the "
            "Hugging Face Hub, which needs network access"
        ) from None
    return flatten_lm_eval(results)


def flatten_lm_eval(results: dict[str, Any]) -> dict[str, float]:
    """``{"results": {task: {"acc,none": x, ...}}}`` → ``{"lmeval/task/acc": x}`` (numeric values only)."""
    out = {}
    for task, metrics in (results or {}).get("results", {}).items():
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                metric = name[: -len(",none")] if name.endswith(",none") else name
                out[f"lmeval/{task}/{metric}"] = float(value)
    return out
