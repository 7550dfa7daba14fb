"""Where kernels run: natively on CUDA, under the Triton interpreter on the CPU, or not at all.

``launches`` counts every Triton kernel launch by kernel name, so tests can prove the kernel path
(not a PyTorch fallback) produced a result.
"""

import collections
import contextlib
import os

import torch

launches: collections.Counter = collections.Counter()


def interpreting() -> bool:
    """True when Triton runs kernels in its interpreter (``TRITON_INTERPRET=1`` before import)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def runs_triton(t: torch.Tensor) -> bool:
    """CUDA tensors always run the Triton kernels; CPU tensors only under the interpreter."""
    return t.is_cuda or (t.device.type == "cpu" and interpreting())


def record_launch(name: str) -> None:
    launches[name] += 1


def device_context(t: torch.Tensor):
    """Launch on the tensor's own GPU (not the current one); nothing to do on the CPU."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
