"""The gated FFN block y = down(dropout(gelu(x W_gate^T + b_gate) * (x W_up^T + b_up))): the
GeGLU launchers for the gated hidden h (dropout applied in their epilogue), cuBLAS for the down
projection, and a backward that regenerates h, and the dropout mask, instead of keeping them.

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

Both the eager ``autograd.Function`` (``functional.py``, launchers) and the custom op's
registered backward (``ops.py``, the GeGLU ops, so the compiled graph calls them) run this
code: they pass in the GeGLU forward / backward to use.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def block_forward(
    x2d: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, b_gate: Tensor | None,
    b_up: Tensor | None, b_down: Tensor | None, seed: Tensor | None, p: float,
    activation: str, save_gate_up: bool, geglu_forward: Callable, col_offset: int = 0,
    n_cols: int | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(y, g, u): y (M, D) and, with ``save_gate_up``, g and u for the backward; dropout(h) is
    dropped once the down projection has read it. The hidden columns are columns
    ``col_offset`` .. of ``n_cols`` (by default all of them), for the dropout mask."""
    h, gate, up = geglu_forward(x2d, w_gate, w_up, b_gate, b_up, activation, save_gate_up,
                                seed, p, col_offset, n_cols)
    with torch.autocast(x2d.device.type, enabled=False):  # operands are already cast
        return F.linear(h, w_down, b_down), gate, up


def block_backward(
    dy2d: Tensor, x2d: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, gate: Tensor,
    up: Tensor, seed: Tensor | None, p: float, activation: str, needs: Sequence[bool],
    geglu_backward: Callable, col_offset: int = 0, n_cols: int | None = None,
) -> tuple[Tensor | None, ...]:
    """(dx, dW_gate, dW_up, dW_down, db_gate, db_up, db_down); ``needs`` has one flag each."""
    need_dx, need_dwg, need_dwu, need_dwd, need_dbg, need_dbu, need_dbd = needs
    with torch.autocast(x2d.device.type, enabled=False):
        dh = torch.mm(dy2d, w_down)
    dx, dwg, dwu, dbg, dbu, h = geglu_backward(
        dh, x2d, w_gate, w_up, gate, up, activation,
        [need_dx, need_dwg, need_dwu, need_dbg, need_dbu], need_dwd, seed, p, col_offset, n_cols,
    )
    del dh
    with torch.autocast(x2d.device.type, enabled=False):
        dwd = torch.mm(dy2d.t(), h) if need_dwd else None
        dbd = dy2d.sum(0) if need_dbd else None
    return dx, dwg, dwu, dwd, dbg, dbu, dbd
