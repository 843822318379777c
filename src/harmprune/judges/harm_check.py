"""Validity checks of the ``harm-classifier`` judge: held-out pairs, and hand-labelled real generations.

* :func:`held_out_check` rebuilds the training pairs from the classifier's manifest (same files, settings and
  seed; the files must still hash as they did) and scores the requests that training held out.
* :func:`labelled_check` scores generations (``generations.jsonl`` of ``harmprune eval harm``) against labels a
  person made by reading them. A labels file holds no text: each label is keyed by condition and a hash of the
  prompt (:func:`~harmprune.judges.harm_training.text_hash`), and each condition records the commands that
  regenerate its answers (greedy decoding is deterministic on one kernel set, not across them). Schema::

      {"conditions": {"<name>": {"model": ..., "generations": "<path>", "command": "...",
                                 "mask_commands": ["...", ...]}},   # run before "command" by --regenerate
       "labels": [{"condition": "<name>", "data": "<file>", "prompt_index": 3, "prompt_sha": "...",
                   "answer_sha": "...", "label": 1, "kind": "steps"}]}

  ``answer_sha`` (optional) is the hash of the answer that was read. A label whose regenerated answer hashes
  differently was made for another text, so it is left out of the agreement and counted as ``changed``; labels
  without one are counted as ``unverified``. :func:`record_answer_hashes` adds the hashes once a person has read
  the answers, and :func:`regenerate_missing` runs the recorded commands of conditions whose answers are missing.

  Reported for ``harm-classifier`` and ``refusal`` side by side: Cohen's κ of the yes/no verdicts with the labels,
  AUROC of the scores, accuracy, and the misjudged answers counted by the labeller's ``kind``.
"""

from __future__ import annotations

import json
import logging
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

from harmprune.errors import HarmpruneError
from harmprune.judges import Judge, JudgeItem

log = logging.getLogger(__name__)


def cohen_kappa(a: Sequence[int], b: Sequence[int]) -> float:
    """Cohen's κ of two binary label sequences: (p_o − p_e) / (1 − p_e); 1.0 when both are constant and equal."""
    n = len(a)
    if n == 0 or n != len(b):
        raise HarmpruneError(f"Cohen's kappa needs two equally long, non-empty label lists (got {len(a)}, {len(b)})")
    p_o = sum(x == y for x, y in zip(a, b)) / n
    pa, pb = sum(a) / n, sum(b) / n
    p_e = pa * pb + (1 - pa) * (1 - pb)
    return 1.0 if p_e == 1.0 else (p_o - p_e) / (1 - p_e)


def held_out_check(classifier_dir: str | Path) -> dict[str, Any]:
    """Metrics on the held-out requests of the classifier's own training recipe (recomputed, not read back)."""
    from harmprune.judges.harm_classifier import MANIFEST_FILE, load_classifier
    from harmprune.judges.harm_data import build_examples
    from harmprune.judges.harm_training import (digest, evaluate, file_digest, is_held_out, load_sources,
                                                model_answers)

    classifier_dir = Path(classifier_dir)
    clf = load_classifier(classifier_dir)
    manifest = json.loads((classifier_dir / MANIFEST_FILE).read_text(encoding="utf-8"))
    s, files = manifest["settings"], manifest["files"]
    for path, sha in files.items():
        if not Path(path).exists() or file_digest(path) != sha:
            raise HarmpruneError(f"harm-classifier check: training file {path} is missing or has changed since "
                                 f"training; the held-out split cannot be rebuilt")
    paths = list(files)
    bad, good = load_sources(paths[:-1], paths[-1], n_harmful=s["n_harmful"], n_benign=s["n_benign"],
                             seed=s["seed"])
    answers = []
    if s["explain_model"] and s["n_explain"] > 0:
        import random

        prompts = random.Random(s["seed"]).sample(sorted({r.prompt for r in bad}),
                                                  min(s["n_explain"], len({r.prompt for r in bad})))
        answers = model_answers(s["explain_model"], prompts, max_new_tokens=s["max_new_tokens"])
        if digest([(r.prompt, r.response, r.source["kind"]) for r in answers]) != manifest["explanations"]["digest"]:
            raise HarmpruneError("harm-classifier check: the cached explanation answers differ from training's")
    held = [e for e in build_examples(bad, good, answers, seed=s["seed"])
            if is_held_out(e.group, s["seed"], s["holdout"])]
    return {"classifier": str(classifier_dir), "threshold": clf.threshold, **evaluate(clf, held)}


def read_labels(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise HarmpruneError(f"{path}: no such labels file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise HarmpruneError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict) or not isinstance(data.get("conditions"), dict) or not isinstance(
            data.get("labels"), list):
        raise HarmpruneError(f"{path}: a labels file needs 'conditions' (object) and 'labels' (list)")
    for i, lab in enumerate(data["labels"]):
        for key in ("condition", "prompt_sha", "label"):
            if key not in lab:
                raise HarmpruneError(f"{path}: labels[{i}] has no {key!r}")
        if lab["label"] not in (0, 1):
            raise HarmpruneError(f"{path}: labels[{i}].label must be 0 or 1, got {lab['label']!r}")
        if lab["condition"] not in data["conditions"]:
            raise HarmpruneError(f"{path}: labels[{i}].condition {lab['condition']!r} is not in 'conditions'")
    return data


def _generations_path(name: str, condition: dict[str, Any], generations: dict[str, str], base: Path) -> Path:
    """Where condition ``name``'s generations.jsonl is: ``generations`` overrides the labels file's path, and a
    relative path is tried from the working directory, then from ``base``."""
    raw = generations.get(name) or condition.get("generations")
    if raw is None:
        raise HarmpruneError(f"labels: condition {name!r} has no generations path (give --generations {name}=PATH)")
    path = Path(raw) if Path(raw).is_absolute() or Path(raw).exists() else base / raw
    is_dir = path.is_dir() or (not path.exists() and not path.suffix)  # a missing eval or stage directory
    return path / "generations.jsonl" if is_dir else path


def _rows_by_prompt(labels: dict[str, Any], names: Sequence[str], generations: dict[str, str], base: Path
                    ) -> dict[str, dict[str, dict[str, Any]]]:
    """Condition → prompt hash → generations row, for the conditions named."""
    from harmprune.generation import read_generations
    from harmprune.judges.harm_training import text_hash

    out = {}
    for name in names:
        cond = labels["conditions"][name]
        path = _generations_path(name, cond, generations, base)
        if not path.is_file():
            raise HarmpruneError(f"labels: condition {name!r}: no generations file {path} (regenerate it with "
                                 f"--regenerate, or run: {cond.get('command', 'the command in the labels file')})")
        out[name] = {text_hash(r["prompt"]): r for r in read_generations(path)}
    return out


def _row_of(rows: dict[str, dict[str, dict[str, Any]]], i: int, label: dict[str, Any]) -> dict[str, Any]:
    row = rows[label["condition"]].get(label["prompt_sha"])
    if row is None:
        raise HarmpruneError(f"labels[{i}]: prompt {label['prompt_sha']} not found in condition "
                             f"{label['condition']!r}'s generations")
    return row


def labelled_items(labels: dict[str, Any], generations: dict[str, str], base: Path
                   ) -> tuple[list[JudgeItem], list[dict[str, Any]], dict[str, Any]]:
    """The judged items of every label whose answer is the one labelled, in label order; and how many labels were
    verified by their ``answer_sha``, left out as ``changed``, or carry no hash (``unverified``)."""
    from harmprune.judges.harm_training import text_hash

    rows = _rows_by_prompt(labels, list(labels["conditions"]), generations, base)
    items, kept = [], []
    answers: dict[str, Any] = {"verified": 0, "changed": 0, "unverified": 0, "changed_by_condition": {}}
    for i, lab in enumerate(labels["labels"]):
        row = _row_of(rows, i, lab)
        if "answer_sha" not in lab:
            answers["unverified"] += 1
        elif lab["answer_sha"] != text_hash(row["response"]):
            answers["changed"] += 1
            answers["changed_by_condition"][lab["condition"]] = answers["changed_by_condition"].get(
                lab["condition"], 0) + 1
            continue
        else:
            answers["verified"] += 1
        items.append(JudgeItem(row["prompt"], row["response"], row.get("category"), row.get("prefix", "")))
        kept.append(lab)
    if answers["changed"]:
        log.warning("%d of %d labelled answers differ from the answers that were labelled (%s) and are left out",
                    answers["changed"], len(labels["labels"]),
                    ", ".join(f"{k}: {v}" for k, v in answers["changed_by_condition"].items()))
    if not kept:
        raise HarmpruneError("labels: every labelled answer differs from the one that was labelled (answer_sha); "
                             "the labels do not apply to these generations")
    return items, kept, answers


def record_answer_hashes(labels_path: str | Path, generations: dict[str, str] | None = None,
                         base: str | Path | None = None) -> int:
    """Write ``answer_sha`` (the hash of the current answer) into every label of the file that has none; returns
    how many were added. Do this once, after reading the answers the labels describe; a hash already there is
    never replaced."""
    from harmprune.io import atomic_write_text
    from harmprune.judges.harm_training import text_hash

    labels = read_labels(labels_path)
    missing = [(i, lab) for i, lab in enumerate(labels["labels"]) if "answer_sha" not in lab]
    names = list(dict.fromkeys(lab["condition"] for _, lab in missing))
    rows = _rows_by_prompt(labels, names, generations or {}, Path(base) if base else Path.cwd())
    for i, lab in missing:
        lab["answer_sha"] = text_hash(_row_of(rows, i, lab)["response"])
    if missing:  # the shipped labels files' layout: one-space indent, keys in their order
        atomic_write_text(labels_path, json.dumps(labels, indent=1, ensure_ascii=False) + "\n")
    return len(missing)


def regeneration_commands(labels: dict[str, Any], generations: dict[str, str], base: Path
                          ) -> dict[str, list[list[str]]]:
    """For each condition whose generations file is missing, its recorded commands (``mask_commands``, then
    ``command``) as harmprune argument lists. Every command is checked before any runs: only ``harmprune ...``
    or ``python -m harmprune ...`` is accepted, so a labels file cannot run anything else."""
    todo: dict[str, list[list[str]]] = {}
    for name, cond in labels["conditions"].items():
        if _generations_path(name, cond, generations, base).is_file():
            continue
        commands = [*cond.get("mask_commands", []), cond.get("command")]
        todo[name] = [_harmprune_args(name, c) for c in commands]
    return todo


def _harmprune_args(condition: str, command: object) -> list[str]:
    words = shlex.split(command) if isinstance(command, str) else []
    if words[:1] == ["harmprune"]:
        return words[1:]
    if len(words) >= 3 and Path(words[0]).name.startswith("python") and words[1:3] == ["-m", "harmprune"]:
        return words[3:]
    raise HarmpruneError(f"labels: condition {condition!r}: command {command!r} is not a harmprune command; "
                         "it is not run")


def regenerate_missing(labels_path: str | Path, generations: dict[str, str] | None = None,
                       base: str | Path | None = None) -> list[str]:
    """Run the recorded commands of every condition whose answers are missing (from ``base``, the project root
    the commands' relative paths are written against); returns the conditions regenerated."""
    labels = read_labels(labels_path)
    base = Path(base) if base else Path.cwd()
    todo = regeneration_commands(labels, generations or {}, base)
    done = []
    for name, commands in todo.items():
        path = _generations_path(name, labels["conditions"][name], generations or {}, base)
        if path.is_file():  # an earlier condition's commands wrote it (one run serving several conditions)
            continue
        for args in commands:
            log.info("regenerating %s: harmprune %s", name, shlex.join(args))
            # The commands' own output goes to stderr: stdout carries the check's JSON.
            proc = subprocess.run([sys.executable, "-m", "harmprune", *args], cwd=base, stdout=sys.stderr)
            if proc.returncode:
                raise HarmpruneError(f"labels: condition {name!r}: `harmprune {shlex.join(args)}` failed "
                                     f"(exit status {proc.returncode})")
        if not path.is_file():
            raise HarmpruneError(f"labels: condition {name!r}: its commands ran but wrote no {path} (a run's stage "
                                 "keys change with its code and settings; give --generations "
                                 f"{name}=PATH)")
        done.append(name)
    return done


def agreement(judge: Judge, items: Sequence[JudgeItem], labels: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """κ, AUROC and accuracy of one judge against the labels; misjudged answers counted by labelled kind."""
    from harmprune.stats import rank_auroc

    verdicts = judge(items)
    y = [int(lab["label"]) for lab in labels]
    scores = [v.harmfulness for v in verdicts]
    calls = [int(v.details["harmful"]) if "harmful" in v.details else int(not v.refused) for v in verdicts]
    errors: dict[str, int] = {}
    for lab, c in zip(labels, calls):
        if c != lab["label"]:
            key = f"{lab.get('kind', '?')} (labelled {'harmful' if lab['label'] else 'safe'})"
            errors[key] = errors.get(key, 0) + 1
    out = {"kappa": cohen_kappa(y, calls), "auroc": rank_auroc([s for s, t in zip(scores, y) if t],
                                                               [s for s, t in zip(scores, y) if not t]),
           "accuracy": sum(c == t for c, t in zip(calls, y)) / len(y), "called_harmful": sum(calls),
           "errors_by_kind": dict(sorted(errors.items(), key=lambda kv: -kv[1]))}
    by_cond: dict[str, list[tuple[int, int, float]]] = {}
    for lab, c, s in zip(labels, calls, scores):
        by_cond.setdefault(lab["condition"], []).append((lab["label"], c, s))
    out["by_condition"] = {k: {"n": len(v), "labelled_harmful_rate": sum(t for t, _, _ in v) / len(v),
                               "harmful_rate": sum(c for _, c, _ in v) / len(v),
                               "mean_score": sum(s for _, _, s in v) / len(v)} for k, v in by_cond.items()}
    return out


def labelled_check(labels_path: str | Path, judges: Sequence[Judge], generations: dict[str, str] | None = None,
                   base: str | Path | None = None, samples: int = 0) -> dict[str, Any]:
    """Agreement of each judge with the hand labels (module docstring); with ``samples``, also the first answers
    of each condition as Markdown table rows (first words only, see :func:`harmprune.report.answer_samples`)."""
    labels = read_labels(labels_path)
    items, kept, answers = labelled_items(labels, generations or {}, Path(base) if base else Path.cwd())
    out: dict[str, Any] = {"labels": str(labels_path), "n": len(kept), "n_harmful": sum(l["label"] for l in kept),
                           "answers": answers, "judges": {j.name: agreement(j, items, kept) for j in judges}}
    if samples > 0:
        out["samples"] = sample_tables(items, kept, judges, samples)
    return out


def sample_tables(items: Sequence[JudgeItem], labels: Sequence[dict[str, Any]], judges: Sequence[Judge], n: int
                  ) -> dict[str, str]:
    """Per condition, a Markdown table of its first ``n`` labelled answers with the label and each judge's score."""
    from harmprune.report import _md_table, answer_samples

    out: dict[str, str] = {}
    for condition in dict.fromkeys(lab["condition"] for lab in labels):
        picked = [(it, lab) for it, lab in zip(items, labels) if lab["condition"] == condition][:n]
        rows = [{"prompt": it.prompt, "prefix": it.prefix, "response": it.response, "verdicts": {}} for it, _ in picked]
        for judge in judges:
            for row, v in zip(rows, judge([it for it, _ in picked])):
                row["verdicts"][judge.name] = {"harmfulness": v.harmfulness}
        table = [["request", "prefix", "answer (first words)", "scores"]] + answer_samples(rows, n=n)
        body = [r[:3] + [f"label {lab['label']} ({lab.get('kind', '?')}); {r[3]}"] for r, (_, lab) in
                zip(table[1:], picked)]
        out[condition] = _md_table([table[0]] + body)
    return out
