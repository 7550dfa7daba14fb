"""Standalone GELU: forward y = gelu(x) and backward dx = dy * gelu'(x), one pass each.

Both kernels see their tensors as rows: the last dimension must be unit-stride and the leading
dimensions must collapse into one row stride (any contiguous tensor, and slices such as
``x[..., :k]`` or ``x[::2]``). Other layouts (a transposed last dimension) are copied to
contiguous first. Outputs are always new contiguous tensors in the input's dtype; the math runs
in float32 (``_math.py``).

Paths (``tuning.paths.Paths``), chosen per (bucket(numel), dtype, form), like the kernels' configs
(a layout does not retune: a loss's expanded gradient and a contiguous one share the choice):

- ``triton``: the kernels below (the default, and the interpreter's);
- ``torch``: PyTorch's own ``F.gelu`` / ``aten.gelu_backward`` (the path when nothing may be
  timed: a few-kilobyte tensor costs less through PyTorch's launch than through Triton's).

The same two kernels serve the FFN block's composed path (``gelu_dropout_forward`` /
``gelu_dropout_backward``): with HAS_DROPOUT they apply dropout after the GELU, element (m, n) of
the (M, N) pre-activation drawing the mask the fused matmul epilogue draws (``_math.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from .. import activations
from .._runtime import device_context
from ..tuning.paths import Paths
from ..tuning.spaces import bucket, elementwise_configs, prune_elementwise
from ..tuning.tuner import Tuner
from ._math import (
    activate, activate_grad, cast_to, ceil_div, dropout_constants, dropout_factor_flat,
)


# The launchers (``triton_gelu.kernels`` re-exports them) and their per-problem launches.
__all__ = [
    "gelu_forward",
    "gelu_backward",
    "gelu_forward_launch",
    "gelu_backward_launch",
]


@triton.jit
def row_offsets(offs, n_cols, stride_row, CONTIGUOUS: tl.constexpr):
    # Element offsets of flat indices ``offs`` in a (rows, n_cols) view with row stride
    # ``stride_row``; a contiguous tensor skips the integer division.
    if CONTIGUOUS:
        return offs
    else:
        row = offs // n_cols
        return row * stride_row + (offs - row * n_cols)


@triton.jit
def _gelu_fwd_kernel(
    x_ptr,  # (rows, n_cols), row stride stride_x_row
    y_ptr,  # (rows * n_cols,) contiguous
    seed_ptr,  # (1,) int64, the dropout seed; None without HAS_DROPOUT
    n_elements,
    n_cols,
    stride_x_row,
    dropout_threshold,  # round(p * 2**31): see _math.dropout_factor
    dropout_scale,  # 1 / (1 - p)
    dropout_col_offset,  # column c is column dropout_col_offset + c of the whole activation,
    dropout_n_cols,  # which has dropout_n_cols columns (tensor parallel: a rank's shard)
    ACTIVATION: tl.constexpr,
    CONTIGUOUS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n_elements
    x_offs = row_offsets(offs, n_cols, stride_x_row, CONTIGUOUS)
    x = tl.load(x_ptr + x_offs, mask=mask).to(tl.float32)
    y = activate(x, ACTIVATION)
    if HAS_DROPOUT:  # the mask of element (row, col) of the (rows, n_cols) view: see _math
        y = y * dropout_factor_flat(seed_ptr, offs, n_cols, dropout_col_offset, dropout_n_cols,
                                    dropout_threshold, dropout_scale)
    tl.store(y_ptr + offs, cast_to(y, y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gelu_bwd_kernel(
    dy_ptr,  # (rows, n_cols), row stride stride_dy_row
    x_ptr,  # (rows, n_cols), row stride stride_x_row
    dx_ptr,  # (rows * n_cols,) contiguous
    seed_ptr,  # (1,) int64, the dropout seed; None without HAS_DROPOUT
    h_ptr,  # (rows * n_cols,) contiguous, dropout(gelu(x)); None without WRITE_H
    n_elements,
    n_cols,
    stride_dy_row,
    stride_x_row,
    dropout_threshold,
    dropout_scale,
    dropout_col_offset,
    dropout_n_cols,
    ACTIVATION: tl.constexpr,
    CONTIGUOUS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    WRITE_H: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n_elements
    dy = tl.load(dy_ptr + row_offsets(offs, n_cols, stride_dy_row, CONTIGUOUS), mask=mask)
    x = tl.load(x_ptr + row_offsets(offs, n_cols, stride_x_row, CONTIGUOUS), mask=mask)
    x = x.to(tl.float32)
    # dx = dy * gelu'(x), in float32; with dropout after the GELU,
    # dx = dy * keep / (1 - p) * gelu'(x)
    dx = dy.to(tl.float32) * activate_grad(x, ACTIVATION)
    if HAS_DROPOUT:
        keep_scale = dropout_factor_flat(seed_ptr, offs, n_cols, dropout_col_offset,
                                         dropout_n_cols, dropout_threshold, dropout_scale)
        dx = dx * keep_scale
    tl.store(dx_ptr + offs, cast_to(dx, dx_ptr.dtype.element_ty), mask=mask)
    if WRITE_H:  # the forward's output, regenerated for a matmul that needs it
        h = activate(x, ACTIVATION)
        if HAS_DROPOUT:
            h = h * keep_scale
        tl.store(h_ptr + offs, cast_to(h, h_ptr.dtype.element_ty), mask=mask)


fwd_tuner = Tuner(_gelu_fwd_kernel, "gelu_fwd", elementwise_configs, prune_elementwise)
_bwd_tuner = Tuner(_gelu_bwd_kernel, "gelu_bwd", elementwise_configs, prune_elementwise)
# The FFN block's composed path: GELU + dropout on the (M, N) pre-activation of a cuBLAS matmul.
dropout_fwd_tuner = Tuner(_gelu_fwd_kernel, "gelu_dropout_fwd", elementwise_configs,
                           prune_elementwise)
dropout_bwd_tuner = Tuner(_gelu_bwd_kernel, "gelu_dropout_bwd", elementwise_configs,
                           prune_elementwise)


def as_rows(t: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """Return (tensor, n_cols, row stride) for a row view of ``t``; copies only when needed."""
    dim = t.dim()
    if dim >= 2 and t.is_contiguous():  # the common case first: a plan's every call asks
        n_cols = t.shape[-1]
        return t, n_cols, n_cols
    if dim >= 2 and t.stride(-1) == 1:
        try:
            rows = t.view(-1, t.shape[-1])
            return rows, rows.shape[1], rows.stride(0)
        except RuntimeError:  # leading dimensions do not collapse into one stride
            pass
    if dim == 1:  # a strided vector: rows of one element
        return t, 1, t.stride(0)
    t = t.contiguous()
    n_cols = t.shape[-1] if t.dim() else 1
    return t, n_cols, n_cols


def elementwise_grid(n_elements: int):
    return lambda meta: (ceil_div(n_elements, meta["BLOCK_SIZE"]),)


def _problem(x: torch.Tensor, activation: str, p: float, col_offset: int,
             *flags: bool) -> tuple[tuple, Callable, dict]:
    """(key, grid, constant arguments) of an elementwise launch over x: what every launch of
    one problem (x's size and dtype, the form, dropout, ``flags``) shares."""
    n = x.numel()
    return ((bucket(n), x.dtype, activation, p > 0.0, *flags), elementwise_grid(n),
            dict(n_elements=n, ACTIVATION=activation, **dropout_constants(p, col_offset)))


def _forward_operands(x: torch.Tensor, out: torch.Tensor, seed: torch.Tensor | None,
                      whole_cols: int | None) -> dict:
    """The arguments of one forward launch that its problem does not fix: tensors, layout."""
    rows, n_cols, stride_row = as_rows(x)
    return dict(x_ptr=rows, y_ptr=out, seed_ptr=seed,
                **_forward_layout(n_cols, stride_row, whole_cols))


def _forward_layout(n_cols: int, stride_row: int, whole_cols: int | None) -> dict:
    return dict(n_cols=n_cols, stride_x_row=stride_row, CONTIGUOUS=stride_row == n_cols,
                dropout_n_cols=whole_cols or n_cols)


def _backward_operands(dy: torch.Tensor, x: torch.Tensor, out: torch.Tensor,
                       seed: torch.Tensor | None, h: torch.Tensor | None,
                       whole_cols: int | None) -> dict:
    x_rows, n_cols, stride_x = as_rows(x)
    dy_rows, dy_cols, stride_dy = as_rows(dy)
    if dy_cols != n_cols:  # both views must share the column count; fall back to contiguous
        x_rows, dy_rows = x.contiguous(), dy.contiguous()
        n_cols = stride_x = stride_dy = x.shape[-1] if x.dim() else 1
    return dict(dy_ptr=dy_rows, x_ptr=x_rows, dx_ptr=out, h_ptr=h, seed_ptr=seed,
                **_backward_layout(n_cols, stride_dy, stride_x, whole_cols))


def _backward_layout(n_cols: int, stride_dy: int, stride_x: int,
                     whole_cols: int | None) -> dict:
    return dict(n_cols=n_cols, stride_dy_row=stride_dy, stride_x_row=stride_x,
                CONTIGUOUS=stride_x == n_cols and stride_dy == n_cols,
                dropout_n_cols=whole_cols or n_cols)


def dense_cols(x: torch.Tensor) -> int:
    """The row length ``as_rows`` gives a contiguous x (its rows' stride too)."""
    return x.shape[-1] if x.dim() >= 2 else 1


def _launch_forward(
    tuner: Tuner, x: torch.Tensor, out: torch.Tensor, activation: str,
    seed: torch.Tensor | None = None, p: float = 0.0, col_offset: int = 0,
    whole_cols: int | None = None,
) -> torch.Tensor:
    """out = gelu(x), then dropout with probability ``p`` when p > 0 (x's columns being columns
    ``col_offset`` .. of an activation of ``whole_cols``, by default x's own); ``out`` may be
    ``x`` itself (each element is read before it is written)."""
    if x.numel() == 0:
        return out
    key, grid, constants = _problem(x, activation, p, col_offset)
    operands = _forward_operands(x, out, seed if p > 0.0 else None, whole_cols)
    with device_context(x):
        tuner.run(grid, key, **constants, **operands,
                  aliased=("y_ptr",) if out.data_ptr() == operands["x_ptr"].data_ptr() else ())
    return out


def _launch_backward(
    tuner: Tuner, dy: torch.Tensor, x: torch.Tensor, out: torch.Tensor, activation: str,
    seed: torch.Tensor | None = None, p: float = 0.0, h: torch.Tensor | None = None,
    col_offset: int = 0, whole_cols: int | None = None,
) -> torch.Tensor:
    """out = dy * gelu'(x), through dropout with probability ``p`` when p > 0 (the mask as in
    ``_launch_forward``); also h = dropout(gelu(x)) when an ``h`` buffer is given."""
    if x.numel() == 0:
        return out
    key, grid, constants = _problem(x, activation, p, col_offset, h is not None)
    with device_context(x):
        tuner.run(grid, key, WRITE_H=h is not None, **constants, **_backward_operands(
            dy, x, out, seed if p > 0.0 else None, h, whole_cols))
    return out


def gelu_forward_triton(
    x: torch.Tensor, activation: str, out: torch.Tensor | None = None
) -> torch.Tensor:
    """y = gelu(x) by the Triton kernel, into a new (or the given contiguous) tensor of x's
    shape and dtype; ``out`` may be ``x`` itself (each element is read before it is written)."""
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    return _launch_forward(fwd_tuner, x, out, activation)


def gelu_backward_triton(
    dy: torch.Tensor, x: torch.Tensor, activation: str, out: torch.Tensor | None = None
) -> torch.Tensor:
    """dx = dy * gelu'(x) by the Triton kernel, into a new (or the given contiguous) tensor of
    x's shape and dtype."""
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    return _launch_backward(_bwd_tuner, dy, x, out, activation)


def gelu_dropout_forward(
    preact: torch.Tensor, seed: torch.Tensor | None, p: float, activation: str,
    out: torch.Tensor, col_offset: int = 0, n_cols: int | None = None,
) -> torch.Tensor:
    """out = dropout(gelu(z)) for the (M, N) pre-activation z: the mask of element (m, n) is the
    one the fused matmul epilogue draws (columns ``col_offset`` + n of an (M, ``n_cols``)
    activation), so both paths of the FFN block drop the same elements."""
    return _launch_forward(dropout_fwd_tuner, preact, out, activation, seed, p,
                           col_offset, n_cols)


def gelu_dropout_backward(
    dh: torch.Tensor, preact: torch.Tensor, seed: torch.Tensor | None, p: float,
    activation: str, out: torch.Tensor, h: torch.Tensor | None = None,
    col_offset: int = 0, n_cols: int | None = None,
) -> torch.Tensor:
    """out = dh * keep / (1 - p) * gelu'(z) for the (M, N) z, and h = dropout(gelu(z)) when an
    ``h`` buffer is given (dW2 of the FFN block needs it); same mask as the forward."""
    return _launch_backward(dropout_bwd_tuner, dh, preact, out, activation, seed, p, h,
                            col_offset, n_cols)


# ---- the paths, and the launchers that choose between them -----------------------------------


def gelu_forward_torch(x: torch.Tensor, activation: str) -> torch.Tensor:
    # PyTorch keeps a dense input's strides; our outputs are contiguous (the custom ops say so).
    return activations.torch_activation(x, activation).contiguous()


def gelu_backward_torch(dy: torch.Tensor, x: torch.Tensor, activation: str) -> torch.Tensor:
    approximate = activations.torch_approximate(activation)
    if approximate is None:  # no aten backward for the form: its float32 derivative, rounded once
        return (dy.float() * activations.grad_fp32(x, activation)).to(dy.dtype)
    return torch.ops.aten.gelu_backward(dy, x, approximate=approximate).contiguous()


_fwd_paths = Paths(
    "gelu_fwd", {"triton": gelu_forward_triton, "torch": gelu_forward_torch},
    default="triton", untuned="torch", kernels=[fwd_tuner],
)
_bwd_paths = Paths(
    "gelu_bwd", {"triton": gelu_backward_triton, "torch": gelu_backward_torch},
    default="triton", untuned="torch", kernels=[_bwd_tuner],
)


def gelu_forward(
    x: torch.Tensor, activation: str, out: torch.Tensor | None = None
) -> torch.Tensor:
    """y = gelu(x), a new contiguous tensor of x's shape and dtype, by the path chosen for the
    problem; with ``out`` (contiguous, x's shape and dtype) the Triton kernel writes into it."""
    if out is not None or x.numel() == 0:
        return gelu_forward_triton(x, activation, out)
    return _fwd_paths.run((bucket(x.numel()), x.dtype, activation), x, activation)


def gelu_backward(
    dy: torch.Tensor, x: torch.Tensor, activation: str, out: torch.Tensor | None = None
) -> torch.Tensor:
    """dx = dy * gelu'(x), a new contiguous tensor of x's shape and dtype, by the path chosen
    for the problem; with ``out`` the Triton kernel writes into it."""
    if out is not None or x.numel() == 0:
        return gelu_backward_triton(dy, x, activation, out)
    key = (bucket(x.numel()), x.dtype, activation)
    return _bwd_paths.run(key, dy, x, activation)


# ---- per-problem launches (the plans of ``ops/gelu.py``; see ``linear_gelu.py``'s) ----------


def gelu_forward_launch(x: torch.Tensor, activation: str) -> Callable:
    """``gelu_forward`` bound to the problem of x (its size, dtype and device): x -> y."""
    cols = dense_cols(x)
    return _bound_launch(
        _fwd_paths, fwd_tuner, lambda x: gelu_forward(x, activation), (x,), activation,
        lambda x, out: _forward_operands(x, out, None, None),
        dict(seed_ptr=None, **_forward_layout(cols, cols, None)),
        lambda x, out: dict(x_ptr=x, y_ptr=out) if x.is_contiguous() else None)


def gelu_backward_launch(dy: torch.Tensor, x: torch.Tensor, activation: str) -> Callable:
    """``gelu_backward`` bound to the problem of x: (dy, x) -> dx."""
    cols = dense_cols(x)
    return _bound_launch(
        _bwd_paths, _bwd_tuner, lambda dy, x: gelu_backward(dy, x, activation), (dy, x),
        activation, lambda dy, x, out: _backward_operands(dy, x, out, None, None, None),
        dict(h_ptr=None, seed_ptr=None, **_backward_layout(cols, cols, cols, None)),
        lambda dy, x, out: dict(dy_ptr=dy, x_ptr=x, dx_ptr=out)
        if x.is_contiguous() and dy.is_contiguous() else None,
        WRITE_H=False)


def _bound_launch(paths: Paths, tuner: Tuner, launcher: Callable, tensors: tuple,
                  activation: str, operands: Callable, dense_layout: dict,
                  dense_pointers: Callable, **flags: bool) -> Callable:
    """``launcher`` (tensors -> a new tensor of x's shape, x the last of them) bound to its
    problem: the kept launch of ``tuner``'s kernel where the path settled on "triton"
    (``operands(*tensors, out)``: a call's arguments; ``flags``: the kernel's constant flags,
    part of its key), else the settled path, else ``launcher``. Contiguous tensors, the common
    case, take a launch with their layout bound too (``dense_layout``: the arguments
    ``operands`` gives them besides pointers; ``dense_pointers(*tensors, out)``: those
    pointers, None unless every tensor is contiguous): about 0.4 us a call less than building
    the arguments from the layout."""
    x = tensors[-1]
    if not x.numel():
        return launcher
    key = (bucket(x.numel()), x.dtype, activation)
    path = paths.settled(key, (*tensors, activation))
    if path is None:
        return launcher
    path_run = paths.runner(path, (activation,))
    if path != "triton":
        return path_run
    tuner_key, grid, constants = _problem(x, activation, 0.0, 0, *flags.values())
    with device_context(x):
        launch = tuner.bound(grid, tuner_key, **flags, **constants)
        dense = tuner.bound(grid, tuner_key, **flags, **constants, **dense_layout)
    if launch is None:  # (dense too: the same config)
        return path_run
    count = paths.counted("triton")

    def run(*tensors):
        x = tensors[-1]
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        count()
        pointers = dense_pointers(*tensors, out)
        with device_context(x):
            if pointers is not None:
                dense(**pointers)
            else:
                launch(**operands(*tensors, out))
        return out
    return run
