"""The stage cache: content-addressed, atomic, resumable outputs of a run's stages.

Each stage's output lives under ``RUN/stages/<kind>/<key>/`` where ``key`` is a content hash of everything the
stage depends on (model weights, data records, parameters, upstream outputs), never of a path or a name. A stage
whose output exists is not run again, so a finished config recomputes nothing and a run killed at any moment
resumes at the stage it was in: a stage is built in a directory private to its process and renamed into place
when complete, and leftovers of dead processes are removed.

A key does not change with harmprune's own code unless ``STAGE_VERSIONS`` is bumped, so each stage also records a
fingerprint of the code that computed it (``code`` in ``stage.json``). Reusing a stage another version of the code
computed is allowed (it is what makes a long run resumable across a fix elsewhere) but never silent: it is logged
and counted as ``reused_other_code`` in the run's ``summary.json`` stages.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import time
import uuid
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

from harmprune import __version__
from harmprune.io import atomic_write_json, process_alive, sha256_file
from harmprune.store import Store

log = logging.getLogger(__name__)

# Bump a stage's version when its semantics change, so old cached outputs are not reused.
STAGE_VERSIONS = {"scores": 1, "mask": 1, "control": 1, "evaluate": 1, "finetune": 1, "generate": 1}


def stable_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


@lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """A hash of the running harmprune package's Python sources (names and bytes): equal code, equal fingerprint,
    whether installed from a checkout or a wheel."""
    import harmprune

    root = Path(harmprune.__file__).resolve().parent
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


class StageCache:
    """The ``stages/`` directory of one run directory, and its record in the run's results store."""

    def __init__(self, run_dir: str | Path, store: Store):
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / "stages"
        self.store = store
        self.stats = {"computed": 0, "reused": 0}

    def key(self, kind: str, params: dict[str, Any]) -> str:
        return stable_hash({"kind": kind, "v": STAGE_VERSIONS[kind], **params})[:20]

    def stage(self, kind: str, params: dict[str, Any], build: Callable[[Path], None], done_file: str) -> Path:
        """Run ``build(dir)`` unless the stage with these params already finished; return its directory."""
        key = self.key(kind, params)
        final = self.root / kind / key
        if (final / done_file).exists():
            return self._reused(key, kind, params, final)
        partial = _fresh_partial_dir(final)
        start = time.perf_counter()
        log.info("stage %s %s: %s", kind, key, _describe(params))
        try:
            build(partial)
            atomic_write_json(partial / "stage.json", {
                "kind": kind, "key": key, "params": params, "harmprune_version": __version__,
                "code": code_fingerprint(), "host": socket.gethostname(), "pid": os.getpid(),
                "seconds": time.perf_counter() - start})
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        if (final / done_file).exists():  # another process (a parallel executor) finished it first
            shutil.rmtree(partial, ignore_errors=True)
            return self._reused(key, kind, params, final)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        self.store.record_stage(key, kind, params, str(final), time.perf_counter() - start)
        self.stats["computed"] += 1
        return final

    def _reused(self, key: str, kind: str, params: dict[str, Any], final: Path) -> Path:
        """Count a finished stage as reused and record it in this run's store, so the report lists every stage
        the run used, also those another run directory computed in a shared ``stages/``."""
        self.stats["reused"] += 1
        try:
            record = json.loads((final / "stage.json").read_text())
        except (OSError, ValueError):
            record = {}
        if record.get("code") != code_fingerprint():
            if not self.stats.get("reused_other_code"):
                log.warning("stage %s %s was computed by other harmprune code (%s; this is %s) and is reused: its "
                            "outputs may differ from what this code computes (delete %s to recompute it); further "
                            "such stages are counted in summary.json's stages.reused_other_code", kind, key,
                            record.get("code", "not recorded"), code_fingerprint(), final)
            self.stats["reused_other_code"] = self.stats.get("reused_other_code", 0) + 1
        self.store.record_stage(key, kind, params, str(final), record.get("seconds"), reused=True)
        return final

    def run_relative(self, path: str | Path) -> str:
        """``path`` relative to the run directory if it lies inside it (else as given), for file metadata.

        Stage keys hash upstream files' bytes, so a file that recorded this run directory's location would give
        equal work in two run directories different keys."""
        try:
            return str(Path(path).resolve().relative_to(self.run_dir.resolve()))
        except ValueError:
            return str(path)


def _fresh_partial_dir(final: Path) -> Path:
    """A build directory private to this process, next to ``final``; leftovers of dead processes on this host
    (a killed run), of this stage or of any other of its kind, are removed."""
    host = socket.gethostname().replace("-", "_")
    for old in final.parent.glob(f"*.partial-{host}-*"):
        pid = old.name.rsplit("-", 2)[-2]
        if not pid.isdigit() or not process_alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    partial = final.with_name(f"{final.name}.partial-{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    partial.mkdir(parents=True)
    return partial


def hash_model_source(source: str) -> str:
    """sha256 over a model directory's files (or a file, or a hub id string), memoised by size and mtime."""
    path = Path(source)
    if not path.exists():
        return stable_hash({"hub": source})
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file() and not f.name.startswith("."))
    from harmprune.models import cache_dir

    memo_path = cache_dir() / "file-hashes.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, json.JSONDecodeError):
        memo = {}
    digests = []
    for f in files:
        st = f.stat()
        memo_key = f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}"
        if memo_key not in memo:
            memo[memo_key] = sha256_file(f)
        digests.append((f.name if path.is_file() else str(f.relative_to(path)), memo[memo_key]))
    try:
        atomic_write_json(memo_path, memo)
    except OSError:
        pass
    return stable_hash(digests)


def _describe(params: dict[str, Any]) -> str:
    short = {k: (v[:10] if isinstance(v, str) and len(v) == 64 else v) for k, v in params.items()}
    return json.dumps(short, default=str)[:200]
