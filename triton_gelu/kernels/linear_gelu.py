"""Fused Linear + bias + GELU: y = gelu(x @ W^T + b), forward and backward kernels.

Shapes (the launchers take a 2-D x; ``functional.py`` flattens the leading dimensions)::

    x (M, K)    weight W (N, K)    bias b (N,)    z = x @ W^T + b (M, N)    y = gelu(z) (M, N)

Forward: one tiled matmul accumulating in float32; the epilogue adds the bias and applies GELU
while the accumulator is still float32, then casts once. When a gradient will be needed the same
epilogue also stores the pre-activation z (in the input dtype) for the backward; in inference only
y is written. ``linear_preact`` runs the same kernel writing only z (backward with recompute).
The FFN block (``ffn.py``) runs it too, with dropout applied to y in the epilogue (HAS_DROPOUT:
the mask is a function of the seed and the element's position, see ``_math.py``).

Backward, with dz = dy * gelu'(z) (elementwise, M x N; gelu' is in ``_math.py``)::

    dx = dz @ W        (M, N) x (N, K)
    dW = dz^T @ x      (N, M) x (M, K)
    db = sum_m dz      (N,)

dz is never written to memory: the dx kernel and the dW kernel each rebuild it from the dy and z
tiles they load, which costs an elementwise gelu' per tile instead of a write and a read of M x N.
db comes out of the dW kernel: for each N-tile exactly one program (the first K-tile's) also sums
its dz tiles over m, so db is stored once, with no atomics and no extra pass over M x N.

Numerics, matching PyTorch in the same dtype: tl.dot multiplies input-dtype operands and
accumulates in float32. dz is rounded to the input dtype before it enters a tl.dot (what
PyTorch's bf16/fp16 backward feeds its matmuls); db sums the unrounded float32 dz. float32 inputs
use TF32 exactly when ``torch.backends.cuda.matmul.allow_tf32`` is set, as ``torch.matmul`` does.

Layouts: x, W, dy and z are read through their strides (W as W^T included), so no transposed
or sliced operand is copied (only a strided bias, N elements, is made contiguous). Outputs are
new contiguous tensors; kernels only store into them, so the autotuner may re-launch a kernel on
the same arguments.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .. import reference
from .._autotune import Tuner, bucket, matmul_configs, prune_matmul
from .._checks import check_linear_2d, check_linear_backward
from .._runtime import device_context
from . import _matmul
from ._math import cast_to, dropout_factor_tile, gelu, gelu_grad
from ._matmul import (
    dot_operand, dot_tile, grouped_tile, input_precision, output_tile, tile_grid,
)


@triton.jit
def _linear_gelu_fwd_kernel(
    x_ptr,  # (M, K)
    w_ptr,  # (N, K), read as W^T (K, N) through its strides
    b_ptr,  # (N,) contiguous; None without HAS_BIAS
    y_ptr,  # (M, N) contiguous; None without WRITE_Y
    preact_ptr,  # (M, N) contiguous; None without SAVE_PREACT
    seed_ptr,  # (1,) int64, the dropout seed; None without HAS_DROPOUT
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_ym,  # row stride of y and preact
    dropout_threshold,  # round(p * 2**31): see _math.dropout_factor_tile
    dropout_scale,  # 1 / (1 - p)
    APPROXIMATE_TANH: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    WRITE_Y: tl.constexpr,
    SAVE_PREACT: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_SIZE_M: tl.constexpr,
    BLOCK_SIZE_N: tl.constexpr,
    BLOCK_SIZE_K: tl.constexpr,
    GROUP_SIZE_M: tl.constexpr,
):
    _, pid_n, offs_m, offs_n, mask_m, mask_n = output_tile(
        M, N, BLOCK_SIZE_M, BLOCK_SIZE_N, GROUP_SIZE_M)
    acc = dot_tile(x_ptr, w_ptr, offs_m, offs_n, mask_m, mask_n, K,
                   stride_xm, stride_xk, stride_wk, stride_wn,  # W^T: k along W's rows' stride
                   INPUT_PRECISION, BLOCK_SIZE_M, BLOCK_SIZE_N, BLOCK_SIZE_K)

    # Epilogue in float32: z = acc + b, y = gelu(z) (then dropout); each output is cast once,
    # on store.
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    offs_out = offs_m[:, None] * stride_ym + offs_n[None, :]
    mask_out = mask_m[:, None] & mask_n[None, :]
    if SAVE_PREACT:
        tl.store(preact_ptr + offs_out, cast_to(acc, preact_ptr.dtype.element_ty), mask=mask_out)
    if WRITE_Y:
        y = gelu(acc, APPROXIMATE_TANH)
        if HAS_DROPOUT:  # y * keep / (1 - p), the mask a function of (m, n): see _math
            y = y * dropout_factor_tile(seed_ptr, offs_m, pid_n, N, dropout_threshold,
                                        dropout_scale, BLOCK_SIZE_N)
        tl.store(y_ptr + offs_out, cast_to(y, y_ptr.dtype.element_ty), mask=mask_out)


@triton.jit
def _load_dz(dy_ptrs, preact_ptrs, mask, APPROXIMATE_TANH: tl.constexpr):
    # dz = dy * gelu'(z) in float32 for one (BM, BN) tile; masked-off elements load dy = 0.
    #   exact: gelu'(z) = Phi(z) + z * phi(z)
    #   tanh:  gelu'(z) = s + 2 z s (1 - s) du/dz,  s = sigmoid(2u),
    #          u = sqrt(2/pi) (z + 0.044715 z^3)
    dy = tl.load(dy_ptrs, mask=mask, other=0.0).to(tl.float32)
    preact = tl.load(preact_ptrs, mask=mask, other=0.0).to(tl.float32)
    return dy * gelu_grad(preact, APPROXIMATE_TANH)


@triton.jit
def _linear_gelu_bwd_dx_kernel(
    dy_ptr,  # (M, N)
    preact_ptr,  # (M, N)
    w_ptr,  # (N, K)
    dx_ptr,  # (M, K) contiguous
    M,
    N,
    K,
    stride_dym,
    stride_dyn,
    stride_pm,
    stride_pn,
    stride_wn,
    stride_wk,
    stride_dxm,
    APPROXIMATE_TANH: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_SIZE_M: tl.constexpr,
    BLOCK_SIZE_N: tl.constexpr,
    BLOCK_SIZE_K: tl.constexpr,
    GROUP_SIZE_M: tl.constexpr,
):
    # dx[m, k] = sum_n dz[m, n] * W[n, k], dz = dy * gelu'(z): one (BM, BK) tile of dx per
    # program, looping over N.
    pid_m, pid_k = grouped_tile(
        tl.program_id(0), tl.cdiv(M, BLOCK_SIZE_M), tl.cdiv(K, BLOCK_SIZE_K), GROUP_SIZE_M
    )
    offs_m = pid_m.to(tl.int64) * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M)
    offs_k = pid_k.to(tl.int64) * BLOCK_SIZE_K + tl.arange(0, BLOCK_SIZE_K)
    offs_n = tl.arange(0, BLOCK_SIZE_N)
    mask_m = offs_m < M
    mask_k = offs_k < K
    dy_ptrs = dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn  # (BM, BN)
    preact_ptrs = preact_ptr + offs_m[:, None] * stride_pm + offs_n[None, :] * stride_pn
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk  # (BN, BK)

    acc = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_K), dtype=tl.float32)
    for n in range(0, tl.cdiv(N, BLOCK_SIZE_N)):
        n_left = N - n * BLOCK_SIZE_N
        dz = _load_dz(
            dy_ptrs, preact_ptrs, mask_m[:, None] & (offs_n[None, :] < n_left), APPROXIMATE_TANH
        )
        dz = cast_to(dz, w_ptr.dtype.element_ty)  # the matmul operand, in the input dtype
        w = tl.load(w_ptrs, mask=(offs_n[:, None] < n_left) & mask_k[None, :], other=0.0)
        acc = tl.dot(dot_operand(dz), dot_operand(w), acc, input_precision=INPUT_PRECISION)
        dy_ptrs += BLOCK_SIZE_N * stride_dyn
        preact_ptrs += BLOCK_SIZE_N * stride_pn
        w_ptrs += BLOCK_SIZE_N * stride_wn

    dx_ptrs = dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :]
    tl.store(dx_ptrs, cast_to(acc, dx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_k[None, :])


@triton.jit
def _linear_gelu_bwd_dw_kernel(
    dy_ptr,  # (M, N)
    preact_ptr,  # (M, N)
    x_ptr,  # (M, K)
    dw_ptr,  # (N, K) contiguous; None without COMPUTE_DW
    db_ptr,  # (N,) contiguous; None without COMPUTE_DB
    M,
    N,
    K,
    stride_dym,
    stride_dyn,
    stride_pm,
    stride_pn,
    stride_xm,
    stride_xk,
    stride_dwn,
    APPROXIMATE_TANH: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
    COMPUTE_DB: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_SIZE_M: tl.constexpr,
    BLOCK_SIZE_N: tl.constexpr,
    BLOCK_SIZE_K: tl.constexpr,
    GROUP_SIZE_M: tl.constexpr,
):
    # dW[n, k] = sum_m dz[m, n] * x[m, k] and db[n] = sum_m dz[m, n], dz = dy * gelu'(z):
    # one (BN, BK) tile of dW per program, looping over M. The tiles are grouped along N
    # (GROUP_SIZE_M N-tiles at a time). Without COMPUTE_DW there is one program per N-tile,
    # computing db only.
    if COMPUTE_DW:
        num_k_tiles = tl.cdiv(K, BLOCK_SIZE_K)
    else:
        num_k_tiles = 1
    pid_n, pid_k = grouped_tile(
        tl.program_id(0), tl.cdiv(N, BLOCK_SIZE_N), num_k_tiles, GROUP_SIZE_M
    )
    offs_n = pid_n.to(tl.int64) * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)
    offs_k = pid_k.to(tl.int64) * BLOCK_SIZE_K + tl.arange(0, BLOCK_SIZE_K)
    offs_m = tl.arange(0, BLOCK_SIZE_M)
    mask_n = offs_n < N
    mask_k = offs_k < K
    dy_ptrs = dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn  # (BM, BN)
    preact_ptrs = preact_ptr + offs_m[:, None] * stride_pm + offs_n[None, :] * stride_pn
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk  # (BM, BK)

    dw_acc = tl.zeros((BLOCK_SIZE_N, BLOCK_SIZE_K), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_SIZE_N,), dtype=tl.float32)
    for m in range(0, tl.cdiv(M, BLOCK_SIZE_M)):
        m_left = M - m * BLOCK_SIZE_M
        mask_mn = (offs_m[:, None] < m_left) & mask_n[None, :]
        dz = _load_dz(dy_ptrs, preact_ptrs, mask_mn, APPROXIMATE_TANH)
        if COMPUTE_DB:
            if pid_k == 0:  # one program per N-tile owns db (uniform branch, no atomics)
                db_acc += tl.sum(dz, axis=0)
        if COMPUTE_DW:
            x = tl.load(x_ptrs, mask=(offs_m[:, None] < m_left) & mask_k[None, :], other=0.0)
            dz_t = tl.trans(cast_to(dz, x_ptr.dtype.element_ty))  # (BN, BM), input dtype
            dw_acc = tl.dot(
                dot_operand(dz_t), dot_operand(x), dw_acc, input_precision=INPUT_PRECISION
            )
            x_ptrs += BLOCK_SIZE_M * stride_xm
        dy_ptrs += BLOCK_SIZE_M * stride_dym
        preact_ptrs += BLOCK_SIZE_M * stride_pm

    if COMPUTE_DW:
        dw_ptrs = dw_ptr + offs_n[:, None] * stride_dwn + offs_k[None, :]
        tl.store(
            dw_ptrs, cast_to(dw_acc, dw_ptr.dtype.element_ty),
            mask=mask_n[:, None] & mask_k[None, :],
        )
    if COMPUTE_DB:
        if pid_k == 0:
            tl.store(db_ptr + offs_n, cast_to(db_acc, db_ptr.dtype.element_ty), mask=mask_n)


# Each kernel holds different tiles in shared memory; the reduction dimension names which.
_fwd_tuner = Tuner(_linear_gelu_fwd_kernel, "linear_gelu_fwd", matmul_configs,
                   functools.partial(prune_matmul, reduction="K"))
_preact_tuner = Tuner(_linear_gelu_fwd_kernel, "linear_preact", matmul_configs,
                      functools.partial(prune_matmul, reduction="K"))
_dx_tuner = Tuner(_linear_gelu_bwd_dx_kernel, "linear_gelu_bwd_dx", matmul_configs,
                  functools.partial(prune_matmul, reduction="N"))
_dw_tuner = Tuner(_linear_gelu_bwd_dw_kernel, "linear_gelu_bwd_dw", matmul_configs,
                  functools.partial(prune_matmul, reduction="M"))


def launch_forward(
    tuner: Tuner, x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    y: torch.Tensor | None, preact: torch.Tensor | None, approximate_tanh: bool,
    seed: torch.Tensor | None = None, p: float = 0.0,
) -> None:
    """Launch the forward kernel into ``y`` (gelu, then dropout with probability ``p`` and the
    1-element int64 ``seed`` when p > 0) and/or ``preact``, both (M, N) contiguous."""
    (M, K), N = x2d.shape, weight.shape[0]
    if bias is not None:
        bias = bias.contiguous()  # N elements: cheaper to copy than to pass another stride
    out = y if y is not None else preact
    has_dropout = p > 0.0
    threshold, scale = reference.dropout_constants(p)
    precision = input_precision(x2d.dtype)
    key = (bucket(M), N, K, x2d.dtype, approximate_tanh, bias is not None,
           y is not None, preact is not None, precision, has_dropout)
    with device_context(x2d):
        tuner.run(
            tile_grid(M, N, "BLOCK_SIZE_M", "BLOCK_SIZE_N"), key,
            x_ptr=x2d, w_ptr=weight, b_ptr=bias, y_ptr=y, preact_ptr=preact,
            seed_ptr=seed if has_dropout else None,
            M=M, N=N, K=K,
            stride_xm=x2d.stride(0), stride_xk=x2d.stride(1),
            stride_wn=weight.stride(0), stride_wk=weight.stride(1),
            stride_ym=out.stride(0), dropout_threshold=threshold, dropout_scale=scale,
            APPROXIMATE_TANH=approximate_tanh, HAS_BIAS=bias is not None,
            WRITE_Y=y is not None, SAVE_PREACT=preact is not None, HAS_DROPOUT=has_dropout,
            INPUT_PRECISION=precision,
        )


def linear_gelu_forward(
    x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    approximate_tanh: bool, save_preact: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(y, preact): y = gelu(x2d @ weight.T + bias) and, if ``save_preact``, z = x2d @ weight.T
    + bias, both new contiguous (M, N) tensors in x2d's dtype; preact is None otherwise."""
    check_linear_2d(x2d, weight, bias)
    (M, _), N = x2d.shape, weight.shape[0]
    y = _matmul.new_output((M, N), x2d)
    preact = _matmul.new_output((M, N), x2d) if save_preact else None
    if M == 0 or N == 0:
        return y, preact
    launch_forward(_fwd_tuner, x2d, weight, bias, y, preact, approximate_tanh)
    return y, preact


def linear_preact(
    x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """z = x2d @ weight.T + bias, a new contiguous (M, N) tensor in x2d's dtype: bitwise what
    ``linear_gelu_forward(..., save_preact=True)`` saves (same kernel, writing only z)."""
    check_linear_2d(x2d, weight, bias)
    (M, _), N = x2d.shape, weight.shape[0]
    preact = _matmul.new_output((M, N), x2d)
    if M == 0 or N == 0:
        return preact
    launch_forward(_preact_tuner, x2d, weight, bias, None, preact, approximate_tanh=False)
    return preact


def linear_gelu_backward(
    dy2d: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor, preact: torch.Tensor,
    approximate_tanh: bool, need_dx: bool, need_dw: bool, need_db: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(dx, dW, db) of y = gelu(z), z = x2d @ weight.T + b, for the upstream gradient dy2d.

    Each is a new contiguous tensor ((M, K), (N, K), (N,)) in the input dtype, or None when not
    needed. ``preact`` is z as saved by the forward (or recomputed by ``linear_preact``).
    """
    check_linear_backward(dy2d, x2d, weight, preact)
    (M, K), N = x2d.shape, weight.shape[0]
    dx = _matmul.new_output((M, K), x2d) if need_dx else None
    dw = _matmul.new_output((N, K), weight) if need_dw else None
    db = _matmul.new_output((N,), weight) if need_db else None
    if min(M, N, K) == 0:  # no tiles to launch; sums over nothing are zeros
        grads = reference.linear_gelu_backward_fp32(dy2d, x2d, weight, preact, approximate_tanh)
        for out, grad in zip((dx, dw, db), grads):
            if out is not None:
                out.copy_(grad)
        return dx, dw, db

    precision = input_precision(x2d.dtype)
    key = (bucket(M), N, K, x2d.dtype, approximate_tanh, precision)
    with device_context(x2d):
        if need_dx:
            _dx_tuner.run(
                tile_grid(M, K, "BLOCK_SIZE_M", "BLOCK_SIZE_K"), key,
                dy_ptr=dy2d, preact_ptr=preact, w_ptr=weight, dx_ptr=dx,
                M=M, N=N, K=K,
                stride_dym=dy2d.stride(0), stride_dyn=dy2d.stride(1),
                stride_pm=preact.stride(0), stride_pn=preact.stride(1),
                stride_wn=weight.stride(0), stride_wk=weight.stride(1),
                stride_dxm=dx.stride(0),
                APPROXIMATE_TANH=approximate_tanh, INPUT_PRECISION=precision,
            )
        if need_dw or need_db:
            _dw_tuner.run(
                tile_grid(N, K, "BLOCK_SIZE_N", "BLOCK_SIZE_K" if need_dw else None),
                key + (need_dw, need_db),
                dy_ptr=dy2d, preact_ptr=preact, x_ptr=x2d, dw_ptr=dw, db_ptr=db,
                M=M, N=N, K=K,
                stride_dym=dy2d.stride(0), stride_dyn=dy2d.stride(1),
                stride_pm=preact.stride(0), stride_pn=preact.stride(1),
                stride_xm=x2d.stride(0), stride_xk=x2d.stride(1),
                stride_dwn=dw.stride(0) if dw is not None else 0,
                APPROXIMATE_TANH=approximate_tanh, COMPUTE_DW=need_dw, COMPUTE_DB=need_db,
                INPUT_PRECISION=precision,
            )
    return dx, dw, db
