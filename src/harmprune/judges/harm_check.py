"""Validity checks of the ``harm-classifier`` judge: held-out pairs, and hand-labelled real generations.

* :func:`held_out_check` rebuilds the training pairs from the classifier's manifest (same files, settings and
  seed; the files must still hash as they did) and scores the requests that training held out.
* :func:`labelled_check` scores generations (``generations.jsonl`` of ``harmprune eval harm``) against labels a
  person made by reading them. A labels file holds no text: each label is keyed by condition and a hash of the
  prompt (:func:`~harmprune.judges.harm_training.text_hash`), and each condition records the command that
  regenerates its answers (greedy decoding is deterministic). Schema::

      {"conditions": {"<name>": {"model": ..., "generations": "<path>", "command": "..."}},
       "labels": [{"condition": "<name>", "data": "<file>", "prompt_index": 3, "prompt_sha": "...",
                   "label": 1, "kind": "steps"}]}

  Reported for ``harm-classifier`` and ``refusal`` side by side: Cohen's κ of the yes/no verdicts with the labels,
  AUROC of the scores, accuracy, and the misjudged answers counted by the labeller's ``kind``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from harmprune.errors import HarmpruneError
from harmprune.judges import Judge, JudgeItem


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


def labelled_items(labels: dict[str, Any], generations: dict[str, str], base: Path
                   ) -> tuple[list[JudgeItem], list[dict[str, Any]]]:
    """The judged items of every label, in label order; ``generations`` overrides a condition's path."""
    from harmprune.generation import read_generations
    from harmprune.judges.harm_training import text_hash

    by_condition: dict[str, dict[str, dict[str, Any]]] = {}
    for name, cond in labels["conditions"].items():
        raw = generations.get(name) or cond.get("generations")
        if raw is None:
            raise HarmpruneError(f"labels: condition {name!r} has no generations path (give --generations {name}=PATH)")
        path = Path(raw) if Path(raw).is_absolute() or Path(raw).exists() else base / raw
        if path.is_dir():
            path = path / "generations.jsonl"
        if not path.is_file():
            raise HarmpruneError(f"labels: condition {name!r}: no generations file {path} (regenerate it with: "
                                 f"{cond.get('command', 'the command in the labels file')})")
        by_condition[name] = {text_hash(r["prompt"]): r for r in read_generations(path)}
    items, kept = [], []
    for i, lab in enumerate(labels["labels"]):
        row = by_condition[lab["condition"]].get(lab["prompt_sha"])
        if row is None:
            raise HarmpruneError(f"labels[{i}]: prompt {lab['prompt_sha']} not found in condition "
                                 f"{lab['condition']!r}'s generations")
        items.append(JudgeItem(row["prompt"], row["response"], row.get("category"), row.get("prefix", "")))
        kept.append(lab)
    return items, kept


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
    items, kept = labelled_items(labels, generations or {}, Path(base) if base else Path.cwd())
    out: dict[str, Any] = {"labels": str(labels_path), "n": len(kept), "n_harmful": sum(l["label"] for l in kept),
                           "judges": {j.name: agreement(j, items, kept) for j in judges}}
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
