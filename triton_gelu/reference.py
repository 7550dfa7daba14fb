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


# ---- Gated GELU (GeGLU) ---------------------------------------------------------------------


def geglu_fp32(gate: torch.Tensor, up: torch.Tensor, approximate_tanh: bool) -> torch.Tensor:
    """h = gelu(g) * u in float32 with the kernels' formulas, returned in float32."""
    return gelu_fp32(gate, approximate_tanh) * up.float()


def geglu_forward_fp32(
    x2d: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, b_gate: torch.Tensor | None,
    b_up: torch.Tensor | None, approximate_tanh: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h in float32, g, u in x's dtype) with the kernels' numerics: g and u accumulated in
    float32, rounded to the input dtype, then gated in float32."""
    gate = linear_preact_fp32(x2d, w_gate, b_gate).to(x2d.dtype)
    up = linear_preact_fp32(x2d, w_up, b_up).to(x2d.dtype)
    return geglu_fp32(gate, up, approximate_tanh), gate, up


def geglu_backward_fp32(
    dh2d: torch.Tensor, x2d: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
    gate: torch.Tensor, up: torch.Tensor, approximate_tanh: bool,
) -> tuple[torch.Tensor, ...]:
    """(dx, dW_gate, dW_up, db_gate, db_up) in float32 with the fused kernels' numerics.

    dg = dh * u * gelu'(g) and du = dh * gelu(g) in float32; the matmuls take them rounded to
    the input dtype, the bias gradients sum the float32 values.
    """
    with torch.autocast(x2d.device.type, enabled=False):
        dh, g, u = dh2d.float(), gate.float(), up.float()
        dgate = dh * u * gelu_grad_fp32(g, approximate_tanh)
        dup = dh * gelu_fp32(g, approximate_tanh)
        dg_op, du_op = dgate.to(x2d.dtype).float(), dup.to(x2d.dtype).float()
        x = x2d.float()
        return (dg_op @ w_gate.float() + du_op @ w_up.float(), dg_op.t() @ x, du_op.t() @ x,
                dgate.sum(0), dup.sum(0))


def geglu64(
    x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, b_gate: torch.Tensor | None = None,
    b_up: torch.Tensor | None = None, approximate: str = "tanh",
) -> torch.Tensor:
    """Float64 ground truth of gelu(linear(x, w_gate, b_gate)) * linear(x, w_up, b_up)."""
    # Not detached: ``grads64`` differentiates through these references.
    x, w_gate, w_up = x.double(), w_gate.double(), w_up.double()
    gate = F.linear(x, w_gate, _double_or_none(b_gate))
    return F.gelu(gate, approximate=approximate) * F.linear(x, w_up, _double_or_none(b_up))


def gated_feed_forward64(
    x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
    b_gate: torch.Tensor | None = None, b_up: torch.Tensor | None = None,
    b_down: torch.Tensor | None = None, approximate: str = "tanh",
) -> torch.Tensor:
    """Float64 ground truth of linear(geglu(x, ...), w_down, b_down)."""
    h = geglu64(x, w_gate, w_up, b_gate, b_up, approximate)
    return F.linear(h, w_down.double(), _double_or_none(b_down))


def grads64(
    fn, tensors: list[torch.Tensor | None], dy: torch.Tensor
) -> list[torch.Tensor | None]:
    """Float64 ground truth of the gradients of ``fn(*tensors)`` for the upstream ``dy``, by
    torch autograd on float64 copies; None for each tensor that is None."""
    leaves = [t.detach().double().requires_grad_(True) if t is not None else None
              for t in tensors]
    fn(*leaves).backward(dy.double())
    return [t.grad if t is not None else None for t in leaves]


def _double_or_none(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.double()
