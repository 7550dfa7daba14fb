"""The functional API: autograd-aware entry points that validate, then call the kernels."""

from __future__ import annotations

import sys
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from . import _gated_block, ops
from ._backend import launchers
from ._runtime import runs_triton
from ._settings import tune_policy
from .activations import resolve, torch_activation
from ._checks import (
    check_down, check_dropout_p, check_ffn, check_geglu, check_linear,
    check_tensor,
)
from .ops import rows as _rows


def distributed(*tensors: torch.Tensor | None) -> bool:
    """Whether any operand is a DTensor (tensor parallel). Costs a dict look-up while
    torch.distributed.tensor was never imported (no DTensor can exist then), and imports nothing."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and any(isinstance(t, dtensor.DTensor) for t in tensors)


def _dtensor():
    """``triton_gelu._dtensor`` (the functional API on DTensors), imported on the first DTensor.
    Looked up in sys.modules first: torch.compile traces that without a graph break."""
    module = sys.modules.get(__package__ + "._dtensor")
    if module is None:
        from . import _dtensor as module
    return module


def _fallback(x: torch.Tensor) -> bool:
    """Whether the call runs on the PyTorch fallback (no Triton kernel can run for x). Without
    dropout the fallback is eager PyTorch's own ops under PyTorch's autograd: its speed and its
    saved tensors; the kernels' float32 formulas run only where dropout must draw their mask.
    The fallback reads the tuning policy, so a bad one is refused here as on every path (on
    the others ``launchers`` reads it: not twice per call)."""
    if runs_triton(x):
        return False
    tune_policy()
    return True


def _linear_act(x, weight, bias, activation: str) -> torch.Tensor:
    return torch_activation(F.linear(x, weight, bias), activation)


class _GELUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, activation: str) -> torch.Tensor:
        ctx.activation = activation
        ctx.save_for_backward(x)
        return launchers(x).gelu_forward(x, activation)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: torch.Tensor):
        (x,) = ctx.saved_tensors
        # A fresh dx every call: nothing saved is written, so a second backward is unchanged.
        return launchers(x).gelu_backward(dy, x, ctx.activation), None


def gelu(x: torch.Tensor, approximate: str = "none", *,
         activation: str | None = None) -> torch.Tensor:
    """``torch.nn.functional.gelu(x, approximate)`` with Triton kernels for forward and backward.

    ``approximate="none"`` is the exact form x * Phi(x); ``"tanh"`` the tanh approximation.
    ``activation`` names the form instead (``triton_gelu.activations``: "gelu", "gelu_tanh",
    "quick_gelu" = x * sigmoid(1.702 x), CLIP's); every function and module takes it.
    float32, float16 and bfloat16 inputs of any shape; math in float32, output in x's dtype.
    """
    activation = resolve(approximate, activation)
    check_tensor("x", x)
    if distributed(x):  # DTensor: the custom op, whose sharding rule runs it on the local shard
        return _dtensor().gelu(x, activation)
    if torch.compiler.is_compiling():  # torch.compile traces the custom op (ops.py), not this
        return ops.gelu_fwd(x, activation)
    if _fallback(x):
        return torch_activation(x, activation)
    return _GELUFunction.apply(x, activation)


# The device types c10 names that autocast does not serve (meta, lazy...), asked of torch once.
# Any other type (a renamed PrivateUse1 backend's included) is served, as PrivateUse1 is.
_NO_AUTOCAST = frozenset(
    name for name in ("cpu", "cuda", "ipu", "xpu", "opengl", "opencl", "ideep", "hip", "ve",
                      "fpga", "maia", "xla", "lazy", "vulkan", "mps", "meta", "hpu", "mtia",
                      "privateuseone")
    if not torch.amp.is_autocast_available(name)
)


def _autocast_available_by_name(device_type: str) -> bool:
    return device_type not in _NO_AUTOCAST


# torch.amp.is_autocast_available calls torch._C._is_autocast_available, which Dynamo folds to a
# constant from torch 2.12 on; torch 2.11's Dynamo cannot trace it (torch.compile(fullgraph=True)
# fails), so there the answer comes from the set above, which it can read.
_autocast_available = (torch.amp.is_autocast_available if torch.__version__ >= "2.12"
                       else _autocast_available_by_name)


def _autocast_linear(*tensors: Any) -> tuple[Any, ...]:
    """Cast the operands as ``F.linear`` is cast under autocast: to the autocast dtype of their
    device (fp16/bf16/fp32 only; float64 is left alone, as autocast does, and then refused).
    The first is a checked tensor; the others are checked after the cast (hence ``Any``)."""
    device_type = tensors[0].device.type
    if not (_autocast_available(device_type)
            and torch.is_autocast_enabled(device_type)):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(
        t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point()
        and t.dtype != torch.float64 else t
        for t in tensors
    )


class _LinearGELUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, activation: str, recompute: bool) -> torch.Tensor:
        x2d = _rows(x)
        y, preact = launchers(x2d).linear_gelu_forward(
            x2d, weight, bias, activation, save_preact=not recompute
        )
        ctx.activation = activation
        ctx.x_shape = x.shape
        # recompute: keep what rebuilds z (x, W, b) instead of z, one (M, N) tensor less.
        ctx.save_for_backward(x2d, weight, bias if recompute else None, preact)
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: torch.Tensor):
        x2d, weight, bias, preact = ctx.saved_tensors
        if preact is None:
            preact = launchers(x2d).linear_preact(x2d, weight, bias)
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        # Fresh gradients every call: nothing saved is written, so a second backward is unchanged.
        dx, dw, db = launchers(x2d).linear_gelu_backward(
            _rows(dy), x2d, weight, preact, ctx.activation, need_dx, need_dw, need_db
        )
        return None if dx is None else dx.view(ctx.x_shape), dw, db, None, None


def linear_gelu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
    approximate: str = "none", recompute: bool = False, *, activation: str | None = None,
) -> torch.Tensor:
    """``F.gelu(F.linear(x, weight, bias), approximate)`` in one fused Triton kernel.

    x (..., in_features), weight (out_features, in_features), bias (out_features,) or None;
    float32, float16 or bfloat16, all of one dtype (under autocast they are cast to the autocast
    dtype first, as for ``F.linear``). Returns (..., out_features) in that dtype. Differentiable
    in x, weight and bias. ``recompute=True`` saves memory: the backward recomputes the
    pre-activation x @ W^T + b instead of keeping it from the forward. ``activation``: as in
    ``gelu``.
    """
    activation = resolve(approximate, activation)
    check_tensor("x", x)
    x, weight, bias = _autocast_linear(x, weight, bias)
    check_linear(x, weight, bias)
    if distributed(x, weight, bias):  # DTensor: the custom ops, run on the local shards
        return _dtensor().linear_gelu(x, weight, bias, activation, recompute)
    if torch.compiler.is_compiling():  # torch.compile traces the custom ops (ops.py), not these
        return ops.linear_gelu(x, weight, bias, activation, recompute)
    if _fallback(x):
        return _linear_act(x, weight, bias, activation)
    if not ops.needs_grad(x, weight, bias):
        # Inference: no graph and no saved pre-activation; the kernel writes only y.
        x2d = _rows(x)
        y, _ = launchers(x2d).linear_gelu_forward(
            x2d, weight, bias, activation, save_preact=False
        )
        return y.view(*x.shape[:-1], weight.shape[0])
    return _LinearGELUFunction.apply(x, weight, bias, activation, recompute)


# ---- the FFN block ---------------------------------------------------------------------------


class _BlockConfig(NamedTuple):
    """What an FFN block's autograd node (plain or gated) carries besides tensors."""

    p: float  # dropout probability; 0: no dropout (eval, or none asked for)
    activation: str
    recompute: bool
    # The hidden columns are columns col_offset .. of n_cols (None: all of them); the dropout
    # mask is drawn for those positions (tensor parallel: a rank's shard of the hidden layer).
    col_offset: int = 0
    n_cols: int | None = None


class _FeedForwardFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, seed: torch.Tensor | None,
                config: _BlockConfig) -> torch.Tensor:
        x2d = _rows(x)
        y, preact = launchers(x2d).ffn_forward(
            x2d, w1, b1, w2, b2, seed, config.p, config.activation,
            save_preact=not config.recompute, col_offset=config.col_offset,
            n_cols=config.n_cols,
        )
        ctx.config = config
        ctx.x_shape = x.shape
        # For the backward: x and z, or with recompute x alone (z = x @ W1^T + b1 is rebuilt
        # from the parameters), and the dropout seed (8 bytes). Never GELU's output, the mask
        # or the dropout output: the backward regenerates them from z and the seed.
        ctx.save_for_backward(x2d, w1, b1 if config.recompute else None, w2, preact, seed)
        return y  # (rows, out): the caller views it N-D, outside the Function (see below)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: torch.Tensor):
        x2d, w1, b1, w2, preact, seed = ctx.saved_tensors
        config = ctx.config
        if preact is None:
            preact = launchers(x2d).linear_preact(x2d, w1, b1)
        # Fresh gradients every call: nothing saved is written, so a second backward is unchanged.
        dx, dw1, db1, dw2, db2 = launchers(x2d).ffn_backward(
            _rows(dy), x2d, w1, w2, preact, seed, config.p, config.activation,
            ctx.needs_input_grad[:5], config.col_offset, config.n_cols,
        )
        return None if dx is None else dx.view(ctx.x_shape), dw1, db1, dw2, db2, None, None


def dropout_seed(device: torch.device | str) -> torch.Tensor:
    """The seed of one dropout call: a 1-element int64 tensor drawn on ``device`` from PyTorch's
    default generator there (``torch.manual_seed`` makes it reproducible). Drawn by a device
    op, so there is no host sync and CUDA-graph capture and torch.compile trace it."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)


def feed_forward(
    x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
    b2: torch.Tensor | None, p: float = 0.0, approximate: str = "none", training: bool = True,
    recompute: bool = False, *, activation: str | None = None,
) -> torch.Tensor:
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
    activation = resolve(approximate, activation)
    p = check_dropout_p(p)
    check_tensor("x", x)
    x, w1, b1, w2, b2 = _autocast_linear(x, w1, b1, w2, b2)
    check_ffn(x, w1, b1, w2, b2)
    if not training:
        p = 0.0
    if distributed(x, w1, b1, w2, b2):
        # Tensor parallel: the whole block on each rank's shards where the layout allows, else
        # linear_gelu and PyTorch's dropout and linear on the DTensors (_dtensor.py).
        def fused(x, first, w2, b2, col_offset: int, n_cols: int) -> torch.Tensor:
            ((w1, b1),) = first
            config = _BlockConfig(p, activation, recompute, col_offset, n_cols)
            return _feed_forward(x, w1, b1, w2, b2, config)

        def unfused() -> torch.Tensor:
            h = linear_gelu(x, w1, b1, recompute=recompute, activation=activation)
            return _dtensor().linear(F.dropout(h, p, training), w2, b2)

        return _dtensor().run_block(x, [(w1, b1)], (w2, b2), p > 0.0, fused, unfused,
                                     "FFN block")
    return _feed_forward(x, w1, b1, w2, b2, _BlockConfig(p, activation, recompute))


def _feed_forward(x, w1, b1, w2, b2, config: _BlockConfig) -> torch.Tensor:
    """The FFN block on plain tensors, validated and cast for autocast; draws the call's seed."""
    seed = dropout_seed(x.device) if config.p > 0.0 else None
    if torch.compiler.is_compiling():  # torch.compile traces the custom ops (ops.py)
        return ops.feed_forward(x, w1, b1, w2, b2, seed, *config)
    if seed is None and _fallback(x):
        return F.linear(_linear_act(x, w1, b1, config.activation), w2, b2)
    if not ops.needs_grad(x, w1, b1, w2, b2):
        # Inference: no graph and no saved pre-activation.
        x2d = _rows(x)
        y, _ = launchers(x2d).ffn_forward(x2d, w1, b1, w2, b2, seed, config.p,
                                          config.activation, save_preact=False,
                                          col_offset=config.col_offset, n_cols=config.n_cols)
        return y.view(*x.shape[:-1], w2.shape[0])
    # Viewed N-D outside the Function: a view made inside it could not be modified in place
    # (Falcon's ``mlp_output += attention_output``).
    return _FeedForwardFunction.apply(x, w1, b1, w2, b2, seed, config).view(
        *x.shape[:-1], w2.shape[0])


# ---- Gated GELU (GeGLU) and the gated FFN block ---------------------------------------------


class _GeGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_gate, w_up, b_gate, b_up, activation: str, recompute: bool):
        x2d = _rows(x)
        h, gate, up = launchers(x2d).geglu_forward(
            x2d, w_gate, w_up, b_gate, b_up, activation, save_gate_up=not recompute
        )
        ctx.activation, ctx.recompute, ctx.x_shape = activation, recompute, x.shape
        # recompute: keep what rebuilds g and u (x, the weights, the biases) instead of them.
        ctx.save_for_backward(x2d, w_gate, w_up, *((b_gate, b_up) if recompute else (gate, up)))
        return h.view(*x.shape[:-1], w_gate.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dh: torch.Tensor):
        x2d, w_gate, w_up, *kept = ctx.saved_tensors
        backend = launchers(x2d)
        gate, up = (backend.geglu_gate_up(x2d, w_gate, w_up, *kept, ctx.activation)
                    if ctx.recompute else kept)
        # Fresh gradients every call: nothing saved is written, so a second backward is unchanged.
        dx, dwg, dwu, dbg, dbu, _ = backend.geglu_backward(
            _rows(dh), x2d, w_gate, w_up, gate, up, ctx.activation,
            ctx.needs_input_grad[:5],
        )
        return None if dx is None else dx.view(ctx.x_shape), dwg, dwu, dbg, dbu, None, None


def _prepare_geglu(x, w_gate, w_up, b_gate, b_up, approximate, activation):
    """Validate and autocast GeGLU's operands (as F.linear's); return them and the activation's
    name (approximate's default is "tanh" here)."""
    activation = resolve(approximate, activation, default="tanh")
    check_tensor("x", x)
    x, w_gate, w_up, b_gate, b_up = _autocast_linear(x, w_gate, w_up, b_gate, b_up)
    check_geglu(x, w_gate, w_up, b_gate, b_up)
    return x, w_gate, w_up, b_gate, b_up, activation


def geglu(
    x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
    b_gate: torch.Tensor | None = None, b_up: torch.Tensor | None = None,
    approximate: str = "tanh", recompute: bool = False, *, activation: str | None = None,
) -> torch.Tensor:
    """``F.gelu(F.linear(x, w_gate, b_gate), approximate) * F.linear(x, w_up, b_up)``: both
    projections and the gate in one Triton kernel.

    x (..., in_features); w_gate and w_up (hidden_features, in_features) of the same shape;
    b_gate and b_up (hidden_features,) or None; float32, float16 or bfloat16, all of one dtype
    (under autocast they are cast first, as for ``F.linear``). Returns (..., hidden_features).
    Differentiable in x, both weights and both biases. The backward keeps x, g and u (eager
    PyTorch also keeps gelu(g)); ``recompute=True`` keeps x only and recomputes g and u.
    ``activation``: as in ``gelu`` (approximate's default "tanh" yields to it).
    """
    x, w_gate, w_up, b_gate, b_up, activation = _prepare_geglu(
        x, w_gate, w_up, b_gate, b_up, approximate, activation)
    if distributed(x, w_gate, w_up, b_gate, b_up):  # DTensor: the custom ops on the shards
        return _dtensor().geglu(x, w_gate, w_up, b_gate, b_up, activation, recompute)
    if torch.compiler.is_compiling():  # torch.compile traces the custom ops (ops.py)
        return ops.geglu(x, w_gate, w_up, b_gate, b_up, activation, recompute)
    if _fallback(x):
        return _linear_act(x, w_gate, b_gate, activation) * F.linear(x, w_up, b_up)
    if not ops.needs_grad(x, w_gate, w_up, b_gate, b_up):
        # Inference: no graph, nothing saved; the kernel writes only h.
        x2d = _rows(x)
        h, _, _ = launchers(x2d).geglu_forward(
            x2d, w_gate, w_up, b_gate, b_up, activation, save_gate_up=False
        )
        return h.view(*x.shape[:-1], w_gate.shape[0])
    return _GeGLUFunction.apply(x, w_gate, w_up, b_gate, b_up, activation, recompute)


class _GatedFeedForwardFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_gate, w_up, w_down, b_gate, b_up, b_down, seed: torch.Tensor | None,
                config: _BlockConfig):
        x2d = _rows(x)
        y, gate, up = _gated_block.block_forward(
            x2d, w_gate, w_up, w_down, b_gate, b_up, b_down, seed, config.p,
            config.activation, not config.recompute, launchers(x2d).geglu_forward,
            config.col_offset, config.n_cols,
        )
        ctx.config, ctx.x_shape = config, x.shape
        # Not h, the dropout mask or dropout(h): the backward regenerates them from g, u and
        # the seed (8 bytes); with recompute g and u too, from x and the parameters.
        ctx.save_for_backward(x2d, w_gate, w_up, w_down, seed,
                              *((b_gate, b_up) if config.recompute else (gate, up)))
        return y.view(*x.shape[:-1], w_down.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: torch.Tensor):
        x2d, w_gate, w_up, w_down, seed, *kept = ctx.saved_tensors
        config, backend = ctx.config, launchers(x2d)
        gate, up = (backend.geglu_gate_up(x2d, w_gate, w_up, *kept, config.activation,
                                          config.p)
                    if config.recompute else kept)
        dx, *grads = _gated_block.block_backward(
            _rows(dy), x2d, w_gate, w_up, w_down, gate, up, seed, config.p,
            config.activation, ctx.needs_input_grad[:7], backend.geglu_backward,
            config.col_offset, config.n_cols,
        )
        return None if dx is None else dx.view(ctx.x_shape), *grads, None, None


def gated_feed_forward(
    x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
    b_gate: torch.Tensor | None = None, b_up: torch.Tensor | None = None,
    b_down: torch.Tensor | None = None, approximate: str = "tanh", dropout: float = 0.0,
    training: bool = False, recompute: bool = False, *, activation: str | None = None,
) -> torch.Tensor:
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
    p = check_dropout_p(dropout)
    x, w_gate, w_up, b_gate, b_up, activation = _prepare_geglu(
        x, w_gate, w_up, b_gate, b_up, approximate, activation)
    w_down, b_down = _autocast_linear(x, w_down, b_down)[1:]
    check_down(w_gate, w_down, b_down)
    if not training:
        p = 0.0
    if distributed(x, w_gate, w_up, w_down, b_gate, b_up, b_down):
        # Tensor parallel: the whole block on each rank's shards where the layout allows, else
        # geglu and PyTorch's dropout and linear on the DTensors (_dtensor.py).
        def fused(x, first, w_down, b_down, col_offset: int, n_cols: int) -> torch.Tensor:
            (w_gate, b_gate), (w_up, b_up) = first
            config = _BlockConfig(p, activation, recompute, col_offset, n_cols)
            return _gated_feed_forward(x, w_gate, w_up, w_down, b_gate, b_up, b_down, config)

        def unfused() -> torch.Tensor:
            h = geglu(x, w_gate, w_up, b_gate, b_up, recompute=recompute, activation=activation)
            return _dtensor().linear(F.dropout(h, p, training), w_down, b_down)

        return _dtensor().run_block(x, [(w_gate, b_gate), (w_up, b_up)], (w_down, b_down),
                                     p > 0.0, fused, unfused, "gated FFN block")
    return _gated_feed_forward(x, w_gate, w_up, w_down, b_gate, b_up, b_down,
                               _BlockConfig(p, activation, recompute))


def _gated_feed_forward(x, w_gate, w_up, w_down, b_gate, b_up, b_down,
                        config: _BlockConfig) -> torch.Tensor:
    """The gated block on plain tensors, validated and cast for autocast; draws the seed."""
    seed = dropout_seed(x.device) if config.p > 0.0 else None
    if torch.compiler.is_compiling():  # torch.compile traces the custom ops (ops.py)
        return ops.gated_feed_forward(x, w_gate, w_up, w_down, b_gate, b_up, b_down, seed,
                                      *config)
    if seed is None and _fallback(x):
        h = _linear_act(x, w_gate, b_gate, config.activation) * F.linear(x, w_up, b_up)
        return F.linear(h, w_down, b_down)
    if not ops.needs_grad(x, w_gate, w_up, w_down, b_gate, b_up, b_down):
        x2d = _rows(x)
        y, _, _ = _gated_block.block_forward(
            x2d, w_gate, w_up, w_down, b_gate, b_up, b_down, seed, config.p,
            config.activation, False, launchers(x2d).geglu_forward, config.col_offset,
            config.n_cols,
        )
        return y.view(*x.shape[:-1], w_down.shape[0])
    return _GatedFeedForwardFunction.apply(x, w_gate, w_up, w_down, b_gate, b_up, b_down, seed,
                                           config)
