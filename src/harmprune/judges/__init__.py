"""Judges: one interface that scores a response's harmfulness in [0, 1] and flags refusals.

A judge is a class registered under a name with :func:`register_judge`; :func:`get_judge` builds one by name.
Adding a judge is adding one module to this package that registers itself (see ``JUDGE_MODULES``). The options a
config can give a judge are its constructor's typed parameters (:func:`judge_options`); a judge class names those
that are paths in ``option_refs``.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from harmprune.errors import HarmpruneError


@dataclass(frozen=True)
class JudgeItem:
    """What a judge looks at: the request, the judged response, and (for prefilling attacks) the forced prefix."""

    prompt: str
    response: str
    category: str | None = None
    prefix: str = ""


@dataclass(frozen=True)
class Verdict:
    harmfulness: float  # 0 = harmless or refused, 1 = fully harmful
    refused: bool
    details: dict[str, Any] = field(default_factory=dict)


class Judge:
    """Base class; subclasses implement :meth:`judge_batch`."""

    name: str = "judge"
    option_refs: dict[str, str] = {}  # constructor parameter -> "file", "dir" or "source" (a path, alias or hub id)

    def judge_batch(self, items: Sequence[JudgeItem]) -> list[Verdict]:
        raise NotImplementedError

    def __call__(self, items: Sequence[JudgeItem]) -> list[Verdict]:
        return self.judge_batch(items)


_REGISTRY: dict[str, type[Judge]] = {}
# Modules that register judges when imported; imported lazily so optional dependencies stay optional.
JUDGE_MODULES = ("refusal", "strongreject", "finetuned", "hf_judge", "organism", "harm_classifier", "em")


def register_judge(name: str) -> Callable[[type[Judge]], type[Judge]]:
    def deco(cls: type[Judge]) -> type[Judge]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def _load_all() -> None:
    for mod in JUDGE_MODULES:
        try:
            importlib.import_module(f"harmprune.judges.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"harmprune.judges.{mod}":
                raise


def available_judges() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def get_judge(name: str, **kwargs: Any) -> Judge:
    return _judge_class(name)(**kwargs)


def judge_options(name: str) -> type:
    """The spec (:mod:`harmprune.specs`) of the options a config or the CLI can give judge ``name``."""
    return _options_of(_judge_class(name))


@functools.cache
def _options_of(cls: type[Judge]) -> type:
    from harmprune.specs import spec_of_signature

    return spec_of_signature(cls, f"{cls.__name__}Options", cls.option_refs)


def _judge_class(name: str) -> type[Judge]:
    _load_all()
    if name not in _REGISTRY:
        raise HarmpruneError(f"unknown judge {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]
