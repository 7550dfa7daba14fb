"""``linear_gelu``: y = act(x @ W^T + b), the activation in the matmul's epilogue
(``kernels/linear_gelu.py``).

The op's declaration: its checks, its custom ops (``triton_gelu::linear_gelu_fwd``,
``linear_preact``, ``linear_gelu_bwd``) with their fake functions, its one autograd definition
(the custom op's and the eager ``autograd.Function``'s), its DTensor sharding rules, its PyTorch
launchers (the fallback's), its eager PyTorch twin, and the public function with its per-problem
plan. The ops take ``x`` (..., K) with any number of leading dimensions and flatten it
themselves, on the tensors they are given: a DTensor sharded on a leading dimension reaches them
unflattened. Shared checks: ``_checks.py``; kernels, paths and config spaces:
``kernels/linear_gelu.py``; float64 truth: ``reference.py``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import SimpleNamespace

import torch

from .. import fallback, reference
from .._backend import launchers
from .._checks import check_linear, check_same_device, check_tensor
from .._declared import declare_sharding_rules
from .._plans import remember
from .._settings import forced_path
from ..activations import check_activation, resolve
from ._core import (
    Tensor, absent, autocast_linear, bound_launcher, bound_per_flags, counted, distributed,
    dtensor_ops, linear_act, linear_out_shape, needs_grad, new_like, on_fallback, or_absent,
    plan_key_unless_autocast, planned, register_autograd, rows, unless_autocast,
)

# ---- its checks (the shared ones: ``_checks.py``) -------------------------------------------


def check_linear_backward(
    dy2d: object, x2d: torch.Tensor, weight: torch.Tensor, preact: object
) -> None:
    """The backward's other operands, once x (flattened to ``x2d``) and weight passed
    ``check_linear``: dy and the saved pre-activation are (M, N)."""
    check_same_device([("x", x2d), ("dy", check_tensor("dy", dy2d)),
                       ("preact", check_tensor("preact", preact))])
    expected = (x2d.shape[0], weight.shape[0])
    for name, t in (("dy", dy2d), ("preact", preact)):
        if tuple(t.shape) != expected:
            raise ValueError(
                f"{name} must have shape (M, N) = {expected} for x of shape {tuple(x2d.shape)} "
                f"and weight of shape {tuple(weight.shape)}, got {tuple(t.shape)}"
            )


# ---- its PyTorch launchers: the fallback's (``fallback.py``), where no Triton kernel runs -------
# The kernels' math (``reference.py``'s float32 formulas, one rounding to the input dtype); only
# a tensor-parallel shard's plan reaches them (other plans there run the eager twin below).


@fallback.launcher(tensors=3)
def linear_gelu_forward(
    x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    activation: str, save_preact: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    preact = reference.linear_preact_fp32(x2d, weight, bias)
    y = reference.gelu_fp32(preact, activation).to(x2d.dtype)
    return y, (preact.to(x2d.dtype) if save_preact else None)


@fallback.launcher(tensors=3)
def linear_preact(
    x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    return reference.linear_preact_fp32(x2d, weight, bias).to(x2d.dtype)


@fallback.launcher(tensors=4)
def linear_gelu_backward(
    dy2d: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor, preact: torch.Tensor,
    activation: str, need_dx: bool, need_dw: bool, need_db: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    grads = reference.linear_gelu_backward_fp32(dy2d, x2d, weight, preact, activation)
    dx, dw, db = (g.to(x2d.dtype) if need else None
                  for g, need in zip(grads, (need_dx, need_dw, need_db)))
    return dx, dw, db


# The custom ops (``torch.ops.triton_gelu``) ``triton_gelu.ops`` re-exports from here.
CUSTOM_OPS = ("linear_gelu_fwd", "linear_preact_op", "linear_gelu_bwd")


# ---- the custom ops -------------------------------------------------------------------------


def _launch_forward(x, weight, bias, activation: str, save_preact: bool):
    x2d, shape = rows(x), linear_out_shape(x, weight)
    y, preact = launchers(x2d).linear_gelu_forward(x2d, weight, bias, activation, save_preact)
    return y.view(shape), (None if preact is None else preact.view(shape))


def eager_preact(x, weight, bias) -> Tensor:
    """z = x @ W^T + b by the launchers (the recompute of the backward, without the op's checks)."""
    x2d = rows(x)
    return launchers(x2d).linear_preact(x2d, weight, bias).view(linear_out_shape(x, weight))


def _launch_backward(dy, x, weight, preact, activation: str, need_dx: bool, need_dw: bool,
                     need_db: bool):
    x2d = rows(x)
    dx, dw, db = launchers(x2d).linear_gelu_backward(
        rows(dy), x2d, weight, rows(preact), activation, need_dx, need_dw, need_db)
    return (None if dx is None else dx.view(x.shape)), dw, db


@torch.library.custom_op("triton_gelu::linear_gelu_fwd", mutates_args=())
def linear_gelu_fwd(
    x: Tensor, weight: Tensor, bias: Tensor | None, activation: str, save_preact: bool
) -> tuple[Tensor, Tensor]:
    """(gelu(x @ weight.T + bias), the pre-activation if save_preact else an empty tensor), both
    (..., N) for x (..., K)."""
    check_linear(x, weight, bias)
    y, preact = _launch_forward(x, weight, bias, check_activation(activation), save_preact)
    return y, or_absent(preact, y)


@linear_gelu_fwd.register_fake
def _linear_gelu_fwd_fake(x, weight, bias, activation, save_preact):
    y = new_like(x, linear_out_shape(x, weight))
    return y, (new_like(y) if save_preact else absent(y))


@torch.library.custom_op("triton_gelu::linear_preact", mutates_args=())
def linear_preact_op(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """preact = x @ weight.T + bias (the backward recomputes it when it was not saved)."""
    check_linear(x, weight, bias)
    return eager_preact(x, weight, bias)


@linear_preact_op.register_fake
def _linear_preact_fake(x, weight, bias):
    return new_like(x, linear_out_shape(x, weight))


@torch.library.custom_op("triton_gelu::linear_gelu_bwd", mutates_args=())
def linear_gelu_bwd(
    dy: Tensor, x: Tensor, weight: Tensor, preact: Tensor, activation: str,
    need_dx: bool, need_dw: bool, need_db: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dw, db) of y = gelu(x @ weight.T + bias); an empty tensor for each one not needed.
    dy and preact are (..., N) for x (..., K); dx has x's shape."""
    check_linear(x, weight, None)
    check_linear_backward(rows(check_tensor("dy", dy)), rows(x), weight,
                          rows(check_tensor("preact", preact)))
    grads = _launch_backward(dy, x, weight, preact, check_activation(activation), need_dx,
                             need_dw, need_db)
    dx, dw, db = (or_absent(g, dy) for g in grads)
    return dx, dw, db


@linear_gelu_bwd.register_fake
def _linear_gelu_bwd_fake(dy, x, weight, preact, activation, need_dx, need_dw, need_db):
    dx = new_like(x) if need_dx else absent(dy)
    dw = new_like(weight) if need_dw else absent(dy)
    db = new_like(weight, (weight.shape[0],)) if need_db else absent(dy)
    return dx, dw, db


# ---- the autograd definition ----------------------------------------------------------------


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, activation, save_preact = inputs
    ctx.activation, ctx.save_preact, ctx.has_bias = activation, save_preact, bias is not None
    # Without a saved pre-activation (recompute) the backward rebuilds it from x, W and b:
    # one (M, N) tensor less between forward and backward.
    ctx.save_for_backward(x, weight, output[1] if save_preact else bias)


def _backward(ctx, dy: Tensor, dpreact: Tensor | None):
    x, weight, saved = ctx.saved_tensors
    calls = ctx.calls
    preact = saved if ctx.save_preact else calls.preact(x, weight, saved)
    need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
    need_db = need_db and ctx.has_bias
    dx, dw, db = calls.backward(dy, x, weight, preact, ctx.activation, need_dx, need_dw, need_db)
    return (dx if need_dx else None, dw if need_dw else None, db if need_db else None,
            None, None)


LinearGELUFunction = register_autograd(
    linear_gelu_fwd, "LinearGELUFunction", _setup_context, _backward,
    traced=SimpleNamespace(preact=linear_preact_op, backward=linear_gelu_bwd))


def _bound_calls(backend, x: Tensor, weight: Tensor, activation: str,
                 save_preact: bool) -> SimpleNamespace:
    """The Function's calls for one problem, each bound to it after its first call
    (``_core.bound_after_first``): ``forward`` (x, weight, bias: ``_launch_forward``'s tensors),
    ``preact`` and ``backward`` (the signatures of ``eager_preact`` and ``_launch_backward``)."""
    shape = linear_out_shape(x, weight)
    forward2d = bound_launcher(backend, "linear_gelu_forward", activation, save_preact)
    preact2d = bound_launcher(backend, "linear_preact")
    backward2d = bound_per_flags(
        lambda needs: bound_launcher(backend, "linear_gelu_backward", activation, *needs))

    def forward(x, weight, bias):
        outputs = forward2d(rows(x), weight, bias)
        if len(shape) == 2:  # the kernel's (M, N) already
            return outputs
        return tuple(None if t is None else t.view(shape) for t in outputs)

    def preact(x, weight, bias):
        return preact2d(rows(x), weight, bias).view(shape)

    def backward(dy, x, weight, preact, activation, need_dx, need_dw, need_db):
        dx, dw, db = backward2d((need_dx, need_dw, need_db))(rows(dy), rows(x), weight,
                                                             rows(preact))
        return (None if dx is None else dx.view(x.shape)), dw, db
    return SimpleNamespace(forward=forward, preact=preact, backward=backward,
                           constants=(activation, save_preact))


def traced(x: Tensor, weight: Tensor, bias: Tensor | None, activation: str,
           recompute: bool) -> Tensor:
    """``linear_gelu`` through the custom op (torch.compile's trace, a DTensor's shards), for
    operands already validated and cast for autocast."""
    save_preact = needs_grad(x, weight, bias) and not recompute
    return linear_gelu_fwd(x, weight, bias, activation, save_preact)[0]


# ---- its DTensor sharding rules --------------------------------------------------------------


@declare_sharding_rules
def sharding_rules(lay) -> dict:
    """{custom op: its DTensor sharding rule}, registered by ``_dtensor_rules`` (``lay``: that
    module, the layouts) on the first DTensor: each of ``lay.linear_layouts``."""
    def forward(x, weight, bias, activation, save_preact):  # outputs (y, z | empty)
        return [([lo.y, lay.wanted(lo.y, save_preact)],
                 [lo.x, lo.weight, lay.if_present(bias, lo.bias), None, None])
                for lo in lay.linear_layouts(x.ndim)]

    def preact(x, weight, bias):
        return [([lo.y], [lo.x, lo.weight, lay.if_present(bias, lo.bias)])
                for lo in lay.linear_layouts(x.ndim)]

    def backward(dy, x, weight, preact, activation, need_dx, need_dw, need_db):
        return [([lay.wanted(lo.dx, need_dx), lay.wanted(lo.dweight, need_dw),
                  lay.wanted(lo.dbias, need_db)],
                 [lo.y, lo.x, lo.weight, lo.y, None, None, None, None])
                for lo in lay.linear_layouts(x.ndim)]
    ops = torch.ops.triton_gelu
    return {ops.linear_gelu_fwd.default: forward, ops.linear_preact.default: preact,
            ops.linear_gelu_bwd.default: backward}


# ---- the public function --------------------------------------------------------------------


def linear_gelu(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, approximate: str = "none",
    recompute: bool = False, *, activation: str | None = None,
) -> Tensor:
    """``F.gelu(F.linear(x, weight, bias), approximate)`` in one fused Triton kernel.

    x (..., in_features), weight (out_features, in_features), bias (out_features,) or None;
    float32, float16 or bfloat16, all of one dtype (under autocast they are cast to the autocast
    dtype first, as for ``F.linear``). Returns (..., out_features) in that dtype. Differentiable
    in x, weight and bias. ``recompute=True`` saves memory: the backward recomputes the
    pre-activation x @ W^T + b instead of keeping it from the forward. ``activation``: as in
    ``gelu``.
    """
    plan, key = planned("linear_gelu", (approximate, activation, recompute), x, weight, bias)
    if plan is not None:
        return plan(x, weight, bias)
    return _unplanned(x, weight, bias, resolve(approximate, activation), recompute, key)


def _unplanned(x, weight, bias, activation: str, recompute: bool, key=None) -> Tensor:
    """``linear_gelu`` without a plan: validate, cast for autocast, route; plan the problem
    under ``key`` (None: do not)."""
    check_tensor("x", x)
    x, weight, bias = autocast_linear(x, weight, bias)
    check_linear(x, weight, bias)
    if distributed(x, weight, bias):  # DTensor: the custom ops, run on the local shards
        return _on_dtensors(x, weight, bias, activation, recompute)
    if torch.compiler.is_compiling():  # torch.compile traces the custom ops
        return traced(x, weight, bias, activation, recompute)
    key = plan_key_unless_autocast(key, x)
    if key is None:  # not planned: routed for this call alone
        return _plan(x, weight, activation, recompute)(x, weight, bias)
    return remember(key, _plan(x, weight, activation, recompute, functools.partial(
        _unplanned, activation=activation, recompute=recompute)))(x, weight, bias)


def _on_dtensors(x, weight, bias, activation: str, recompute: bool) -> Tensor:
    """``linear_gelu`` of DTensors (validated, cast for autocast): the custom ops on the local
    shards where a layout their rules serve fits (``_dtensor.fusable_layout``), else the unfused
    ops, with a warning."""
    dtensors = dtensor_ops()
    dtensors.require_dtensors(x=x, weight=weight, bias=bias)
    if dtensors.fusable_layout(x, weight, bias):
        return traced(x, weight, bias, activation, recompute)
    dtensors.warn_unfused(
        "Linear+GELU kernels", dtensors.placements(x=x, weight=weight, bias=bias),
        "GELU needs the whole pre-activation, not a partial sum or a mismatched split",
        "Make linear1 column-parallel (triton_gelu.parallel.ColwiseParallel) to fuse.",
    )
    return linear_act(activation, dtensors.linear)(x, weight, bias)


def _plan(x: Tensor, weight: Tensor, activation: str, recompute: bool,
          replan: Callable | None = None):
    """The problem's route: eager PyTorch's ops (the fallback, or its paths forced to "torch"),
    or the Triton launchers, guarded by ``unless_autocast`` with ``replan``."""
    eager = linear_act(activation)
    if on_fallback(x):
        return eager
    if forced_path("linear_gelu_fwd") == "torch" and forced_path("linear_gelu_bwd") == "torch":
        return counted("linear_gelu_fwd", "linear_gelu_bwd", eager)
    backend = launchers(x)
    calls = _bound_calls(backend, x, weight, activation, save_preact=not recompute)
    # Inference: no graph and no saved pre-activation; the kernel writes only y.
    infer = _bound_calls(backend, x, weight, activation, save_preact=False).forward

    def launch(x, weight, bias):
        if needs_grad(x, weight, bias):
            return LinearGELUFunction.apply(x, weight, bias, calls)
        return infer(x, weight, bias)[0]
    return unless_autocast(launch, x, replan)
