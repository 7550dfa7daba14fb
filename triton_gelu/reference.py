"""Pure-PyTorch references. Tests and the bench compare against these; the CPU fallback (no
interpreter) uses the float32 ones, which follow the kernels' formulas in ``_math.py``."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_SQRT_1_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _sigmoid_2u(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.exp(-2.0 * u.abs())
    r = 1.0 / (1.0 + t)
    return torch.where(u >= 0, r, t * r), t * r * r


def _tanh_arg(x: torch.Tensor) -> torch.Tensor:
    return _SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)


def gelu_fp32(x: torch.Tensor, approximate_tanh: bool) -> torch.Tensor:
    """gelu(x) computed in float32 with the kernels' formulas, returned in float32."""
    x = x.float()
    if approximate_tanh:
        return x * _sigmoid_2u(_tanh_arg(x))[0]
    return 0.5 * x * (1.0 + torch.erf(x * _SQRT_1_2))


def gelu_grad_fp32(x: torch.Tensor, approximate_tanh: bool) -> torch.Tensor:
    """gelu'(x) computed in float32 with the kernels' formulas, returned in float32."""
    x = x.float()
    if approximate_tanh:
        s, s_1ms = _sigmoid_2u(_tanh_arg(x))
        du_dx = _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * x * x)
        return torch.where(s_1ms == 0, s, s + 2.0 * x * s_1ms * du_dx)
    cdf = 0.5 * (1.0 + torch.erf(x * _SQRT_1_2))
    return cdf + x * torch.exp(-0.5 * x * x) * _INV_SQRT_2PI


def gelu64(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """Float64 ground truth of torch.nn.functional.gelu."""
    return F.gelu(x.double(), approximate=approximate)


def gelu_grad64(x: torch.Tensor, dy: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """Float64 ground truth of dy * gelu'(x), through torch's own autograd."""
    x64 = x.detach().double().requires_grad_(True)
    (dx,) = torch.autograd.grad(F.gelu(x64, approximate=approximate), x64, dy.double())
    return dx


# ---- Linear + bias + GELU -------------------------------------------------------------------


def linear_preact_fp32(
    x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """z = x @ W^T + b accumulated in float32 (inputs upcast first), returned in float32."""
    with torch.autocast(x2d.device.type, enabled=False):  # an enclosing autocast must not recast
        z = x2d.float() @ weight.float().t()
        return z if bias is None else z + bias.float()


def linear_gelu_backward_fp32(
    dy2d: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor, preact: torch.Tensor,
    approximate_tanh: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dW, db) in float32 with the kernels' numerics.

    dz = dy * gelu'(z) in float32; the matmuls take dz rounded to the input dtype (what the
    kernels feed tl.dot), db sums the unrounded float32 dz.
    """
    with torch.autocast(x2d.device.type, enabled=False):
        dz = dy2d.float() * gelu_grad_fp32(preact, approximate_tanh)
        dz_operand = dz.to(x2d.dtype).float()
        return dz_operand @ weight.float(), dz_operand.t() @ x2d.float(), dz.sum(0)


def linear_gelu64(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, approximate: str = "none"
) -> torch.Tensor:
    """Float64 ground truth of gelu(linear(x, weight, bias))."""
    bias64 = None if bias is None else bias.detach().double()
    z64 = F.linear(x.detach().double(), weight.detach().double(), bias64)
    return F.gelu(z64, approximate=approximate)


def linear_gelu_grads64(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dy: torch.Tensor,
    approximate: str = "none",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Float64 ground truth of (dx, dW, db) for the upstream gradient ``dy``, by torch autograd."""
    x64 = x.detach().double().requires_grad_(True)
    w64 = weight.detach().double().requires_grad_(True)
    b64 = None if bias is None else bias.detach().double().requires_grad_(True)
    y64 = F.gelu(F.linear(x64, w64, b64), approximate=approximate)
    grads = torch.autograd.grad(y64, [x64, w64] if b64 is None else [x64, w64, b64], dy.double())
    return grads[0], grads[1], None if b64 is None else grads[2]
