"""Experiment configuration: a TOML file, validated completely before any work starts.

Every error names the offending key (``data.harmful.path``) and, for files, the path. Relative paths are
resolved against the config file's directory first, then the current directory. Evaluations and experiments are
checked against their kinds' typed specs (:mod:`harmprune.specs`): every value's type and range, every name they
refer to, and each judge option against the judge chosen.

    name = "demo"
    seed = 0
    dtype = "float32"

    [models.aligned]          # any number of models
    path = "smollm2-135m-instruct"
    format = "chat"

    [data.harmful]            # any number of data sets, with field mappings
    path = "harmful.jsonl"
    n_examples = 64

    [data.own]                # each model's own answers to another set's prompts (harmprune.calibration)
    self_generated = true
    from = "harmful"          # whose prompts (and, with prefill_tokens, reference answers)
    prefill_tokens = 10       # or prefix = "Sure, here is"
    refusal_judge = "refusal" # answers it marks as refusals are dropped ("none": keep all)

    [scoring]                 # how scores are computed (once per model × data × method × format)
    harm = "harmful"          # a data set name
    utility = "benign"
    harm_method = "signed-snip"     # the defaults: the study's B-TAP pair (see SCORING_DEFAULTS)
    utility_method = "snip"
    harm_format = "pretrained"      # or "chat", "raw", "model" (each model's own [models.X] format)
    utility_format = "pretrained"

    [selection]
    q = [1e-4, 1e-3]
    p = [1e-3]

    [evaluations.harm]        # named evaluations: kind + its parameters
    kind = "harm"
    data = "harmful_test"

    [experiments.compression] # which experiments to run, with their parameters
    models = ["aligned"]
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from harmprune.errors import ConfigError, ModelError
from harmprune.formatting import PROMPT_FORMATS
from harmprune.specs import Context, parse, parse_table
from harmprune.scoring_methods import SCORING_METHODS

TOP_KEYS = {"name", "seed", "dtype", "device", "models", "data", "scoring", "selection", "evaluations",
            "experiments", "report"}
MODEL_KEYS = {"path", "format", "dtype", "aligned", "label"}
DATA_KEYS = {"path", "prompt_field", "response_field", "category_field", "category", "exclude_category",
             "n_examples", "seed", "skip_empty", "split", "exclude"}
# A data set the model under study writes itself: its answers to another set's prompts under a prefilling attack,
# refusals dropped (harmprune.calibration). Each model gets its own answers; usable wherever scores are computed.
SELF_GENERATED_KEYS = {"self_generated", "from", "prefix", "prefill_tokens", "prefill_from", "refusal_judge",
                       "max_new_tokens", "batch_size", "score_prefix"}
SCORING_KEYS = {"method", "harm_method", "utility_method", "format", "harm_format", "utility_format", "harm",
                "utility", "max_length", "batch_size", "modules"}
# The study's recipe (B-TAP): signed SNIP for the harm set, absolute SNIP for the utility set, both scored in the
# "pretrained" prompt format. ``method`` / ``format`` set both roles at once; the per-role keys override them.
SCORING_DEFAULTS = {"harm_method": "signed-snip", "utility_method": "snip", "harm_format": "pretrained",
                    "utility_format": "pretrained"}
SCORING_FORMATS = {*PROMPT_FORMATS, "model"}  # "model": the scored model's own [models.X] format
SELECTION_KEYS = {"q", "p", "granularity"}
RECIPE_Q, RECIPE_P = 1e-5, 5e-5  # the study's headline operating point
GRANULARITIES = {"matrix", "row", "global"}
DATA_TYPES = (("prompt_field", (str,), "a string"), ("response_field", (str,), "a string"),
              ("category_field", (str,), "a string"), ("category", (str, list), "a string or a list"),
              ("exclude_category", (str, list), "a string or a list"), ("seed", (int,), "an integer"),
              ("skip_empty", (bool,), "true or false"), ("split", (str,), "a string"), ("exclude", (str,), "a string"))


@dataclass
class ModelSpec:
    name: str
    path: str
    format: str = "chat"
    dtype: str | None = None
    aligned: bool = True
    label: str | None = None


@dataclass
class DataSpec:
    name: str
    path: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Evaluation:
    """A configured evaluation: its kind, its typed spec, and its table as given with paths resolved (what the
    evaluation's cache key hashes, so adding a parameter with its default keeps old keys)."""

    name: str
    kind: str
    spec: Any
    table: dict[str, Any]


@dataclass
class Config:
    path: Path
    raw: dict[str, Any]
    name: str
    seed: int
    dtype: str
    device: str | None
    models: dict[str, ModelSpec]
    data: dict[str, DataSpec]
    scoring: dict[str, Any]
    selection: dict[str, Any]
    evaluations: dict[str, Evaluation]
    experiments: dict[str, Any]  # name -> its params (an instance of the experiment's spec)
    report: dict[str, Any]


def read_raw_config(path: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The TOML tables of ``path`` with ``overrides`` (``KEY=VALUE``, as ``run --set`` takes them) applied."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such config file")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    for override in overrides:
        apply_override(raw, override, str(path))
    return raw


def apply_override(raw: dict[str, Any], override: str, where: str) -> None:
    """Set one dotted key of ``raw`` from ``KEY=VALUE``; VALUE is read as a TOML value (``1e-5``, ``[0, 1]``,
    ``true``, ``"text"``), and a bare word that is no TOML value is taken as a string (``scoring.harm=lat``).
    Missing tables on the way are created; the result is validated like any config."""
    key, sep, text = override.partition("=")
    parts = [part.strip() for part in key.split(".")]
    if not sep or not all(parts):
        raise ConfigError(f"{where}: --set {override!r} must be KEY=VALUE with a dotted KEY (scoring.harm=lat)")
    try:
        value = tomllib.loads(f"value = {text.strip()}")["value"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    table = raw
    for depth, part in enumerate(parts[:-1]):
        table = table.setdefault(part, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: --set {key}: {'.'.join(parts[:depth + 1])} is a value, not a table")
    table[parts[-1]] = value


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Parse and validate ``path`` (with ``overrides``, see :func:`apply_override`) against the registered
    evaluation kinds, experiments and judges."""
    path = Path(path)
    raw = read_raw_config(path, overrides)
    where = str(path) + (f" (with --set {' '.join(overrides)})" if overrides else "")
    _check_keys(raw, TOP_KEYS, "", where)
    dtype = raw.get("dtype", "float32")
    if not isinstance(dtype, str) or dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"{where}: dtype {dtype!r} must be float32, bfloat16 or float16")
    seed = raw.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"{where}: seed {seed!r} must be an integer")
    base = path.parent
    models = {n: _model(n, t, base, where) for n, t in _table(raw, "models", where, required=True).items()}
    data = {n: _data(n, t, base, where) for n, t in _table(raw, "data", where).items()}
    _check_self_generated(data, where)
    for n, spec in data.items():
        excluded = spec.options.get("exclude")
        if excluded is not None and (excluded not in data or excluded == n):
            raise ConfigError(f"{where}: data.{n}.exclude names unknown data set {excluded!r}")
        seen = {n}
        while excluded is not None:
            if excluded in seen:
                raise ConfigError(f"{where}: data.{n}.exclude forms a cycle through {excluded!r}")
            seen.add(excluded)
            excluded = data[excluded].options.get("exclude")
    scoring = _scoring(_table(raw, "scoring", where), data, where)
    selection = _selection(_table(raw, "selection", where), where, has_utility=scoring.get("utility") is not None)
    ctx = _context(where, base, models, data)
    evaluations = {n: _evaluation(n, t, ctx) for n, t in _table(raw, "evaluations", where).items()}
    _add_evaluations(ctx, evaluations)
    experiments = {n: _experiment(n, t, ctx) for n, t in _table(raw, "experiments", where).items()}
    return Config(path, raw, str(raw.get("name", path.stem)), seed, dtype, raw.get("device"),
                  models, data, scoring, selection, evaluations, experiments, _table(raw, "report", where))


def _context(where: str, base: Path, models: dict[str, ModelSpec], data: dict[str, DataSpec]) -> Context:
    """What evaluation and experiment specs refer to: this config's models and data sets, the judges."""
    from harmprune.judges import available_judges, judge_options

    return Context(where, base, names={"model": set(models), "data": set(data), "judge": set(available_judges()),
                                       "evaluation": set()},
                   self_generated={n for n, s in data.items() if is_self_generated(s)},
                   options_spec=lambda ref, name: judge_options(name) if ref == "judge" else None)


def _add_evaluations(ctx: Context, evaluations: dict[str, Evaluation]) -> None:
    """Let experiment specs name the evaluations, and their metrics be checked against each evaluation's kind."""
    from harmprune.experiments.evaluations import EVALUATIONS

    ctx.names = {**ctx.names, "evaluation": set(evaluations)}
    ctx.metrics = lambda e: EVALUATIONS.get(evaluations[e].kind).metrics(evaluations[e].spec) if e in evaluations else None


def _evaluation(name: str, t: Any, ctx: Context) -> Evaluation:
    from harmprune.experiments.evaluations import EVALUATIONS

    if not isinstance(t, dict) or "kind" not in t:
        raise ConfigError(f"{ctx.where}: evaluations.{name} must be a table with a 'kind'")
    kind = t["kind"]
    if kind not in EVALUATIONS:
        raise ConfigError(f"{ctx.where}: evaluations.{name}.kind {kind!r} is not one of {EVALUATIONS.names()}")
    spec, table = parse_table(EVALUATIONS.get(kind).spec, {k: v for k, v in t.items() if k != "kind"},
                              f"evaluations.{name}.", ctx)
    return Evaluation(name, kind, spec, {"kind": kind, **table})


def _experiment(name: str, t: Any, ctx: Context) -> Any:
    from harmprune.experiments import experiments

    known = experiments()
    if name not in known:
        raise ConfigError(f"{ctx.where}: unknown experiment 'experiments.{name}' (known: {', '.join(sorted(known))})")
    return parse(known[name].params, t, f"experiments.{name}.", ctx)


def _model(name: str, t: Any, base: Path, where: str) -> ModelSpec:
    if not isinstance(t, dict):
        raise ConfigError(f"{where}: models.{name} must be a table")
    _check_keys(t, MODEL_KEYS, f"models.{name}.", where)
    if "path" not in t:
        raise ConfigError(f"{where}: models.{name}.path is missing")
    fmt = t.get("format", "chat")
    if fmt not in PROMPT_FORMATS:
        raise ConfigError(f"{where}: models.{name}.format must be one of {', '.join(PROMPT_FORMATS)}, got {fmt!r}")
    if not isinstance(t["path"], str):
        raise ConfigError(f"{where}: models.{name}.path {t['path']!r} must be a string")
    path = _maybe_local(t["path"], base)
    _check_model_path(name, t["path"], path, base, where)
    if t.get("dtype") not in (None, "float32", "bfloat16", "float16"):
        raise ConfigError(f"{where}: models.{name}.dtype {t['dtype']!r} must be float32, bfloat16 or float16")
    if not isinstance(t.get("aligned", True), bool):
        raise ConfigError(f"{where}: models.{name}.aligned {t['aligned']!r} must be true or false")
    return ModelSpec(name, path, fmt, t.get("dtype"), t.get("aligned", True), t.get("label"))


def _check_model_path(name: str, given: str, path: str, base: Path, where: str) -> None:
    """An alias, a model directory or file, or a hub id; nothing is fetched."""
    from harmprune.models import check_model_spec

    first = given.split("/")[0]
    try:
        check_model_spec(path)
        if path == given and given.count("/") == 1 and (base / first).is_dir():
            raise ModelError(f"{given}: no such model directory (the folder {first}/ exists beside the config, so "
                             "this is not taken as a hub id)")
    except ModelError as e:
        raise ConfigError(f"{where}: models.{name}.path: {e}") from None


def _data(name: str, t: Any, base: Path, where: str) -> DataSpec:
    if isinstance(t, str):
        t = {"path": t}
    if not isinstance(t, dict):
        raise ConfigError(f"{where}: data.{name} must be a table or a path")
    if "self_generated" in t:
        return _self_generated(name, t, where)
    _check_keys(t, DATA_KEYS, f"data.{name}.", where)
    if "path" not in t:
        raise ConfigError(f"{where}: data.{name}.path is missing")
    path = _maybe_local(t["path"], base)
    if not Path(path).exists() and not _looks_like_hub_id(t["path"]):
        raise ConfigError(f"{where}: data.{name}.path: no such file {t['path']!r}")
    n = t.get("n_examples")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n <= 0):
        raise ConfigError(f"{where}: data.{name}.n_examples must be a positive integer, got {n!r}")
    for key, types, label in DATA_TYPES:
        if key in t and not (isinstance(t[key], types) and not (bool not in types and isinstance(t[key], bool))):
            raise ConfigError(f"{where}: data.{name}.{key} {t[key]!r} must be {label}")
    return DataSpec(name, path, {k: v for k, v in t.items() if k != "path"})


def _self_generated(name: str, t: dict[str, Any], where: str) -> DataSpec:
    key = f"{where}: data.{name}"
    _check_keys(t, SELF_GENERATED_KEYS, f"data.{name}.", where)
    if t["self_generated"] is not True:
        raise ConfigError(f"{key}.self_generated must be true (or absent), got {t['self_generated']!r}")
    if not isinstance(t.get("from"), str):
        raise ConfigError(f"{key}.from must name the data set whose prompts the model answers")
    for k in ("max_new_tokens", "batch_size"):
        v = t.get(k, 1)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ConfigError(f"{key}.{k} must be a positive integer, got {v!r}")
    n = t.get("prefill_tokens", 0)
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ConfigError(f"{key}.prefill_tokens must be a non-negative integer, got {n!r}")
    if not isinstance(t.get("prefix", ""), str):
        raise ConfigError(f"{key}.prefix must be a string, got {t['prefix']!r}")
    if t.get("prefix") and n:
        raise ConfigError(f"{key}: give prefix or prefill_tokens, not both")
    if "prefill_from" in t and not n:
        raise ConfigError(f"{key}.prefill_from needs prefill_tokens > 0")
    if not isinstance(t.get("score_prefix", False), bool):
        raise ConfigError(f"{key}.score_prefix must be true or false, got {t['score_prefix']!r}")
    judge = t.get("refusal_judge", "refusal")
    if judge != "none":
        from harmprune.judges import available_judges

        if judge not in available_judges():
            raise ConfigError(f"{key}.refusal_judge {judge!r} is not a judge (known: {', '.join(available_judges())}"
                              f"; 'none' keeps every answer)")
    options = {"max_new_tokens": 128, "batch_size": 8, "prefill_tokens": 0, "prefix": "", "prefill_from": None,
               "refusal_judge": "refusal", "score_prefix": False, **t}
    return DataSpec(name, "", options)


def is_self_generated(spec: DataSpec) -> bool:
    return bool(spec.options.get("self_generated"))


def _check_self_generated(data: dict[str, DataSpec], where: str) -> None:
    """Self-generated sets answer a plain data set's prompts, and are never the prompts of another set."""
    for n, spec in data.items():
        keys = ("from", "prefill_from") if is_self_generated(spec) else ("exclude",)
        for k, ref in ((k, spec.options.get(k)) for k in keys):
            if ref is None:
                continue
            if ref not in data:
                raise ConfigError(f"{where}: data.{n}.{k} names unknown data set {ref!r}")
            if is_self_generated(data[ref]):
                hint = f" (name its source, {data[ref].options['from']!r})" if k == "exclude" else ""
                raise ConfigError(f"{where}: data.{n}.{k} names self-generated data set {ref!r}; it has answers only "
                                  f"per model{hint}")


def _scoring(t: dict[str, Any], data: dict[str, DataSpec], where: str) -> dict[str, Any]:
    """The scoring table with every role's method and format resolved (``harm_method``, ``utility_format``, ...)."""
    _check_keys(t, SCORING_KEYS, "scoring.", where)
    out = {"max_length": 256, "batch_size": 4, "modules": None, **t}
    for key, least in (("max_length", 2), ("batch_size", 1)):
        v = out[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < least:
            raise ConfigError(f"{where}: scoring.{key} {v!r} must be an integer of at least {least}")
    if out["modules"] is not None and not (isinstance(out["modules"], list)
                                           and all(isinstance(m, str) for m in out["modules"])):
        raise ConfigError(f"{where}: scoring.modules {out['modules']!r} must be a list of strings")
    for kind, allowed in (("method", set(SCORING_METHODS.names())), ("format", SCORING_FORMATS)):
        shared = t.get(kind)
        if shared is not None and (not isinstance(shared, str) or shared not in allowed):
            raise ConfigError(f"{where}: scoring.{kind} {shared!r} is not one of {sorted(allowed)}")
        for role in ("harm", "utility"):
            key = f"{role}_{kind}"
            value = t.get(key)
            if value is not None and (not isinstance(value, str) or value not in allowed):
                raise ConfigError(f"{where}: scoring.{key} {value!r} is not one of {sorted(allowed)}")
            if value is not None and shared is not None and value != shared:
                raise ConfigError(f"{where}: scoring.{kind} = {shared!r} and scoring.{key} = {value!r} disagree; "
                                  f"give one of them (the per-role key for a per-role choice)")
            out[key] = value or shared or SCORING_DEFAULTS[key]
    for key in ("harm", "utility"):
        if key in out and out[key] not in data:
            raise ConfigError(f"{where}: scoring.{key} names unknown data set {out[key]!r}")
    return out


def _selection(t: dict[str, Any], where: str, has_utility: bool) -> dict[str, Any]:
    """The selection table; defaults are the study's operating point (q = 1e-5, p = 5e-5 with a utility set)."""
    _check_keys(t, SELECTION_KEYS, "selection.", where)
    out = {"q": [RECIPE_Q], "p": [RECIPE_P if has_utility else 0.0], "granularity": "matrix", **t}
    for key in ("q", "p"):
        values = _as_list(out[key])
        if not values:
            raise ConfigError(f"{where}: selection.{key} is empty")
        for v in values:  # a TOML true is a bool, and bools are ints in Python: refuse them explicitly
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
                raise ConfigError(f"{where}: selection.{key} value {v!r} must be a number in [0, 1]")
        out[key] = sorted(float(v) for v in values)
    if out["granularity"] not in GRANULARITIES:
        raise ConfigError(f"{where}: selection.granularity {out['granularity']!r} is not one of {sorted(GRANULARITIES)}")
    return out


def _table(raw: dict[str, Any], key: str, where: str, required: bool = False) -> dict[str, Any]:
    t = raw.get(key)
    if t is None:
        if required:
            raise ConfigError(f"{where}: the [{key}] table is missing")
        return {}
    if not isinstance(t, dict):
        raise ConfigError(f"{where}: '{key}' must be a table")
    return t


def _check_keys(t: dict[str, Any], allowed: set[str], prefix: str, where: str) -> None:
    for key in t:
        if key not in allowed:
            raise ConfigError(f"{where}: unknown key '{prefix}{key}' (expected one of: {', '.join(sorted(allowed))})")


def _maybe_local(value: str, base: Path) -> str:
    candidate = base / value
    return str(candidate.resolve()) if candidate.exists() else value


def _looks_like_hub_id(value: str) -> bool:
    return value.count("/") == 1 and not value.startswith((".", "/")) and not Path(value).suffix


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
