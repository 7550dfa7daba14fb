"""The functional API: autograd-aware entry points that validate, then call the kernels."""

from __future__ import annotations

import sys
from typing import Any

import torch

from . import ops
from ._backend import launchers
from ._checks import check_approximate, check_linear, check_tensor
from .ops import rows as _rows


def _distributed(*tensors: torch.Tensor | None) -> bool:
    """Whether any operand is a DTensor (tensor parallel). Costs a dict look-up while
    torch.distributed.tensor was never imported (no DTensor can exist then), and imports nothing."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and any(isinstance(t, dtensor.DTensor) for t in tensors)


def _parallel():
    """``triton_gelu.parallel`` (the DTensor sharding rules), imported on the first DTensor.
    Looked up in sys.modules first: torch.compile traces that without a graph break."""
    module = sys.modules.get(__package__ + ".parallel")
    if module is None:
        from . import parallel as module
    return module


class _GELUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, approximate_tanh: bool) -> torch.Tensor:
        ctx.approximate_tanh = approximate_tanh
        ctx.save_for_backward(x)
        return launchers(x).gelu_forward(x, approximate_tanh)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: torch.Tensor):
        (x,) = ctx.saved_tensors
        # A fresh dx every call: nothing saved is written, so a second backward is unchanged.
        return launchers(x).gelu_backward(dy, x, ctx.approximate_tanh), None


def gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """``torch.nn.functional.gelu(x, approximate)`` with Triton kernels for forward and backward.

    ``approximate="none"`` is the exact form x * Phi(x); ``"tanh"`` the tanh approximation.
    float32, float16 and bfloat16 inputs of any shape; math in float32, output in x's dtype.
    """
    approximate_tanh = check_approximate(approximate)
    check_tensor("x", x)
    if _distributed(x):  # DTensor: the custom op, whose sharding rule runs it on the local shard
        return _parallel().gelu(x, approximate_tanh)
    if torch.compiler.is_compiling():  # torch.compile traces the custom op (ops.py), not this
        return ops.gelu_fwd(x, approximate_tanh)
    return _GELUFunction.apply(x, approximate_tanh)


def _autocast_linear(*tensors: Any) -> tuple[Any, ...]:
    """Cast the operands as ``F.linear`` is cast under autocast: to the autocast dtype of their
    device (fp16/bf16/fp32 only; float64 is left alone, as autocast does, and then refused).
    The first is a checked tensor; the others are checked after the cast (hence ``Any``)."""
    device_type = tensors[0].device.type
    if not (torch.amp.is_autocast_available(device_type)
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
    def forward(ctx, x, weight, bias, approximate_tanh: bool, recompute: bool) -> torch.Tensor:
        x2d = _rows(x)
        y, preact = launchers(x2d).linear_gelu_forward(
            x2d, weight, bias, approximate_tanh, save_preact=not recompute
        )
        ctx.approximate_tanh = approximate_tanh
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
            _rows(dy), x2d, weight, preact, ctx.approximate_tanh, need_dx, need_dw, need_db
        )
        return None if dx is None else dx.view(ctx.x_shape), dw, db, None, None


def linear_gelu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
    approximate: str = "none", recompute: bool = False,
) -> torch.Tensor:
    """``F.gelu(F.linear(x, weight, bias), approximate)`` in one fused Triton kernel.

    x (..., in_features), weight (out_features, in_features), bias (out_features,) or None;
    float32, float16 or bfloat16, all of one dtype (under autocast they are cast to the autocast
    dtype first, as for ``F.linear``). Returns (..., out_features) in that dtype. Differentiable
    in x, weight and bias. ``recompute=True`` saves memory: the backward recomputes the
    pre-activation x @ W^T + b instead of keeping it from the forward.
    """
    approximate_tanh = check_approximate(approximate)
    check_tensor("x", x)
    x, weight, bias = _autocast_linear(x, weight, bias)
    check_linear(x, weight, bias)
    if _distributed(x, weight, bias):  # DTensor: the custom ops, run on the local shards
        return _parallel().linear_gelu(x, weight, bias, approximate_tanh, recompute)
    if torch.compiler.is_compiling():  # torch.compile traces the custom ops (ops.py), not these
        return ops.linear_gelu(x, weight, bias, approximate_tanh, recompute)
    if not (torch.is_grad_enabled()
            and any(t is not None and t.requires_grad for t in (x, weight, bias))):
        # Inference: no graph and no saved pre-activation; the kernel writes only y.
        x2d = _rows(x)
        y, _ = launchers(x2d).linear_gelu_forward(
            x2d, weight, bias, approximate_tanh, save_preact=False
        )
        return y.view(*x.shape[:-1], weight.shape[0])
    return _LinearGELUFunction.apply(x, weight, bias, approximate_tanh, recompute)
