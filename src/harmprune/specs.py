"""Typed parameter specs: what an experiment, an evaluation kind or a judge accepts, checked before any work.

A spec is a dataclass whose fields are the parameters, with their types and defaults; :func:`param` adds what a
type cannot say: allowed values (``choices``), bounds, and which fields name something else of the config
(``ref``: a data set, model, evaluation or judge, or a file or directory on disk). :func:`parse` turns a TOML
table into the dataclass, refusing unknown keys, wrong types (a TOML ``true`` is not a number), values out of
range and dangling references, each error one line naming the config file and the full key. Because references
are declared, cache keys can be built from them (:func:`references`) instead of guessed from key names.

    @dataclass(frozen=True)
    class ControlsParams:
        models: list[str] = param([], ref="model")
        seeds: list[int] = param([0, 1, 2])
        kinds: list[str] = param(["random"], choices=CONTROLS.names())
        harm_evaluation: str = param("harm", ref="evaluation")
        harm_metric: str = param("harmfulness", metric_of="harm_evaluation")
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import inspect
import types
import typing
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Literal, Mapping, TypeVar, Union

from harmprune.errors import ConfigError

T = TypeVar("T")
# What a reference names: a table of the config (data, model, evaluation), a registered judge, or a local path
# ("file" and "dir" must exist; "source" is a local path if one exists, else an alias or hub id).
Ref = Literal["data", "model", "evaluation", "judge", "file", "dir", "source"]
NAMED_REFS = ("data", "model", "evaluation", "judge")


class Invalid(Exception):
    """Raised by a spec's ``check()`` for a rule across fields: ``key`` is the field the message is about."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


def param(default: Any = MISSING, *, ref: Ref | None = None, choices: Collection[Any] | None = None,
          at_least: float | None = None, at_most: float | None = None, scored: bool = False,
          metric_of: str | None = None) -> Any:
    """A spec field. ``ref``: what the value names; ``scored``: a data reference that may name a self-generated
    set (those have answers only per model, so they can only be scored); ``metric_of``: the field naming the
    evaluation whose output the value is a metric of; ``choices``, ``at_least``, ``at_most``: allowed values
    (of each element, for a list)."""
    metadata = {"ref": ref, "choices": tuple(choices) if choices is not None else None, "at_least": at_least,
                "at_most": at_most, "scored": scored, "metric_of": metric_of}
    if default is MISSING:
        return field(metadata=metadata)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def options(of: str, prefix: str) -> Any:
    """A group of ``prefix``-ed keys (``judge_model``) that are the options of what field ``of`` names (the
    judge): checked against that thing's own spec, kept without the prefix."""
    return field(default_factory=dict, metadata={"options_of": of, "prefix": prefix})


def options_by_name(of: str) -> Any:
    """A table of option tables, one per name listed in field ``of`` (``extra_judge_options =
    {harm-classifier = {model = "DIR"}}`` for ``extra_judges``): each checked against that thing's own spec."""
    return field(default_factory=dict, metadata={"options_by_name_of": of})


@dataclass
class Context:
    """What a spec's references are checked against."""

    where: str  # the config file, first in every message
    base: Path = Path(".")  # relative paths are looked up here first, then in the current directory
    names: Mapping[str, Collection[str]] = field(default_factory=dict)  # ref kind -> defined names
    self_generated: Collection[str] = ()  # data sets that only have answers per model
    options_spec: Callable[[str, str], type | None] = lambda kind, name: None  # e.g. ("judge", "em") -> spec
    metrics: Callable[[str], Collection[str] | None] = lambda evaluation: None  # None: not knowable up front

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.where}: {key}{message}")


def parse(spec: type[T], table: Mapping[str, Any], prefix: str, ctx: Context) -> T:
    """``table`` as an instance of ``spec``; ``prefix`` is the table's key path (``experiments.controls.``)."""
    return parse_table(spec, table, prefix, ctx)[0]


def parse_table(spec: type[T], table: Mapping[str, Any], prefix: str, ctx: Context) -> tuple[T, dict[str, Any]]:
    """:func:`parse`, and the table as given with every path field resolved (what a cache key hashes)."""
    if not isinstance(table, Mapping):
        raise ctx.error(prefix.rstrip("."), " must be a table")
    fields = {f.name: f for f in dataclasses.fields(spec)}
    hints = typing.get_type_hints(spec)
    groups = {f.metadata["prefix"]: f for f in fields.values() if "options_of" in f.metadata}
    values: dict[str, Any] = {}
    resolved = dict(table)
    grouped: dict[str, dict[str, Any]] = {g.name: {} for g in groups.values()}
    for key, value in table.items():
        group = next((g for p, g in groups.items() if key.startswith(p) and key not in fields), None)
        if group is not None:
            grouped[group.name][key.removeprefix(group.metadata["prefix"])] = value
            continue
        if key not in fields or "options_of" in fields[key].metadata:
            raise ctx.error(prefix + key, _unknown(key, [k for k in fields if "options_of" not in fields[k].metadata]
                                                   + [p + "*" for p in groups]))
        if "options_by_name_of" in fields[key].metadata:
            continue  # checked below, once the names it is keyed by are known
        values[key], resolved[key] = _field_value(fields[key], hints[key], value, prefix + key, ctx)
    for f in fields.values():
        if f.name not in values and "options_of" not in f.metadata and _required(f):
            raise ctx.error(prefix + f.name, " is missing")
    for g in groups.values():
        values[g.name] = _parse_group(g, grouped[g.name], values, fields, prefix, ctx, resolved)
    for f in fields.values():
        if "options_by_name_of" in f.metadata and f.name in table:
            values[f.name], resolved[f.name] = _parse_by_name(f, table[f.name], values, fields, prefix, ctx)
    instance = spec(**values)
    for f in fields.values():  # defaults too: a default evaluation the config lacks fails here, not mid-run
        if f.metadata.get("ref") in NAMED_REFS:
            for v in _as_list(getattr(instance, f.name)):
                _check_name(f.metadata["ref"], v, prefix + f.name, ctx, f.metadata.get("scored", False))
    for f in fields.values():
        _check_metric(instance, f, prefix, ctx)
    check = getattr(instance, "check", None)
    if check is not None:
        try:
            check()
        except Invalid as e:
            raise ctx.error(prefix + e.key, f": {e}") from None
    return instance, resolved


def references(instance: Any, kind: Ref) -> dict[str, str]:
    """The names (or paths) ``instance`` refers to of ``kind``, keyed ``field[i]``: what a cache key hashes."""
    out = {}
    for f in dataclasses.fields(instance):
        if f.metadata.get("ref") == kind:
            for i, v in enumerate(_as_list(getattr(instance, f.name))):
                out[f"{f.name}[{i}]"] = v
    return out


def spec_of_signature(fn: Callable[..., Any], name: str, refs: Mapping[str, Ref] | None = None) -> type:
    """A spec of the parameters of ``fn`` (a class: its constructor) that a config can give: those annotated with
    a type :func:`parse` checks; others (a model object, a tokenizer) are for Python callers only."""
    target = fn.__init__ if inspect.isclass(fn) else fn
    hints = typing.get_type_hints(target)
    fields = []
    for p in inspect.signature(target).parameters.values():
        if p.name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name not in hints:
            continue
        if not _checkable(hints[p.name]):
            continue
        default = MISSING if p.default is inspect.Parameter.empty else p.default
        fields.append((p.name, hints[p.name], param(default, ref=(refs or {}).get(p.name))))
    return dataclasses.make_dataclass(name, fields, frozen=True)


# ---------------------------------------------------------------------------------------------- fields


def _field_value(f: dataclasses.Field, tp: Any, value: Any, key: str, ctx: Context) -> tuple[Any, Any]:
    """(the checked value, the value a cache key sees): paths resolved, references checked."""
    checked = _typed(value, tp, key, ctx)
    md = f.metadata
    for v in _as_list(checked):
        if md.get("choices") and v not in md["choices"]:
            raise ctx.error(key, f" {v!r} is not one of {', '.join(map(repr, md['choices']))}"
                            + _did_you_mean(v, md["choices"]))
        if md.get("at_least") is not None and v < md["at_least"]:
            raise ctx.error(key, f" {v!r} must be at least {md['at_least']}")
        if md.get("at_most") is not None and v > md["at_most"]:
            raise ctx.error(key, f" {v!r} must be at most {md['at_most']}")
    ref = md.get("ref")
    if ref in ("file", "dir", "source"):
        paths = [_local(v, ctx.base) for v in _as_list(checked)]
        for given, p in zip(_as_list(checked), paths):
            if ref != "source" and not Path(p).exists():
                raise ctx.error(key, f": no such path {given!r}")
        out = paths if isinstance(checked, list) else paths[0] if paths else checked
        return out, out
    return checked, value


def _check_name(ref: str, value: str, key: str, ctx: Context, scored: bool) -> None:
    known = ctx.names.get(ref, ())
    if value not in known:
        label = {"data": "data set"}.get(ref, ref)
        raise ctx.error(key, f" names unknown {label} {value!r}" + _did_you_mean(value, known)
                        + (f" (known: {', '.join(sorted(known))})" if ref == "judge" else ""))
    if ref == "data" and value in ctx.self_generated and not scored:
        raise ctx.error(key, f": self-generated data set {value!r} can only be scored, not read as records here")


def _parse_group(g: dataclasses.Field, given: dict[str, Any], values: dict[str, Any],
                 fields: Mapping[str, dataclasses.Field], prefix: str, ctx: Context,
                 resolved: dict[str, Any]) -> dict[str, Any]:
    """The options of the thing field ``of`` names, checked against its spec and returned without the prefix."""
    of, pre = g.metadata["options_of"], g.metadata["prefix"]
    owner = values.get(of, fields[of].default)
    if not given:
        return {}
    if owner is None or owner is MISSING:
        raise ctx.error(prefix + pre + next(iter(given)), f": options of a {of} need '{prefix}{of}'")
    ref = fields[of].metadata.get("ref") or of
    spec = ctx.options_spec(ref, owner)
    if spec is None:
        return dict(given)
    _check_option_keys(spec, given, f"{of} {owner!r}", prefix + pre, pre, ctx)
    instance, sub_resolved = parse_table(spec, given, prefix + pre, ctx)
    for k in given:
        resolved[pre + k] = sub_resolved[k]
    return {k: getattr(instance, k) for k in given}


def _parse_by_name(f: dataclasses.Field, given: Any, values: dict[str, Any], fields: Mapping[str, dataclasses.Field],
                   prefix: str, ctx: Context) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """(checked options, options as a cache key sees them) per name of an :func:`options_by_name` field."""
    of = f.metadata["options_by_name_of"]
    key = prefix + f.name
    if not isinstance(given, Mapping):
        raise ctx.error(key, f" must be a table of option tables, one per name in '{prefix}{of}'")
    names = _as_list(values[of] if of in values else _default(fields[of]))
    ref = fields[of].metadata.get("ref") or of
    checked: dict[str, dict[str, Any]] = {}
    resolved: dict[str, dict[str, Any]] = {}
    for name, table in given.items():
        where = f"{key}.{name}"
        if name not in names:
            raise ctx.error(where, f": {name!r} is not in '{prefix}{of}' ({', '.join(map(repr, names)) or 'empty'})")
        if not isinstance(table, Mapping):
            raise ctx.error(where, " must be a table of options")
        spec = ctx.options_spec(ref, name)
        if spec is None:
            checked[name] = resolved[name] = dict(table)
            continue
        _check_option_keys(spec, table, f"{ref} {name!r}", where + ".", "", ctx)
        instance, sub_resolved = parse_table(spec, table, where + ".", ctx)
        checked[name] = {k: getattr(instance, k) for k in table}
        resolved[name] = {k: sub_resolved[k] for k in table}
    return checked, resolved


def _check_option_keys(spec: type, given: Mapping[str, Any], owner: str, key_prefix: str, shown_prefix: str,
                       ctx: Context) -> None:
    """Every key of ``given`` is an option of ``spec``, or one line naming the key, its owner and the options."""
    allowed = [f.name for f in dataclasses.fields(spec)]
    for k in given:
        if k not in allowed:
            raise ctx.error(key_prefix + k, f": {owner} takes no option {k!r}" + _did_you_mean(k, allowed)
                            + f" (its options: {', '.join(shown_prefix + a for a in allowed)})")


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not MISSING else f.default  # type: ignore[misc]


def _check_metric(instance: Any, f: dataclasses.Field, prefix: str, ctx: Context) -> None:
    source = f.metadata.get("metric_of")
    metric = getattr(instance, f.name)
    if not source or metric is None or "/" in metric:  # per category, task or judge: data-dependent
        return
    for evaluation in _as_list(getattr(instance, source)):
        known = ctx.metrics(evaluation)
        if known is not None and metric not in known:
            raise ctx.error(prefix + f.name, f" {metric!r} is not a metric of evaluation {evaluation!r}"
                            + _did_you_mean(metric, known) + f" (it gives: {', '.join(sorted(known))})")


def _required(f: dataclasses.Field) -> bool:
    return f.default is MISSING and f.default_factory is MISSING


# ---------------------------------------------------------------------------------------------- types


def _typed(value: Any, tp: Any, key: str, ctx: Context) -> Any:
    ok, out = _convert(value, tp)
    if not ok:
        raise ctx.error(key, f" {value!r} must be {_describe(tp)}")
    return out


def _convert(value: Any, tp: Any) -> tuple[bool, Any]:
    """(whether ``value`` is of type ``tp``, the value as that type): bools are not numbers, ints are floats."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True, value
    if origin in (Union, types.UnionType):
        for arm in args:
            ok, out = _convert(value, arm)
            if ok:
                return True, out
        return False, None
    if origin is Literal:
        return value in args, value
    if origin in (list, tuple, Collection, typing.Sequence) or tp in (list, tuple):
        if not isinstance(value, list):
            return False, None
        arm = args[0] if args else Any
        pairs = [_convert(v, arm) for v in value]
        return all(ok for ok, _ in pairs), [v for _, v in pairs]
    if origin in (dict, Mapping) or tp in (dict,):
        if not isinstance(value, dict):
            return False, None
        arm = args[1] if len(args) == 2 else Any
        pairs = {k: _convert(v, arm) for k, v in value.items()}
        return all(ok for ok, _ in pairs.values()), {k: v for k, (_, v) in pairs.items()}
    if tp is type(None):
        return value is None, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool), float(value) \
            if isinstance(value, (int, float)) else None
    if tp in (str, Path):
        return isinstance(value, str), value
    return False, None


def _checkable(tp: Any) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType, list, tuple, dict, Mapping, Collection, typing.Sequence):
        return all(_checkable(a) for a in args if a is not Ellipsis)
    return origin is Literal or tp in (bool, int, float, str, Path, type(None), Any)


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args if a is not type(None))
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin in (list, tuple, Collection, typing.Sequence):
        return f"a list of {_plural(args[0]) if args else 'values'}"
    if origin in (dict, Mapping):
        return "a table"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            Path: "a path (string)"}.get(tp, str(tp))


def _plural(tp: Any) -> str:
    return {bool: "true/false values", int: "integers", float: "numbers", str: "strings"}.get(tp, _describe(tp))


# ---------------------------------------------------------------------------------------------- helpers


def _unknown(key: str, allowed: list[str]) -> str:
    return f": unknown key{_did_you_mean(key, allowed)} (expected one of: {', '.join(sorted(allowed))})"


def _did_you_mean(value: Any, known: Collection[Any]) -> str:
    if not isinstance(value, str):
        return ""
    close = difflib.get_close_matches(value, [k for k in known if isinstance(k, str)], n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _local(value: str, base: Path) -> str:
    candidate = base / value
    return str(candidate.resolve()) if candidate.exists() else value


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
