"""``gated_feed_forward``: y = down(dropout(act(x W_gate^T + b_gate) * (x W_up^T + b_up))), the
gated FFN block (Gemma's MLP, T5's DenseGatedActDense) as one autograd node: the GeGLU kernels
for the gated hidden h (dropout applied in their epilogue), cuBLAS for the down projection, and
a backward that regenerates h and the dropout mask instead of keeping them.

Shapes: x (M, K), W_gate and W_up (N, K), W_down (D, N), b_down (D,), h (M, N), y (M, D).

Between forward and backward the block keeps x, g, u and, with dropout, the seed (one int64; x
alone and the seed with recompute), where eager PyTorch keeps x, g, gelu(g), u and h at p = 0,
and x, g, gelu(g), u, the mask and the dropout output at p > 0: per token (K + 2N) / (K + 4N)
of its bytes at p = 0, (K + 2N) / (K + 5N) at p > 0 (on a GPU eager's mask is one byte per
element: (2K + 4N) / (2K + 9N) in bf16). The backward, for the upstream gradient dy::

    dh = dy @ W_down                                  (M, D) x (D, N), the gradient of dropout(h)
    dx, dW_gate, dW_up, db_gate, db_up = GeGLU backward(dh, x, g, u, seed, p): its kernel
    regenerates the mask (dh * keep / (1 - p) is h's gradient) and dropout(h), bitwise the
    down projection's input of the forward (see ``kernels/geglu.py``)
    dW_down = dy^T @ dropout(h)                       (D, M) x (M, N)
    db_down = sum_m dy

The op's declaration: its checks, its custom op (``triton_gelu::gated_ffn_fwd``, on 2-D x; its
backward calls the GeGLU ops of ``geglu.py``, so the compiled backward keeps x, g, u and the
seed, never h or the mask), its one autograd definition, its DTensor sharding rule, its eager
PyTorch twin, and the public function with its per-problem plan.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from .._backend import launchers
from .._checks import (
    check_dropout, check_dropout_columns, check_dropout_p, check_weight_and_bias,
)
from .._declared import declare_sharding_rules
from .._plans import remember
from .._runtime import autocast_off
from .._settings import forced_path
from ..activations import check_activation
from . import geglu as _geglu
from ._core import (
    BlockConfig, Tensor, absent, autocast_linear, counted, distributed, dropout_seed,
    dtensor_ops, needs_grad, new_like, on_fallback, or_absent, plan_key_unless_autocast,
    planned, register_autograd, rows, unless_autocast,
)

# The custom ops (``torch.ops.triton_gelu``) ``triton_gelu.ops`` re-exports from here.
CUSTOM_OPS = ("gated_ffn_fwd",)


# ---- its checks (the shared ones: ``_checks.py``) -------------------------------------------


def check_down(w_gate: torch.Tensor, w_down: object, b_down: object | None) -> None:
    """The down projection of a gated block: w_down (out_features, hidden_features) reads the
    gated hidden of width w_gate.shape[0]; b_down (out_features,)."""
    check_weight_and_bias(("w_gate", w_gate), w_down, b_down, "w_down", "b_down")
    if w_down.shape[1] != w_gate.shape[0]:
        raise ValueError(
            f"w_down must be 2-D (out_features, hidden_features = {w_gate.shape[0]}) to read "
            f"the gated hidden of w_gate {tuple(w_gate.shape)}, got shape {tuple(w_down.shape)}"
        )


# ---- the block, on the GeGLU launchers / ops -------------------------------------------------


def block_forward(
    x2d: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, b_gate: Tensor | None,
    b_up: Tensor | None, b_down: Tensor | None, seed: Tensor | None, p: float,
    activation: str, save_gate_up: bool, col_offset: int = 0, n_cols: int | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(y, g, u): y (M, D) and, with ``save_gate_up``, g and u for the backward; dropout(h) is
    dropped once the down projection has read it. The hidden columns are columns
    ``col_offset`` .. of ``n_cols`` (by default all of them), for the dropout mask."""
    h, gate, up = launchers(x2d).geglu_forward(x2d, w_gate, w_up, b_gate, b_up, activation,
                                               save_gate_up, seed, p, col_offset, n_cols)
    return down(h, w_down, b_down), gate, up


def down(h: Tensor, w_down: Tensor, b_down: Tensor | None) -> Tensor:
    """The down projection, on operands already cast for autocast."""
    with autocast_off(h):
        return F.linear(h, w_down, b_down)


def block_backward(
    dy2d: Tensor, x2d: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, gate: Tensor,
    up: Tensor, seed: Tensor | None, p: float, activation: str, needs: Sequence[bool],
    geglu_backward: Callable, col_offset: int = 0, n_cols: int | None = None,
) -> tuple[Tensor | None, ...]:
    """(dx, dW_gate, dW_up, dW_down, db_gate, db_up, db_down), None for each not needed;
    ``needs`` has one flag each; ``geglu_backward`` is ``geglu_bwd`` or its eager twin."""
    need_dx, need_dwg, need_dwu, need_dwd, need_dbg, need_dbu, need_dbd = needs
    wanted = [need_dx, need_dwg, need_dwu, need_dbg, need_dbu]
    with autocast_off(x2d):  # one block for the PyTorch ops here and GeGLU's (it finds it off)
        dh = torch.mm(dy2d, w_down)
        grads = geglu_backward(dh, x2d, w_gate, w_up, gate, up, seed, p, activation, wanted,
                               need_dwd, col_offset, n_cols)
        del dh
        dwd = torch.mm(dy2d.t(), grads[5]) if need_dwd else None  # grads[5]: dropout(h)
        dbd = dy2d.sum(0) if need_dbd else None
    dx, dwg, dwu, dbg, dbu = (t if want else None for t, want in zip(grads, wanted))
    return dx, dwg, dwu, dwd, dbg, dbu, dbd


# ---- the custom op ----------------------------------------------------------------------------


@torch.library.custom_op("triton_gelu::gated_ffn_fwd", mutates_args=())
def gated_ffn_fwd(
    x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, b_gate: Tensor | None,
    b_up: Tensor | None, b_down: Tensor | None, seed: Tensor | None, p: float,
    activation: str, save_gate_up: bool, col_offset: int = 0, n_cols: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(down(dropout(gelu(g) * u)), g if save_gate_up else empty, u likewise); dropout with
    probability p and the mask of ``seed`` (None when p == 0) at hidden columns ``col_offset``
    .. of ``n_cols``."""
    _geglu.check_geglu_2d(x, w_gate, w_up, b_gate, b_up)
    check_down(w_gate, w_down, b_down)
    p = check_dropout(seed, p, x)
    col_offset, n_cols = check_dropout_columns(col_offset, n_cols, w_gate.shape[0])
    y, gate, up = block_forward(x, w_gate, w_up, w_down, b_gate, b_up, b_down, seed, p,
                                check_activation(activation), save_gate_up, col_offset, n_cols)
    return y, or_absent(gate, y), or_absent(up, y)


@gated_ffn_fwd.register_fake
def _gated_ffn_fwd_fake(x, w_gate, w_up, w_down, b_gate, b_up, b_down, seed, p,
                        activation, save_gate_up, col_offset=0, n_cols=None):
    y = new_like(x, (x.shape[0], w_down.shape[0]))
    hidden = (x.shape[0], w_gate.shape[0])
    return y, *((new_like(x, hidden), new_like(x, hidden)) if save_gate_up
                else (absent(y), absent(y)))


# ---- the autograd definition ----------------------------------------------------------------


def _setup_context(ctx, inputs, output) -> None:
    (x, w_gate, w_up, w_down, b_gate, b_up, b_down, seed, p, activation,
     save_gate_up, *columns) = inputs
    _, gate, up = output
    ctx.p, ctx.activation, ctx.columns = p, activation, columns
    ctx.has_down_bias = b_down is not None
    # x, g, u (or the biases that rebuild them) and the seed (8 bytes): never h, the dropout
    # mask or dropout(h), which the backward regenerates from g, u and the seed.
    _geglu.save_gate_up_or_biases(ctx, (x, w_gate, w_up, w_down, seed), (b_gate, b_up), gate,
                                  up, save_gate_up)


def _backward(ctx, dy: Tensor, dgate, dup):
    x, w_gate, w_up, w_down, seed, *kept = ctx.saved_tensors
    gate, up = _geglu.saved_gate_up(ctx, x, w_gate, w_up, kept, ctx.p)
    has = (True, True, True, True, *ctx.has_bias, ctx.has_down_bias)
    needs = [need and present for need, present in zip(ctx.needs_input_grad[:7], has)]
    grads = block_backward(dy, x, w_gate, w_up, w_down, gate, up, seed, ctx.p, ctx.activation,
                           needs, ctx.calls.backward, *ctx.columns)
    return (*grads, None, None, None, None, *(None,) * len(ctx.columns))


def _launch_forward(x, w_gate, w_up, w_down, b_gate, b_up, b_down, seed, p, activation,
                    save_gate_up, col_offset=0, n_cols=None):
    return block_forward(x, w_gate, w_up, w_down, b_gate, b_up, b_down, seed, p, activation,
                         save_gate_up, col_offset, n_cols)


GatedFeedForwardFunction = register_autograd(
    gated_ffn_fwd, "GatedFeedForwardFunction", _setup_context, _backward,
    traced=_geglu.TRACED)


def _bound_calls(backend, x: Tensor, w_gate: Tensor, config: BlockConfig,
                 save_gate_up: bool) -> SimpleNamespace:
    """The Function's calls for one problem (``forward``: ``_launch_forward``'s tensors;
    ``gate_up`` and ``backward``: GeGLU's, ``geglu.bound_calls``), each bound to it after its
    first call."""
    p, activation, _, col_offset, n_cols = config
    geglu = _geglu.bound_calls(backend, (math.prod(x.shape[:-1]), w_gate.shape[0]),
                               activation, save_gate_up, p, col_offset, n_cols)
    forward2d = geglu.forward2d

    def forward(x2d, w_gate, w_up, w_down, b_gate, b_up, b_down, seed):
        h, gate, up = forward2d(x2d, w_gate, w_up, b_gate, b_up, seed)
        return down(h, w_down, b_down), gate, up
    return SimpleNamespace(forward=forward, gate_up=geglu.gate_up, backward=geglu.backward,
                           constants=(p, activation, save_gate_up, col_offset, n_cols))


def traced(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, b_gate: Tensor | None,
           b_up: Tensor | None, b_down: Tensor | None, seed: Tensor | None, p: float,
           activation: str, recompute: bool, col_offset: int = 0,
           n_cols: int | None = None) -> Tensor:
    """``gated_feed_forward`` through the custom ops (torch.compile's trace), the call's seed
    already drawn (None when p == 0)."""
    save = needs_grad(x, w_gate, w_up, w_down, b_gate, b_up, b_down) and not recompute
    y, _, _ = gated_ffn_fwd(rows(x), w_gate, w_up, w_down, b_gate, b_up, b_down, seed, p,
                            activation, save, col_offset, n_cols)
    return y.view(*x.shape[:-1], w_down.shape[0])


# ---- its DTensor sharding rules --------------------------------------------------------------


@declare_sharding_rules
def sharding_rules(lay) -> dict:
    """{custom op: its DTensor sharding rule}, registered by ``_dtensor_rules`` (``lay``: that
    module, the layouts) on the first DTensor: as the FFN block's (``ffn.sharding_rules``); its
    backward is GeGLU's op and the down projection's PyTorch ops."""
    def forward(x, w_gate, w_up, w_down, b_gate, b_up, b_down, seed, p, activation,
                save_gate_up, col_offset=0, n_cols=None):  # outputs (y, g | empty, u | empty)
        return [([lo.last.y, lay.wanted(lo.first.y, save_gate_up),
                  lay.wanted(lo.first.y, save_gate_up)],
                 [lo.first.x, lo.first.weight, lo.first.weight, lo.last.weight,
                  lay.if_present(b_gate, lo.first.bias), lay.if_present(b_up, lo.first.bias),
                  lay.if_present(b_down, lo.last.bias), lay.if_present(seed, lay.R), None, None,
                  None, None, None])
                for lo in lay.rule_block_layouts(x.ndim, p > 0.0)]
    return {torch.ops.triton_gelu.gated_ffn_fwd.default: forward}


# ---- the public function --------------------------------------------------------------------


def gated_feed_forward(
    x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, b_gate: Tensor | None = None,
    b_up: Tensor | None = None, b_down: Tensor | None = None, approximate: str = "tanh",
    dropout: float = 0.0, training: bool = False, recompute: bool = False, *,
    activation: str | None = None,
) -> Tensor:
    """The gated FFN block ``F.linear(F.dropout(geglu(x, ...), dropout, training), w_down,
    b_down)`` (Gemma's MLP, T5's DenseGatedActDense) as one fused autograd node.

    w_down is (out_features, hidden_features), b_down (out_features,) or None; the rest is as
    in ``geglu``. ``dropout`` is the dropout probability p, in [0, 1): in training with p > 0
    the GeGLU kernel applies it to h in its epilogue (the FFN block's generator, its seed drawn
    from PyTorch's generator of x's device) and the backward regenerates the mask. The backward
    keeps x, g, u and the seed only, and regenerates the down projection's input
    dropout(gelu(g) * u) from them (``recompute=True``: x and the seed only). ``activation``:
    as in ``geglu``.
    """
    plan, key = planned("gated_feed_forward", (approximate, dropout, training, recompute,
                                               activation),
                        x, w_gate, w_up, w_down, b_gate, b_up, b_down)
    if plan is not None:
        return plan(x, w_gate, w_up, w_down, b_gate, b_up, b_down)
    return _unplanned(x, w_gate, w_up, w_down, b_gate, b_up, b_down, approximate, dropout,
                      training, recompute, activation, key)


def _unplanned(x, w_gate, w_up, w_down, b_gate, b_up, b_down, approximate, dropout, training,
               recompute, activation, key=None) -> Tensor:
    """``gated_feed_forward`` without a plan: validate, cast for autocast, route; plan the
    problem under ``key`` (None: do not)."""
    p = check_dropout_p(dropout)
    x, w_gate, w_up, b_gate, b_up, activation = _geglu.prepare(
        x, w_gate, w_up, b_gate, b_up, approximate, activation)
    w_down, b_down = autocast_linear(x, w_down, b_down)[1:]
    check_down(w_gate, w_down, b_down)
    if not training:
        p = 0.0
    if distributed(x, w_gate, w_up, w_down, b_gate, b_up, b_down):
        # Tensor parallel: the whole block on each rank's shards where the layout allows, else
        # geglu and PyTorch's dropout and linear on the DTensors (_dtensor.py).
        def fused(x, first, w_down, b_down, col_offset: int, n_cols: int) -> Tensor:
            (w_gate, b_gate), (w_up, b_up) = first
            config = BlockConfig(p, activation, recompute, col_offset, n_cols)
            return routed(x, w_gate, w_up, w_down, b_gate, b_up, b_down, config)

        def unfused() -> Tensor:
            h = _geglu.geglu(x, w_gate, w_up, b_gate, b_up, recompute=recompute,
                             activation=activation)
            return dtensor_ops().linear(F.dropout(h, p, training), w_down, b_down)

        return dtensor_ops().run_block(x, [(w_gate, b_gate), (w_up, b_up)], (w_down, b_down),
                                       p > 0.0, fused, unfused, "gated FFN block")
    key = plan_key_unless_autocast(key, x)
    config = BlockConfig(p, activation, recompute)
    if key is None or torch.compiler.is_compiling():
        return routed(x, w_gate, w_up, w_down, b_gate, b_up, b_down, config)
    launch = _plan(x, w_gate, config, functools.partial(
        _unplanned, approximate="tanh", dropout=p, training=True, recompute=recompute,
        activation=activation))
    return remember(key, launch)(x, w_gate, w_up, w_down, b_gate, b_up, b_down)


def routed(x, w_gate, w_up, w_down, b_gate, b_up, b_down, config: BlockConfig) -> Tensor:
    """The gated block on plain tensors, validated and cast for autocast, routed now."""
    if torch.compiler.is_compiling():  # torch.compile traces the custom ops
        seed = dropout_seed(x.device) if config.p > 0.0 else None
        return traced(x, w_gate, w_up, w_down, b_gate, b_up, b_down, seed, *config)
    return _plan(x, w_gate, config)(x, w_gate, w_up, w_down, b_gate, b_up, b_down)


def _plan(x: Tensor, w_gate: Tensor, config: BlockConfig, replan: Callable | None = None):
    """The problem's route (as ``linear_gelu``'s)."""
    p, activation = config.p, config.activation
    geglu = _geglu.eager_geglu(activation)
    if on_fallback(x) and config.n_cols is None:
        # PyTorch's own block, its dropout included (as in ``ffn.py``).
        def eager(x, w_gate, w_up, w_down, b_gate, b_up, b_down):
            h = geglu(x, w_gate, w_up, b_gate, b_up)
            return F.linear(F.dropout(h, p) if p > 0.0 else h, w_down, b_down)
        return eager
    if p == 0.0 and config.n_cols is None \
            and forced_path("geglu_fwd") == "torch" and forced_path("geglu_bwd") == "torch":
        return counted("geglu_fwd", "geglu_bwd",
                       lambda x, w_gate, w_up, w_down, b_gate, b_up, b_down: F.linear(
                           geglu(x, w_gate, w_up, b_gate, b_up), w_down, b_down))
    backend = launchers(x)
    calls = _bound_calls(backend, x, w_gate, config, save_gate_up=not config.recompute)
    infer = _bound_calls(backend, x, w_gate, config, False).forward  # no graph, nothing saved

    def launch(x, w_gate, w_up, w_down, b_gate, b_up, b_down):
        seed = dropout_seed(x.device) if p > 0.0 else None
        x2d = rows(x)
        if not needs_grad(x, w_gate, w_up, w_down, b_gate, b_up, b_down):
            y, _, _ = infer(x2d, w_gate, w_up, w_down, b_gate, b_up, b_down, seed)
        else:
            y = GatedFeedForwardFunction.apply(x2d, w_gate, w_up, w_down, b_gate, b_up, b_down,
                                               seed, calls)
        return y if x.dim() == 2 else y.view(*x.shape[:-1], w_down.shape[0])
    return unless_autocast(launch, x, replan)
