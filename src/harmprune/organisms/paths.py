"""Where a built organism lives: its layout on disk, shared by the builder and the evaluation of organisms."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harmprune.errors import ConfigError

SPLITS = ("harmful_train", "harmful_test", "benign_train", "benign_test", "refusal_train")


@dataclass(frozen=True)
class OrganismPaths:
    """Where a built organism lives: two Hugging Face model directories and the data splits."""

    root: Path
    aligned: Path = field(init=False)
    unaligned: Path = field(init=False)
    data: Path = field(init=False)

    def __post_init__(self) -> None:
        for name in ("aligned", "unaligned", "data"):
            object.__setattr__(self, name, self.root / name)

    def split(self, name: str) -> Path:
        if name not in SPLITS:
            raise ConfigError(f"unknown organism split {name!r}; expected one of {', '.join(SPLITS)}")
        return self.data / f"{name}.jsonl"

    def info(self) -> dict[str, Any]:
        return json.loads((self.root / "organism.json").read_text())
