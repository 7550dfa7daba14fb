"""Gated GELU (GeGLU): h = gelu(x @ W_gate^T + b_gate) * (x @ W_up^T + b_up), forward and backward.

Shapes (the launchers take a 2-D x; the ops (``ops/``) flatten the leading dimensions)::

    x (M, K)    W_gate, W_up (N, K)    b_gate, b_up (N,)
    g = x @ W_gate^T + b_gate (M, N)    u = x @ W_up^T + b_up (M, N)    h = gelu(g) * u (M, N)

Forward, path "fused" (the default): one tiled kernel loads each x tile once and multiplies it
with the W_gate and the W_up tile of the same output columns into two float32 accumulators; the
epilogue adds the biases, rounds g and u to the input dtype, and writes h = gelu(g) * u
(computed in float32, cast once), plus g and u when the backward keeps them. Path "composed":
g and u by cuBLAS (``torch.addmm``), then one elementwise kernel writes h.

Why round g and u before the gate: they are the values the backward is given (saved, or
recomputed bitwise by the same kernel), the values the composed path's cuBLAS matmuls produce,
and what PyTorch's own GeGLU multiplies. Gating the rounded values makes h the same function of
(g, u) on all our paths, so the gated block's backward (``ops/gated_ffn.py``) regenerates bitwise
the h its forward fed the down projection, and training, inference and recompute agree bit for
bit. (The "torch" paths form h as eager PyTorch does, also rounding gelu(g): where the forward
and the backward choose differently, the regenerated h is within one rounding of the forward's.)

Backward, for the upstream gradient dh. With h = gelu(g) * u::

    dh/dg = u * gelu'(g)   =>   dg = dh * u * gelu'(g)       (elementwise, M x N)
    dh/du = gelu(g)        =>   du = dh * gelu(g)
    dx = dg @ W_gate + du @ W_up      dW_gate = dg^T @ x      dW_up = du^T @ x
    db_gate = sum_m dg                db_up = sum_m du

Path "once" (the default): one elementwise kernel reads dh, g and u once and writes dg and du
in the input dtype; cuBLAS does the four matmuls (dx as ``mm`` then ``addmm_`` into the same
buffer) and the bias gradients are column sums of the rounded dg and du, as in PyTorch's
backward. The gated block's backward also asks for h (``write_h``): the same kernel writes it
alongside dg and du. dg and du are transients of the backward: 2 x M x N elements of the input
dtype (as eager PyTorch's backward holds), freed when it returns. No path rebuilds dg and du
inside the matmuls: dx and dW kernels doing so (as this file's once did) recomputed them
K / BLOCK_SIZE_K times per element, ran 1,900-8,900 SASS instructions per main-loop iteration
on sm90 against about 250 for the dual forward, and the dW kernel spilled inside its loop at
every config (255 registers; see ``linear_gelu.py``).

Path "tma" (forward, sm90+, operands a tensor descriptor can serve): the fused kernel's Hopper
variant, x, W_gate and W_up loaded by TMA on a persistent grid, the same epilogue.

Path "torch" (forward and backward): eager PyTorch's own computation, F.linear for g and u,
then F.gelu(g) * u (gelu(g) rounded to the input dtype before the product, as eager rounds it)
and its autograd backward: the candidate that keeps the path choice never slower than PyTorch.
Where nothing may be timed on a GPU the forward takes "composed", the backward "once".

Dropout (the gated block GeGLU -> dropout -> down in training): with ``p`` > 0 the forward
writes dropout(h) = h * keep / (1 - p), the mask drawn from the call's seed by the FFN block's
generator (``_math.py``: Philox on element (m, n)'s position, so every tile shape and kernel
draws the same one): the fused epilogue with ``dropout_factor_tile``, the composed path's
elementwise kernel with ``dropout_factor``. The backward takes dh for dropout(h) and its "once"
kernel regenerates the mask from the seed: dh * keep / (1 - p) enters dg and du, and the h it
writes for the down projection is dropout(h). Only g, u and the seed are kept, never the mask
or h. "torch" serves p == 0 only (``applies``): PyTorch's ops cannot draw the kernels' mask.
The path keys hold p > 0, and ``geglu_gate_up`` (the recompute) takes the forward's p so
that it keys, and so computes, g and u as the forward did.

Layouts: x, the weights and dh are read through their strides (no copy of a transposed weight
or a sliced x); g and u are the package's own contiguous outputs. Outputs are new contiguous
tensors; kernels only store into them, so the autotuner may re-launch a kernel.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
import triton
import triton.language as tl

from .._runtime import autocast_off, device_context
from ..tuning.paths import Paths
from ..tuning.spaces import (
    bucket, elementwise_configs, matmul_configs, prune_elementwise, prune_matmul,
    tma_matmul_configs,
)
from ..tuning.tuner import Tuner
from . import _matmul
from . import gelu as _gelu
from ._math import (
    activate, activate_grad, cast_to, dropout_arguments, dropout_constants, dropout_factor_flat,
    dropout_factor_tile, without_dropout,
)
from ._matmul import (
    dot_operand, input_precision, output_tile, output_tile_of, persistent_grid, column_halves,
    small_accumulators, tile_grid, tma_applies, tma_compatible, use_tma_allocator,
)
from .gelu import as_rows, elementwise_grid, row_offsets

# ---- the math, once -------------------------------------------------------------------------


# The launchers (``triton_gelu.kernels`` re-exports them) and their per-problem launches.
__all__ = [
    "geglu_forward",
    "geglu_gate_up",
    "geglu_backward",
    "geglu_forward_launch",
    "geglu_gate_up_launch",
    "geglu_backward_launch",
]


@triton.jit
def _gated(gate, up, ACTIVATION: tl.constexpr):
    # h = gelu(g) * u, float32 in and out.
    return activate(gate, ACTIVATION) * up


@triton.jit
def _gated_grads(dh, gate, up, ACTIVATION: tl.constexpr):
    # h = gelu(g) * u:  dg = dh * u * gelu'(g),  du = dh * gelu(g); float32 in and out.
    return dh * up * activate_grad(gate, ACTIVATION), dh * activate(gate, ACTIVATION)


@triton.jit
def _rounded(acc, dtype: tl.constexpr):
    # float32 -> dtype -> float32: the value as stored in the input dtype.
    return cast_to(acc, dtype).to(tl.float32)


# ---- forward ----------------------------------------------------------------------------------


@triton.jit
def _geglu_fwd_kernel(
    x_ptr,  # (M, K)
    wg_ptr,  # (N, K) W_gate, read as W_gate^T (K, N) through its strides
    wu_ptr,  # (N, K) W_up, likewise
    bg_ptr,  # (N,) contiguous; None without HAS_GATE_BIAS
    bu_ptr,  # (N,) contiguous; None without HAS_UP_BIAS
    h_ptr,  # (M, N) contiguous; None without WRITE_H
    g_ptr,  # (M, N) contiguous; None without SAVE_GATE_UP
    u_ptr,  # (M, N) contiguous; None without SAVE_GATE_UP
    seed_ptr,  # (1,) int64, the dropout seed; None without HAS_DROPOUT
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_wgn,
    stride_wgk,
    stride_wun,
    stride_wuk,
    stride_om,  # row stride of h, g and u
    dropout_threshold,  # round(p * 2**31): see _math.dropout_factor_tile
    dropout_scale,  # 1 / (1 - p)
    dropout_col_offset,  # column n is column dropout_col_offset + n of the whole hidden layer,
    dropout_n_cols,  # which has dropout_n_cols columns (tensor parallel: a rank's shard)
    ACTIVATION: tl.constexpr,
    HAS_GATE_BIAS: tl.constexpr,
    HAS_UP_BIAS: tl.constexpr,
    WRITE_H: tl.constexpr,
    SAVE_GATE_UP: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_SIZE_M: tl.constexpr,
    BLOCK_SIZE_N: tl.constexpr,
    BLOCK_SIZE_K: tl.constexpr,
    GROUP_SIZE_M: tl.constexpr,
):
    _, pid_n, offs_m, offs_n, mask_m, mask_n = output_tile(
        M, N, BLOCK_SIZE_M, BLOCK_SIZE_N, GROUP_SIZE_M)
    offs_k = tl.arange(0, BLOCK_SIZE_K)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk  # (BM, BK)
    wg_ptrs = wg_ptr + offs_k[:, None] * stride_wgk + offs_n[None, :] * stride_wgn  # (BK, BN)
    wu_ptrs = wu_ptr + offs_k[:, None] * stride_wuk + offs_n[None, :] * stride_wun  # (BK, BN)

    # Both accumulators cover the same output columns, so each x tile is loaded once for two dots.
    acc_g = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_SIZE_K)):
        k_left = K - k * BLOCK_SIZE_K
        mask_kn = (offs_k[:, None] < k_left) & mask_n[None, :]
        x = dot_operand(
            tl.load(x_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
        )
        wg = tl.load(wg_ptrs, mask=mask_kn, other=0.0)
        acc_g = tl.dot(x, dot_operand(wg), acc_g, input_precision=INPUT_PRECISION)
        wu = tl.load(wu_ptrs, mask=mask_kn, other=0.0)
        acc_u = tl.dot(x, dot_operand(wu), acc_u, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_SIZE_K * stride_xk
        wg_ptrs += BLOCK_SIZE_K * stride_wgk
        wu_ptrs += BLOCK_SIZE_K * stride_wuk

    _forward_epilogue(acc_g, acc_u, x_ptr, bg_ptr, bu_ptr, h_ptr, g_ptr, u_ptr, seed_ptr, pid_n,
                      offs_m, mask_m, N, stride_om, dropout_threshold, dropout_scale,
                      dropout_col_offset, dropout_n_cols, ACTIVATION, HAS_GATE_BIAS,
                      HAS_UP_BIAS, WRITE_H, SAVE_GATE_UP, HAS_DROPOUT, BLOCK_SIZE_M,
                      BLOCK_SIZE_N)


@triton.jit
def _geglu_fwd_tma_kernel(
    x_ptr,  # (M, K), last stride 1, 16-byte aligned rows (see _matmul.tma_compatible)
    wg_ptr,  # (N, K) W_gate, likewise
    wu_ptr,  # (N, K) W_up, likewise
    bg_ptr,  # (N,) contiguous; None without HAS_GATE_BIAS
    bu_ptr,  # (N,) contiguous; None without HAS_UP_BIAS
    h_ptr,  # (M, N) contiguous; None without WRITE_H
    g_ptr,  # (M, N) contiguous; None without SAVE_GATE_UP
    u_ptr,  # (M, N) contiguous; None without SAVE_GATE_UP
    seed_ptr,  # (1,) int64, the dropout seed; None without HAS_DROPOUT
    M,
    N,
    K,
    stride_xm,
    stride_wgn,
    stride_wun,
    stride_om,  # row stride of h, g and u
    dropout_threshold,
    dropout_scale,
    dropout_col_offset,
    dropout_n_cols,
    ACTIVATION: tl.constexpr,
    HAS_GATE_BIAS: tl.constexpr,
    HAS_UP_BIAS: tl.constexpr,
    WRITE_H: tl.constexpr,
    SAVE_GATE_UP: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_SIZE_M: tl.constexpr,
    BLOCK_SIZE_N: tl.constexpr,
    BLOCK_SIZE_K: tl.constexpr,
    GROUP_SIZE_M: tl.constexpr,
):
    # The dual-matmul forward for Hopper: x, W_gate and W_up tiles by TMA, each program of a
    # persistent grid (one per SM) walking output tiles in grouped order; the same epilogue.
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[stride_xm, 1],
                                       block_shape=[BLOCK_SIZE_M, BLOCK_SIZE_K])
    wg_desc = tl.make_tensor_descriptor(wg_ptr, shape=[N, K], strides=[stride_wgn, 1],
                                        block_shape=[BLOCK_SIZE_N, BLOCK_SIZE_K])
    wu_desc = tl.make_tensor_descriptor(wu_ptr, shape=[N, K], strides=[stride_wun, 1],
                                        block_shape=[BLOCK_SIZE_N, BLOCK_SIZE_K])
    num_tiles = tl.cdiv(M, BLOCK_SIZE_M) * tl.cdiv(N, BLOCK_SIZE_N)
    for tile_id in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0)):
        pid_m, pid_n, offs_m, offs_n, mask_m, mask_n = output_tile_of(
            tile_id, M, N, BLOCK_SIZE_M, BLOCK_SIZE_N, GROUP_SIZE_M)
        off_m = pid_m * BLOCK_SIZE_M
        off_n = pid_n * BLOCK_SIZE_N
        # Each x tile is loaded once for two dots; TMA zero-fills past the tensors' ends.
        acc_g = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_SIZE_K)):
            x = dot_operand(x_desc.load([off_m, k * BLOCK_SIZE_K]))
            wg = dot_operand(wg_desc.load([off_n, k * BLOCK_SIZE_K]))
            acc_g = tl.dot(x, wg.T, acc_g, input_precision=INPUT_PRECISION)
            wu = dot_operand(wu_desc.load([off_n, k * BLOCK_SIZE_K]))
            acc_u = tl.dot(x, wu.T, acc_u, input_precision=INPUT_PRECISION)
        _forward_epilogue(acc_g, acc_u, x_ptr, bg_ptr, bu_ptr, h_ptr, g_ptr, u_ptr, seed_ptr,
                          pid_n, offs_m, mask_m, N, stride_om, dropout_threshold,
                          dropout_scale, dropout_col_offset, dropout_n_cols, ACTIVATION,
                          HAS_GATE_BIAS, HAS_UP_BIAS, WRITE_H, SAVE_GATE_UP, HAS_DROPOUT,
                          BLOCK_SIZE_M, BLOCK_SIZE_N)


@triton.jit
def _forward_epilogue(
    acc_g, acc_u,  # (BM, BN) float32: x @ W_gate^T and x @ W_up^T for the tile
    x_ptr, bg_ptr, bu_ptr, h_ptr, g_ptr, u_ptr, seed_ptr,  # the forward kernels' arguments
    pid_n,  # the tile's column index (the dropout mask's tile position)
    offs_m, mask_m,  # the tile's int64 rows and their mask
    N, stride_om, dropout_threshold, dropout_scale, dropout_col_offset, dropout_n_cols,
    ACTIVATION: tl.constexpr,
    HAS_GATE_BIAS: tl.constexpr,
    HAS_UP_BIAS: tl.constexpr,
    WRITE_H: tl.constexpr,
    SAVE_GATE_UP: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    BLOCK_SIZE_M: tl.constexpr,
    BLOCK_SIZE_N: tl.constexpr,
):
    # The tile's column halves in turn, quarters for tiles of 8K elements and more (the whole
    # tile's epilogue at once spilled on sm90 beside two accumulators; halves of 128 x 128
    # with dropout still spilled 304 bytes with Triton 3.6): part j of width w is column tile
    # (BN / w) * pid_n + j, as the dropout mask (a function of the element's position) sees it.
    if BLOCK_SIZE_M * BLOCK_SIZE_N >= 8192:
        HALF: tl.constexpr = BLOCK_SIZE_N // 2
        g_lo, g_hi = column_halves(acc_g, BLOCK_SIZE_M, BLOCK_SIZE_N)
        u_lo, u_hi = column_halves(acc_u, BLOCK_SIZE_M, BLOCK_SIZE_N)
        _forward_epilogue_halves(g_lo, u_lo, x_ptr, bg_ptr, bu_ptr, h_ptr, g_ptr, u_ptr,
                                 seed_ptr, 2 * pid_n, offs_m, mask_m, N, stride_om,
                                 dropout_threshold, dropout_scale, dropout_col_offset,
                                 dropout_n_cols, ACTIVATION, HAS_GATE_BIAS, HAS_UP_BIAS,
                                 WRITE_H, SAVE_GATE_UP, HAS_DROPOUT, BLOCK_SIZE_M, HALF)
        _forward_epilogue_halves(g_hi, u_hi, x_ptr, bg_ptr, bu_ptr, h_ptr, g_ptr, u_ptr,
                                 seed_ptr, 2 * pid_n + 1, offs_m, mask_m, N, stride_om,
                                 dropout_threshold, dropout_scale, dropout_col_offset,
                                 dropout_n_cols, ACTIVATION, HAS_GATE_BIAS, HAS_UP_BIAS,
                                 WRITE_H, SAVE_GATE_UP, HAS_DROPOUT, BLOCK_SIZE_M, HALF)
    else:
        _forward_epilogue_halves(acc_g, acc_u, x_ptr, bg_ptr, bu_ptr, h_ptr, g_ptr, u_ptr,
                                 seed_ptr, pid_n, offs_m, mask_m, N, stride_om,
                                 dropout_threshold, dropout_scale, dropout_col_offset,
                                 dropout_n_cols, ACTIVATION, HAS_GATE_BIAS, HAS_UP_BIAS,
                                 WRITE_H, SAVE_GATE_UP, HAS_DROPOUT, BLOCK_SIZE_M, BLOCK_SIZE_N)


@triton.jit
def _forward_epilogue_halves(
    acc_g, acc_u,  # (BM, BLOCK_SIZE_N) float32: column tile pid_n of width BLOCK_SIZE_N
    x_ptr, bg_ptr, bu_ptr, h_ptr, g_ptr, u_ptr, seed_ptr, pid_n, offs_m, mask_m,
    N, stride_om, dropout_threshold, dropout_scale, dropout_col_offset, dropout_n_cols,
    ACTIVATION: tl.constexpr,
    HAS_GATE_BIAS: tl.constexpr,
    HAS_UP_BIAS: tl.constexpr,
    WRITE_H: tl.constexpr,
    SAVE_GATE_UP: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    BLOCK_SIZE_M: tl.constexpr,
    BLOCK_SIZE_N: tl.constexpr,
):
    # ``_forward_epilogue_part`` on the two column halves of the accumulators in turn.
    HALF: tl.constexpr = BLOCK_SIZE_N // 2
    g_lo, g_hi = column_halves(acc_g, BLOCK_SIZE_M, BLOCK_SIZE_N)
    u_lo, u_hi = column_halves(acc_u, BLOCK_SIZE_M, BLOCK_SIZE_N)
    _forward_epilogue_part(g_lo, u_lo, x_ptr, bg_ptr, bu_ptr, h_ptr, g_ptr, u_ptr, seed_ptr,
                           2 * pid_n, offs_m, mask_m, N, stride_om, dropout_threshold,
                           dropout_scale, dropout_col_offset, dropout_n_cols, ACTIVATION,
                           HAS_GATE_BIAS, HAS_UP_BIAS, WRITE_H, SAVE_GATE_UP, HAS_DROPOUT, HALF)
    _forward_epilogue_part(g_hi, u_hi, x_ptr, bg_ptr, bu_ptr, h_ptr, g_ptr, u_ptr, seed_ptr,
                           2 * pid_n + 1, offs_m, mask_m, N, stride_om, dropout_threshold,
                           dropout_scale, dropout_col_offset, dropout_n_cols, ACTIVATION,
                           HAS_GATE_BIAS, HAS_UP_BIAS, WRITE_H, SAVE_GATE_UP, HAS_DROPOUT, HALF)


@triton.jit
def _forward_epilogue_part(
    acc_g, acc_u,  # (BM, BLOCK_SIZE_N) float32: x @ W_gate^T and x @ W_up^T, column tile pid_n
    x_ptr, bg_ptr, bu_ptr, h_ptr, g_ptr, u_ptr, seed_ptr,  # the forward kernels' arguments
    pid_n,  # the column tile's index, in units of BLOCK_SIZE_N
    offs_m, mask_m,  # the tile's int64 rows and their mask
    N, stride_om, dropout_threshold, dropout_scale, dropout_col_offset, dropout_n_cols,
    ACTIVATION: tl.constexpr,
    HAS_GATE_BIAS: tl.constexpr,
    HAS_UP_BIAS: tl.constexpr,
    WRITE_H: tl.constexpr,
    SAVE_GATE_UP: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    BLOCK_SIZE_N: tl.constexpr,
):
    offs_n = pid_n.to(tl.int64) * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)
    mask_n = offs_n < N
    # Epilogue in float32: g and u get their biases and are rounded to the input dtype (the
    # values the backward sees, see the module docstring); h = gelu(g) * u (then dropout) is
    # cast once. Both forward kernels (pointer loads, and TMA loads on a persistent grid) end so.
    if HAS_GATE_BIAS:
        acc_g += tl.load(bg_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if HAS_UP_BIAS:
        acc_u += tl.load(bu_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    gate = _rounded(acc_g, x_ptr.dtype.element_ty)
    up = _rounded(acc_u, x_ptr.dtype.element_ty)
    offs_out = offs_m[:, None] * stride_om + offs_n[None, :]
    mask_out = mask_m[:, None] & mask_n[None, :]
    if SAVE_GATE_UP:
        tl.store(g_ptr + offs_out, gate.to(g_ptr.dtype.element_ty), mask=mask_out)
        tl.store(u_ptr + offs_out, up.to(u_ptr.dtype.element_ty), mask=mask_out)
    if WRITE_H:
        h = _gated(gate, up, ACTIVATION)
        if HAS_DROPOUT:  # h * keep / (1 - p), the mask a function of (m, n): see _math
            h = h * dropout_factor_tile(seed_ptr, offs_m, pid_n, dropout_n_cols,
                                        dropout_col_offset, dropout_threshold, dropout_scale,
                                        BLOCK_SIZE_N)
        tl.store(h_ptr + offs_out, cast_to(h, h_ptr.dtype.element_ty), mask=mask_out)


@triton.jit
def _geglu_act_kernel(
    g_ptr,  # (M * N,) contiguous
    u_ptr,  # (M * N,) contiguous
    h_ptr,  # (M * N,) contiguous
    seed_ptr,  # (1,) int64, the dropout seed; None without HAS_DROPOUT
    n_elements,
    n_cols,  # N: element i is (i // N, i % N) of the (M, N) hidden, for the dropout mask
    dropout_threshold,
    dropout_scale,
    dropout_col_offset,  # as in _geglu_fwd_kernel
    dropout_n_cols,
    ACTIVATION: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    # h = gelu(g) * u elementwise (then dropout): the composed forward, and h regenerated in
    # the fused backward.
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n_elements
    gate = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
    up = tl.load(u_ptr + offs, mask=mask).to(tl.float32)
    h = _gated(gate, up, ACTIVATION)
    if HAS_DROPOUT:  # the fused epilogue's mask: see _math
        h = h * dropout_factor_flat(seed_ptr, offs, n_cols, dropout_col_offset, dropout_n_cols,
                                    dropout_threshold, dropout_scale)
    tl.store(h_ptr + offs, cast_to(h, h_ptr.dtype.element_ty), mask=mask)


# ---- backward ---------------------------------------------------------------------------------


@triton.jit
def _geglu_bwd_act_kernel(
    dh_ptr,  # (M, N), row stride stride_dh_row
    g_ptr,  # (M * N,) contiguous
    u_ptr,  # (M * N,) contiguous
    dg_ptr,  # (M * N,) contiguous
    du_ptr,  # (M * N,) contiguous
    h_ptr,  # (M * N,) contiguous; None without WRITE_H
    seed_ptr,  # (1,) int64, the forward's dropout seed; None without HAS_DROPOUT
    n_elements,
    n_cols,
    stride_dh_row,
    dropout_threshold,
    dropout_scale,
    dropout_col_offset,  # as in _geglu_fwd_kernel
    dropout_n_cols,
    ACTIVATION: tl.constexpr,
    WRITE_H: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    CONTIGUOUS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    # dg = dh * u * gelu'(g), du = dh * gelu(g) once, in float32, stored in the input dtype.
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n_elements
    dh = tl.load(dh_ptr + row_offsets(offs, n_cols, stride_dh_row, CONTIGUOUS), mask=mask)
    dh = dh.to(tl.float32)
    gate = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
    up = tl.load(u_ptr + offs, mask=mask).to(tl.float32)
    if HAS_DROPOUT:
        # dh is the gradient of dropout(h) = h * keep / (1 - p): the gradient of h is
        # dh * keep / (1 - p), the forward's mask regenerated from its seed (see _math)
        keep_scale = dropout_factor_flat(seed_ptr, offs, n_cols, dropout_col_offset,
                                         dropout_n_cols, dropout_threshold, dropout_scale)
        dh = dh * keep_scale
    dgate, dup = _gated_grads(dh, gate, up, ACTIVATION)
    tl.store(dg_ptr + offs, cast_to(dgate, dg_ptr.dtype.element_ty), mask=mask)
    tl.store(du_ptr + offs, cast_to(dup, du_ptr.dtype.element_ty), mask=mask)
    if WRITE_H:  # the down projection's input, dropout(h), for dW_down
        h = _gated(gate, up, ACTIVATION)
        if HAS_DROPOUT:
            h = h * keep_scale
        tl.store(h_ptr + offs, cast_to(h, h_ptr.dtype.element_ty), mask=mask)


# ---- launchers ----------------------------------------------------------------------------------

# The forward and the recompute of g and u share one tuner and one key, so they launch the same
# config: the same tiles in the same order, hence bitwise the same g and u.
def _fwd_configs(arch: str | None = None) -> list[triton.Config]:
    # The matmul tiles whose two accumulators fit beside each other (see
    # _matmul.small_accumulators: 256 x 128 at 8 warps spilled inside the main loop on sm90,
    # 128 x 256 16.8 KB on sm80). Where mma.sync takes its operands from registers (before
    # Hopper), 64-register accumulators beside 64-deep x and two W tiles spilled inside the
    # main loop too (128 x 128 x 64 at 8 warps; 128 x 64 x 64 at 4 with dropout): their
    # 32-deep variants stay.
    configs = small_accumulators(matmul_configs(arch))
    if arch in ("sm80", "sm86", "sm89", "default"):
        configs = [c for c in configs if c.kwargs["BLOCK_SIZE_K"] < 64 or
                   c.kwargs["BLOCK_SIZE_M"] * c.kwargs["BLOCK_SIZE_N"] < 64 * 32 * c.num_warps]
    return configs


_fwd_tuner = Tuner(_geglu_fwd_kernel, "geglu_fwd", _fwd_configs,
                   functools.partial(prune_matmul, reduction="K", gated=True))
# Its Hopper variant (TMA loads, persistent grid): the forward's "tma" path.
_fwd_tma_tuner = Tuner(_geglu_fwd_tma_kernel, "geglu_fwd_tma", tma_matmul_configs,
                       functools.partial(prune_matmul, reduction="K", gated=True,
                                         persistent=True))
_act_tuner = Tuner(_geglu_act_kernel, "geglu_act", elementwise_configs, prune_elementwise)


def _bwd_act_configs(arch: str | None = None) -> list[triton.Config]:
    # The elementwise blocks of at most 32 elements a thread (16 at 16 warps, which have 128
    # registers a thread): with three loads, GELU, GELU', three stores and the Philox mask per
    # element, 64 a thread spilled on sm90 (600 bytes of stack at 8192 x 4 warps with
    # dropout), 128 several KB, and 32 at 16 warps 320 bytes with Triton 3.6.
    return [c for c in elementwise_configs(arch)
            if c.kwargs["BLOCK_SIZE"] // (32 * c.num_warps) <= (32 if c.num_warps <= 8 else 16)]


_bwd_act_tuner = Tuner(_geglu_bwd_act_kernel, "geglu_bwd_act", _bwd_act_configs,
                       prune_elementwise)


Outputs = tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]


def _key(x2d: torch.Tensor, w_gate: torch.Tensor, activation: str, *flags) -> tuple:
    (M, K), N = x2d.shape, w_gate.shape[0]
    return (bucket(M), N, K, x2d.dtype, activation, *flags, input_precision(x2d.dtype))


def _forward_key(x2d: torch.Tensor, w_gate: torch.Tensor, b_gate: torch.Tensor | None,
                 b_up: torch.Tensor | None, activation: str, p: float) -> tuple:
    """The forward's path key and its kernel's tuning key, for the forward and the recompute of
    g and u alike (so both take the same path and config): dropout on, and which biases."""
    return _key(x2d, w_gate, activation, p > 0.0, b_gate is not None, b_up is not None)


def _forward_problem(x2d, w_gate, b_gate, b_up, activation: str, write_h: bool,
                     save_gate_up: bool, p: float, col_offset: int, n_cols: int,
                     tma: bool) -> tuple[tuple, Callable, dict]:
    """(key, grid, constant arguments) of a forward launch: what every launch of one problem
    shares (the outputs are (M, N) contiguous)."""
    (M, K), N = x2d.shape, w_gate.shape[0]
    key = _forward_key(x2d, w_gate, b_gate, b_up, activation, p)
    constants = dict(
        M=M, N=N, K=K, stride_om=N, ACTIVATION=activation, HAS_GATE_BIAS=b_gate is not None,
        HAS_UP_BIAS=b_up is not None, WRITE_H=write_h, SAVE_GATE_UP=save_gate_up,
        INPUT_PRECISION=key[-1], dropout_n_cols=n_cols,
        **dropout_constants(p if write_h else 0.0, col_offset))  # the mask is h's alone
    grid = persistent_grid(M, N, x2d.device) if tma else \
        tile_grid(M, N, "BLOCK_SIZE_M", "BLOCK_SIZE_N")
    return key, grid, constants


def _forward_operands(tma: bool, x2d, w_gate, w_up, b_gate, b_up, h, g, u, seed) -> dict:
    """The arguments of one forward launch that its problem does not fix: tensors, strides."""
    operands = _forward_pointers(x2d, w_gate, w_up, b_gate, b_up, h, g, u, seed)
    operands.update(stride_xm=x2d.stride(0), stride_wgn=w_gate.stride(0),
                    stride_wun=w_up.stride(0))
    if not tma:
        operands.update(stride_xk=x2d.stride(1), stride_wgk=w_gate.stride(1),
                        stride_wuk=w_up.stride(1))
    return operands


def _forward_pointers(x2d, w_gate, w_up, b_gate, b_up, h, g, u, seed) -> dict:
    return dict(x_ptr=x2d, wg_ptr=w_gate, wu_ptr=w_up,
                # N elements each: cheaper to copy than to pass another stride
                bg_ptr=None if b_gate is None else b_gate.contiguous(),
                bu_ptr=None if b_up is None else b_up.contiguous(),
                h_ptr=h, g_ptr=g, u_ptr=u, seed_ptr=seed)


def _dense_strides(tma: bool, K: int) -> dict:
    """``_forward_operands``' strides for contiguous x2d, W_gate and W_up (K columns each)."""
    strides = dict(stride_xm=K, stride_wgn=K, stride_wun=K)
    if not tma:
        strides.update(stride_xk=1, stride_wgk=1, stride_wuk=1)
    return strides


def _forward_outputs(M: int, N: int, x2d, write_h: bool, save_gate_up: bool) -> Outputs:
    h = _matmul.new_output((M, N), x2d) if write_h else None
    if not save_gate_up:
        return h, None, None
    return h, _matmul.new_output((M, N), x2d), _matmul.new_output((M, N), x2d)


def _forward_fused(
    x2d: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, b_gate: torch.Tensor | None,
    b_up: torch.Tensor | None, activation: str, write_h: bool, save_gate_up: bool,
    seed: torch.Tensor | None, p: float, col_offset: int, n_cols: int, tma: bool = False,
) -> Outputs:
    # tma: by the Hopper kernel (the "tma" path, on operands descriptors can serve)
    M, N = x2d.shape[0], w_gate.shape[0]
    h, g, u = _forward_outputs(M, N, x2d, write_h, save_gate_up)
    if M == 0 or N == 0:
        return h, g, u
    key, grid, constants = _forward_problem(x2d, w_gate, b_gate, b_up, activation, write_h,
                                            save_gate_up, p, col_offset, n_cols, tma)
    operands = _forward_operands(tma, x2d, w_gate, w_up, b_gate, b_up, h, g, u,
                                 seed if write_h and p > 0.0 else None)
    with device_context(x2d):
        if tma:
            # The tile loop is not flattened: with two float32 accumulators, an epilogue
            # inside the pipelined loop spills there (tests/aot_compile.py); after the K loop
            # it spills a few registers outside it.
            use_tma_allocator()
        (_fwd_tma_tuner if tma else _fwd_tuner).run(grid, key, **constants, **operands)
    return h, g, u


def _forward_tma(
    x2d: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, b_gate: torch.Tensor | None,
    b_up: torch.Tensor | None, activation: str, write_h: bool, save_gate_up: bool,
    seed: torch.Tensor | None, p: float, col_offset: int, n_cols: int,
) -> Outputs:
    # fused on the Hopper kernel where descriptors can serve x and both weights (else the
    # pointer kernel: a key that chose this path may come again with operands they cannot)
    return _forward_fused(x2d, w_gate, w_up, b_gate, b_up, activation, write_h,
                          save_gate_up, seed, p, col_offset, n_cols,
                          tma=tma_compatible(x2d, w_gate, w_up))


def _tma_applies(x2d: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, *args,
                 **kwargs) -> bool:
    return tma_applies(x2d, w_gate, w_up)


def _gate_into(h: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, activation: str,
               seed: torch.Tensor | None = None, p: float = 0.0, col_offset: int = 0,
               n_cols: int | None = None) -> torch.Tensor:
    """h = gelu(gate) * up (then dropout with probability ``p`` when p > 0, the mask of columns
    ``col_offset`` .. of ``n_cols``, by default gate's own) by the elementwise kernel, into the
    contiguous ``h``; gate and up are (M, N)."""
    gate, up = gate.contiguous(), up.contiguous()  # no-ops: both are our own outputs
    n = gate.numel()
    if n:
        with device_context(gate):
            _act_tuner.run(elementwise_grid(n), (bucket(n), gate.dtype, activation, p > 0.0),
                           g_ptr=gate, u_ptr=up, h_ptr=h, n_elements=n, n_cols=gate.shape[1],
                           ACTIVATION=activation,
                           **dropout_arguments(seed, p, n_cols or gate.shape[1], col_offset))
    return h


def _linear_into(out: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor:
    """out = x2d @ weight^T + bias by cuBLAS (what F.linear runs), into ``out``."""
    with torch.autocast(x2d.device.type, enabled=False):
        if bias is None:
            return torch.mm(x2d, weight.t(), out=out)
        return torch.addmm(bias, x2d, weight.t(), out=out)


def _gated_by_cublas(
    x2d: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, b_gate: torch.Tensor | None,
    b_up: torch.Tensor | None, write_h: bool, save_gate_up: bool,
    gate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> Outputs:
    """g and u by cuBLAS (what F.linear runs), then h = gate(g, u) when ``write_h``."""
    (M, _), N = x2d.shape, w_gate.shape[0]
    g = _linear_into(_matmul.new_output((M, N), x2d), x2d, w_gate, b_gate)
    u = _linear_into(_matmul.new_output((M, N), x2d), x2d, w_up, b_up)
    with torch.autocast(x2d.device.type, enabled=False):
        h = gate(g, u) if write_h else None
    return (h, g, u) if save_gate_up else (h, None, None)


def _forward_composed(
    x2d: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, b_gate: torch.Tensor | None,
    b_up: torch.Tensor | None, activation: str, write_h: bool, save_gate_up: bool,
    seed: torch.Tensor | None, p: float, col_offset: int, n_cols: int,
) -> Outputs:
    # h by our elementwise kernel (then dropout)
    return _gated_by_cublas(
        x2d, w_gate, w_up, b_gate, b_up, write_h, save_gate_up,
        lambda g, u: _gate_into(_matmul.new_output(tuple(g.shape), x2d), g, u, activation,
                                seed, p, col_offset, n_cols))


def _forward_torch(
    x2d: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, b_gate: torch.Tensor | None,
    b_up: torch.Tensor | None, activation: str, write_h: bool, save_gate_up: bool,
    seed: torch.Tensor | None, p: float, col_offset: int, n_cols: int,
) -> Outputs:
    # Eager PyTorch (p == 0 only, see the Paths, so the columns' position does not matter):
    # F.gelu(g) * u, gelu(g) rounded to the input dtype before the product, as eager rounds it.
    return _gated_by_cublas(x2d, w_gate, w_up, b_gate, b_up, write_h, save_gate_up,
                            lambda g, u: _gelu.gelu_forward_torch(g, activation) * u)


# Where nothing may be timed on a GPU (policy "off", CUDA-graph capture) and nothing is known:
# composed (cuBLAS for both projections and an elementwise kernel whose first config is fine
# for any size; the dual matmul's first config is a guess). "torch" is no candidate with
# dropout on: PyTorch's ops cannot draw the kernels' mask, which the backward regenerates.
_forward_paths = Paths(
    "geglu_fwd",
    {"fused": _forward_fused, "composed": _forward_composed, "torch": _forward_torch,
     "tma": _forward_tma},
    default="fused", untuned="composed",
    applies={"torch": without_dropout, "tma": _tma_applies},
    kernels=[_fwd_tuner, _act_tuner, _fwd_tma_tuner],
)


def _run_forward(
    x2d: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, b_gate: torch.Tensor | None,
    b_up: torch.Tensor | None, activation: str, write_h: bool, save_gate_up: bool,
    seed: torch.Tensor | None, p: float, col_offset: int, n_cols: int,
) -> Outputs:
    # One key for the forward and the recompute: the same path, so the same g and u.
    key = _forward_key(x2d, w_gate, b_gate, b_up, activation, p)
    return _forward_paths.run(key, x2d, w_gate, w_up, b_gate, b_up, activation, write_h,
                              save_gate_up, seed=seed, p=p, col_offset=col_offset,
                              n_cols=n_cols)


def geglu_forward(
    x2d: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, b_gate: torch.Tensor | None,
    b_up: torch.Tensor | None, activation: str, save_gate_up: bool,
    seed: torch.Tensor | None = None, p: float = 0.0, col_offset: int = 0,
    n_cols: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(h, g, u): h = gelu(g) * u with g = x2d @ w_gate.T + b_gate and u = x2d @ w_up.T + b_up,
    new contiguous (M, N) tensors in x2d's dtype; g and u are None unless ``save_gate_up``.

    With ``p`` > 0, h is dropout(gelu(g) * u) with probability p, its mask drawn from ``seed``
    (a 1-element int64 tensor on x2d's device), the FFN block's generator (``_math.py``), for
    columns ``col_offset`` .. ``col_offset + N`` of an (M, ``n_cols``) hidden layer: by default
    the whole (M, N) one; under tensor parallel, the rank's columns of the whole layer."""
    n_cols = w_gate.shape[0] if n_cols is None else n_cols
    return _run_forward(x2d, w_gate, w_up, b_gate, b_up, activation, True, save_gate_up,
                        seed, p, col_offset, n_cols)


def geglu_gate_up(
    x2d: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, b_gate: torch.Tensor | None,
    b_up: torch.Tensor | None, activation: str, p: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(g, u), bitwise what ``geglu_forward(..., save_gate_up=True)`` saves (the same path and
    kernel config, writing no h): the backward's recompute. ``p`` is the forward's dropout
    probability: g and u do not depend on it, but the forward's path choice does."""
    _, g, u = _run_forward(x2d, w_gate, w_up, b_gate, b_up, activation, False, True,
                           None, p, 0, w_gate.shape[0])
    return g, u


Grads = tuple[torch.Tensor | None, ...]


def _input_and_weight_grads(
    dgate: torch.Tensor, dup: torch.Tensor, x2d: torch.Tensor, w_gate: torch.Tensor,
    w_up: torch.Tensor, needs: Sequence[bool],
) -> Grads:
    """(dx, dW_gate, dW_up, db_gate, db_up) from dg and du in the input dtype, by cuBLAS: dx as
    ``mm`` then ``addmm_`` into one buffer, the bias gradients column sums of the rounded dg
    and du (as PyTorch's backward sums them)."""
    need_dx, need_dwg, need_dwu, need_dbg, need_dbu = needs
    dx = dwg = dwu = dbg = dbu = None
    with autocast_off(x2d):
        if need_dx:
            dx = torch.mm(dgate, w_gate)
            dx.addmm_(dup, w_up)
        if need_dwg:
            dwg = torch.mm(dgate.t(), x2d)
        if need_dwu:
            dwu = torch.mm(dup.t(), x2d)
        if need_dbg:
            dbg = torch.sum(dgate, 0, dtype=torch.float32).to(w_gate.dtype)
        if need_dbu:
            dbu = torch.sum(dup, 0, dtype=torch.float32).to(w_up.dtype)
    return dx, dwg, dwu, dbg, dbu


def _backward_problem(x2d, w_gate, activation: str, write_h: bool, p: float, col_offset: int,
                      n_cols: int) -> tuple[tuple, Callable, dict]:
    """(key, grid, constant arguments) of the backward's elementwise launch."""
    n = x2d.shape[0] * w_gate.shape[0]
    return ((bucket(n), x2d.dtype, activation, write_h, p > 0.0), elementwise_grid(n),
            dict(n_elements=n, ACTIVATION=activation, WRITE_H=write_h, dropout_n_cols=n_cols,
                 **dropout_constants(p, col_offset)))


def _backward_outputs(x2d, w_gate, write_h: bool):
    """(dg, du, h or None), new (M, N)."""
    shape = (x2d.shape[0], w_gate.shape[0])
    return (_matmul.new_output(shape, x2d), _matmul.new_output(shape, x2d),
            _matmul.new_output(shape, x2d) if write_h else None)


def _backward_operands(dh2d, gate, up, dgate, dup, h, seed) -> dict:
    dh_rows, row_len, stride_row = as_rows(dh2d)
    return dict(dh_ptr=dh_rows, g_ptr=gate.contiguous(), u_ptr=up.contiguous(),  # no-ops: ours
                dg_ptr=dgate, du_ptr=dup, h_ptr=h, seed_ptr=seed,
                **_backward_layout(row_len, stride_row))


def _backward_layout(row_len: int, stride_row: int) -> dict:
    return dict(n_cols=row_len, stride_dh_row=stride_row, CONTIGUOUS=stride_row == row_len)


def _backward_once(
    dh2d: torch.Tensor, x2d: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
    gate: torch.Tensor, up: torch.Tensor, activation: str, needs: Sequence[bool],
    write_h: bool, seed: torch.Tensor | None, p: float, col_offset: int, n_cols: int,
) -> Grads:
    dgate, dup, h = _backward_outputs(x2d, w_gate, write_h)
    if dgate.numel():
        key, grid, constants = _backward_problem(x2d, w_gate, activation, write_h, p,
                                                 col_offset, n_cols)
        with device_context(x2d):
            _bwd_act_tuner.run(grid, key, **constants, **_backward_operands(
                dh2d, gate, up, dgate, dup, h, seed if p > 0.0 else None))
    return (*_input_and_weight_grads(dgate, dup, x2d, w_gate, w_up, needs), h)


def _backward_torch(
    dh2d: torch.Tensor, x2d: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
    gate: torch.Tensor, up: torch.Tensor, activation: str, needs: Sequence[bool],
    write_h: bool, seed: torch.Tensor | None, p: float, col_offset: int, n_cols: int,
) -> Grads:
    # Eager PyTorch's backward of F.gelu(g) * u (p == 0 only, see the Paths; so the columns'
    # position does not matter): du = dh * gelu(g)
    # and dg = aten.gelu_backward(dh * u, g), each op rounding to the input dtype as eager's
    # do; then F.linear's backward (the cuBLAS matmuls and column sums of the once path).
    with autocast_off(x2d):
        gelu_gate = _gelu.gelu_forward_torch(gate, activation)
        dgate = _gelu.gelu_backward_torch(dh2d * up, gate, activation)
        dup = dh2d * gelu_gate
        h = gelu_gate * up if write_h else None  # eager's h: what its forward fed down
    return (*_input_and_weight_grads(dgate, dup, x2d, w_gate, w_up, needs), h)


# "once" is cuBLAS with one elementwise kernel: safe untuned. "torch" serves p == 0 only:
# PyTorch's ops cannot draw the kernels' mask. No path rebuilds dg and du per output tile inside
# a matmul's K loop (see the module docstring for why that cannot win).
_backward_paths = Paths(
    "geglu_bwd", {"once": _backward_once, "torch": _backward_torch},
    default="once", untuned="once", applies={"torch": without_dropout},
    kernels=[_bwd_act_tuner],
)


def geglu_backward(
    dh2d: torch.Tensor, x2d: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
    gate: torch.Tensor, up: torch.Tensor, activation: str, needs: Sequence[bool],
    write_h: bool = False, seed: torch.Tensor | None = None, p: float = 0.0,
    col_offset: int = 0, n_cols: int | None = None,
) -> tuple[torch.Tensor | None, ...]:
    """(dx, dW_gate, dW_up, db_gate, db_up, h) of h = gelu(g) * u for the upstream gradient dh2d.

    ``needs`` says which of the five gradients to compute (the others are None); each is a new
    contiguous tensor in the input dtype. ``gate`` and ``up`` are g and u as saved by the forward
    (or recomputed by ``geglu_gate_up``). With ``write_h`` the last output is h = gelu(g) * u,
    bitwise the forward's (the gated block's down projection needs it), else None.

    With ``p`` > 0 the forward applied dropout to h (``geglu_forward``'s ``seed`` and ``p``):
    dh2d is then the gradient of dropout(h), the mask is regenerated from ``seed``, and the h
    written is dropout(h), the down projection's input (``col_offset`` and ``n_cols`` as the
    forward's).
    """
    n_cols = w_gate.shape[0] if n_cols is None else n_cols
    return _backward_paths.run(_key(x2d, w_gate, activation, p > 0.0), dh2d, x2d, w_gate,
                               w_up, gate, up, activation, needs, write_h, seed=seed, p=p,
                               col_offset=col_offset, n_cols=n_cols)


# ---- per-problem launches (the plans of ``ops/geglu.py``, ``ops/gated_ffn.py``) -------------
#
# Each binds the problem's settled path (see ``linear_gelu.py``'s): the key is built and the
# path chosen once; its kernels launch by their Tuners.


def _bound_forward(x2d, w_gate, w_up, b_gate, b_up, activation: str, write_h: bool,
                   save_gate_up: bool, p: float, col_offset: int, n_cols: int | None):
    """``_run_forward``'s settled path for this problem, as a callable (x2d, w_gate, w_up,
    b_gate, b_up, seed) -> (h, g, u); None when the path is not settled."""
    n_cols = w_gate.shape[0] if n_cols is None else n_cols
    key = _forward_key(x2d, w_gate, b_gate, b_up, activation, p)
    fixed = (activation, write_h, save_gate_up)
    kwargs = dict(seed=None, p=p, col_offset=col_offset, n_cols=n_cols)
    path = _forward_paths.settled(key, (x2d, w_gate, w_up, b_gate, b_up, *fixed), kwargs)
    if path is None:
        return None
    fn, count = _forward_paths.paths[path], _forward_paths.counted(path)

    def run_path(x2d, w_gate, w_up, b_gate, b_up, seed):
        count()
        return fn(x2d, w_gate, w_up, b_gate, b_up, *fixed, seed, p, col_offset, n_cols)
    (M, _), N = x2d.shape, w_gate.shape[0]
    if path not in ("fused", "tma") or not (M and N):
        return run_path
    # The kernel's launch kept (as ``linear_gelu.bound_forward``), for operands it may take.
    tma = path == "tma"
    if tma and not tma_compatible(x2d, w_gate, w_up):
        return run_path
    tuner_key, grid, constants = _forward_problem(
        x2d, w_gate, b_gate, b_up, activation, write_h, save_gate_up, p, col_offset, n_cols,
        tma)
    tuner = _fwd_tma_tuner if tma else _fwd_tuner
    with device_context(x2d):
        launch = tuner.bound(grid, tuner_key, **constants)
        # contiguous x2d and weights, the common case: their strides bound too
        dense = tuner.bound(grid, tuner_key, **constants, **_dense_strides(tma, x2d.shape[1]))
    if launch is None:  # (dense too: the same config)
        return run_path
    precision, with_seed = constants["INPUT_PRECISION"], write_h and p > 0.0

    def run(x2d, w_gate, w_up, b_gate, b_up, seed):
        if (precision is not None and input_precision(x2d.dtype) != precision) or (
                tma and not tma_compatible(x2d, w_gate, w_up)):
            return run_path(x2d, w_gate, w_up, b_gate, b_up, seed)
        outputs = _forward_outputs(M, N, x2d, write_h, save_gate_up)
        count()
        seed = seed if with_seed else None
        with device_context(x2d):
            if tma:
                use_tma_allocator()
            if x2d.is_contiguous() and w_gate.is_contiguous() and w_up.is_contiguous():
                dense(**_forward_pointers(x2d, w_gate, w_up, b_gate, b_up, *outputs, seed))
            else:
                launch(**_forward_operands(tma, x2d, w_gate, w_up, b_gate, b_up, *outputs,
                                           seed))
        return outputs
    return run


def geglu_forward_launch(x2d, w_gate, w_up, b_gate, b_up, activation: str, save_gate_up: bool,
                   seed=None, p: float = 0.0, col_offset: int = 0,
                   n_cols: int | None = None) -> Callable:
    """``geglu_forward`` bound to this problem: (x2d, w_gate, w_up, b_gate, b_up, seed) ->
    (h, g, u)."""
    return _bound_forward(x2d, w_gate, w_up, b_gate, b_up, activation, True, save_gate_up, p,
                          col_offset, n_cols) or (
        lambda x2d, w_gate, w_up, b_gate, b_up, seed: geglu_forward(
            x2d, w_gate, w_up, b_gate, b_up, activation, save_gate_up, seed, p, col_offset,
            n_cols))


def geglu_gate_up_launch(x2d, w_gate, w_up, b_gate, b_up, activation: str,
                   p: float = 0.0) -> Callable:
    """``geglu_gate_up`` bound to this problem: (x2d, w_gate, w_up, b_gate, b_up) -> (g, u)."""
    bound = _bound_forward(x2d, w_gate, w_up, b_gate, b_up, activation, False, True, p, 0,
                           None)
    if bound is None:
        return lambda *tensors: geglu_gate_up(*tensors, activation, p)
    return lambda *tensors: bound(*tensors, None)[1:]


def geglu_backward_launch(dh2d, x2d, w_gate, w_up, gate, up, activation: str, needs: Sequence[bool],
                    write_h: bool = False, seed=None, p: float = 0.0, col_offset: int = 0,
                    n_cols: int | None = None) -> Callable:
    """``geglu_backward`` bound to this problem: (dh2d, x2d, w_gate, w_up, gate, up, seed) ->
    its outputs."""
    n_cols = w_gate.shape[0] if n_cols is None else n_cols
    key = _key(x2d, w_gate, activation, p > 0.0)
    fixed = (activation, needs, write_h)
    path = _backward_paths.settled(key, (dh2d, x2d, w_gate, w_up, gate, up, *fixed),
                                   dict(seed=seed, p=p, col_offset=col_offset, n_cols=n_cols))
    if path is None:
        def launcher(dh2d, x2d, w_gate, w_up, gate, up, seed):
            return geglu_backward(dh2d, x2d, w_gate, w_up, gate, up, *fixed, seed, p,
                                  col_offset, n_cols)
        return launcher
    fn, count = _backward_paths.paths[path], _backward_paths.counted(path)

    def run_path(dh2d, x2d, w_gate, w_up, gate, up, seed):
        count()
        return fn(dh2d, x2d, w_gate, w_up, gate, up, *fixed, seed, p, col_offset, n_cols)
    if path != "once" or not (x2d.shape[0] and w_gate.shape[0]):
        return run_path
    tuner_key, grid, constants = _backward_problem(x2d, w_gate, activation, write_h, p,
                                                   col_offset, n_cols)
    n = w_gate.shape[0]
    with device_context(x2d):
        launch = _bwd_act_tuner.bound(grid, tuner_key, **constants)
        # contiguous dh, g and u (g and u are the forward's), the common case: layout bound too
        dense = _bwd_act_tuner.bound(grid, tuner_key, **constants, **_backward_layout(n, n))
    if launch is None:  # (dense too: the same config)
        return run_path
    with_seed = p > 0.0

    def run(dh2d, x2d, w_gate, w_up, gate, up, seed):
        dgate, dup, h = _backward_outputs(x2d, w_gate, write_h)
        count()
        seed = seed if with_seed else None
        with device_context(x2d):
            if dh2d.is_contiguous() and gate.is_contiguous() and up.is_contiguous():
                dense(dh_ptr=dh2d, g_ptr=gate, u_ptr=up, dg_ptr=dgate, du_ptr=dup, h_ptr=h,
                      seed_ptr=seed)
            else:
                launch(**_backward_operands(dh2d, gate, up, dgate, dup, h, seed))
        return (*_input_and_weight_grads(dgate, dup, x2d, w_gate, w_up, needs), h)
    return run
