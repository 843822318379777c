"""Atomic file writes and content hashes: no stage ever leaves a half-written output behind.

A temporary file is named ``.<name>.<pid>-<host>-<random>.tmp``: a writer killed before its rename (SIGKILL, power
loss) leaves it behind, and the next write of the same path on that host removes those whose process is gone.

Long hashes can run in the background (``in_background``) while the work that needs them goes on.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import socket
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

T = TypeVar("T")


def host_tag() -> str:
    """This machine's name in letters, digits and underscores (safe inside file names split on '-')."""
    return re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (one of another user counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_tmp(path: str | Path) -> list[Path]:
    """Remove the temporary files beside ``path`` left by dead writers on this host; return what was removed."""
    path = Path(path)
    prefix = f".{path.name}."
    removed = []
    for old in path.parent.glob(f"{glob.escape(prefix)}*-{host_tag()}-*.tmp"):
        pid = old.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not process_alive(int(pid)):
            old.unlink(missing_ok=True)
            removed.append(old)
    return removed


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``, on error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-{host_tag()}-", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def in_background(fn: Callable[[], T]) -> Callable[[], T]:
    """Start ``fn()`` in a daemon thread and return a call that waits for its result (re-raising its error).

    For work that releases the GIL, such as hashing a large file, beside other work; being a daemon, it never
    keeps the process waiting after an error elsewhere."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as e:  # handed to the caller of result()
            box["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()

    def result() -> T:
        thread.join()
        if "error" in box:
            raise box["error"]
        return box["result"]

    return result
