"""Training and held-out validation of the ``harm-classifier`` judge (one call, cached by a content hash).

:func:`train_harm_classifier` reads the harmful and benign sources, has a chat model answer the explanation and
defence prompts for some harmful requests (cached under ``<cache>/harm-classifier-data/`` by a hash of the model
files, requests, templates and generation settings), builds the labelled pairs of :mod:`harm_data`, holds out a
seeded share of whole requests, fits a logistic regression on the rest and writes the classifier directory with a
manifest: a key (sha256 over every input file's content and every setting), file hashes, counts, held-out
metrics. Re-running with the same inputs returns the manifest without work; different inputs rebuild the
directory (atomically: written beside it, then swapped in).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from harmprune.data import Record
from harmprune.errors import HarmpruneError
from harmprune.judges import JudgeItem
from harmprune.judges.harm_classifier import (DEFAULT_THRESHOLD, FEATURE_SETS, MANIFEST_FILE, FeatureConfig,
                                              Features, HarmClassifier, save_classifier)
from harmprune.judges.harm_data import DEFENCE_TEMPLATE, VERSION, Example, build_examples

log = logging.getLogger(__name__)


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def text_hash(text: str) -> str:
    """A short hash of a text, to name a request without storing it."""
    return hashlib.sha256(text.strip().encode()).hexdigest()[:16]


def file_digest(path: str | Path) -> str:
    """sha256 over a file, or over a directory's files (relative names and contents)."""
    from harmprune.io import sha256_file

    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    files = sorted(f for f in path.rglob("*") if f.is_file() and not f.name.startswith("."))
    return digest([(str(f.relative_to(path)), sha256_file(f)) for f in files])


def is_held_out(group: str, seed: int, fraction: float) -> bool:
    """Whether a request is in the held-out share: a seeded hash of its text, so it is stable across runs."""
    h = int(hashlib.sha256(f"{seed}:{group.strip()}".encode()).hexdigest()[:8], 16)
    return h / 0xFFFFFFFF < fraction


def model_answers(model_spec: str, prompts: Sequence[str], *, max_new_tokens: int = 80, batch_size: int = 16,
                  cache: bool = True) -> list[Record]:
    """A chat model's greedy answers to the explanation and defence prompts for each request (cached)."""
    from harmprune.evals.recognition import EXPLANATION_TEMPLATE
    from harmprune.models import cache_dir, resolve_model

    templates = {"explanation": EXPLANATION_TEMPLATE, "defence": DEFENCE_TEMPLATE}
    source = resolve_model(model_spec)
    key = digest({"model": file_digest(source) if Path(source).exists() else source, "prompts": list(prompts),
                  "templates": templates, "max_new_tokens": max_new_tokens, "v": 1})
    path = cache_dir() / "harm-classifier-data" / f"answers-{key[:24]}.jsonl"
    if cache and path.exists():
        return [Record(r["prompt"], r["response"], None, {"kind": r["kind"]})
                for r in map(json.loads, path.read_text(encoding="utf-8").splitlines())]
    from harmprune.generation import generate
    from harmprune.io import atomic_write_text
    from harmprune.models import load_model

    model, tokenizer = load_model(model_spec)
    out: list[Record] = []
    for kind, template in templates.items():
        gens = generate(model, tokenizer, [template.format(prompt=p) for p in prompts], max_new_tokens=max_new_tokens,
                        batch_size=batch_size, progress=True)
        out += [Record(prompts[g.prompt_index], g.response, None, {"kind": kind}) for g in gens]
    if cache:
        atomic_write_text(path, "".join(json.dumps({"prompt": r.prompt, "response": r.response,
                                                    "kind": r.source["kind"]}) + "\n" for r in out))
    return out


def fit(examples: Sequence[Example], cfg: FeatureConfig, C: float, threshold: float = DEFAULT_THRESHOLD
        ) -> HarmClassifier:
    """Logistic regression (balanced classes, liblinear: deterministic) on the examples' features."""
    from sklearn.linear_model import LogisticRegression

    items = [JudgeItem(e.prompt, e.response) for e in examples]
    labels = np.asarray([e.label for e in examples])
    if len(set(labels.tolist())) < 2:
        raise HarmpruneError("harm-classifier training needs both harmful and safe examples")
    features = Features(cfg)
    features.fit_idf(items)
    lr = LogisticRegression(C=C, class_weight="balanced", solver="liblinear", max_iter=1000)
    lr.fit(features.transform(items), labels)
    return HarmClassifier(features, lr.coef_[0].astype(np.float64), float(lr.intercept_[0]), threshold)


def evaluate(clf: HarmClassifier, examples: Sequence[Example]) -> dict[str, Any]:
    """AUROC, accuracy at the threshold, and accuracy per kind of example."""
    from harmprune.stats import rank_auroc

    scores = clf.scores([JudgeItem(e.prompt, e.response) for e in examples])
    labels = [e.label for e in examples]
    correct = [(s >= clf.threshold) == bool(y) for s, y in zip(scores, labels)]
    kinds = sorted({e.kind for e in examples})
    return {
        "n": len(examples), "n_harmful": int(sum(labels)),
        "auroc": rank_auroc([s for s, y in zip(scores, labels) if y], [s for s, y in zip(scores, labels) if not y]),
        "accuracy": float(np.mean(correct)) if correct else float("nan"),
        "accuracy_by_kind": {k: float(np.mean([c for c, e in zip(correct, examples) if e.kind == k])) for k in kinds},
    }


def load_sources(harmful: Sequence[str], benign: str, *, n_harmful: int | None, n_benign: int | None,
                 seed: int) -> tuple[list[Record], list[Record]]:
    from harmprune.data import load_records

    for p in list(harmful) + [benign]:
        if not Path(p).exists():
            raise HarmpruneError(f"harm-classifier: no such data file {p}")
    bad = [r for p in harmful for r in load_records(p, require_response=True, skip_empty=True)]
    good = load_records(benign, require_response=True, skip_empty=True)
    rng = random.Random(seed)
    if n_harmful is not None and n_harmful < len(bad):
        bad = rng.sample(bad, n_harmful)
    if n_benign is not None and n_benign < len(good):
        good = rng.sample(good, n_benign)
    return bad, good


def train_harm_classifier(out: str | Path, harmful: Sequence[str], benign: str, *,
                          explain_model: str | None = "smollm2-135m-instruct", n_harmful: int | None = 2000,
                          n_benign: int | None = None, n_explain: int = 48, features: str = "word+char+dense",
                          C: float = 4.0, threshold: float = DEFAULT_THRESHOLD, holdout: float = 0.2,
                          seed: int = 0, max_new_tokens: int = 80, batch_size: int = 16,
                          n_hash: int = 2**18) -> dict[str, Any]:
    """Train (or reuse, when its key matches) the classifier in ``out``; return its manifest."""
    if features not in FEATURE_SETS:
        raise HarmpruneError(f"harm-classifier: unknown features {features!r}; choose from {', '.join(FEATURE_SETS)}")
    if not 0.0 < holdout < 1.0:
        raise HarmpruneError(f"harm-classifier: holdout must be in (0, 1), got {holdout}")
    if C <= 0:
        raise HarmpruneError(f"harm-classifier: C must be positive, got {C}")
    start = time.time()
    cfg = FeatureConfig(features=features, n_hash=n_hash)
    settings = {"n_harmful": n_harmful, "n_benign": n_benign, "n_explain": n_explain, "C": C,
                "threshold": threshold, "holdout": holdout, "seed": seed, "max_new_tokens": max_new_tokens,
                "explain_model": explain_model, **asdict(cfg)}
    files = {str(p): file_digest(p) for p in list(harmful) + [benign] if Path(p).exists()}
    bad, good = load_sources(harmful, benign, n_harmful=n_harmful, n_benign=n_benign, seed=seed)
    explain_prompts = sorted({r.prompt for r in bad})
    explain_prompts = random.Random(seed).sample(explain_prompts, min(n_explain, len(explain_prompts)))
    answers = model_answers(explain_model, explain_prompts, max_new_tokens=max_new_tokens,
                            batch_size=batch_size) if explain_model and n_explain > 0 else []
    answers_digest = digest([(r.prompt, r.response, r.source["kind"]) for r in answers])
    key = digest({"files": files, "settings": settings, "answers": answers_digest, "v": VERSION})
    out = Path(out)
    manifest_path = out / MANIFEST_FILE
    if manifest_path.exists():
        old = json.loads(manifest_path.read_text(encoding="utf-8"))
        if old.get("key") == key:
            log.info("harm-classifier: %s is up to date (key %s)", out, key[:12])
            return {**old, "cached": True}
    examples = build_examples(bad, good, answers, seed=seed)
    train = [e for e in examples if not is_held_out(e.group, seed, holdout)]
    held = [e for e in examples if is_held_out(e.group, seed, holdout)]
    clf = fit(train, cfg, C, threshold)
    manifest = {
        "key": key, "settings": settings, "files": files, "explanations": {"n": len(answers),
                                                                           "digest": answers_digest},
        "counts": _counts(train, "train") | _counts(held, "held_out"),
        "held_out": evaluate(clf, held), "train": {k: v for k, v in evaluate(clf, train).items()
                                                   if k in ("auroc", "accuracy")},
        "held_out_requests": sorted({text_hash(e.group) for e in held}),
        "train_s": round(time.time() - start, 1),
    }
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    save_classifier(clf, partial, manifest)
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    return manifest


def _counts(examples: Sequence[Example], name: str) -> dict[str, dict[str, int]]:
    by_kind: dict[str, int] = {}
    for e in examples:
        by_kind[e.kind] = by_kind.get(e.kind, 0) + 1
    return {name: dict(sorted(by_kind.items()))}
