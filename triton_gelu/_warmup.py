"""Tuning ahead of time: one forward and backward of a model, leaving nothing behind.

No Triton here: ``triton_gelu.autotune`` re-exports ``warmup`` and must import without Triton.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from ._runtime import runs_triton
from ._settings import tune_policy


def _tensors(obj: object) -> Iterator[torch.Tensor]:
    """Every tensor in nested tuples, lists and dicts (Hugging Face outputs are dicts)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value)
    elif isinstance(obj, (tuple, list)):
        for value in obj:
            yield from _tensors(value)


def _choices_made() -> int:
    # Imports Triton: only reached where a kernel can run.
    from .tuning.paths import path_choosers
    from .tuning.tuner import tuners

    return sum(len(t.choices) for t in tuners.values()) + \
        sum(len(p.choices) for p in path_choosers.values())


def warmup(model: nn.Module, example_inputs: tuple) -> int:
    """Tune every triton_gelu kernel and path ``model`` launches, before the first real step.

    Runs ``model(*example_inputs)`` once and a backward from every floating-point output that
    requires grad, under the tuning policy in force (``TRITON_GELU_TUNE``, ``set_policy``), so
    the choices are made (or read from the cache) now, outside any CUDA-graph capture and outside
    the timed part of a job. Pass inputs of the shapes and dtypes of the real ones; an input that
    requires grad in the real run should require grad here (its gradient kernel is then tuned).

    Nothing is left behind: the backward uses ``torch.autograd.grad`` (no ``.grad`` is written;
    each parameter's ``.grad`` is restored as it was, None included), the graph is freed, buffers
    (BatchNorm statistics) are restored, and the random number generators of the CPU and of the
    model's GPUs are restored (dropout draws do not shift the run). Call it on the bare module,
    before wrapping it in DDP or FSDP (their hooks expect a real ``.backward()``).

    Returns how many problems were chosen (tuned, or read from the cache or the table); 0 where
    no Triton kernel runs (the PyTorch fallback on the CPU), where it does nothing.
    """
    tune_policy()  # a bad TRITON_GELU_TUNE is refused here too
    if not isinstance(example_inputs, tuple):
        raise TypeError("example_inputs must be a tuple of the model's positional arguments, "
                        f"got {type(example_inputs).__name__}")
    params = list(model.parameters())
    inputs = [t for t in _tensors(example_inputs) if t.is_floating_point()]
    if not any(runs_triton(t) for t in [*params, *inputs]):
        return 0
    before = _choices_made()
    grads = [p.grad for p in params]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    devices = sorted({t.device.index for t in [*params, *inputs] if t.is_cuda})
    try:
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            outputs = model(*example_inputs)
            roots = [t for t in _tensors(outputs) if t.is_floating_point() and t.requires_grad]
            leaves = [t for t in [*params, *inputs] if t.requires_grad]
            if roots and leaves:
                torch.autograd.grad(roots, leaves, [torch.ones_like(t) for t in roots],
                                    allow_unused=True)
            del outputs, roots
    finally:
        for p, grad in zip(params, grads):
            p.grad = grad
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
    return _choices_made() - before
