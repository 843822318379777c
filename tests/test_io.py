"""Small helpers of harmprune.io: file hashes and work started in the background."""

from __future__ import annotations

import hashlib
import threading

import pytest

from harmprune.io import in_background, sha256_file


def test_sha256_file_equals_hashlib_on_the_bytes(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(bytes(range(256)) * 5000)
    assert sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_in_background_runs_meanwhile_and_hands_back_the_result():
    started, release = threading.Event(), threading.Event()

    def work():
        started.set()
        release.wait(5)
        return 42

    result = in_background(work)
    assert started.wait(5)  # running before anyone asks for the result
    release.set()
    assert result() == 42 and result() == 42


def test_in_background_reraises_the_error_when_the_result_is_asked_for():
    def fail():
        raise ValueError("bad file")

    result = in_background(fail)
    with pytest.raises(ValueError, match="bad file"):
        result()
