"""``gelu``: y = act(x), elementwise, with the Triton kernels of ``kernels/gelu.py``.

The op's declaration: its custom ops (``triton_gelu::gelu_fwd`` / ``gelu_bwd``) with their fake
functions, its one autograd definition (the custom op's and the eager ``autograd.Function``'s),
its DTensor sharding rules, its PyTorch launchers (the fallback's), its eager PyTorch twin (the
fallback and the forced "torch" paths), and the public function with its per-problem plan.
Shared checks: ``_checks.py``; kernels, paths and config spaces: ``kernels/gelu.py``; float64
truth: ``reference.py``.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from .. import fallback, reference
from .._backend import launchers
from .._checks import check_tensor
from .._declared import declare_sharding_rules
from .._plans import remember
from .._settings import forced_path
from ..activations import ACTIVATIONS, check_activation, resolve
from ._core import (
    Tensor, bound_launcher, counted, distributed, dtensor_ops, new_like, on_fallback, planned,
    register_autograd,
)

# ---- its PyTorch launchers: the fallback's (``fallback.py``), where no Triton kernel runs -------
# The kernels' math (``reference.py``'s float32 formulas, one rounding to the input dtype); only
# a tensor-parallel shard's plan reaches them (other plans there run the eager twin below).


@fallback.launcher(tensors=1)
def gelu_forward(
    x: torch.Tensor, activation: str, out: torch.Tensor | None = None
) -> torch.Tensor:
    if out is None:
        out = new_like(x)
    return out.copy_(reference.gelu_fp32(x, activation))


@fallback.launcher(tensors=2)
def gelu_backward(
    dy: torch.Tensor, x: torch.Tensor, activation: str, out: torch.Tensor | None = None
) -> torch.Tensor:
    if out is None:
        out = new_like(x)
    return out.copy_(dy.float() * reference.gelu_grad_fp32(x, activation))


# The custom ops (``torch.ops.triton_gelu``) ``triton_gelu.ops`` re-exports from here.
CUSTOM_OPS = ("gelu_fwd", "gelu_bwd")


# ---- the custom ops -------------------------------------------------------------------------


def _launch_forward(x: Tensor, activation: str) -> Tensor:
    return launchers(x).gelu_forward(x, activation)


def _launch_backward(dy: Tensor, x: Tensor, activation: str) -> Tensor:
    return launchers(x).gelu_backward(dy, x, activation)


@torch.library.custom_op("triton_gelu::gelu_fwd", mutates_args=())
def gelu_fwd(x: Tensor, activation: str) -> Tensor:
    """y = gelu(x), a new contiguous tensor of x's shape and dtype."""
    check_tensor("x", x)
    return _launch_forward(x, check_activation(activation))


@gelu_fwd.register_fake
def _gelu_fwd_fake(x: Tensor, activation: str) -> Tensor:
    return new_like(x)


@torch.library.custom_op("triton_gelu::gelu_bwd", mutates_args=())
def gelu_bwd(dy: Tensor, x: Tensor, activation: str) -> Tensor:
    """dx = dy * gelu'(x), a new contiguous tensor of x's shape and dtype."""
    check_tensor("x", x)
    check_tensor("dy", dy)
    if dy.shape != x.shape:
        raise ValueError(f"dy must have x's shape {tuple(x.shape)}, got {tuple(dy.shape)}")
    return _launch_backward(dy, x, check_activation(activation))


@gelu_bwd.register_fake
def _gelu_bwd_fake(dy: Tensor, x: Tensor, activation: str) -> Tensor:
    return new_like(x)


# ---- the autograd definition ----------------------------------------------------------------


def _setup_context(ctx, inputs, output) -> None:
    x, activation = inputs
    ctx.activation = activation
    ctx.save_for_backward(x)


def _backward(ctx, dy: Tensor):
    (x,) = ctx.saved_tensors
    return ctx.calls.backward(dy, x, ctx.activation), None


GELUFunction = register_autograd(gelu_fwd, "GELUFunction", _setup_context, _backward,
                                 traced=SimpleNamespace(backward=gelu_bwd))


def _bound_calls(backend, activation: str) -> SimpleNamespace:
    """The Function's calls for one problem (``forward``: x -> y; ``backward``: the signature
    of ``_launch_backward``), each bound to it after its first call."""
    forward = bound_launcher(backend, "gelu_forward", activation)
    backward = bound_launcher(backend, "gelu_backward", activation)
    return SimpleNamespace(forward=forward, backward=lambda dy, x, activation: backward(dy, x),
                           constants=(activation,))


# ---- its DTensor sharding rules --------------------------------------------------------------


@declare_sharding_rules
def sharding_rules(lay) -> dict:
    """{custom op: its DTensor sharding rule}, registered by ``_dtensor_rules`` (``lay``: that
    module, the layouts) on the first DTensor: GELU is elementwise, y and dx split as x."""
    ops = torch.ops.triton_gelu
    return {
        ops.gelu_fwd.default: lambda x, activation: [
            ([p], [p, None]) for p in lay.elementwise_layouts(x.ndim)],
        ops.gelu_bwd.default: lambda dy, x, activation: [
            ([p], [p, p, None]) for p in lay.elementwise_layouts(x.ndim)],
    }


# ---- the public function --------------------------------------------------------------------


def gelu(x: Tensor, approximate: str = "none", *, activation: str | None = None) -> Tensor:
    """``torch.nn.functional.gelu(x, approximate)`` with Triton kernels for forward and backward.

    ``approximate="none"`` is the exact form x * Phi(x); ``"tanh"`` the tanh approximation.
    ``activation`` names the form instead (``triton_gelu.activations``: "gelu", "gelu_tanh",
    "quick_gelu" = x * sigmoid(1.702 x), CLIP's); every function and module takes it.
    float32, float16 and bfloat16 inputs of any shape; math in float32, output in x's dtype.
    """
    plan, key = planned("gelu", (approximate, activation), x)
    if plan is not None:
        return plan(x)
    activation = resolve(approximate, activation)
    check_tensor("x", x)
    if distributed(x):  # DTensor: the custom op, whose sharding rule runs it on the local shard
        dtensor_ops()  # imported on the first DTensor: it registers the ops' sharding rules
        return gelu_fwd(x, activation)
    if torch.compiler.is_compiling():  # torch.compile traces the custom op, not the Function
        return gelu_fwd(x, activation)
    return remember(key, _plan(x, activation))(x)


def _plan(x: Tensor, activation: str):
    eager = ACTIVATIONS[activation].torch_value
    if on_fallback(x):
        return eager
    if forced_path("gelu_fwd") == "torch" and forced_path("gelu_bwd") == "torch":
        return counted("gelu_fwd", "gelu_bwd", eager)
    calls = _bound_calls(launchers(x), activation)
    infer = calls.forward

    def run(x: Tensor) -> Tensor:
        if x.requires_grad and torch.is_grad_enabled():  # ``needs_grad(x)``, a frame less
            return GELUFunction.apply(x, calls)
        return infer(x)  # inference: no graph, nothing saved
    return run
