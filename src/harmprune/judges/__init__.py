"""Judges: one interface that scores a response's harmfulness in [0, 1] and flags refusals.

A judge is a class registered under a name with :func:`register_judge`; :func:`get_judge` builds one by name.
Adding a judge is adding one module to this package whose class carries ``@register_judge("name")``; judges of
other distributions are entry points in the group ``harmprune.judges`` (see :mod:`harmprune.registry`). The
options a config or the CLI can give a judge are its constructor's typed parameters (:func:`judge_options`); a
judge class names those that are paths in ``option_refs``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from harmprune.registry import Registry


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


JUDGES: Registry[type[Judge]] = Registry("judge", "harmprune.judges", "register_judge", [__name__])


def register_judge(name: str) -> Callable[[type[Judge]], type[Judge]]:
    def deco(cls: type[Judge]) -> type[Judge]:
        cls.name = name
        JUDGES.add(name, cls, source=cls)
        return cls

    return deco


def available_judges() -> list[str]:
    return JUDGES.names()


def get_judge(name: str, **kwargs: Any) -> Judge:
    return JUDGES.get(name)(**kwargs)


def judge_options(name: str) -> type:
    """The spec (:mod:`harmprune.specs`) of the options a config or the CLI can give judge ``name``."""
    return _options_of(JUDGES.get(name))


@functools.cache
def _options_of(cls: type[Judge]) -> type:
    from harmprune.specs import spec_of_signature

    return spec_of_signature(cls, f"{cls.__name__}Options", cls.option_refs)
