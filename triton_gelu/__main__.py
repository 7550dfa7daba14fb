"""``python -m triton_gelu``: a report of the environment, to paste into a bug report.

Versions (triton_gelu, Python, torch, triton), each visible GPU with its compute capability and
the autotuning config space that maps to, where the kernels run (natively, in Triton's
interpreter, or on the PyTorch fallback, and why), the tuning cache and how many tunings it
holds, and the settings read from the environment.

Each field is computed on its own and a field that fails prints its error as its value, so the
report always completes and exits with 0: without Triton, without a GPU, with an unreadable
cache. Triton is imported only to ask for its version, and only if it imports.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from . import __version__, _runtime
from .tuning import cache as _cache

# What the environment can change about the kernels (read by _runtime, _settings, _cache).
SETTINGS = ("TRITON_INTERPRET", "TRITON_GELU_PATH", "TRITON_GELU_CACHE_DIR", "CUDA_VISIBLE_DEVICES")


def package_field() -> str:
    return f"{__version__} ({Path(__file__).resolve().parent})"


def python_field() -> str:
    implementation, system = platform.python_implementation(), platform.platform()
    return f"{platform.python_version()} ({implementation}, {system})"


def torch_field() -> str:
    if torch.version.hip is not None:
        build = f"ROCm {torch.version.hip}"
    else:
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only"
    return f"{torch.__version__} ({build} build)"


def triton_field() -> str:
    reason = _runtime.triton_unavailable()
    if reason is not None:
        return f"missing: {reason}"
    import triton

    return triton.__version__


def config_space(capability: tuple[int, int]) -> str:
    """The autotuning config space of a compute capability (``tuning.keys.arch_of``), which needs
    Triton; without it there is none."""
    if _runtime.triton_unavailable() is not None:
        return "none (triton missing)"
    from .tuning.keys import arch_of

    return arch_of(capability, hip=torch.version.hip is not None)


def gpu_field() -> str:
    if not torch.cuda.is_available():
        return "none visible (torch.cuda.is_available() is False)"
    gpus = []
    for index in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(index)
        gpus.append(
            f"{index}: {torch.cuda.get_device_name(index)}, compute capability {major}.{minor}, "
            f"config space {config_space((major, minor))}"
        )
    return "; ".join(gpus)


def kernels_field() -> str:
    where = _runtime.where_kernels_run()
    if where == "native":
        return "native (CUDA tensors run the Triton kernels; CPU tensors the PyTorch fallback)"
    if where == "interpreted":
        return "interpreted (TRITON_INTERPRET is set: the Triton kernels run in Triton's " \
               "interpreter on the CPU, slowly)"
    reason = _runtime.triton_unavailable() or "no CUDA GPU is visible and TRITON_INTERPRET is unset"
    return f"fallback (every function runs its PyTorch fallback: {reason})"


def cache_field() -> str:
    directory = _cache.cache_dir()
    if not directory.exists():
        return f"{directory} (does not exist: nothing tuned yet)"
    if not directory.is_dir():
        return f"{directory} (not a directory: tunings cannot be saved)"
    files = _cache.cache_files()
    entries = sum(len(_cache.read_entries(path)) for path in files)
    return f"{directory} ({entries} tunings in {len(files)} files)"


def settings_field() -> str:
    found = [f"{name}={os.environ[name]}" for name in SETTINGS if name in os.environ]
    return ", ".join(found) or "none set"


FIELDS: tuple[tuple[str, Callable[[], str]], ...] = (
    ("triton_gelu", package_field),
    ("python", python_field),
    ("torch", torch_field),
    ("triton", triton_field),
    ("gpu", gpu_field),
    ("kernels run", kernels_field),
    ("tuning cache", cache_field),
    ("settings", settings_field),
)


def report() -> list[tuple[str, str]]:
    """(label, value) of every field; a field that raises gives its error as its value."""
    lines = []
    for label, field in FIELDS:
        try:
            value = field()
        except Exception as e:  # the report must finish whatever one field finds
            value = f"unknown ({type(e).__name__}: {e})"
        lines.append((label, value))
    return lines


def main() -> int:
    width = max(len(label) for label, _ in FIELDS)
    for label, value in report():
        print(f"{label:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
