"""Per-problem plans: what a public entry point decided on a problem's first call, kept so that
a repeated call is one dictionary look-up and the call itself.

A *problem* is everything the checks and the route depend on: the entry point and its
non-tensor arguments, and each operand's type, shape, dtype and device; with the paths a
``force_path`` block forces (so a block takes effect on problems already planned). On its first
call the entry point validates the operands (``_checks.py``: a bad one is refused there, so a
problem with a plan is a valid one), resolves the activation, and decides the *route*:

- eager PyTorch's own ops under PyTorch's autograd: the fallback (no Triton kernel can run for
  the device), or every path of the op forced to "torch";
- the Triton launchers: an ``autograd.Function`` when a gradient is needed, the inference
  launcher alone when none is. Each launcher of the plan runs as chosen on its first call and
  is then bound to the problem (``ops/_core.bound_after_first`` and the kernels' ``*_launch``):
  its settled path, its kernel's config and grid and the arguments the problem fixes are kept,
  so a later call allocates, reads its operands' strides and launches.

Nothing below a plan validates again. Not planned: DTensor operands (tensor parallel), calls
under autocast, and calls while torch.compile traces (each is validated and routed every call).
The environment (``TRITON_GELU_PATH``, ``TRITON_GELU_TUNE``, ``TRITON_INTERPRET``) is read once,
when first needed (``_settings.py``); ``clear_plans()`` reads it again and makes every problem
plan anew, after a change; a chooser that forgets its choices drops the plans too
(``forget_plans``).
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Hashable

from ._settings import reread_environment

plans: dict[Hashable, Callable] = {}
# "planned": plans built (each one validated its operands once); tests count them.
counts: collections.Counter = collections.Counter()


def remember(key: Hashable, plan: Callable) -> Callable:
    """Keep ``plan`` for the problem ``key`` and return it."""
    plans[key] = plan
    counts["planned"] += 1
    return plan


def clear_plans() -> None:
    """Forget every plan, and the environment as read: the next call of each problem reads the
    environment, validates and routes again (public as ``triton_gelu.autotune.clear_plans``)."""
    plans.clear()
    reread_environment()


def forget_plans() -> None:
    """Forget every plan (and the launches they keep), not the environment: what a chooser
    that forgets its choices (``tuning.chooser.Chooser.forget``) calls, so that no plan keeps
    a launch it no longer would choose."""
    plans.clear()
