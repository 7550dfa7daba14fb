"""``feed_forward``: y = linear2(dropout(act(linear1(x)))), the FFN block as one autograd node
(``kernels/ffn.py``): act and dropout in the first matmul's epilogue, the backward keeping x and
the pre-activation z (or x alone, ``recompute``) and the dropout seed, never act(z) or the mask.

The op's declaration: its checks, its custom ops (``triton_gelu::ffn_fwd`` / ``ffn_bwd``, on 2-D
x: the public function flattens it; under tensor parallel ``_dtensor.py`` calls them on each
rank's local tensors) with their fake functions, its one autograd definition (the custom op's
and the eager ``autograd.Function``'s), its DTensor sharding rules, its PyTorch launchers (the
fallback's), its eager PyTorch twin, and the public function with its per-problem plan. The ops
take the dropout seed as a tensor (``dropout_seed``, drawn in the traced graph by
``torch.randint``; None when p == 0) and p as a float, with the position of the call's hidden
columns in the whole hidden layer (``col_offset``, ``n_cols``: a tensor-parallel rank's shard,
whose mask is the single-process one's columns; by default the whole layer). Shared checks:
``_checks.py``; kernels, paths and config spaces: ``kernels/ffn.py``; float64 truth:
``reference.py``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from .. import fallback, reference
from .._backend import launchers
from .._checks import (
    check_dropout, check_dropout_columns, check_dropout_p, check_linear, check_same_device,
    check_tensor, check_weight_and_bias,
)
from .._declared import declare_sharding_rules
from .._plans import remember
from .._settings import forced_path
from ..activations import check_activation, resolve
from . import linear_gelu as _linear_gelu
from ._core import (
    BlockConfig, Tensor, absent, autocast_linear, bound_launcher, bound_per_flags, counted,
    distributed, dropout_seed, dtensor_ops, linear_act, needs_grad, new_like, on_fallback,
    or_absent, plan_key_unless_autocast, planned, register_autograd, rows, unless_autocast,
)

# ---- its checks (the shared ones: ``_checks.py``) -------------------------------------------


def check_ffn(
    x: object, w1: object, b1: object | None, w2: object, b2: object | None
) -> None:
    """The FFN block's operands: x (..., D), w1 (F, D), b1 (F,), w2 (D_out, F), b2 (D_out,),
    all of one dtype and on one device."""
    check_linear(x, w1, b1, "w1", "b1")
    check_weight_and_bias(("x", x), w2, b2, "w2", "b2")
    if w2.shape[1] != w1.shape[0]:
        raise ValueError(
            f"linear2 in_features mismatch: w1 has shape {tuple(w1.shape)} (hidden features "
            f"{w1.shape[0]}) but w2 has shape {tuple(w2.shape)} (in_features {w2.shape[1]})"
        )


def check_ffn_2d(
    x2d: object, w1: object, b1: object | None, w2: object, b2: object | None, seed: object,
    p: object,
) -> float:
    """``check_ffn`` for the launchers, which take x flattened to (M, D), and the dropout
    arguments; returns p as a float."""
    check_ffn(x2d, w1, b1, w2, b2)
    if x2d.dim() != 2:
        raise ValueError(f"x must be 2-D (M, in_features) here, got shape {tuple(x2d.shape)}")
    return check_dropout(seed, p, x2d)


def check_ffn_backward(
    dy2d: object, x2d: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, preact: object,
    seed: object, p: object,
) -> float:
    """The backward launchers' operands: dy (M, D_out) and the pre-activation z (M, F)."""
    p = check_ffn_2d(x2d, w1, None, w2, None, seed, p)
    check_same_device([("x", x2d), ("dy", check_tensor("dy", dy2d)),
                       ("preact", check_tensor("preact", preact))])
    for name, t, expected in (("dy", dy2d, (x2d.shape[0], w2.shape[0])),
                              ("preact", preact, (x2d.shape[0], w1.shape[0]))):
        if tuple(t.shape) != expected:
            raise ValueError(
                f"{name} must have shape {expected} for x of shape {tuple(x2d.shape)}, "
                f"w1 of shape {tuple(w1.shape)} and w2 of shape {tuple(w2.shape)}, "
                f"got {tuple(t.shape)}"
            )
    return p


def check_ffn_needs(needs: object) -> tuple[bool, ...]:
    """Which of the backward's (dx, dW1, db1, dW2, db2) to compute: five booleans."""
    needs = tuple(bool(n) for n in needs)
    if len(needs) != 5:
        raise ValueError(f"needs must say which of (dx, dW1, db1, dW2, db2) to compute: five "
                         f"booleans, got {len(needs)}")
    return needs


# ---- its PyTorch launchers: the fallback's (``fallback.py``), where no Triton kernel runs -------
# The kernels' math (``reference.py``'s float32 formulas, one rounding to the input dtype); only
# a tensor-parallel shard's plan reaches them (other plans there run the eager twin below).


@fallback.launcher(tensors=6)
def ffn_forward(
    x2d: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
    b2: torch.Tensor | None, seed: torch.Tensor | None, p: float, activation: str,
    save_preact: bool, col_offset: int = 0, n_cols: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    columns = col_offset, w1.shape[0] if n_cols is None else n_cols
    keep = fallback.kernels_mask(seed, p, x2d.shape[0], w1.shape[0], *columns)
    y, preact = reference.ffn_forward_fp32(
        x2d, w1, b1, w2, b2, keep, reference.dropout_constants(p)[1], activation
    )
    return y.to(x2d.dtype), (preact.to(x2d.dtype) if save_preact else None)


@fallback.launcher(tensors=6)
def ffn_backward(
    dy2d: torch.Tensor, x2d: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
    preact: torch.Tensor, seed: torch.Tensor | None, p: float, activation: str,
    needs: Sequence[bool], col_offset: int = 0, n_cols: int | None = None,
) -> tuple[torch.Tensor | None, ...]:
    columns = col_offset, w1.shape[0] if n_cols is None else n_cols
    keep = fallback.kernels_mask(seed, p, preact.shape[0], preact.shape[1], *columns)
    grads = reference.ffn_backward_fp32(
        dy2d, x2d, w1, w2, preact, keep, reference.dropout_constants(p)[1], activation
    )
    return tuple(g.to(x2d.dtype) if need else None for g, need in zip(grads, needs))


# The custom ops (``torch.ops.triton_gelu``) ``triton_gelu.ops`` re-exports from here.
CUSTOM_OPS = ("ffn_fwd", "ffn_bwd")


# ---- the custom ops -------------------------------------------------------------------------


def _launch_forward(x, w1, b1, w2, b2, seed, p: float, activation: str, save_preact: bool,
                    col_offset: int = 0, n_cols: int | None = None):
    return launchers(x).ffn_forward(x, w1, b1, w2, b2, seed, p, activation,
                                     save_preact=save_preact, col_offset=col_offset,
                                     n_cols=n_cols)


def _launch_backward(dy, x, w1, w2, preact, seed, p: float, activation: str, needs,
                     col_offset: int = 0, n_cols: int | None = None):
    return launchers(x).ffn_backward(dy, x, w1, w2, preact, seed, p, activation, needs,
                                     col_offset, n_cols)


@torch.library.custom_op("triton_gelu::ffn_fwd", mutates_args=())
def ffn_fwd(
    x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None,
    seed: Tensor | None, p: float, activation: str, save_preact: bool,
    col_offset: int = 0, n_cols: int | None = None,
) -> tuple[Tensor, Tensor]:
    """(linear2(dropout(gelu(linear1(x)))), the pre-activation if save_preact else empty)."""
    p = check_ffn_2d(x, w1, b1, w2, b2, seed, p)
    col_offset, n_cols = check_dropout_columns(col_offset, n_cols, w1.shape[0])
    y, preact = _launch_forward(x, w1, b1, w2, b2, seed, p, check_activation(activation),
                                save_preact, col_offset, n_cols)
    return y, or_absent(preact, y)


@ffn_fwd.register_fake
def _ffn_fwd_fake(x, w1, b1, w2, b2, seed, p, activation, save_preact, col_offset=0,
                  n_cols=None):
    y = new_like(x, (x.shape[0], w2.shape[0]))
    return y, (new_like(x, (x.shape[0], w1.shape[0])) if save_preact else absent(y))


@torch.library.custom_op("triton_gelu::ffn_bwd", mutates_args=())
def ffn_bwd(
    dy: Tensor, x: Tensor, w1: Tensor, w2: Tensor, preact: Tensor, seed: Tensor | None,
    p: float, activation: str, needs: list[bool], col_offset: int = 0,
    n_cols: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dw1, db1, dw2, db2) of the FFN block; an empty tensor for each one not needed."""
    p = check_ffn_backward(dy, x, w1, w2, preact, seed, p)
    needs = check_ffn_needs(needs)
    col_offset, n_cols = check_dropout_columns(col_offset, n_cols, w1.shape[0])
    grads = _launch_backward(dy, x, w1, w2, preact, seed, p, check_activation(activation),
                             needs, col_offset, n_cols)
    dx, dw1, db1, dw2, db2 = (or_absent(g, dy) for g in grads)
    return dx, dw1, db1, dw2, db2


@ffn_bwd.register_fake
def _ffn_bwd_fake(dy, x, w1, w2, preact, seed, p, activation, needs, col_offset=0,
                  n_cols=None):
    shapes = (x.shape, w1.shape, (w1.shape[0],), w2.shape, (w2.shape[0],))
    return tuple(new_like(x, shape) if need else absent(dy)
                 for shape, need in zip(shapes, needs))


# ---- the autograd definition ----------------------------------------------------------------


def _setup_context(ctx, inputs, output) -> None:
    x, w1, b1, w2, b2, seed, p, activation, save_preact, *columns = inputs
    preact = output[1]
    ctx.p, ctx.activation, ctx.save_preact = p, activation, save_preact
    ctx.columns = columns  # (col_offset, n_cols) where the call passed them
    ctx.has_bias = (b1 is not None, b2 is not None)
    # x and z (or, without a saved z, b1 to rebuild it) and the seed (8 bytes): never act(z),
    # the mask or the dropout output, which the backward regenerates from z and the seed.
    ctx.save_for_backward(x, w1, w2, preact if save_preact else b1, seed)


def _backward(ctx, dy: Tensor, dpreact: Tensor | None):
    x, w1, w2, saved, seed = ctx.saved_tensors
    calls = ctx.calls
    preact = saved if ctx.save_preact else calls.preact(x, w1, saved)
    need_dx, need_dw1, need_db1, need_dw2, need_db2 = ctx.needs_input_grad[:5]
    needs = [need_dx, need_dw1, need_db1 and ctx.has_bias[0], need_dw2,
             need_db2 and ctx.has_bias[1]]
    grads = calls.backward(dy, x, w1, w2, preact, seed, ctx.p, ctx.activation, needs,
                           *ctx.columns)
    return (*(g if need else None for g, need in zip(grads, needs)),
            *(None,) * (4 + len(ctx.columns)))


FeedForwardFunction = register_autograd(
    ffn_fwd, "FeedForwardFunction", _setup_context, _backward,
    traced=SimpleNamespace(preact=_linear_gelu.linear_preact_op, backward=ffn_bwd))


def _bound_calls(backend, config: BlockConfig, save_preact: bool) -> SimpleNamespace:
    """The Function's calls for one problem, on 2-D x, each bound to it after its first call
    (``_core.bound_after_first``): ``forward`` (``_launch_forward``'s tensors, x2d .. seed),
    ``preact`` and ``backward`` (the signatures of ``linear_gelu.eager_preact`` and
    ``_launch_backward``)."""
    p, activation, _, col_offset, n_cols = config
    fixed = (p, activation, save_preact, col_offset, n_cols)
    forward = bound_launcher(backend, "ffn_forward", *fixed)
    backward = bound_per_flags(lambda needs: bound_launcher(
        backend, "ffn_backward", p, activation, needs, col_offset, n_cols))
    return SimpleNamespace(
        forward=forward,
        preact=bound_launcher(backend, "linear_preact"),
        backward=lambda dy, x2d, w1, w2, preact, seed, p, activation, needs, *_: backward(
            tuple(needs))(dy, x2d, w1, w2, preact, seed),
        constants=fixed)


def traced(x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None,
           seed: Tensor | None, p: float, activation: str, recompute: bool,
           col_offset: int = 0, n_cols: int | None = None) -> Tensor:
    """``feed_forward`` through the custom ops (torch.compile's trace, the compile route), for
    operands already validated and cast for autocast, the call's seed already drawn."""
    save_preact = needs_grad(x, w1, b1, w2, b2) and not recompute
    y, _ = ffn_fwd(rows(x), w1, b1, w2, b2, seed, p, activation, save_preact, col_offset,
                   n_cols)
    return y.view(*x.shape[:-1], w2.shape[0])


# ---- its DTensor sharding rules --------------------------------------------------------------


@declare_sharding_rules
def sharding_rules(lay) -> dict:
    """{custom op: its DTensor sharding rule}, registered by ``_dtensor_rules`` (``lay``: that
    module, the layouts) on the first DTensor: replicated, or split on the rows without
    dropout (``lay.rule_block_layouts``; tensor parallel runs the ops on the local tensors)."""
    def forward(x, w1, b1, w2, b2, seed, p, activation, save_preact, col_offset=0,
                n_cols=None):  # outputs (y, z | empty)
        return [([lo.last.y, lay.wanted(lo.first.y, save_preact)],
                 [lo.first.x, lo.first.weight, lay.if_present(b1, lo.first.bias), lo.last.weight,
                  lay.if_present(b2, lo.last.bias), lay.if_present(seed, lay.R), None, None,
                  None, None, None])
                for lo in lay.rule_block_layouts(x.ndim, p > 0.0)]

    def backward(dy, x, w1, w2, preact, seed, p, activation, needs, col_offset=0,
                 n_cols=None):  # outputs (dx, dW1, db1, dW2, db2), each empty unless asked for
        return [([lay.wanted(placement, wanted) for placement, wanted in zip(
                    (lo.first.dx, lo.first.dweight, lo.first.dbias, lo.last.dweight,
                     lo.last.dbias), needs)],
                 [lo.last.y, lo.first.x, lo.first.weight, lo.last.weight, lo.first.y,
                  lay.if_present(seed, lay.R), None, None, None, None, None])
                for lo in lay.rule_block_layouts(x.ndim, p > 0.0)]
    ops = torch.ops.triton_gelu
    return {ops.ffn_fwd.default: forward, ops.ffn_bwd.default: backward}


# ---- the public function --------------------------------------------------------------------


def feed_forward(
    x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None, p: float = 0.0,
    approximate: str = "none", training: bool = True, recompute: bool = False, *,
    activation: str | None = None,
) -> Tensor:
    """``F.linear(F.dropout(F.gelu(F.linear(x, w1, b1), approximate), p, training), w2, b2)``
    as one fused autograd node.

    x (..., D), w1 (F, D), b1 (F,) or None, w2 (E, F), b2 (E,) or None; float32, float16 or
    bfloat16, all of one dtype (under autocast they are cast to the autocast dtype first, as for
    ``F.linear``). Returns (..., E). Differentiable in x and the four parameters.

    Dropout (``training`` and ``p`` > 0; p in [0, 1)) keeps each element of the (tokens, F)
    activation with probability 1 - p and scales it by 1 / (1 - p), as ``nn.Dropout``; its seed
    is drawn from PyTorch's generator of x's device. The backward keeps only x and the
    pre-activation z (``recompute=True``: x only, z is recomputed by one matmul) and the seed.
    ``activation``: as in ``gelu``.
    """
    plan, key = planned("feed_forward", (p, approximate, training, recompute, activation),
                        x, w1, b1, w2, b2)
    if plan is not None:
        return plan(x, w1, b1, w2, b2)
    return _unplanned(x, w1, b1, w2, b2, p, resolve(approximate, activation), training,
                      recompute, key)


def _unplanned(x, w1, b1, w2, b2, p, activation: str, training: bool, recompute: bool,
               key=None) -> Tensor:
    """``feed_forward`` without a plan: validate, cast for autocast, route; plan the problem
    under ``key`` (None: do not)."""
    p = check_dropout_p(p)
    check_tensor("x", x)
    x, w1, b1, w2, b2 = autocast_linear(x, w1, b1, w2, b2)
    check_ffn(x, w1, b1, w2, b2)
    if not training:
        p = 0.0
    if distributed(x, w1, b1, w2, b2):
        # Tensor parallel: the whole block on each rank's shards where the layout allows, else
        # linear_gelu and PyTorch's dropout and linear on the DTensors (_dtensor.py).
        def fused(x, first, w2, b2, col_offset: int, n_cols: int) -> Tensor:
            ((w1, b1),) = first
            config = BlockConfig(p, activation, recompute, col_offset, n_cols)
            return routed(x, w1, b1, w2, b2, config)

        def unfused() -> Tensor:
            h = _linear_gelu.linear_gelu(x, w1, b1, recompute=recompute, activation=activation)
            return dtensor_ops().linear(F.dropout(h, p, training), w2, b2)

        return dtensor_ops().run_block(x, [(w1, b1)], (w2, b2), p > 0.0, fused, unfused,
                                       "FFN block")
    key = plan_key_unless_autocast(key, x)
    config = BlockConfig(p, activation, recompute)
    if key is None or torch.compiler.is_compiling():
        return routed(x, w1, b1, w2, b2, config)
    launch = _plan(x, config, functools.partial(
        _unplanned, p=p, activation=activation, training=True, recompute=recompute))
    return remember(key, launch)(x, w1, b1, w2, b2)


def routed(x, w1, b1, w2, b2, config: BlockConfig) -> Tensor:
    """The FFN block on plain tensors, validated and cast for autocast, routed now (no plan)."""
    if torch.compiler.is_compiling():  # torch.compile traces the custom ops
        seed = dropout_seed(x.device) if config.p > 0.0 else None
        return traced(x, w1, b1, w2, b2, seed, *config)
    return _plan(x, config)(x, w1, b1, w2, b2)


def _plan(x: Tensor, config: BlockConfig, replan: Callable | None = None):
    """The problem's route (as ``linear_gelu``'s)."""
    p, activation = config.p, config.activation
    act = linear_act(activation)
    if on_fallback(x) and config.n_cols is None:
        # PyTorch's own block, its dropout included (PyTorch's mask, from its generator): a
        # tensor-parallel shard alone draws the kernels' mask, to match the whole layer's.
        def eager(x, w1, b1, w2, b2):
            h = act(x, w1, b1)
            return F.linear(F.dropout(h, p) if p > 0.0 else h, w2, b2)
        return eager
    if p == 0.0 and config.n_cols is None \
            and forced_path("ffn_fwd") == "torch" and forced_path("ffn_bwd") == "torch":
        return counted("ffn_fwd", "ffn_bwd", lambda x, w1, b1, w2, b2: F.linear(
            act(x, w1, b1), w2, b2))
    backend = launchers(x)
    calls = _bound_calls(backend, config, save_preact=not config.recompute)
    infer = _bound_calls(backend, config, False).forward  # no graph, no saved pre-activation

    def launch(x, w1, b1, w2, b2):
        seed = dropout_seed(x.device) if p > 0.0 else None
        x2d = rows(x)
        if not needs_grad(x, w1, b1, w2, b2):
            y, _ = infer(x2d, w1, b1, w2, b2, seed)
        else:
            y = FeedForwardFunction.apply(x2d, w1, b1, w2, b2, seed, calls)
        # Viewed N-D outside the Function: a view made inside it could not be modified in
        # place (Falcon's ``mlp_output += attention_output``).
        return y if x.dim() == 2 else y.view(*x.shape[:-1], w2.shape[0])
    return unless_autocast(launch, x, replan)
