"""Which launchers serve a tensor: the Triton kernels, or the PyTorch fallback."""

from __future__ import annotations

from types import ModuleType

import torch

from . import fallback
from ._runtime import runs_triton
from ._settings import tune_policy


def launchers(t: torch.Tensor) -> ModuleType:
    """``triton_gelu.kernels`` (imported on first use, so Triton is imported only when a kernel
    can run) for CUDA tensors and CPU tensors under the interpreter, else ``triton_gelu.fallback``.
    Both modules have the same launchers.

    Every call also reads the tuning policy, so a bad ``TRITON_GELU_TUNE`` is refused here, on
    every machine, before anything runs (``_settings.py``)."""
    tune_policy()
    if runs_triton(t):
        from . import kernels

        return kernels
    return fallback
