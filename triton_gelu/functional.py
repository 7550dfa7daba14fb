"""The functional API: autograd-aware entry points that validate, then call the kernels."""

from __future__ import annotations

import functools
import sys
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from . import _gated_block, ops
from ._backend import launchers
from ._plans import plans, remember
from ._runtime import path_runs, runs_triton
from ._settings import forced_in_python, forced_path, tune_policy
from .activations import ACTIVATIONS, resolve, torch_activation
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
    """Whether the call runs on the PyTorch fallback (no Triton kernel can run for x). There the
    ops are eager PyTorch's own under PyTorch's autograd (dropout included: PyTorch's mask),
    with eager's speed and saved tensors; only a tensor-parallel shard's dropout runs the
    kernels' float32 formulas, to draw the kernels' mask. The fallback reads the tuning policy,
    so a bad one is refused here as on every path (on the others ``launchers`` reads it)."""
    if runs_triton(x):
        return False
    tune_policy()
    return True


def _operand(t: torch.Tensor | None) -> tuple | None:
    """What an operand contributes to its problem's key: all the checks and routes read."""
    return None if t is None else (type(t), t.shape, t.dtype, t.device)


def _planned(entry: str, arguments: tuple, *operands: Any) -> tuple[Any, Any]:
    """(the plan of this problem or None, its key or None when it has none). No plan while
    torch.compile traces (the trace routes by itself), and no key for an operand that is not a
    tensor or an argument that is not hashable: the checks name what is wrong."""
    if torch.compiler.is_compiling():
        return None, None
    try:
        key = (entry, arguments, forced_in_python(), *map(_operand, operands))
        return plans.get(key), key
    except (AttributeError, TypeError):
        return None, None


def _unless_autocast(launch, x: torch.Tensor, unplanned):
    """The plan of a problem with Linear operands: ``launch`` them, unless autocast is on for
    their device, which casts them (then ``unplanned``: validated, cast and routed anew)."""
    device_type = x.device.type
    if not _autocast_available(device_type):
        return launch

    def run(*operands):
        if torch.is_autocast_enabled(device_type):
            return unplanned(*operands)
        return launch(*operands)
    return run


def _counted(forward_op: str, backward_op: str, fn):
    """``fn`` (eager PyTorch's ops) counting each call as a run of the forward op's "torch"
    path, as ``Paths`` counts the paths it runs, and, when it records a graph, one of the
    backward op's (the backward PyTorch's autograd will run; a hook to count it as it runs
    would cost more host time than the count is worth)."""
    def run(*args):
        y = fn(*args)
        path_runs[(forward_op, "torch")] += 1
        if y.requires_grad:
            path_runs[(backward_op, "torch")] += 1
        return y
    return run


def _linear_act(x, weight, bias, activation: str) -> torch.Tensor:
    return torch_activation(F.linear(x, weight, bias), activation)


class _GELUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, activation: str, backend) -> torch.Tensor:
        ctx.activation, ctx.backend = activation, backend
        ctx.save_for_backward(x)
        return backend.gelu_forward(x, activation)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: torch.Tensor):
        (x,) = ctx.saved_tensors
        # A fresh dx every call: nothing saved is written, so a second backward is unchanged.
        return ctx.backend.gelu_backward(dy, x, ctx.activation), None, None


def gelu(x: torch.Tensor, approximate: str = "none", *,
         activation: str | None = None) -> torch.Tensor:
    """``torch.nn.functional.gelu(x, approximate)`` with Triton kernels for forward and backward.

    ``approximate="none"`` is the exact form x * Phi(x); ``"tanh"`` the tanh approximation.
    ``activation`` names the form instead (``triton_gelu.activations``: "gelu", "gelu_tanh",
    "quick_gelu" = x * sigmoid(1.702 x), CLIP's); every function and module takes it.
    float32, float16 and bfloat16 inputs of any shape; math in float32, output in x's dtype.
    """
    plan, key = _planned("gelu", (approximate, activation), x)
    if plan is not None:
        return plan(x)
    activation = resolve(approximate, activation)
    check_tensor("x", x)
    if distributed(x):  # DTensor: the custom op, whose sharding rule runs it on the local shard
        return _dtensor().gelu(x, activation)
    if torch.compiler.is_compiling():  # torch.compile traces the custom op (ops.py), not this
        return ops.gelu_fwd(x, activation)
    return remember(key, _gelu_plan(x, activation))(x)


def _gelu_plan(x: torch.Tensor, activation: str):
    eager = ACTIVATIONS[activation].torch_value
    if _fallback(x):
        return eager
    if forced_path("gelu_fwd") == "torch" and forced_path("gelu_bwd") == "torch":
        return _counted("gelu_fwd", "gelu_bwd", eager)
    backend = launchers(x)

    def run(x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _GELUFunction.apply(x, activation, backend)
        return backend.gelu_forward(x, activation)  # inference: no graph, nothing saved
    return run


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
    def forward(ctx, x, weight, bias, activation: str, recompute: bool, backend) -> torch.Tensor:
        x2d = _rows(x)
        y, preact = backend.linear_gelu_forward(
            x2d, weight, bias, activation, save_preact=not recompute
        )
        ctx.activation, ctx.backend = activation, backend
        ctx.x_shape = x.shape
        # recompute: keep what rebuilds z (x, W, b) instead of z, one (M, N) tensor less.
        ctx.save_for_backward(x2d, weight, bias if recompute else None, preact)
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: torch.Tensor):
        x2d, weight, bias, preact = ctx.saved_tensors
        backend = ctx.backend
        if preact is None:
            preact = backend.linear_preact(x2d, weight, bias)
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        # Fresh gradients every call: nothing saved is written, so a second backward is unchanged.
        dx, dw, db = backend.linear_gelu_backward(
            _rows(dy), x2d, weight, preact, ctx.activation, need_dx, need_dw, need_db
        )
        return None if dx is None else dx.view(ctx.x_shape), dw, db, None, None, None


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
    plan, key = _planned("linear_gelu", (approximate, activation, recompute), x, weight, bias)
    if plan is not None:
        return plan(x, weight, bias)
    return _linear_gelu(x, weight, bias, resolve(approximate, activation), recompute, key)


def _linear_gelu(x, weight, bias, activation: str, recompute: bool, key=None) -> torch.Tensor:
    """``linear_gelu`` unplanned: validate, cast for autocast, route; plan the problem under
    ``key`` (None: do not)."""
    check_tensor("x", x)
    x, weight, bias = _autocast_linear(x, weight, bias)
    check_linear(x, weight, bias)
    if distributed(x, weight, bias):  # DTensor: the custom ops, run on the local shards
        return _dtensor().linear_gelu(x, weight, bias, activation, recompute)
    if torch.compiler.is_compiling():  # torch.compile traces the custom ops (ops.py), not these
        return ops.linear_gelu(x, weight, bias, activation, recompute)
    launch = _linear_gelu_plan(x, activation, recompute)
    if key is not None:
        remember(key, _unless_autocast(launch, x, functools.partial(
            _linear_gelu, activation=activation, recompute=recompute)))
    return launch(x, weight, bias)


def _linear_gelu_plan(x: torch.Tensor, activation: str, recompute: bool):
    eager = functools.partial(_linear_act, activation=activation)
    if _fallback(x):
        return eager
    if forced_path("linear_gelu_fwd") == "torch" and forced_path("linear_gelu_bwd") == "torch":
        return _counted("linear_gelu_fwd", "linear_gelu_bwd", eager)
    backend = launchers(x)

    def launch(x, weight, bias):
        if ops.needs_grad(x, weight, bias):
            return _LinearGELUFunction.apply(x, weight, bias, activation, recompute, backend)
        # Inference: no graph and no saved pre-activation; the kernel writes only y.
        x2d = _rows(x)
        y, _ = backend.linear_gelu_forward(x2d, weight, bias, activation, save_preact=False)
        return y.view(*x.shape[:-1], weight.shape[0])
    return launch


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
                config: _BlockConfig, backend) -> torch.Tensor:
        x2d = _rows(x)
        y, preact = backend.ffn_forward(
            x2d, w1, b1, w2, b2, seed, config.p, config.activation,
            save_preact=not config.recompute, col_offset=config.col_offset,
            n_cols=config.n_cols,
        )
        ctx.config, ctx.backend = config, backend
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
        config, backend = ctx.config, ctx.backend
        if preact is None:
            preact = backend.linear_preact(x2d, w1, b1)
        # Fresh gradients every call: nothing saved is written, so a second backward is unchanged.
        dx, dw1, db1, dw2, db2 = backend.ffn_backward(
            _rows(dy), x2d, w1, w2, preact, seed, config.p, config.activation,
            ctx.needs_input_grad[:5], config.col_offset, config.n_cols,
        )
        return None if dx is None else dx.view(ctx.x_shape), dw1, db1, dw2, db2, None, None, None


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
    plan, key = _planned("feed_forward", (p, approximate, training, recompute, activation),
                         x, w1, b1, w2, b2)
    if plan is not None:
        return plan(x, w1, b1, w2, b2)
    return _feed_forward_checked(x, w1, b1, w2, b2, p, resolve(approximate, activation),
                                 training, recompute, key)


def _feed_forward_checked(x, w1, b1, w2, b2, p, activation: str, training: bool,
                          recompute: bool, key=None) -> torch.Tensor:
    """``feed_forward`` unplanned: validate, cast for autocast, route; plan the problem under
    ``key`` (None: do not)."""
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
    config = _BlockConfig(p, activation, recompute)
    if key is None or torch.compiler.is_compiling():
        return _feed_forward(x, w1, b1, w2, b2, config)
    launch = _feed_forward_plan(x, config)
    remember(key, _unless_autocast(launch, x, functools.partial(
        _feed_forward_checked, p=p, activation=activation, training=True,
        recompute=recompute)))
    return launch(x, w1, b1, w2, b2)


def _feed_forward(x, w1, b1, w2, b2, config: _BlockConfig) -> torch.Tensor:
    """The FFN block on plain tensors, validated and cast for autocast, routed now."""
    if torch.compiler.is_compiling():  # torch.compile traces the custom ops (ops.py)
        seed = dropout_seed(x.device) if config.p > 0.0 else None
        return ops.feed_forward(x, w1, b1, w2, b2, seed, *config)
    return _feed_forward_plan(x, config)(x, w1, b1, w2, b2)


def _feed_forward_plan(x: torch.Tensor, config: _BlockConfig):
    p, activation = config.p, config.activation
    if _fallback(x) and config.n_cols is None:
        # PyTorch's own block, its dropout included (PyTorch's mask, from its generator): a
        # tensor-parallel shard alone draws the kernels' mask, to match the whole layer's.
        def eager(x, w1, b1, w2, b2):
            h = _linear_act(x, w1, b1, activation)
            return F.linear(F.dropout(h, p) if p > 0.0 else h, w2, b2)
        return eager
    if p == 0.0 and config.n_cols is None \
            and forced_path("ffn_fwd") == "torch" and forced_path("ffn_bwd") == "torch":
        return _counted("ffn_fwd", "ffn_bwd", lambda x, w1, b1, w2, b2: F.linear(
            _linear_act(x, w1, b1, activation), w2, b2))
    backend = launchers(x)

    def launch(x, w1, b1, w2, b2):
        seed = dropout_seed(x.device) if p > 0.0 else None
        if not ops.needs_grad(x, w1, b1, w2, b2):
            # Inference: no graph and no saved pre-activation.
            x2d = _rows(x)
            y, _ = backend.ffn_forward(x2d, w1, b1, w2, b2, seed, p, activation,
                                       save_preact=False, col_offset=config.col_offset,
                                       n_cols=config.n_cols)
            return y.view(*x.shape[:-1], w2.shape[0])
        # Viewed N-D outside the Function: a view made inside it could not be modified in
        # place (Falcon's ``mlp_output += attention_output``).
        return _FeedForwardFunction.apply(x, w1, b1, w2, b2, seed, config, backend).view(
            *x.shape[:-1], w2.shape[0])
    return launch


# ---- Gated GELU (GeGLU) and the gated FFN block ---------------------------------------------


class _GeGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_gate, w_up, b_gate, b_up, activation: str, recompute: bool, backend):
        x2d = _rows(x)
        h, gate, up = backend.geglu_forward(
            x2d, w_gate, w_up, b_gate, b_up, activation, save_gate_up=not recompute
        )
        ctx.activation, ctx.recompute, ctx.x_shape = activation, recompute, x.shape
        ctx.backend = backend
        # recompute: keep what rebuilds g and u (x, the weights, the biases) instead of them.
        ctx.save_for_backward(x2d, w_gate, w_up, *((b_gate, b_up) if recompute else (gate, up)))
        return h.view(*x.shape[:-1], w_gate.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dh: torch.Tensor):
        x2d, w_gate, w_up, *kept = ctx.saved_tensors
        backend = ctx.backend
        gate, up = (backend.geglu_gate_up(x2d, w_gate, w_up, *kept, ctx.activation)
                    if ctx.recompute else kept)
        # Fresh gradients every call: nothing saved is written, so a second backward is unchanged.
        dx, dwg, dwu, dbg, dbu, _ = backend.geglu_backward(
            _rows(dh), x2d, w_gate, w_up, gate, up, ctx.activation,
            ctx.needs_input_grad[:5],
        )
        return None if dx is None else dx.view(ctx.x_shape), dwg, dwu, dbg, dbu, None, None, None


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
    plan, key = _planned("geglu", (approximate, recompute, activation), x, w_gate, w_up,
                         b_gate, b_up)
    if plan is not None:
        return plan(x, w_gate, w_up, b_gate, b_up)
    return _geglu_checked(x, w_gate, w_up, b_gate, b_up, approximate, activation, recompute,
                          key)


def _geglu_checked(x, w_gate, w_up, b_gate, b_up, approximate, activation, recompute: bool,
                   key=None) -> torch.Tensor:
    """``geglu`` unplanned: validate, cast for autocast, route; plan the problem under ``key``
    (None: do not)."""
    x, w_gate, w_up, b_gate, b_up, activation = _prepare_geglu(
        x, w_gate, w_up, b_gate, b_up, approximate, activation)
    if distributed(x, w_gate, w_up, b_gate, b_up):  # DTensor: the custom ops on the shards
        return _dtensor().geglu(x, w_gate, w_up, b_gate, b_up, activation, recompute)
    if torch.compiler.is_compiling():  # torch.compile traces the custom ops (ops.py)
        return ops.geglu(x, w_gate, w_up, b_gate, b_up, activation, recompute)
    launch = _geglu_plan(x, activation, recompute)
    if key is not None:
        remember(key, _unless_autocast(launch, x, functools.partial(
            _geglu_checked, approximate="tanh", activation=activation, recompute=recompute)))
    return launch(x, w_gate, w_up, b_gate, b_up)


def _eager_geglu(x, w_gate, w_up, b_gate, b_up, activation: str) -> torch.Tensor:
    return _linear_act(x, w_gate, b_gate, activation) * F.linear(x, w_up, b_up)


def _geglu_plan(x: torch.Tensor, activation: str, recompute: bool):
    eager = functools.partial(_eager_geglu, activation=activation)
    if _fallback(x):
        return eager
    if forced_path("geglu_fwd") == "torch" and forced_path("geglu_bwd") == "torch":
        return _counted("geglu_fwd", "geglu_bwd", eager)
    backend = launchers(x)

    def launch(x, w_gate, w_up, b_gate, b_up):
        if ops.needs_grad(x, w_gate, w_up, b_gate, b_up):
            return _GeGLUFunction.apply(x, w_gate, w_up, b_gate, b_up, activation, recompute,
                                        backend)
        # Inference: no graph, nothing saved; the kernel writes only h.
        x2d = _rows(x)
        h, _, _ = backend.geglu_forward(x2d, w_gate, w_up, b_gate, b_up, activation,
                                        save_gate_up=False)
        return h.view(*x.shape[:-1], w_gate.shape[0])
    return launch


class _GatedFeedForwardFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_gate, w_up, w_down, b_gate, b_up, b_down, seed: torch.Tensor | None,
                config: _BlockConfig, backend):
        x2d = _rows(x)
        y, gate, up = _gated_block.block_forward(
            x2d, w_gate, w_up, w_down, b_gate, b_up, b_down, seed, config.p,
            config.activation, not config.recompute, backend.geglu_forward,
            config.col_offset, config.n_cols,
        )
        ctx.config, ctx.x_shape, ctx.backend = config, x.shape, backend
        # Not h, the dropout mask or dropout(h): the backward regenerates them from g, u and
        # the seed (8 bytes); with recompute g and u too, from x and the parameters.
        ctx.save_for_backward(x2d, w_gate, w_up, w_down, seed,
                              *((b_gate, b_up) if config.recompute else (gate, up)))
        return y.view(*x.shape[:-1], w_down.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: torch.Tensor):
        x2d, w_gate, w_up, w_down, seed, *kept = ctx.saved_tensors
        config, backend = ctx.config, ctx.backend
        gate, up = (backend.geglu_gate_up(x2d, w_gate, w_up, *kept, config.activation,
                                          config.p)
                    if config.recompute else kept)
        dx, *grads = _gated_block.block_backward(
            _rows(dy), x2d, w_gate, w_up, w_down, gate, up, seed, config.p,
            config.activation, ctx.needs_input_grad[:7], backend.geglu_backward,
            config.col_offset, config.n_cols,
        )
        return None if dx is None else dx.view(ctx.x_shape), *grads, None, None, None


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
    plan, key = _planned("gated_feed_forward", (approximate, dropout, training, recompute,
                                                activation),
                         x, w_gate, w_up, w_down, b_gate, b_up, b_down)
    if plan is not None:
        return plan(x, w_gate, w_up, w_down, b_gate, b_up, b_down)
    return _gated_feed_forward_checked(x, w_gate, w_up, w_down, b_gate, b_up, b_down,
                                       approximate, dropout, training, recompute, activation, key)


def _gated_feed_forward_checked(x, w_gate, w_up, w_down, b_gate, b_up, b_down, approximate,
                                dropout, training, recompute, activation,
                                key=None) -> torch.Tensor:
    """``gated_feed_forward`` unplanned: validate, cast for autocast, route; plan the problem
    under ``key`` (None: do not)."""
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
    config = _BlockConfig(p, activation, recompute)
    if key is None or torch.compiler.is_compiling():
        return _gated_feed_forward(x, w_gate, w_up, w_down, b_gate, b_up, b_down, config)
    launch = _gated_feed_forward_plan(x, config)
    remember(key, _unless_autocast(launch, x, functools.partial(
        _gated_feed_forward_checked, approximate="tanh", dropout=p, training=True,
        recompute=recompute, activation=activation)))
    return launch(x, w_gate, w_up, w_down, b_gate, b_up, b_down)


def _gated_feed_forward(x, w_gate, w_up, w_down, b_gate, b_up, b_down,
                        config: _BlockConfig) -> torch.Tensor:
    """The gated block on plain tensors, validated and cast for autocast, routed now."""
    if torch.compiler.is_compiling():  # torch.compile traces the custom ops (ops.py)
        seed = dropout_seed(x.device) if config.p > 0.0 else None
        return ops.gated_feed_forward(x, w_gate, w_up, w_down, b_gate, b_up, b_down, seed,
                                      *config)
    return _gated_feed_forward_plan(x, config)(x, w_gate, w_up, w_down, b_gate, b_up, b_down)


def _gated_feed_forward_plan(x: torch.Tensor, config: _BlockConfig):
    p, activation = config.p, config.activation
    if _fallback(x) and config.n_cols is None:
        # PyTorch's own block, its dropout included (as in ``_feed_forward_plan``).
        def eager(x, w_gate, w_up, w_down, b_gate, b_up, b_down):
            h = _eager_geglu(x, w_gate, w_up, b_gate, b_up, activation)
            return F.linear(F.dropout(h, p) if p > 0.0 else h, w_down, b_down)
        return eager
    if p == 0.0 and config.n_cols is None \
            and forced_path("geglu_fwd") == "torch" and forced_path("geglu_bwd") == "torch":
        return _counted("geglu_fwd", "geglu_bwd", lambda x, w_gate, w_up, w_down, b_gate, b_up, b_down:
                        F.linear(_eager_geglu(x, w_gate, w_up, b_gate, b_up, activation),
                                 w_down, b_down))
    backend = launchers(x)

    def launch(x, w_gate, w_up, w_down, b_gate, b_up, b_down):
        seed = dropout_seed(x.device) if p > 0.0 else None
        if not ops.needs_grad(x, w_gate, w_up, w_down, b_gate, b_up, b_down):
            x2d = _rows(x)
            y, _, _ = _gated_block.block_forward(
                x2d, w_gate, w_up, w_down, b_gate, b_up, b_down, seed, p, activation, False,
                backend.geglu_forward, config.col_offset, config.n_cols,
            )
            return y.view(*x.shape[:-1], w_down.shape[0])
        return _GatedFeedForwardFunction.apply(x, w_gate, w_up, w_down, b_gate, b_up, b_down,
                                               seed, config, backend)
    return launch
