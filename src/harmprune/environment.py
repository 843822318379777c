"""What a run's numbers depend on besides its config and data: library versions, CPU kernels and thread count.

Greedy decoding, scoring and fine-tuning are deterministic for a fixed machine kind, but float sums change with
the BLAS kernels the CPU selects (``torch.backends.cpu.get_cpu_capability()``: AVX2, AVX512, ...) and with the
number of threads splitting a reduction, and a near-tie in a top-k or an argmax can then flip. A run records them
(``environment.json`` beside ``summary.json``) so two runs that differ can be told apart by cause.
"""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from typing import Any


KERNEL_ENV = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "MKL_NUM_THREADS",
              "MKL_CBWR")


def describe() -> dict[str, Any]:
    """The versions, CPU kind and torch thread settings in effect in this process."""
    import torch

    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        # set on purpose, these pin the kernels below what the CPU offers (an AVX2 machine's results on AVX512)
        # or the BLAS thread count
        "kernel_env": {v: os.environ[v] for v in KERNEL_ENV if v in os.environ},
        "mkl": torch.backends.mkl.is_available(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    for package in ("harmprune", "torch", "transformers", "safetensors", "peft", "scikit-learn"):
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[package] = None
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
