"""``geglu``: h = act(x @ W_gate^T + b_gate) * (x @ W_up^T + b_up), both projections and the gate
in one kernel (``kernels/geglu.py``).

The op's declaration: its checks, its custom ops (``triton_gelu::geglu_fwd``, ``geglu_gate_up``,
``geglu_bwd``) with their fake functions, its one autograd definition (the custom op's and the
eager ``autograd.Function``'s), its DTensor sharding rules, its PyTorch launchers (the
fallback's), its eager PyTorch twin, and the public function with its per-problem plan. The ops
take ``x`` (..., K) and flatten it themselves, as the linear ops do (g, u, h and dh are (...,
N)). ``geglu_bwd`` also serves the gated block (``gated_ffn.py``): with p > 0 its dh is the
gradient of dropout(h) and it regenerates the mask. Shared checks: ``_checks.py``; kernels,
paths and config spaces: ``kernels/geglu.py``; float64 truth: ``reference.py``.
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
    check_same_dtype, check_tensor,
)
from .._declared import declare_sharding_rules
from .._plans import remember
from .._settings import forced_path
from ..activations import check_activation, resolve
from ._core import (
    Tensor, absent, autocast_linear, bound_after_first, bound_launcher, bound_per_flags,
    counted, distributed, dtensor_ops, linear_act, linear_out_shape, needs_grad, new_like,
    on_fallback, or_absent, plan_key_unless_autocast, planned, register_autograd, rows,
    unless_autocast,
)

# ---- its checks (the shared ones: ``_checks.py``) -------------------------------------------


def check_geglu(
    x: object, w_gate: object, w_up: object, b_gate: object | None, b_up: object | None
) -> None:
    """Validate ``gelu(x @ w_gate.T + b_gate) * (x @ w_up.T + b_up)``'s operands: each
    projection as a Linear, and the two of the same shape, dtype and device."""
    check_linear(x, w_gate, b_gate, "w_gate", "b_gate")
    check_linear(x, w_up, b_up, "w_up", "b_up")
    check_same_device([("w_gate", w_gate), ("w_up", w_up)])
    check_same_dtype([("w_gate", w_gate), ("w_up", w_up)])
    if w_up.shape != w_gate.shape:
        raise ValueError(
            f"w_up has shape {tuple(w_up.shape)} but w_gate has shape {tuple(w_gate.shape)}: "
            "the gate and up projections must have the same (hidden_features, in_features)"
        )


def check_geglu_2d(
    x2d: object, w_gate: object, w_up: object, b_gate: object | None, b_up: object | None
) -> None:
    """``check_geglu`` for the launchers, which take x already flattened to (M, K)."""
    check_geglu(x2d, w_gate, w_up, b_gate, b_up)
    if x2d.dim() != 2:
        raise ValueError(f"x must be 2-D (M, in_features) here, got shape {tuple(x2d.shape)}")


def check_geglu_backward(
    dh2d: object, x2d: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, gate: object,
    up: object, needs: Sequence[bool],
) -> tuple[bool, ...]:
    """The backward's other operands, once x (flattened to ``x2d``) and the weights passed
    ``check_geglu``: dh and the saved gate and up are (M, N); ``needs`` holds five flags (dx,
    dw_gate, dw_up, db_gate, db_up), returned as a tuple of bools."""
    named = [("dh", dh2d), ("gate", gate), ("up", up)]
    check_same_device([("x", x2d)] + [(name, check_tensor(name, t)) for name, t in named])
    expected = (x2d.shape[0], w_gate.shape[0])
    for name, t in named:
        if tuple(t.shape) != expected:
            raise ValueError(
                f"{name} must have shape (M, N) = {expected} for x of shape {tuple(x2d.shape)} "
                f"and w_gate of shape {tuple(w_gate.shape)}, got {tuple(t.shape)}"
            )
    if len(needs) != 5:
        raise ValueError(
            f"needs must hold 5 flags (dx, dw_gate, dw_up, db_gate, db_up), got {list(needs)}"
        )
    return tuple(bool(n) for n in needs)


# ---- its PyTorch launchers: the fallback's (``fallback.py``), where no Triton kernel runs -------
# The kernels' math (``reference.py``'s float32 formulas, one rounding to the input dtype); only
# a tensor-parallel shard's plan reaches them (other plans there run the eager twin below).


@fallback.launcher(tensors=(0, 1, 2, 3, 4, 7))
def geglu_forward(
    x2d: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, b_gate: torch.Tensor | None,
    b_up: torch.Tensor | None, activation: str, save_gate_up: bool,
    seed: torch.Tensor | None = None, p: float = 0.0, col_offset: int = 0,
    n_cols: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    columns = col_offset, w_gate.shape[0] if n_cols is None else n_cols
    h, gate, up = reference.geglu_forward_fp32(
        x2d, w_gate, w_up, b_gate, b_up, activation,
        fallback.kernels_mask(seed, p, x2d.shape[0], w_gate.shape[0], *columns),
        reference.dropout_constants(p)[1],
    )
    return (h.to(x2d.dtype), *((gate, up) if save_gate_up else (None, None)))


@fallback.launcher(tensors=5)
def geglu_gate_up(
    x2d: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, b_gate: torch.Tensor | None,
    b_up: torch.Tensor | None, activation: str, p: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    _, gate, up = reference.geglu_forward_fp32(x2d, w_gate, w_up, b_gate, b_up, activation)
    return gate, up


@fallback.launcher(tensors=(0, 1, 2, 3, 4, 5, 9))
def geglu_backward(
    dh2d: torch.Tensor, x2d: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
    gate: torch.Tensor, up: torch.Tensor, activation: str, needs: Sequence[bool],
    write_h: bool = False, seed: torch.Tensor | None = None, p: float = 0.0,
    col_offset: int = 0, n_cols: int | None = None,
) -> tuple[torch.Tensor | None, ...]:
    columns = col_offset, w_gate.shape[0] if n_cols is None else n_cols
    (rows, cols), scale = gate.shape, reference.dropout_constants(p)[1]
    keep = fallback.kernels_mask(seed, p, rows, cols, *columns)
    grads = reference.geglu_backward_fp32(dh2d, x2d, w_gate, w_up, gate, up, activation,
                                          keep, scale)
    h = None
    if write_h:
        h = reference.dropout_fp32(reference.geglu_fp32(gate, up, activation), keep,
                                    scale).to(x2d.dtype)
    return (*(g.to(x2d.dtype) if need else None for g, need in zip(grads, needs)), h)


# The custom ops (``torch.ops.triton_gelu``) ``triton_gelu.ops`` re-exports from here.
CUSTOM_OPS = ("geglu_fwd", "geglu_gate_up_op", "geglu_bwd")


# ---- the custom ops -------------------------------------------------------------------------


def _launch_forward(x, w_gate, w_up, b_gate, b_up, activation: str, save_gate_up: bool):
    x2d, shape = rows(x), linear_out_shape(x, w_gate)
    h, gate, up = launchers(x2d).geglu_forward(x2d, w_gate, w_up, b_gate, b_up, activation,
                                               save_gate_up)
    return h.view(shape), *(None if t is None else t.view(shape) for t in (gate, up))


def eager_gate_up(x, w_gate, w_up, b_gate, b_up, p: float, activation: str):
    """(g, u) by the launchers: the backward's recompute, without the op's checks."""
    x2d, shape = rows(x), linear_out_shape(x, w_gate)
    gate, up = launchers(x2d).geglu_gate_up(x2d, w_gate, w_up, b_gate, b_up, activation, p)
    return gate.view(shape), up.view(shape)


def eager_backward(dh, x, w_gate, w_up, gate, up, seed, p: float, activation: str, needs,
                   write_h: bool, col_offset: int = 0, n_cols: int | None = None):
    """``geglu_bwd``'s outputs by the launchers (None for each not asked for), unchecked."""
    x2d = rows(x)
    dx, dwg, dwu, dbg, dbu, h = launchers(x2d).geglu_backward(
        rows(dh), x2d, w_gate, w_up, rows(gate), rows(up), activation, needs, write_h,
        seed, p, col_offset, n_cols)
    return (None if dx is None else dx.view(x.shape)), dwg, dwu, dbg, dbu, \
        (None if h is None else h.view(dh.shape))


@torch.library.custom_op("triton_gelu::geglu_fwd", mutates_args=())
def geglu_fwd(
    x: Tensor, w_gate: Tensor, w_up: Tensor, b_gate: Tensor | None, b_up: Tensor | None,
    activation: str, save_gate_up: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(gelu(g) * u, g if save_gate_up else empty, u likewise), g and u the two projections,
    each (..., N) for x (..., K)."""
    check_geglu(x, w_gate, w_up, b_gate, b_up)
    h, gate, up = _launch_forward(x, w_gate, w_up, b_gate, b_up, check_activation(activation),
                                  save_gate_up)
    return h, or_absent(gate, h), or_absent(up, h)


@geglu_fwd.register_fake
def _geglu_fwd_fake(x, w_gate, w_up, b_gate, b_up, activation, save_gate_up):
    h = new_like(x, linear_out_shape(x, w_gate))
    return h, *((new_like(h), new_like(h)) if save_gate_up else (absent(h), absent(h)))


@torch.library.custom_op("triton_gelu::geglu_gate_up", mutates_args=())
def geglu_gate_up_op(
    x: Tensor, w_gate: Tensor, w_up: Tensor, b_gate: Tensor | None, b_up: Tensor | None,
    p: float, activation: str,
) -> tuple[Tensor, Tensor]:
    """(g, u), bitwise what geglu_fwd / gated_ffn_fwd with dropout probability p saves (the
    backward recomputes them when not saved)."""
    check_geglu(x, w_gate, w_up, b_gate, b_up)
    return eager_gate_up(x, w_gate, w_up, b_gate, b_up, check_dropout_p(p),
                         check_activation(activation))


@geglu_gate_up_op.register_fake
def _geglu_gate_up_fake(x, w_gate, w_up, b_gate, b_up, p, activation):
    gate = new_like(x, linear_out_shape(x, w_gate))
    return gate, new_like(gate)


@torch.library.custom_op("triton_gelu::geglu_bwd", mutates_args=())
def geglu_bwd(
    dh: Tensor, x: Tensor, w_gate: Tensor, w_up: Tensor, gate: Tensor, up: Tensor,
    seed: Tensor | None, p: float, activation: str, needs: list[bool], write_h: bool,
    col_offset: int = 0, n_cols: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dw_gate, dw_up, db_gate, db_up, h): each gradient empty unless its flag in ``needs``
    is set; h = gelu(g) * u with write_h, else empty. dh, g and u are (..., N) for x (..., K);
    dx has x's shape, h dh's. With p > 0, dh is the gradient of dropout(h) (the mask of
    ``seed`` at columns ``col_offset`` .. of ``n_cols``) and h is written as dropout(h)."""
    check_geglu(x, w_gate, w_up, None, None)
    dh2d, gate2d, up2d = (rows(check_tensor(name, t))
                          for name, t in (("dh", dh), ("gate", gate), ("up", up)))
    needs = check_geglu_backward(dh2d, rows(x), w_gate, w_up, gate2d, up2d, needs)
    p = check_dropout(seed, p, x)
    col_offset, n_cols = check_dropout_columns(col_offset, n_cols, w_gate.shape[0])
    outputs = eager_backward(dh, x, w_gate, w_up, gate, up, seed, p,
                             check_activation(activation), needs, write_h, col_offset, n_cols)
    dx, dwg, dwu, dbg, dbu, h = (or_absent(t, dh) for t in outputs)
    return dx, dwg, dwu, dbg, dbu, h


@geglu_bwd.register_fake
def _geglu_bwd_fake(dh, x, w_gate, w_up, gate, up, seed, p, activation, needs, write_h,
                    col_offset=0, n_cols=None):
    shapes = (x.shape, w_gate.shape, w_up.shape, w_gate.shape[:1], w_up.shape[:1], gate.shape)
    return tuple(new_like(dh, shape) if wanted else absent(dh)
                 for shape, wanted in zip(shapes, (*needs, write_h)))


# ---- the autograd definition ----------------------------------------------------------------


def save_gate_up_or_biases(ctx, tensors, biases, gate, up, save_gate_up) -> None:
    """Keep g and u for the backward, or (recompute) the biases that rebuild them."""
    ctx.save_gate_up = save_gate_up
    b_gate, b_up = biases
    ctx.has_bias = (b_gate is not None, b_up is not None)
    ctx.save_for_backward(*tensors, *((gate, up) if save_gate_up else biases))


def saved_gate_up(ctx, x, w_gate, w_up, kept, p: float = 0.0) -> tuple[Tensor, Tensor]:
    """g and u as the forward saved them, or recomputed (bitwise the same)."""
    if ctx.save_gate_up:
        return tuple(kept)
    biases = (b if has else None for b, has in zip(kept, ctx.has_bias))
    return ctx.calls.gate_up(x, w_gate, w_up, *biases, p, ctx.activation)


def _setup_context(ctx, inputs, output) -> None:
    x, w_gate, w_up, b_gate, b_up, activation, save_gate_up = inputs
    _, gate, up = output
    ctx.activation = activation
    # x, g and u (recompute: x and the biases); eager PyTorch also keeps gelu(g).
    save_gate_up_or_biases(ctx, (x, w_gate, w_up), (b_gate, b_up), gate, up, save_gate_up)


def _backward(ctx, dh: Tensor, dgate, dup):
    x, w_gate, w_up, *kept = ctx.saved_tensors
    gate, up = saved_gate_up(ctx, x, w_gate, w_up, kept)
    need, (has_b_gate, has_b_up) = ctx.needs_input_grad, ctx.has_bias
    needs = [need[0], need[1], need[2], need[3] and has_b_gate, need[4] and has_b_up]
    grads = ctx.calls.backward(dh, x, w_gate, w_up, gate, up, None, 0.0, ctx.activation,
                               needs, False)
    # (h, the sixth, is not asked for); a gradient not needed may be an empty stand-in
    return (*[g if need else None for g, need in zip(grads, needs)], None, None)


TRACED = SimpleNamespace(gate_up=geglu_gate_up_op, backward=geglu_bwd)
GeGLUFunction = register_autograd(geglu_fwd, "GeGLUFunction", _setup_context, _backward,
                                  traced=TRACED)


def bound_calls(backend, shape: tuple[int, ...], activation: str, save_gate_up: bool,
                p: float = 0.0, col_offset: int = 0,
                n_cols: int | None = None) -> SimpleNamespace:
    """The Function's calls for one problem, each bound to it after its first call
    (``_core.bound_after_first``): ``forward`` (``_launch_forward``'s tensors), ``gate_up`` and
    ``backward`` (the signatures of ``eager_gate_up`` and ``eager_backward``), ``forward2d`` ((x2d,
    w_gate, w_up, b_gate, b_up, seed) -> (h, g, u), 2-D: the gated block's). ``p``,
    ``shape``: the problem's (..., N) (x's and g's); ``p``, ``col_offset`` and ``n_cols``: the
    gated block's dropout (GeGLU has none)."""
    columns = (col_offset, n_cols)
    forward2d = bound_after_first(
        lambda *tensors: backend.geglu_forward(*tensors[:5], activation, save_gate_up,
                                               tensors[5], p, *columns),
        lambda *tensors: backend.geglu_forward_launch(*tensors[:5], activation, save_gate_up,
                                                      tensors[5], p, *columns))
    gate_up2d = bound_launcher(backend, "geglu_gate_up", activation, p)
    # The seed, a tensor of each call, sits among the flags of these two (not after them).
    backward2d = bound_per_flags(lambda flags: bound_after_first(
        lambda *tensors: backend.geglu_backward(*tensors[:6], activation, list(flags[0]),
                                                flags[1], tensors[6], p, *columns),
        lambda *tensors: backend.geglu_backward_launch(*tensors[:6], activation,
                                                       list(flags[0]), flags[1], tensors[6],
                                                       p, *columns)))

    def forward(x, w_gate, w_up, b_gate, b_up):
        outputs = forward2d(rows(x), w_gate, w_up, b_gate, b_up, None)
        if len(shape) == 2:  # the kernels' (M, N) already
            return outputs
        return tuple(None if t is None else t.view(shape) for t in outputs)

    def gate_up(x, w_gate, w_up, b_gate, b_up, p, activation):
        gate, up = gate_up2d(rows(x), w_gate, w_up, b_gate, b_up)
        return gate.view(shape), up.view(shape)

    def backward(dh, x, w_gate, w_up, gate, up, seed, p, activation, needs, write_h, *_):
        launch = backward2d((tuple(needs), write_h))
        if len(shape) == 2:  # the kernels' (M, N) already
            return launch(dh, x, w_gate, w_up, gate, up, seed)
        dx, dwg, dwu, dbg, dbu, h = launch(rows(dh), rows(x), w_gate, w_up, rows(gate),
                                           rows(up), seed)
        return (None if dx is None else dx.view(x.shape)), dwg, dwu, dbg, dbu, \
            (None if h is None else h.view(dh.shape))
    return SimpleNamespace(forward=forward, forward2d=forward2d, gate_up=gate_up,
                           backward=backward, constants=(activation, save_gate_up))


def traced(x: Tensor, w_gate: Tensor, w_up: Tensor, b_gate: Tensor | None,
           b_up: Tensor | None, activation: str, recompute: bool) -> Tensor:
    """``geglu`` through the custom ops (torch.compile's trace, a DTensor's shards), for
    operands already validated and cast for autocast."""
    save = needs_grad(x, w_gate, w_up, b_gate, b_up) and not recompute
    return geglu_fwd(x, w_gate, w_up, b_gate, b_up, activation, save)[0]


# ---- its DTensor sharding rules --------------------------------------------------------------


@declare_sharding_rules
def sharding_rules(lay) -> dict:
    """{custom op: its DTensor sharding rule}, registered by ``_dtensor_rules`` (``lay``: that
    module, the layouts) on the first DTensor: both projections split alike, by each of
    ``lay.linear_layouts`` (a rule never pairs a split W_gate with a whole W_up)."""
    def forward(x, w_gate, w_up, b_gate, b_up, activation, save_gate_up):
        # outputs (h, g | empty, u | empty)
        return [([lo.y, lay.wanted(lo.y, save_gate_up), lay.wanted(lo.y, save_gate_up)],
                 [lo.x, lo.weight, lo.weight, lay.if_present(b_gate, lo.bias),
                  lay.if_present(b_up, lo.bias), None, None])
                for lo in lay.linear_layouts(x.ndim)]

    def gate_up(x, w_gate, w_up, b_gate, b_up, p, activation):
        return [([lo.y, lo.y],
                 [lo.x, lo.weight, lo.weight, lay.if_present(b_gate, lo.bias),
                  lay.if_present(b_up, lo.bias), None, None])
                for lo in lay.linear_layouts(x.ndim)]

    def backward(dh, x, w_gate, w_up, gate, up, seed, p, activation, needs, write_h,
                 col_offset=0, n_cols=None):
        # outputs (dx, dW_gate, dW_up, db_gate, db_up, h), each empty unless asked for. With
        # dropout (the gated block's backward) replicated only: a split would key each rank's
        # mask on its local rows or columns (tensor parallel passes the columns' position:
        # _dtensor.py).
        return [([lay.wanted(placement, wanted) for placement, wanted in zip(
                    (lo.dx, lo.dweight, lo.dweight, lo.dbias, lo.dbias, lo.y), (*needs, write_h))],
                 [lo.y, lo.x, lo.weight, lo.weight, lo.y, lo.y, lay.if_present(seed, lay.R), None,
                  None, None, None, None, None])
                for lo in lay.linear_layouts(x.ndim) if p == 0.0 or lo == lay.REPLICATED]
    ops = torch.ops.triton_gelu
    return {ops.geglu_fwd.default: forward, ops.geglu_gate_up.default: gate_up,
            ops.geglu_bwd.default: backward}


# ---- the public function --------------------------------------------------------------------


def prepare(x, w_gate, w_up, b_gate, b_up, approximate, activation):
    """Validate and autocast GeGLU's operands (as F.linear's); return them and the activation's
    name (approximate's default is "tanh" here)."""
    activation = resolve(approximate, activation, default="tanh")
    check_tensor("x", x)
    x, w_gate, w_up, b_gate, b_up = autocast_linear(x, w_gate, w_up, b_gate, b_up)
    check_geglu(x, w_gate, w_up, b_gate, b_up)
    return x, w_gate, w_up, b_gate, b_up, activation


def eager_geglu(activation: str, linear: Callable = F.linear) -> Callable:
    """Eager PyTorch's GeGLU, ``act(F.linear(x, w_gate, b_gate)) * F.linear(x, w_up, b_up)``,
    as a function of (x, w_gate, w_up, b_gate, b_up); ``linear``: DTensors' own, for them."""
    act = linear_act(activation, linear)
    return lambda x, w_gate, w_up, b_gate, b_up: act(x, w_gate, b_gate) * linear(x, w_up, b_up)


def geglu(
    x: Tensor, w_gate: Tensor, w_up: Tensor, b_gate: Tensor | None = None,
    b_up: Tensor | None = None, approximate: str = "tanh", recompute: bool = False, *,
    activation: str | None = None,
) -> Tensor:
    """``F.gelu(F.linear(x, w_gate, b_gate), approximate) * F.linear(x, w_up, b_up)``: both
    projections and the gate in one Triton kernel.

    x (..., in_features); w_gate and w_up (hidden_features, in_features) of the same shape;
    b_gate and b_up (hidden_features,) or None; float32, float16 or bfloat16, all of one dtype
    (under autocast they are cast first, as for ``F.linear``). Returns (..., hidden_features).
    Differentiable in x, both weights and both biases. The backward keeps x, g and u (eager
    PyTorch also keeps gelu(g)); ``recompute=True`` keeps x only and recomputes g and u.
    ``activation``: as in ``gelu`` (approximate's default "tanh" yields to it).
    """
    plan, key = planned("geglu", (approximate, recompute, activation), x, w_gate, w_up,
                        b_gate, b_up)
    if plan is not None:
        return plan(x, w_gate, w_up, b_gate, b_up)
    return _unplanned(x, w_gate, w_up, b_gate, b_up, approximate, activation, recompute, key)


def _unplanned(x, w_gate, w_up, b_gate, b_up, approximate, activation, recompute: bool,
               key=None) -> Tensor:
    """``geglu`` without a plan: validate, cast for autocast, route; plan the problem under
    ``key`` (None: do not)."""
    x, w_gate, w_up, b_gate, b_up, activation = prepare(
        x, w_gate, w_up, b_gate, b_up, approximate, activation)
    if distributed(x, w_gate, w_up, b_gate, b_up):  # DTensor: the custom ops on the shards
        return _on_dtensors(x, w_gate, w_up, b_gate, b_up, activation, recompute)
    if torch.compiler.is_compiling():  # torch.compile traces the custom ops
        return traced(x, w_gate, w_up, b_gate, b_up, activation, recompute)
    key = plan_key_unless_autocast(key, x)
    if key is None:  # not planned: routed for this call alone
        return _plan(x, w_gate, activation, recompute)(x, w_gate, w_up, b_gate, b_up)
    return remember(key, _plan(x, w_gate, activation, recompute, functools.partial(
        _unplanned, approximate="tanh", activation=activation, recompute=recompute)))(
        x, w_gate, w_up, b_gate, b_up)


def _on_dtensors(x, w_gate, w_up, b_gate, b_up, activation: str, recompute: bool) -> Tensor:
    """``geglu`` of DTensors (validated, cast for autocast): the GeGLU ops on the local shards
    where both projections are split alike in a layout their rules serve
    (``_dtensor.fusable_layout``), else the unfused ops, with a warning."""
    dtensors = dtensor_ops()
    dtensors.require_dtensors(x=x, w_gate=w_gate, w_up=w_up, b_gate=b_gate, b_up=b_up)
    if dtensors.fusable_layout(x, w_gate, b_gate, (w_up, b_up)):
        return traced(x, w_gate, w_up, b_gate, b_up, activation, recompute)
    dtensors.warn_unfused(
        "GeGLU kernel",
        dtensors.placements(x=x, w_gate=w_gate, w_up=w_up, b_gate=b_gate, b_up=b_up),
        "gelu(g) * u needs whole g and u, and the gate and up columns of one rank must match",
        "Make gate_proj and up_proj both column-parallel (Shard(0)) to fuse.",
    )
    return eager_geglu(activation, dtensors.linear)(x, w_gate, w_up, b_gate, b_up)


def _plan(x: Tensor, w_gate: Tensor, activation: str, recompute: bool,
          replan: Callable | None = None):
    """The problem's route (as ``linear_gelu``'s)."""
    eager = eager_geglu(activation)
    if on_fallback(x):
        return eager
    if forced_path("geglu_fwd") == "torch" and forced_path("geglu_bwd") == "torch":
        return counted("geglu_fwd", "geglu_bwd", eager)
    backend = launchers(x)
    shape = linear_out_shape(x, w_gate)
    calls = bound_calls(backend, shape, activation, not recompute)
    # Inference: no graph, nothing saved; the kernel writes only h.
    infer = bound_calls(backend, shape, activation, False).forward

    def launch(x, w_gate, w_up, b_gate, b_up):
        if needs_grad(x, w_gate, w_up, b_gate, b_up):
            return GeGLUFunction.apply(x, w_gate, w_up, b_gate, b_up, calls)
        return infer(x, w_gate, w_up, b_gate, b_up)[0]
    return unless_autocast(launch, x, replan)
