"""Data sets as one record type: a prompt, an optional response, an optional category.

Every loader funnels into :class:`Record`, so scoring, evaluation and experiments never care whether the
examples came from a CSV, a chat-format JSONL file, a YAML question list or the Hugging Face Hub.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence


from harmprune.errors import DataError

__all__ = ["DataError", "Record", "load_records", "filter_categories", "sample", "records_digest", "write_jsonl"]


@dataclass(frozen=True)
class Record:
    """One example: what is asked, what is answered (if known), and its harm category (if known)."""

    prompt: str
    response: str | None = None
    category: str | None = None
    source: dict[str, Any] = field(default_factory=dict, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "response": self.response, "category": self.category, "source": self.source}


@dataclass(frozen=True)
class Schema:
    """Where a known data set keeps its prompt, response and category."""

    name: str
    prompt: str
    response: str | None = None
    category: str | None = None
    signature: tuple[str, ...] = ()  # further fields that must be present for the schema to match


# Checked in order; the first schema whose prompt field and signature fields are present wins.
KNOWN_SCHEMAS: tuple[Schema, ...] = (
    Schema("xstest", "prompt", None, "type", signature=("label", "type")),
    Schema("prompt/response", "prompt", "response", "category"),
    Schema("instruction/output", "instruction", "output", "category"),
    Schema("advbench", "goal", "target", "category"),
    Schema("strongreject", "forbidden_prompt", None, "category"),
    Schema("simple-safety-tests", "prompts_final", None, "harm_area"),
    Schema("gsm8k", "question", "answer", "category"),
    Schema("em-questions", "paraphrases", None, "id"),
)


def load_records(
    path: str | Path,
    *,
    prompt_field: str | None = None,
    response_field: str | None = None,
    category_field: str | None = None,
    category: str | Sequence[str] | None = None,
    exclude_category: str | Sequence[str] | None = None,
    n_examples: int | None = None,
    seed: int = 0,
    require_response: bool = False,
    skip_empty: bool = False,
    split: str = "train",
) -> list[Record]:
    """Read a data set from a file (CSV, JSON, JSONL, YAML) or a hub id, detect its schema, filter and sample.

    ``category`` keeps only those categories; ``n_examples`` takes a seeded random sample (order preserved).
    With ``require_response`` an empty response is an error, unless ``skip_empty`` drops such rows (logged).
    """
    source = str(path)
    rows = _read_rows(source, split=split)
    if not rows:
        raise DataError(f"{source}: no rows")
    records = _rows_to_records(rows, source, prompt_field, response_field, category_field)
    if require_response:
        empty = [i for i, rec in enumerate(records) if not rec.response or not rec.response.strip()]
        if empty and not skip_empty:
            raise DataError(f"{source}: row {empty[0]} has an empty response, and a response is needed here "
                            f"({len(empty)} such rows; --skip-empty-responses drops them)")
        if empty:
            logging.getLogger(__name__).warning("%s: dropped %d rows with an empty response", source, len(empty))
            records = [r for r in records if r.response and r.response.strip()]
            if not records:
                raise DataError(f"{source}: every response is empty")
    records = filter_categories(records, category, exclude_category, source)
    if n_examples is not None:
        records = sample(records, n_examples, seed)
    return records


def filter_categories(
    records: list[Record],
    keep: str | Sequence[str] | None,
    drop: str | Sequence[str] | None = None,
    source: str = "data",
) -> list[Record]:
    """Keep the records whose category is in ``keep`` (all if None) and not in ``drop``."""
    keep_set = _as_set(keep)
    drop_set = _as_set(drop)
    if not keep_set and not drop_set:
        return records
    if any(r.category is None for r in records):
        raise DataError(f"{source}: a category filter was given but the data set has no category field")
    out = [r for r in records if (not keep_set or r.category in keep_set) and r.category not in drop_set]
    if not out:
        present = sorted({str(r.category) for r in records})
        raise DataError(f"{source}: no rows left after the category filter {sorted(keep_set)}; present: {present}")
    return out


def sample(records: list[Record], n: int, seed: int = 0) -> list[Record]:
    """A seeded sample of ``n`` records in their original order (all of them when ``n`` exceeds the count)."""
    if n <= 0:
        raise DataError(f"n_examples must be positive, got {n}")
    if n >= len(records):
        return list(records)
    keep = sorted(random.Random(seed).sample(range(len(records)), n))
    return [records[i] for i in keep]


def records_digest(records: Iterable[Record]) -> str:
    """A sha256 of the records' content: the cache key and provenance of everything computed from them."""
    h = hashlib.sha256()
    for r in records:
        fields = [r.prompt, r.response, r.category]
        if r.source.get("unscored_prefix"):  # which part of the response is context changes what is scored
            fields.append({"unscored_prefix": r.source["unscored_prefix"]})
        h.update(json.dumps(fields, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def write_jsonl(records: Iterable[Record], path: str | Path) -> None:
    """Write records in the chat ``messages`` schema (plus ``category``), atomically."""
    from harmprune.io import atomic_write_text

    lines = []
    for r in records:
        row: dict[str, Any] = {"messages": [{"role": "user", "content": r.prompt}]}
        if r.response is not None:
            row["messages"].append({"role": "assistant", "content": r.response})
        if r.category is not None:
            row["category"] = r.category
        lines.append(json.dumps(row, ensure_ascii=False))
    atomic_write_text(path, "\n".join(lines) + ("\n" if lines else ""))


# ---------------------------------------------------------------------------------------------- reading


def _read_rows(source: str, split: str) -> list[dict[str, Any]]:
    path = Path(source)
    if not path.exists():
        if _looks_like_hub_id(source):
            return _read_hub(source, split)
        raise DataError(f"{source}: no such file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            with path.open(newline="", encoding="utf-8") as f:
                return list(csv.DictReader(f))
        if suffix == ".jsonl":
            rows = []
            with path.open(encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            row = json.loads(line)
                        except json.JSONDecodeError as e:
                            raise DataError(f"{source}: line {lineno} is not valid JSON ({e.msg})") from None
                        if not isinstance(row, dict):
                            raise DataError(f"{source}: line {lineno} is a JSON {type(row).__name__}, not an object "
                                            "with fields")
                        rows.append(row)
            return rows
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            return _unwrap_list(data, source)
        if suffix in (".yaml", ".yml"):
            import yaml

            return _unwrap_list(yaml.safe_load(path.read_text(encoding="utf-8")), source)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{source}: cannot be parsed ({e})") from None
    raise DataError(f"{source}: unknown file type {suffix!r} (expected .csv, .json, .jsonl, .yaml)")


def _unwrap_list(data: Any, source: str) -> list[dict[str, Any]]:
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) == 1:
            data = lists[0]
    if not isinstance(data, list) or not all(isinstance(x, dict) for x in data):
        raise DataError(f"{source}: expected a list of objects")
    return data


def _looks_like_hub_id(source: str) -> bool:
    """``owner/name``, unless it has a data file's suffix or its first part is a local folder (a misspelt path)."""
    parts = source.split("/")
    return (len(parts) == 2 and all(parts) and not source.startswith((".", "/")) and not Path(parts[0]).is_dir()
            and Path(source).suffix.lower() not in (".csv", ".json", ".jsonl", ".yaml", ".yml"))


def _read_hub(source: str, split: str) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{source}: not a local file, and reading hub data sets needs `pip install datasets`") from None
    try:
        return list(datasets.load_dataset(source, split=split))
    except Exception as e:  # the hub raises many types; the user needs the cause, not the type
        raise DataError(f"{source}: not a local file and could not be loaded from the hub ({e})") from None


# ---------------------------------------------------------------------------------------------- schemas


def _rows_to_records(
    rows: list[dict[str, Any]],
    source: str,
    prompt_field: str | None,
    response_field: str | None,
    category_field: str | None,
) -> list[Record]:
    first = rows[0]
    if prompt_field is None and "messages" in first:
        return [_from_messages(row, i, source, category_field) for i, row in enumerate(rows)]
    schema = _detect_schema(first, source, prompt_field, response_field, category_field)
    out = []
    for i, row in enumerate(rows):
        prompt = _field(row, schema.prompt, i, source, required=True)
        if isinstance(prompt, list) and prompt:  # EM question files keep a list of paraphrases
            prompt = prompt[0]
        if prompt is None or isinstance(prompt, (dict, list, bool)):
            raise DataError(f"{source}: row {i}: prompt field {schema.prompt!r} is {json.dumps(prompt)}, not text")
        response = _field(row, schema.response, i, source, required=response_field is not None)
        cat = _field(row, schema.category, i, source, required=category_field is not None)
        extra = {k: v for k, v in row.items()
                 if k not in (schema.prompt, schema.response, schema.category) and isinstance(v, (str, int, float))}
        out.append(Record(str(prompt), _str_or_none(response), _str_or_none(cat), {"file": source, "row": i, **extra}))
    return out


def _detect_schema(
    row: dict[str, Any], source: str, prompt_field: str | None, response_field: str | None, category_field: str | None
) -> Schema:
    if prompt_field is not None:
        if prompt_field not in row:
            raise DataError(f"{source}: prompt field {prompt_field!r} not found; fields: {sorted(row)}")
        if response_field is not None and response_field not in row:
            raise DataError(f"{source}: response field {response_field!r} not found; fields: {sorted(row)}")
        if category_field is not None and category_field not in row:
            raise DataError(f"{source}: category field {category_field!r} not found; fields: {sorted(row)}")
        return Schema("custom", prompt_field, response_field, category_field)
    for schema in KNOWN_SCHEMAS:
        if schema.prompt in row and all(f in row for f in schema.signature):
            response = response_field or (schema.response if schema.response in row else None)
            cat = category_field or (schema.category if schema.category in row else None)
            for name, value in (("response", response_field), ("category", category_field)):
                if value is not None and value not in row:
                    raise DataError(f"{source}: {name} field {value!r} not found; fields: {sorted(row)}")
            return Schema(schema.name, schema.prompt, response, cat)
    raise DataError(
        f"{source}: unknown schema (fields: {sorted(row)}); name the fields with --prompt-field/--response-field"
    )


def _from_messages(row: dict[str, Any], i: int, source: str, category_field: str | None) -> Record:
    messages = row.get("messages")
    if not isinstance(messages, list):
        raise DataError(f"{source}: row {i}: field 'messages' is not a list")
    user = next((m.get("content") for m in messages if m.get("role") == "user"), None)
    assistant = next((m.get("content") for m in messages if m.get("role") == "assistant"), None)
    if user is None:
        raise DataError(f"{source}: row {i}: 'messages' has no user turn (or its content is null)")
    cat_key = category_field or "category"
    if category_field is not None and cat_key not in row:
        raise DataError(f"{source}: row {i}: category field {cat_key!r} not found")
    return Record(str(user), _str_or_none(assistant), _str_or_none(row.get(cat_key)), {"file": source, "row": i})


def _field(row: dict[str, Any], name: str | None, i: int, source: str, required: bool) -> Any:
    if name is None:
        return None
    if name not in row:
        if required:
            raise DataError(f"{source}: row {i}: field {name!r} missing")
        return None
    return row[name]


def _str_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


def _as_set(value: str | Sequence[str] | None) -> set[str]:
    if value is None:
        return set()
    if isinstance(value, str):
        return {v.strip() for v in value.split(",") if v.strip()}
    return set(value)
