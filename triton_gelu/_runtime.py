"""Where kernels run: natively on CUDA, under the Triton interpreter on the CPU, or not at all.

Nothing here imports Triton at import time: ``import triton_gelu`` works on machines without it
(macOS, Windows, CPU-only containers). The first call that could run a kernel asks whether
Triton imports; if it does not, every call takes the PyTorch fallback and a warning naming the
reason is given once.

``launches`` counts every Triton kernel launch by kernel name, so tests can prove the kernel path
(not a PyTorch fallback) produced a result; ``path_runs`` counts the paths ``tuning.paths.Paths``
ran, by (op, path name).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import importlib
import warnings

import torch

from ._settings import INTERPRET_ENV, env_value

launches: collections.Counter = collections.Counter()
path_runs: collections.Counter = collections.Counter()


def interpreting() -> bool:
    """True when Triton runs kernels in its interpreter (``TRITON_INTERPRET=1`` before import;
    read with the other settings, ``_settings.py``)."""
    return env_value(INTERPRET_ENV) not in (None, "", "0")


@functools.cache
def triton_unavailable() -> str | None:
    """Why the Triton kernels cannot run in this process (None when they can): Triton is not
    installed, or it fails to import. Asked once; the answer imports Triton if it is there."""
    try:
        importlib.import_module("triton")
        importlib.import_module("triton.language")
    except Exception as e:  # ImportError, or a broken install raising something else
        return f"triton does not import ({type(e).__name__}: {e})"
    return None


class TritonUnavailableWarning(UserWarning):
    """Given once per process when the Triton kernels cannot run and the fallback is used."""


class UnfusedFallbackWarning(UserWarning):
    """Given once per layout when DTensor operands are laid out in a way the fused kernels cannot
    serve, and the unfused PyTorch ops (with DTensor's own communication) run instead (public as
    ``triton_gelu.parallel.UnfusedFallbackWarning``)."""


_warned = False


def _warn_fallback(reason: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            f"triton_gelu: the Triton kernels are not available: {reason}. Every triton_gelu "
            "function runs its PyTorch fallback (same results, no fused kernels).",
            TritonUnavailableWarning, stacklevel=4,
        )


def runs_triton(t: torch.Tensor) -> bool:
    """CUDA tensors run the Triton kernels, CPU tensors only under the interpreter; neither does
    when Triton is unavailable (then a warning says why, once)."""
    reason = triton_unavailable()
    if reason is not None:
        _warn_fallback(reason)
        return False
    return t.is_cuda or (t.device.type == "cpu" and interpreting())


def where_kernels_run() -> str:
    """``"native"`` (a CUDA GPU), ``"interpreted"`` (TRITON_INTERPRET) or ``"fallback"``, for the
    environment report."""
    if triton_unavailable() is not None:
        return "fallback"
    if interpreting():
        return "interpreted"
    return "native" if torch.cuda.is_available() else "fallback"


def capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (never on a machine without CUDA).
    Nothing may be timed then: timing synchronizes, which capture forbids."""
    try:
        return bool(torch.cuda.is_current_stream_capturing())
    except (RuntimeError, AssertionError, AttributeError):  # a CPU-only build of torch
        return False


def record_launch(name: str) -> None:
    launches[name] += 1


_NO_CONTEXT = contextlib.nullcontext()  # reusable: one for every CPU launch


def device_context(t: torch.Tensor):
    """Launch on the tensor's own GPU (not the current one); nothing to do on the CPU or when it
    is the current one (switching devices costs a few microseconds a launch)."""
    if not t.is_cuda or t.get_device() == torch.cuda.current_device():
        return _NO_CONTEXT
    return torch.cuda.device(t.device)


# The device types c10 names that autocast does not serve (meta, lazy...), asked of torch once.
# Any other type (a renamed PrivateUse1 backend's included) is served, as PrivateUse1 is.
NO_AUTOCAST = frozenset(
    name for name in ("cpu", "cuda", "ipu", "xpu", "opengl", "opencl", "ideep", "hip", "ve",
                      "fpga", "maia", "xla", "lazy", "vulkan", "mps", "meta", "hpu", "mtia",
                      "privateuseone")
    if not torch.amp.is_autocast_available(name)
)


def autocast_available_by_name(device_type: str) -> bool:
    """``torch.amp.is_autocast_available``, from the set above (a look-up: the plans' calls ask)."""
    return device_type not in NO_AUTOCAST


def autocast_off(t: torch.Tensor):
    """Around PyTorch ops (cuBLAS matmuls, the gated block's down projection) on operands
    already cast as ``F.linear`` is under autocast: autocast off for ``t``'s device, so that an
    enclosing block (a backward run under autocast included) does not cast them again; a shared
    no-op context while it is off (cheaper than a ``torch.autocast``)."""
    device_type = t.device.type
    if device_type not in NO_AUTOCAST and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return _NO_CONTEXT
