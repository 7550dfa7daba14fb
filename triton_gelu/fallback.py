"""The launchers in PyTorch, for tensors no Triton kernel serves: CPU tensors outside the
interpreter, and every tensor when Triton is not installed (or does not import).

Same arguments and outputs as ``triton_gelu.kernels``, and, like them, no validation: their
callers validated the operands (the public functions once per problem, the custom ops at each
call). The math is the kernels' (``reference.py``'s float32 formulas, one rounding to the input
dtype).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import reference

__all__ = [
    "gelu_forward", "gelu_backward",
    "linear_gelu_forward", "linear_preact", "linear_gelu_backward",
    "geglu_forward", "geglu_gate_up", "geglu_backward",
    "ffn_forward", "ffn_backward",
]


def _new(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    return torch.empty(shape, dtype=like.dtype, device=like.device)


def gelu_forward(
    x: torch.Tensor, activation: str, out: torch.Tensor | None = None
) -> torch.Tensor:
    if out is None:
        out = _new(x.shape, x)
    return out.copy_(reference.gelu_fp32(x, activation))


def gelu_backward(
    dy: torch.Tensor, x: torch.Tensor, activation: str, out: torch.Tensor | None = None
) -> torch.Tensor:
    if out is None:
        out = _new(x.shape, x)
    return out.copy_(dy.float() * reference.gelu_grad_fp32(x, activation))


def linear_gelu_forward(
    x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    activation: str, save_preact: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    preact = reference.linear_preact_fp32(x2d, weight, bias)
    y = reference.gelu_fp32(preact, activation).to(x2d.dtype)
    return y, (preact.to(x2d.dtype) if save_preact else None)


def linear_preact(
    x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    return reference.linear_preact_fp32(x2d, weight, bias).to(x2d.dtype)


def linear_gelu_backward(
    dy2d: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor, preact: torch.Tensor,
    activation: str, need_dx: bool, need_dw: bool, need_db: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    grads = reference.linear_gelu_backward_fp32(dy2d, x2d, weight, preact, activation)
    dx, dw, db = (g.to(x2d.dtype) if need else None
                  for g, need in zip(grads, (need_dx, need_dw, need_db)))
    return dx, dw, db


def _keep(seed: torch.Tensor | None, p: float, rows: int, cols: int, col_offset: int,
          n_cols: int) -> torch.Tensor | None:
    """The kernels' dropout mask of columns ``col_offset`` .. ``col_offset + cols`` of an
    activation of ``n_cols``, drawn by the PyTorch copy of their generator."""
    if p == 0.0 or seed is None:
        return None
    return reference.dropout_keep(seed, rows, cols, p, col_offset, n_cols)


def geglu_forward(
    x2d: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, b_gate: torch.Tensor | None,
    b_up: torch.Tensor | None, activation: str, save_gate_up: bool,
    seed: torch.Tensor | None = None, p: float = 0.0, col_offset: int = 0,
    n_cols: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    columns = col_offset, w_gate.shape[0] if n_cols is None else n_cols
    h, gate, up = reference.geglu_forward_fp32(
        x2d, w_gate, w_up, b_gate, b_up, activation,
        _keep(seed, p, x2d.shape[0], w_gate.shape[0], *columns),
        reference.dropout_constants(p)[1],
    )
    return (h.to(x2d.dtype), *((gate, up) if save_gate_up else (None, None)))


def geglu_gate_up(
    x2d: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, b_gate: torch.Tensor | None,
    b_up: torch.Tensor | None, activation: str, p: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    _, gate, up = reference.geglu_forward_fp32(x2d, w_gate, w_up, b_gate, b_up, activation)
    return gate, up


def geglu_backward(
    dh2d: torch.Tensor, x2d: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
    gate: torch.Tensor, up: torch.Tensor, activation: str, needs: Sequence[bool],
    write_h: bool = False, seed: torch.Tensor | None = None, p: float = 0.0,
    col_offset: int = 0, n_cols: int | None = None,
) -> tuple[torch.Tensor | None, ...]:
    columns = col_offset, w_gate.shape[0] if n_cols is None else n_cols
    (rows, cols), scale = gate.shape, reference.dropout_constants(p)[1]
    keep = _keep(seed, p, rows, cols, *columns)
    grads = reference.geglu_backward_fp32(dh2d, x2d, w_gate, w_up, gate, up, activation,
                                          keep, scale)
    h = None
    if write_h:
        h = reference.dropout_fp32(reference.geglu_fp32(gate, up, activation), keep,
                                    scale).to(x2d.dtype)
    return (*(g.to(x2d.dtype) if need else None for g, need in zip(grads, needs)), h)

def ffn_forward(
    x2d: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
    b2: torch.Tensor | None, seed: torch.Tensor | None, p: float, activation: str,
    save_preact: bool, col_offset: int = 0, n_cols: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    columns = col_offset, w1.shape[0] if n_cols is None else n_cols
    keep = _keep(seed, p, x2d.shape[0], w1.shape[0], *columns)
    y, preact = reference.ffn_forward_fp32(
        x2d, w1, b1, w2, b2, keep, reference.dropout_constants(p)[1], activation
    )
    return y.to(x2d.dtype), (preact.to(x2d.dtype) if save_preact else None)


def ffn_backward(
    dy2d: torch.Tensor, x2d: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
    preact: torch.Tensor, seed: torch.Tensor | None, p: float, activation: str,
    needs: Sequence[bool], col_offset: int = 0, n_cols: int | None = None,
) -> tuple[torch.Tensor | None, ...]:
    columns = col_offset, w1.shape[0] if n_cols is None else n_cols
    keep = _keep(seed, p, preact.shape[0], preact.shape[1], *columns)
    grads = reference.ffn_backward_fp32(
        dy2d, x2d, w1, w2, preact, keep, reference.dropout_constants(p)[1], activation
    )
    return tuple(g.to(x2d.dtype) if need else None for g, need in zip(grads, needs))


# ---- per-problem launches ---------------------------------------------------------------------
# The kernels' ``*_launch`` functions keep a problem's launch for its plan (``kernels/__init__``);
# the fallback keeps nothing per problem: each of these is its launcher with the call's flags,
# taking what the kernels' bound launch takes. (Reached by a tensor-parallel shard's plan on the
# fallback: other plans there run eager PyTorch's ops.)


def _with_flags(launcher, n_tensors: int):
    def launch(*args):
        flags = args[n_tensors:]
        return lambda *tensors: launcher(*tensors, *flags)
    return launch


gelu_forward_launch = _with_flags(gelu_forward, 1)
gelu_backward_launch = _with_flags(gelu_backward, 2)
linear_gelu_forward_launch = _with_flags(linear_gelu_forward, 3)
linear_preact_launch = _with_flags(linear_preact, 3)
linear_gelu_backward_launch = _with_flags(linear_gelu_backward, 4)
ffn_forward_launch = _with_flags(ffn_forward, 6)
ffn_backward_launch = _with_flags(ffn_backward, 6)
geglu_gate_up_launch = _with_flags(geglu_gate_up, 5)


def geglu_forward_launch(x2d, w_gate, w_up, b_gate, b_up, activation: str, save_gate_up: bool,
                         seed=None, p: float = 0.0, col_offset: int = 0, n_cols=None):
    """(x2d, w_gate, w_up, b_gate, b_up, seed) -> (h, g, u), as the kernels' bound launch."""
    return lambda x2d, w_gate, w_up, b_gate, b_up, seed: geglu_forward(
        x2d, w_gate, w_up, b_gate, b_up, activation, save_gate_up, seed, p, col_offset, n_cols)


def geglu_backward_launch(dh2d, x2d, w_gate, w_up, gate, up, activation: str, needs,
                          write_h: bool = False, seed=None, p: float = 0.0,
                          col_offset: int = 0, n_cols=None):
    """(dh2d, x2d, w_gate, w_up, gate, up, seed) -> geglu_backward's outputs."""
    return lambda dh2d, x2d, w_gate, w_up, gate, up, seed: geglu_backward(
        dh2d, x2d, w_gate, w_up, gate, up, activation, needs, write_h, seed, p, col_offset,
        n_cols)
