"""The kernels as PyTorch custom operators, so ``torch.compile`` traces them without a graph break.

Eager calls go through the ``autograd.Function``s in ``functional.py``: a custom op's dispatch
costs ~10 us more per call (measured on the CPU: ~15 us against ~4 us for the Function, with the
launch stubbed out), so ``functional.py`` switches to these ops only while Dynamo traces
(``torch.compiler.is_compiling()``).
Each op wraps one host launcher; its fake (meta) implementation states the output's shape, dtype
and layout (always new, contiguous tensors) without running a kernel, so Dynamo/AOTAutograd and
Inductor can trace symbolic shapes; autograd is registered on the forward ops and calls the
backward ops, so the backward graph is traced too.

Each op validates its operands (``_checks.py``) before its launcher runs: the ops are reachable
as ``torch.ops.triton_gelu.*``, and a compiled graph calls them with whatever its inputs are at
run time. The launchers below them validate nothing.

``torch.library.custom_op`` (not ``triton_op`` + ``wrap_triton``) because it also traces on the
CPU while the kernels run under the Triton interpreter: Inductor treats each op as an opaque
extern call in both cases.

Custom ops cannot return ``None``: an output that was not asked for is an empty tensor of shape
``(0,)`` (``preact`` when it is not saved; ``dx`` / ``dw`` / ``db`` when not needed).

Ops (namespace ``triton_gelu``)::

    gelu_fwd(x, activation) -> y
    gelu_bwd(dy, x, activation) -> dx
    linear_gelu_fwd(x, weight, bias?, activation, save_preact) -> (y, preact | empty)
    linear_preact(x, weight, bias?) -> preact
    linear_gelu_bwd(dy, x, weight, preact, activation, need_dx, need_dw, need_db)
        -> (dx | empty, dw | empty, db | empty)
    geglu_fwd(x, w_gate, w_up, b_gate?, b_up?, activation, save_gate_up)
        -> (h, g | empty, u | empty)
    geglu_gate_up(x, w_gate, w_up, b_gate?, b_up?, p, activation) -> (g, u)
    geglu_bwd(dh, x, w_gate, w_up, g, u, seed?, p, activation, needs[5], write_h,
              col_offset=0, n_cols?=None)
        -> (dx, dw_gate, dw_up, db_gate, db_up, h), each empty when not asked for
    gated_ffn_fwd(x, w_gate, w_up, w_down, b_gate?, b_up?, b_down?, seed?, p, activation,
                  save_gate_up, col_offset=0, n_cols?=None) -> (y, g | empty, u | empty)
    ffn_fwd(x, w1, b1?, w2, b2?, seed?, p, activation, save_preact, col_offset=0,
            n_cols?=None) -> (y, preact | empty)
    ffn_bwd(dy, x, w1, w2, preact, seed?, p, activation, needs[5], col_offset=0,
            n_cols?=None) -> (dx, dw1, db1, dw2, db2), each empty when not needed

The linear ops take ``x`` (..., K) with any number of leading dimensions, ``weight`` (N, K) and
``bias`` (N,), and flatten the leading dimensions themselves, on the tensors they are given: so a
DTensor sharded on a leading dimension (batch or sequence) reaches them unflattened, and DTensor
never has to redistribute it to flatten it (``_dtensor_rules.py`` holds the sharding rules).
``functional.py`` applies autocast before calling them, exactly as on the eager path.
``gated_ffn_fwd``'s registered backward calls ``geglu_gate_up`` and ``geglu_bwd`` (and PyTorch
matmuls for the down projection), so the compiled backward keeps x, g, u and the seed, never h
or the dropout mask. The GeGLU ops take ``x`` (..., K) and flatten it themselves, as the linear
ops do (g, u, h and dh are (..., N)); the FFN and gated block ops take 2-D ``x``, flattened by
their entry points below (under tensor parallel ``_dtensor.py`` calls them on each rank's local
tensors). The blocks' ops take the dropout seed as a tensor (``functional.dropout_seed``, drawn
in the traced graph by ``torch.randint``; None when p == 0) and p as a float: the graph carries
them to the backward op, with the position of the call's hidden columns in the whole hidden
layer (``col_offset``, ``n_cols``: a tensor-parallel rank's shard, so its dropout mask is the
single-process one's columns; by default the whole layer). ``geglu_gate_up`` takes the forward's
p only to choose the forward's path (g and u do not depend on it); ``geglu_fwd`` (the GeGLU op
alone) has no dropout.
"""

from __future__ import annotations

import math

import torch

from . import _gated_block
from ._backend import launchers
from ._checks import (
    check_down, check_dropout, check_dropout_columns, check_dropout_p, check_ffn_2d,
    check_ffn_backward, check_ffn_needs, check_geglu, check_geglu_2d, check_geglu_backward,
    check_linear, check_linear_backward, check_tensor,
)
from .activations import check_activation

Tensor = torch.Tensor


def _new_like(t: Tensor, shape=None) -> Tensor:
    return torch.empty(t.shape if shape is None else shape, dtype=t.dtype, device=t.device)


def rows(t: Tensor) -> Tensor:
    """(..., n) -> (rows, n): a view when the leading dimensions collapse, else a copy."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def _linear_out_shape(x: Tensor, weight: Tensor) -> tuple[int, ...]:
    return (*x.shape[:-1], weight.shape[0])


def _absent(t: Tensor) -> Tensor:
    """The stand-in for an output that was not asked for (custom ops cannot return None)."""
    return torch.empty((0,), dtype=t.dtype, device=t.device)


def _or_absent(t: Tensor | None, like: Tensor) -> Tensor:
    return t if t is not None else _absent(like)


# ---- GELU -----------------------------------------------------------------------------------


@torch.library.custom_op("triton_gelu::gelu_fwd", mutates_args=())
def gelu_fwd(x: Tensor, activation: str) -> Tensor:
    """y = gelu(x), a new contiguous tensor of x's shape and dtype."""
    check_tensor("x", x)
    return launchers(x).gelu_forward(x, check_activation(activation))


@gelu_fwd.register_fake
def _gelu_fwd_fake(x: Tensor, activation: str) -> Tensor:
    return _new_like(x)


@torch.library.custom_op("triton_gelu::gelu_bwd", mutates_args=())
def gelu_bwd(dy: Tensor, x: Tensor, activation: str) -> Tensor:
    """dx = dy * gelu'(x), a new contiguous tensor of x's shape and dtype."""
    check_tensor("x", x)
    check_tensor("dy", dy)
    if dy.shape != x.shape:
        raise ValueError(f"dy must have x's shape {tuple(x.shape)}, got {tuple(dy.shape)}")
    return launchers(x).gelu_backward(dy, x, check_activation(activation))


@gelu_bwd.register_fake
def _gelu_bwd_fake(dy: Tensor, x: Tensor, activation: str) -> Tensor:
    return _new_like(x)


def _gelu_setup_context(ctx, inputs, output) -> None:
    x, activation = inputs
    ctx.activation = activation
    ctx.save_for_backward(x)


def _gelu_fwd_backward(ctx, dy: Tensor):
    (x,) = ctx.saved_tensors
    return gelu_bwd(dy, x, ctx.activation), None


gelu_fwd.register_autograd(_gelu_fwd_backward, setup_context=_gelu_setup_context)


# ---- fused Linear + bias + GELU -------------------------------------------------------------


@torch.library.custom_op("triton_gelu::linear_gelu_fwd", mutates_args=())
def linear_gelu_fwd(
    x: Tensor, weight: Tensor, bias: Tensor | None, activation: str, save_preact: bool
) -> tuple[Tensor, Tensor]:
    """(gelu(x @ weight.T + bias), the pre-activation if save_preact else an empty tensor), both
    (..., N) for x (..., K)."""
    check_linear(x, weight, bias)
    x2d, shape = rows(x), _linear_out_shape(x, weight)
    y, preact = launchers(x2d).linear_gelu_forward(x2d, weight, bias,
                                                   check_activation(activation), save_preact)
    return y.view(shape), (preact.view(shape) if preact is not None else _absent(y))


@linear_gelu_fwd.register_fake
def _linear_gelu_fwd_fake(x, weight, bias, activation, save_preact):
    y = _new_like(x, _linear_out_shape(x, weight))
    return y, (_new_like(y) if save_preact else _absent(y))


@torch.library.custom_op("triton_gelu::linear_preact", mutates_args=())
def linear_preact_op(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """preact = x @ weight.T + bias (the backward recomputes it when it was not saved)."""
    check_linear(x, weight, bias)
    x2d = rows(x)
    return launchers(x2d).linear_preact(x2d, weight, bias).view(_linear_out_shape(x, weight))


@linear_preact_op.register_fake
def _linear_preact_fake(x, weight, bias):
    return _new_like(x, _linear_out_shape(x, weight))


@torch.library.custom_op("triton_gelu::linear_gelu_bwd", mutates_args=())
def linear_gelu_bwd(
    dy: Tensor, x: Tensor, weight: Tensor, preact: Tensor, activation: str,
    need_dx: bool, need_dw: bool, need_db: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dw, db) of y = gelu(x @ weight.T + bias); an empty tensor for each one not needed.
    dy and preact are (..., N) for x (..., K); dx has x's shape."""
    check_linear(x, weight, None)
    x2d = rows(x)
    dy2d, preact2d = rows(check_tensor("dy", dy)), rows(check_tensor("preact", preact))
    check_linear_backward(dy2d, x2d, weight, preact2d)
    dx, dw, db = launchers(x2d).linear_gelu_backward(
        dy2d, x2d, weight, preact2d, check_activation(activation), need_dx, need_dw, need_db
    )
    dx = None if dx is None else dx.view(x.shape)
    dx, dw, db = (_or_absent(g, dy) for g in (dx, dw, db))
    return dx, dw, db


@linear_gelu_bwd.register_fake
def _linear_gelu_bwd_fake(dy, x, weight, preact, activation, need_dx, need_dw, need_db):
    dx = _new_like(x) if need_dx else _absent(dy)
    dw = _new_like(weight) if need_dw else _absent(dy)
    db = _new_like(weight, (weight.shape[0],)) if need_db else _absent(dy)
    return dx, dw, db


def _linear_gelu_setup_context(ctx, inputs, output) -> None:
    x, weight, bias, activation, save_preact = inputs
    _, preact = output
    ctx.mark_non_differentiable(preact)
    ctx.activation = activation
    ctx.save_preact = save_preact
    ctx.has_bias = bias is not None
    # Without a saved pre-activation the backward recomputes it, and needs the bias for that.
    ctx.save_for_backward(x, weight, preact if save_preact else bias)


def _linear_gelu_fwd_backward(ctx, dy: Tensor, dpreact: Tensor | None):
    x, weight, saved = ctx.saved_tensors
    if ctx.save_preact:
        preact = saved
    else:
        preact = linear_preact_op(x, weight, saved if ctx.has_bias else None)
    need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
    dx, dw, db = linear_gelu_bwd(
        dy, x, weight, preact, ctx.activation, need_dx, need_dw, need_db and ctx.has_bias
    )
    return (
        dx if need_dx else None,
        dw if need_dw else None,
        db if need_db and ctx.has_bias else None,
        None,
        None,
    )


linear_gelu_fwd.register_autograd(
    _linear_gelu_fwd_backward, setup_context=_linear_gelu_setup_context
)


# ---- the FFN block ---------------------------------------------------------------------------


@torch.library.custom_op("triton_gelu::ffn_fwd", mutates_args=())
def ffn_fwd(
    x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None,
    seed: Tensor | None, p: float, activation: str, save_preact: bool,
    col_offset: int = 0, n_cols: int | None = None,
) -> tuple[Tensor, Tensor]:
    """(linear2(dropout(gelu(linear1(x)))), the pre-activation if save_preact else empty)."""
    p = check_ffn_2d(x, w1, b1, w2, b2, seed, p)
    col_offset, n_cols = check_dropout_columns(col_offset, n_cols, w1.shape[0])
    y, preact = launchers(x).ffn_forward(x, w1, b1, w2, b2, seed, p,
                                         check_activation(activation), save_preact,
                                         col_offset, n_cols)
    return y, _or_absent(preact, y)


@ffn_fwd.register_fake
def _ffn_fwd_fake(x, w1, b1, w2, b2, seed, p, activation, save_preact, col_offset=0,
                  n_cols=None):
    y = _new_like(x, (x.shape[0], w2.shape[0]))
    return y, (_new_like(x, (x.shape[0], w1.shape[0])) if save_preact else _absent(y))


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
    grads = launchers(x).ffn_backward(dy, x, w1, w2, preact, seed, p,
                                      check_activation(activation), needs, col_offset, n_cols)
    dx, dw1, db1, dw2, db2 = (_or_absent(g, dy) for g in grads)
    return dx, dw1, db1, dw2, db2


@ffn_bwd.register_fake
def _ffn_bwd_fake(dy, x, w1, w2, preact, seed, p, activation, needs, col_offset=0,
                  n_cols=None):
    shapes = (x.shape, w1.shape, (w1.shape[0],), w2.shape, (w2.shape[0],))
    return tuple(_new_like(x, shape) if need else _absent(dy)
                 for shape, need in zip(shapes, needs))


def _ffn_setup_context(ctx, inputs, output) -> None:
    x, w1, b1, w2, b2, seed, p, activation, save_preact, *columns = inputs
    _, preact = output
    ctx.mark_non_differentiable(preact)
    ctx.p, ctx.activation, ctx.save_preact = p, activation, save_preact
    ctx.columns = columns  # (col_offset, n_cols) where the call passed them
    ctx.has_bias = (b1 is not None, b2 is not None)
    # x and z (or, without a saved z, b1 to rebuild it) and the seed: never h or the mask.
    ctx.save_for_backward(x, w1, w2, preact if save_preact else b1, seed)


def _ffn_fwd_backward(ctx, dy: Tensor, dpreact: Tensor | None):
    x, w1, w2, saved, seed = ctx.saved_tensors
    preact = saved if ctx.save_preact else linear_preact_op(x, w1, saved)
    need_dx, need_dw1, need_db1, need_dw2, need_db2 = ctx.needs_input_grad[:5]
    needs = [need_dx, need_dw1, need_db1 and ctx.has_bias[0], need_dw2,
             need_db2 and ctx.has_bias[1]]
    grads = ffn_bwd(dy, x, w1, w2, preact, seed, ctx.p, ctx.activation, needs,
                    *ctx.columns)
    return (*(g if need else None for g, need in zip(grads, needs)),
            *(None,) * (4 + len(ctx.columns)))


ffn_fwd.register_autograd(_ffn_fwd_backward, setup_context=_ffn_setup_context)


# ---- Gated GELU (GeGLU) -----------------------------------------------------------------------


@torch.library.custom_op("triton_gelu::geglu_fwd", mutates_args=())
def geglu_fwd(
    x: Tensor, w_gate: Tensor, w_up: Tensor, b_gate: Tensor | None, b_up: Tensor | None,
    activation: str, save_gate_up: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(gelu(g) * u, g if save_gate_up else empty, u likewise), g and u the two projections,
    each (..., N) for x (..., K)."""
    check_geglu(x, w_gate, w_up, b_gate, b_up)
    x2d, shape = rows(x), _linear_out_shape(x, w_gate)
    h, gate, up = launchers(x2d).geglu_forward(
        x2d, w_gate, w_up, b_gate, b_up, check_activation(activation), save_gate_up
    )
    return h.view(shape), *(_or_absent(None if t is None else t.view(shape), h)
                            for t in (gate, up))


@geglu_fwd.register_fake
def _geglu_fwd_fake(x, w_gate, w_up, b_gate, b_up, activation, save_gate_up):
    h = _new_like(x, _linear_out_shape(x, w_gate))
    return h, *((_new_like(h), _new_like(h)) if save_gate_up else (_absent(h), _absent(h)))


@torch.library.custom_op("triton_gelu::geglu_gate_up", mutates_args=())
def geglu_gate_up_op(
    x: Tensor, w_gate: Tensor, w_up: Tensor, b_gate: Tensor | None, b_up: Tensor | None,
    p: float, activation: str,
) -> tuple[Tensor, Tensor]:
    """(g, u), bitwise what geglu_fwd / gated_ffn_fwd with dropout probability p saves (the
    backward recomputes them when not saved)."""
    check_geglu(x, w_gate, w_up, b_gate, b_up)
    p = check_dropout_p(p)
    x2d, shape = rows(x), _linear_out_shape(x, w_gate)
    gate, up = launchers(x2d).geglu_gate_up(x2d, w_gate, w_up, b_gate, b_up,
                                            check_activation(activation), p)
    return gate.view(shape), up.view(shape)


@geglu_gate_up_op.register_fake
def _geglu_gate_up_fake(x, w_gate, w_up, b_gate, b_up, p, activation):
    gate = _new_like(x, _linear_out_shape(x, w_gate))
    return gate, _new_like(gate)


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
    x2d = rows(x)
    dh2d, gate2d, up2d = (rows(check_tensor(name, t))
                          for name, t in (("dh", dh), ("gate", gate), ("up", up)))
    needs = check_geglu_backward(dh2d, x2d, w_gate, w_up, gate2d, up2d, needs)
    p = check_dropout(seed, p, x2d)
    col_offset, n_cols = check_dropout_columns(col_offset, n_cols, w_gate.shape[0])
    dx, dwg, dwu, dbg, dbu, h = launchers(x2d).geglu_backward(
        dh2d, x2d, w_gate, w_up, gate2d, up2d, check_activation(activation), needs, write_h,
        seed, p, col_offset, n_cols,
    )
    dx, h = (None if t is None else t.view(like.shape) for t, like in ((dx, x), (h, dh)))
    dx, dwg, dwu, dbg, dbu, h = (_or_absent(t, dh) for t in (dx, dwg, dwu, dbg, dbu, h))
    return dx, dwg, dwu, dbg, dbu, h


@geglu_bwd.register_fake
def _geglu_bwd_fake(dh, x, w_gate, w_up, gate, up, seed, p, activation, needs, write_h,
                    col_offset=0, n_cols=None):
    shapes = (x.shape, w_gate.shape, w_up.shape, w_gate.shape[:1], w_up.shape[:1], gate.shape)
    return tuple(_new_like(dh, shape) if wanted else _absent(dh)
                 for shape, wanted in zip(shapes, (*needs, write_h)))


def _geglu_backward_through_op(dh, x, w_gate, w_up, gate, up, activation, needs,
                               write_h=False, seed=None, p=0.0, col_offset=0, n_cols=None):
    """``geglu_bwd`` with the launchers' conventions (argument order, None for what was not
    asked for)."""
    outputs = geglu_bwd(dh, x, w_gate, w_up, gate, up, seed, p, activation, list(needs),
                        write_h, col_offset, n_cols)
    return tuple(t if wanted else None for t, wanted in zip(outputs, (*needs, write_h)))


def _save_gate_up_or_biases(ctx, tensors, biases, gate, up, save_gate_up) -> None:
    """Keep g and u for the backward, or (recompute) the biases that rebuild them."""
    ctx.save_gate_up = save_gate_up
    ctx.has_bias = tuple(b is not None for b in biases)
    ctx.save_for_backward(*tensors, *((gate, up) if save_gate_up else biases))


def _saved_gate_up(ctx, x, w_gate, w_up, kept, p: float = 0.0) -> tuple[Tensor, Tensor]:
    if ctx.save_gate_up:
        return tuple(kept)
    biases = (b if has else None for b, has in zip(kept, ctx.has_bias))
    return geglu_gate_up_op(x, w_gate, w_up, *biases, p, ctx.activation)


def _geglu_setup_context(ctx, inputs, output) -> None:
    x, w_gate, w_up, b_gate, b_up, activation, save_gate_up = inputs
    _, gate, up = output
    ctx.mark_non_differentiable(gate, up)
    ctx.activation = activation
    _save_gate_up_or_biases(ctx, (x, w_gate, w_up), (b_gate, b_up), gate, up, save_gate_up)


def _geglu_fwd_backward(ctx, dh: Tensor, dgate, dup):
    x, w_gate, w_up, *kept = ctx.saved_tensors
    gate, up = _saved_gate_up(ctx, x, w_gate, w_up, kept)
    needs = [*ctx.needs_input_grad[:3], *(need and has for need, has in
                                          zip(ctx.needs_input_grad[3:5], ctx.has_bias))]
    grads = _geglu_backward_through_op(dh, x, w_gate, w_up, gate, up, ctx.activation,
                                       needs)
    return (*grads[:5], None, None)


geglu_fwd.register_autograd(_geglu_fwd_backward, setup_context=_geglu_setup_context)


@torch.library.custom_op("triton_gelu::gated_ffn_fwd", mutates_args=())
def gated_ffn_fwd(
    x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, b_gate: Tensor | None,
    b_up: Tensor | None, b_down: Tensor | None, seed: Tensor | None, p: float,
    activation: str, save_gate_up: bool, col_offset: int = 0, n_cols: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(down(dropout(gelu(g) * u)), g if save_gate_up else empty, u likewise); dropout with
    probability p and the mask of ``seed`` (None when p == 0) at hidden columns ``col_offset``
    .. of ``n_cols``."""
    check_geglu_2d(x, w_gate, w_up, b_gate, b_up)
    check_down(w_gate, w_down, b_down)
    p = check_dropout(seed, p, x)
    col_offset, n_cols = check_dropout_columns(col_offset, n_cols, w_gate.shape[0])
    activation = check_activation(activation)
    y, gate, up = _gated_block.block_forward(
        x, w_gate, w_up, w_down, b_gate, b_up, b_down, seed, p, activation, save_gate_up,
        launchers(x).geglu_forward, col_offset, n_cols,
    )
    return y, _or_absent(gate, y), _or_absent(up, y)


@gated_ffn_fwd.register_fake
def _gated_ffn_fwd_fake(x, w_gate, w_up, w_down, b_gate, b_up, b_down, seed, p,
                        activation, save_gate_up, col_offset=0, n_cols=None):
    y = _new_like(x, (x.shape[0], w_down.shape[0]))
    hidden = (x.shape[0], w_gate.shape[0])
    return y, *((_new_like(x, hidden), _new_like(x, hidden)) if save_gate_up
                else (_absent(y), _absent(y)))


def _gated_ffn_setup_context(ctx, inputs, output) -> None:
    (x, w_gate, w_up, w_down, b_gate, b_up, b_down, seed, p, activation,
     save_gate_up, *columns) = inputs
    _, gate, up = output
    ctx.mark_non_differentiable(gate, up)
    ctx.p, ctx.activation, ctx.columns = p, activation, columns
    ctx.has_down_bias = b_down is not None
    # x, g, u (or the biases that rebuild them) and the seed: never h or the dropout mask.
    _save_gate_up_or_biases(ctx, (x, w_gate, w_up, w_down, seed), (b_gate, b_up), gate, up,
                            save_gate_up)


def _gated_ffn_fwd_backward(ctx, dy: Tensor, dgate, dup):
    x, w_gate, w_up, w_down, seed, *kept = ctx.saved_tensors
    gate, up = _saved_gate_up(ctx, x, w_gate, w_up, kept, ctx.p)
    has = (True, True, True, True, *ctx.has_bias, ctx.has_down_bias)
    needs = [need and present for need, present in zip(ctx.needs_input_grad[:7], has)]
    grads = _gated_block.block_backward(dy, x, w_gate, w_up, w_down, gate, up, seed, ctx.p,
                                        ctx.activation, needs, _geglu_backward_through_op,
                                        *ctx.columns)
    return (*grads, None, None, None, None, *(None,) * len(ctx.columns))


gated_ffn_fwd.register_autograd(_gated_ffn_fwd_backward, setup_context=_gated_ffn_setup_context)


# ---- the entry points functional.py takes under torch.compile --------------------------------


def needs_grad(*tensors: Tensor | None) -> bool:
    """Whether autograd will ask for a gradient of any of ``tensors`` (else: inference)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def linear_gelu(
    x: Tensor, weight: Tensor, bias: Tensor | None, activation: str, recompute: bool
) -> Tensor:
    """``functional.linear_gelu`` through the custom ops, for x (..., K) already validated and
    cast for autocast (the cast stays outside the ops, as on the eager path)."""
    save_preact = needs_grad(x, weight, bias) and not recompute
    y, _ = linear_gelu_fwd(x, weight, bias, activation, save_preact)
    return y


def feed_forward(
    x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None,
    seed: Tensor | None, p: float, activation: str, recompute: bool,
    col_offset: int = 0, n_cols: int | None = None,
) -> Tensor:
    """``functional.feed_forward`` through the custom ops, for operands already validated and
    cast for autocast, and the call's dropout seed already drawn (None when p == 0)."""
    save_preact = needs_grad(x, w1, b1, w2, b2) and not recompute
    y, _ = ffn_fwd(rows(x), w1, b1, w2, b2, seed, p, activation, save_preact,
                   col_offset, n_cols)
    return y.view(*x.shape[:-1], w2.shape[0])


def geglu(
    x: Tensor, w_gate: Tensor, w_up: Tensor, b_gate: Tensor | None, b_up: Tensor | None,
    activation: str, recompute: bool,
) -> Tensor:
    """``functional.geglu`` through the custom ops (x (..., K), validated and autocast)."""
    save = needs_grad(x, w_gate, w_up, b_gate, b_up) and not recompute
    h, _, _ = geglu_fwd(x, w_gate, w_up, b_gate, b_up, activation, save)
    return h


def gated_feed_forward(
    x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, b_gate: Tensor | None,
    b_up: Tensor | None, b_down: Tensor | None, seed: Tensor | None, p: float,
    activation: str, recompute: bool, col_offset: int = 0, n_cols: int | None = None,
) -> Tensor:
    """``functional.gated_feed_forward`` through the custom ops, the call's dropout seed already
    drawn (None when p == 0)."""
    save = needs_grad(x, w_gate, w_up, w_down, b_gate, b_up, b_down) and not recompute
    y, _, _ = gated_ffn_fwd(rows(x), w_gate, w_up, w_down, b_gate, b_up, b_down, seed, p,
                            activation, save, col_offset, n_cols)
    return y.view(*x.shape[:-1], w_down.shape[0])
