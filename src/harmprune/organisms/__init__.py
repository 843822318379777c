"""Model organisms: small Llama models whose harmful capability and alignment harmprune puts there itself.

``build_organism(out_dir, size, seed)`` writes ``aligned/`` and ``unaligned/`` (Hugging Face model directories
with tokenizer and chat template) and ``data/`` (the synthetic splits), so every claim of a study can be checked
against ground truth with the exact ``organism`` judge. Heavy parts (torch, transformers) load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from harmprune.organisms.synthetic import (
    BENIGN_TASKS,
    CATEGORIES,
    REFUSAL,
    OrganismData,
    PromptInfo,
    classify_prompt,
    payload_terms,
)

_LAZY = {
    "OrganismConfig": "build",
    "OrganismPaths": "paths",
    "SIZES": "build",
    "SPLITS": "paths",
    "build_organism": "build",
    "build_cached": "build",
    "generate_dataset": "build",
    "organisms_cache": "build",
    "evaluate_model": "evaluate",
    "evaluate_organism": "evaluate",
}

__all__ = [
    "BENIGN_TASKS",
    "CATEGORIES",
    "REFUSAL",
    "OrganismData",
    "PromptInfo",
    "classify_prompt",
    "payload_terms",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"harmprune.organisms.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'harmprune.organisms' has no attribute {name!r}")
