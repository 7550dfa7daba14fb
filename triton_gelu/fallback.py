"""The launchers in PyTorch, for tensors no Triton kernel serves: CPU tensors outside the
interpreter, and every tensor when Triton is not installed (or does not import).

Same arguments and outputs as ``triton_gelu.kernels``, and, like them, no validation: their
callers validated the operands (the public functions once per problem, the custom ops at each
call). Each op declares its own in its module (``ops/<op>.py``, with ``@fallback.launcher``):
the kernels' math (``reference.py``'s float32 formulas, one rounding to the input dtype). This
module is where ``_backend.launchers`` finds them, under the kernels' names; each with its
per-problem launch (``<name>_launch``), which keeps nothing here (there is no launch to keep):
it is the launcher with the call's flags. Only a tensor-parallel shard's plan reaches them on a
machine without Triton; every other plan there runs eager PyTorch's own ops.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import reference

# The launchers' names, sorted as ``triton_gelu.kernels.__all__`` (the ops add theirs on import).
__all__: list[str] = []


def launcher(tensors: int | tuple[int, ...]) -> Callable[[Callable], Callable]:
    """Decorator: an op's PyTorch launcher, made ``fallback.<its name>``, with its per-problem
    launch ``fallback.<its name>_launch``. ``tensors``: which of its positional parameters a
    plan's bound launch takes per call (the first n, or these positions); the others are the
    problem's flags."""
    positions = tuple(range(tensors)) if isinstance(tensors, int) else tuple(tensors)

    def register(fn: Callable) -> Callable:
        def launch(*args) -> Callable:
            flags = {i: arg for i, arg in enumerate(args) if i not in positions}

            def run(*operands):
                merged = {**flags, **dict(zip(positions, operands))}
                return fn(*(merged[i] for i in range(len(merged))))
            return run

        globals()[fn.__name__] = fn
        globals()[f"{fn.__name__}_launch"] = launch
        __all__.append(fn.__name__)
        __all__.sort()
        return fn
    return register


def kernels_mask(seed: torch.Tensor | None, p: float, rows: int, cols: int, col_offset: int,
                 n_cols: int) -> torch.Tensor | None:
    """The kernels' dropout mask of columns ``col_offset`` .. ``col_offset + cols`` of an
    activation of ``n_cols``, drawn by the PyTorch copy of their generator (None without
    dropout)."""
    if p == 0.0 or seed is None:
        return None
    return reference.dropout_keep(seed, rows, cols, p, col_offset, n_cols)
