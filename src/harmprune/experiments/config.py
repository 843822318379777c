"""Experiment configuration: a TOML file, validated completely before any work starts.

Every error names the offending key (``data.harmful.path``) and, for files, the path. Relative paths are
resolved against the config file's directory first, then the current directory.

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
from typing import Any

from harmprune.errors import ConfigError
from harmprune.formatting import PROMPT_FORMATS
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
SCORE_ONLY_DATA_KEYS = {"utility_data", "benign_task_data", "prune_data"}  # experiment keys only scored
SCORING_KEYS = {"method", "harm_method", "utility_method", "format", "harm_format", "utility_format", "harm",
                "utility", "max_length", "batch_size", "modules"}
# The study's recipe (B-TAP): signed SNIP for the harm set, absolute SNIP for the utility set, both scored in the
# "pretrained" prompt format. ``method`` / ``format`` set both roles at once; the per-role keys override them.
SCORING_DEFAULTS = {"harm_method": "signed-snip", "utility_method": "snip", "harm_format": "pretrained",
                    "utility_format": "pretrained"}
SCORING_FORMATS = {*PROMPT_FORMATS, "model"}  # "model": the scored model's own [models.X] format
SELECTION_KEYS = {"q", "p", "granularity"}
GRANULARITIES = {"matrix", "row", "global"}


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
    evaluations: dict[str, dict[str, Any]]
    experiments: dict[str, dict[str, Any]]
    report: dict[str, Any]


def load_config(path: str | Path, known_evaluations: dict[str, set[str]] | None = None,
                known_experiments: dict[str, set[str]] | None = None) -> Config:
    """Parse and validate ``path``. ``known_*`` map registered kinds to their allowed parameter names."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such config file")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    where = str(path)
    _check_keys(raw, TOP_KEYS, "", where)
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
    selection = _selection(_table(raw, "selection", where), where)
    evaluations = {n: _evaluation(n, t, data, base, where, known_evaluations)
                   for n, t in _table(raw, "evaluations", where).items()}
    experiments = _table(raw, "experiments", where)
    for name, params in experiments.items():
        if not isinstance(params, dict):
            raise ConfigError(f"{where}: experiments.{name} must be a table")
        if known_experiments is not None:
            if name not in known_experiments:
                raise ConfigError(f"{where}: unknown experiment 'experiments.{name}' "
                                  f"(known: {', '.join(sorted(known_experiments))})")
            _check_keys(params, known_experiments[name], f"experiments.{name}.", where)
        for key in ("models", "model"):
            for m in _as_list(params.get(key)):
                if m not in models:
                    raise ConfigError(f"{where}: experiments.{name}.{key} names unknown model {m!r}")
        for key in ("evaluations", "harm_evaluation", "utility_evaluation"):
            for e in _as_list(params.get(key)):
                if e not in evaluations:
                    raise ConfigError(f"{where}: experiments.{name}.{key} names unknown evaluation {e!r}")
        for key, value in params.items():
            if key.endswith("data") and isinstance(value, str) and value not in data:
                raise ConfigError(f"{where}: experiments.{name}.{key} names unknown data set {value!r}")
            if (key.endswith("data") and isinstance(value, str) and is_self_generated(data[value])
                    and key not in SCORE_ONLY_DATA_KEYS):
                raise ConfigError(f"{where}: experiments.{name}.{key}: self-generated data set {value!r} can only be "
                                  f"scored ({', '.join(sorted(SCORE_ONLY_DATA_KEYS))}, scoring.harm/utility)")
    dtype = raw.get("dtype", "float32")
    if not isinstance(dtype, str) or dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"{where}: dtype {dtype!r} must be float32, bfloat16 or float16")
    seed = raw.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"{where}: seed {seed!r} must be an integer")
    return Config(path, raw, str(raw.get("name", path.stem)), seed, dtype, raw.get("device"),
                  models, data, scoring, selection, evaluations, experiments, _table(raw, "report", where))


def _model(name: str, t: Any, base: Path, where: str) -> ModelSpec:
    if not isinstance(t, dict):
        raise ConfigError(f"{where}: models.{name} must be a table")
    _check_keys(t, MODEL_KEYS, f"models.{name}.", where)
    if "path" not in t:
        raise ConfigError(f"{where}: models.{name}.path is missing")
    fmt = t.get("format", "chat")
    if fmt not in PROMPT_FORMATS:
        raise ConfigError(f"{where}: models.{name}.format must be one of {', '.join(PROMPT_FORMATS)}, got {fmt!r}")
    path = _maybe_local(t["path"], base)
    return ModelSpec(name, path, fmt, t.get("dtype"), bool(t.get("aligned", True)), t.get("label"))


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
    if n is not None and (not isinstance(n, int) or n <= 0):
        raise ConfigError(f"{where}: data.{name}.n_examples must be a positive integer, got {n!r}")
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


def _selection(t: dict[str, Any], where: str) -> dict[str, Any]:
    _check_keys(t, SELECTION_KEYS, "selection.", where)
    out = {"q": [1e-4], "p": [0.0], "granularity": "matrix", **t}
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


def _evaluation(name: str, t: Any, data: dict[str, DataSpec], base: Path, where: str,
                known: dict[str, set[str]] | None) -> dict[str, Any]:
    if not isinstance(t, dict) or "kind" not in t:
        raise ConfigError(f"{where}: evaluations.{name} must be a table with a 'kind'")
    kind = t["kind"]
    if known is not None:
        if kind not in known:
            raise ConfigError(f"{where}: evaluations.{name}.kind {kind!r} is not one of {sorted(known)}")
        _check_keys(t, known[kind] | {"kind"}, f"evaluations.{name}.", where)
    for key, value in t.items():
        if key in ("batch_size", "max_batch_tokens") and (isinstance(value, bool) or not isinstance(value, int)
                                                          or value < 1):
            raise ConfigError(f"{where}: evaluations.{name}.{key} must be a positive integer, got {value!r}")
        if key.endswith("data") or key in ("prefill_from", "harmful", "benign"):
            for v in _as_list(value):
                if v not in data:
                    raise ConfigError(f"{where}: evaluations.{name}.{key} names unknown data set {v!r}")
                if is_self_generated(data[v]):
                    raise ConfigError(f"{where}: evaluations.{name}.{key}: self-generated data set {v!r} can only be "
                                      "scored, not evaluated")
        if key in ("mmlu", "ppl_file", "judge_prompt_file", "judge_prompts_file"):
            resolved = _maybe_local(value, base)
            if not Path(resolved).exists():
                raise ConfigError(f"{where}: evaluations.{name}.{key}: no such path {value!r}")
            t = {**t, key: resolved}
        if key in ("judge_model", "judge_base_model", "judge_adapter") and isinstance(value, str):
            t = {**t, key: _maybe_local(value, base)}  # a local grader next to the config; else an alias or hub id
    return dict(t)


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
