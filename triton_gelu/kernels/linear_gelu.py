"""Fused Linear + bias + GELU: y = gelu(x @ W^T + b), forward and backward kernels.

Shapes (the launchers take a 2-D x; the ops (``ops/``) flatten the leading dimensions)::

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

dz is computed once per element: one elementwise kernel (``_linear_gelu_bwd_dz_kernel``) reads
dy and z once, writes dz in the input dtype (only when a matmul needs it) and, per 64 rows,
float32 partial column sums of dz, which a sum over M/64 rows turns into db; dx and dW are then
two cuBLAS matmuls (``torch.mm``) of that dz. dz is a transient of the backward: M x N elements
of the input dtype (plus M/64 x N float32 partial sums, 1/32 of that in bf16), freed when the
backward returns; eager PyTorch's backward holds the same dz (aten.gelu_backward's output).

Why not rebuild dz inside the matmuls (as the dx and dW kernels here once did): a kernel that
recomputes dz from the dy and z tiles it loads does so once per output tile, so K / BLOCK_SIZE_K
times per element in both the dx and the dW kernel (12x at K = 768, 64x at K = 4096). Compiled
for sm90 (Triton 3.9, bf16) those kernels ran 1,600-6,800 SASS instructions per main-loop
iteration against 130-250 for a plain matmul tile, and 16 of their 21 configs spilled inside
the loop: even the best spends about ten times the tensor cores' time per iteration on GELU',
while writing and reading dz once costs 4 bytes an element (bf16) at memory bandwidth.

Numerics, matching PyTorch in the same dtype: tl.dot multiplies input-dtype operands and
accumulates in float32. dz is rounded to the input dtype before it enters a matmul (what
PyTorch's bf16/fp16 backward feeds its matmuls); db sums the unrounded float32 dz. float32 inputs
use TF32 exactly when ``torch.backends.cuda.matmul.allow_tf32`` is set, as ``torch.matmul`` does
(the forward kernel by its INPUT_PRECISION, the backward's cuBLAS matmuls by that flag).

Layouts: x, W, dy and z are read through their strides (W as W^T included), so no transposed
or sliced operand is copied (only a strided bias, N elements, is made contiguous). Outputs are
new contiguous tensors; kernels only store into them, so the autotuner may re-launch a kernel on
the same arguments.

Paths (``tuning.paths.Paths``): each launcher below chooses, per problem key, how to compute::

    linear_gelu_fwd  fused      the forward kernel (default; the interpreter's)
                     composed   z by cuBLAS (torch.addmm), then our GELU kernel: in place when
                                nothing keeps z, into a new y when the backward does (untuned)
                     addmm_gelu torch._addmm_activation(use_gelu=True): cuBLASLt's GELU epilogue,
                                where it computes the asked form (tanh on CUDA; on the CPU
                                PyTorch applies its exact GELU after the matmul) and z is not kept
                     torch      eager PyTorch: torch.addmm, then F.gelu
                     tma        fused on Hopper: the forward kernel's TMA variant on a
                                persistent grid (sm90+, operands a descriptor can serve)
    linear_preact    fused      the forward kernel writing z only (default)
                     composed   torch.addmm, as eager PyTorch (untuned)
                     tma        the TMA variant writing z only
    linear_gelu_bwd  dz_once    the dz kernel writes dz in the input dtype and db's partial
                                sums; dx = dz @ W and dW = dz^T @ x by cuBLAS (default; the
                                interpreter's)
                     torch      eager PyTorch's backward: aten.gelu_backward, two cuBLAS
                                matmuls and db = dz.sum(0)

With eager PyTorch's own computation among the candidates of every op, the path the timing
picks is never slower than PyTorch's (up to timing noise and the choice's lookup).

Every path rounds the matmul operand dz to the input dtype, and ours sum db from the float32
dz, so all of them meet the tolerance rule; the composed paths round z to the input dtype
before GELU, as eager PyTorch does. With the same path for the forward and ``linear_preact``,
the recomputed z is bitwise the saved one.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .. import reference
from .._runtime import autocast_off, device_context
from ..tuning.paths import Paths
from ..tuning.spaces import (
    TILE_ROWS, bucket, matmul_configs, prune_matmul, prune_tiles, tile_configs,
    tma_linear_configs,
)
from ..tuning.tuner import Tuner
from . import _matmul
from . import gelu as _gelu
from ._math import (
    activate, activate_grad, cast_to, ceil_div, dropout_constants, dropout_factor_tile,
)
from ._matmul import (
    descriptor_dot_tile, dot_tile, input_precision, output_tile, output_tile_of,
    persistent_grid, range_flattens, tile_grid, tma_applies, tma_compatible,
)


# The launchers (``triton_gelu.kernels`` re-exports them) and their per-problem launches.
__all__ = [
    "linear_gelu_forward",
    "linear_preact",
    "linear_gelu_backward",
    "linear_gelu_forward_launch",
    "linear_preact_launch",
    "linear_gelu_backward_launch",
]


@triton.jit
def linear_gelu_fwd_kernel(
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
    dropout_col_offset,  # column n is column dropout_col_offset + n of the whole activation,
    dropout_n_cols,  # which has dropout_n_cols columns (tensor parallel: N is a rank's shard)
    ACTIVATION: tl.constexpr,
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
    _forward_epilogue(acc, b_ptr, y_ptr, preact_ptr, seed_ptr, pid_n, offs_m, offs_n, mask_m,
                      mask_n, stride_ym, dropout_threshold, dropout_scale, dropout_col_offset,
                      dropout_n_cols, ACTIVATION, HAS_BIAS, WRITE_Y, SAVE_PREACT,
                      HAS_DROPOUT, BLOCK_SIZE_N)


@triton.jit
def _forward_epilogue(
    acc,  # (BM, BN) float32: x @ W^T for the tile
    b_ptr, y_ptr, preact_ptr, seed_ptr,  # as the forward kernels' arguments
    pid_n,  # the tile's column index (the dropout mask's tile position)
    offs_m, offs_n, mask_m, mask_n,  # the tile's int64 rows and columns, and their masks
    stride_ym, dropout_threshold, dropout_scale, dropout_col_offset, dropout_n_cols,
    ACTIVATION: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    WRITE_Y: tl.constexpr,
    SAVE_PREACT: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    BLOCK_SIZE_N: tl.constexpr,
):
    # Epilogue in float32: z = acc + b, y = gelu(z) (then dropout); each output is cast once,
    # on store. Both forward kernels (pointer loads, and TMA loads on a persistent grid) end so.
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    offs_out = offs_m[:, None] * stride_ym + offs_n[None, :]
    mask_out = mask_m[:, None] & mask_n[None, :]
    if SAVE_PREACT:
        tl.store(preact_ptr + offs_out, cast_to(acc, preact_ptr.dtype.element_ty), mask=mask_out)
    if WRITE_Y:
        y = activate(acc, ACTIVATION)
        if HAS_DROPOUT:  # y * keep / (1 - p), the mask a function of (m, n): see _math
            y = y * dropout_factor_tile(seed_ptr, offs_m, pid_n, dropout_n_cols,
                                        dropout_col_offset, dropout_threshold, dropout_scale,
                                        BLOCK_SIZE_N)
        tl.store(y_ptr + offs_out, cast_to(y, y_ptr.dtype.element_ty), mask=mask_out)


@triton.jit
def linear_gelu_fwd_tma_kernel(
    x_ptr,  # (M, K), last stride 1, 16-byte aligned rows (see _matmul.tma_compatible)
    w_ptr,  # (N, K), likewise
    b_ptr,  # (N,) contiguous; None without HAS_BIAS
    y_ptr,  # (M, N) contiguous; None without WRITE_Y
    preact_ptr,  # (M, N) contiguous; None without SAVE_PREACT
    seed_ptr,  # (1,) int64, the dropout seed; None without HAS_DROPOUT
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_ym,  # row stride of y and preact
    dropout_threshold,
    dropout_scale,
    dropout_col_offset,
    dropout_n_cols,
    ACTIVATION: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    WRITE_Y: tl.constexpr,
    SAVE_PREACT: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    FLATTEN: tl.constexpr,  # tl.range's flatten, where this Triton has it (_matmul.range_flattens)
    WARP_SPECIALIZE: tl.constexpr,  # a config's: tl.range's warp_specialize (then not flattened)
    BLOCK_SIZE_M: tl.constexpr,
    BLOCK_SIZE_N: tl.constexpr,
    BLOCK_SIZE_K: tl.constexpr,
    GROUP_SIZE_M: tl.constexpr,
):
    # The forward kernel for Hopper: x and W tiles arrive by TMA (tensor descriptors), and each
    # program of a persistent grid (one per SM) walks output tiles in grouped order, the same
    # epilogue ending every tile.
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[stride_xm, 1],
                                       block_shape=[BLOCK_SIZE_M, BLOCK_SIZE_K])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[stride_wn, 1],
                                       block_shape=[BLOCK_SIZE_N, BLOCK_SIZE_K])
    num_tiles = tl.cdiv(M, BLOCK_SIZE_M) * tl.cdiv(N, BLOCK_SIZE_N)
    for tile_id in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0),
                            flatten=FLATTEN and not WARP_SPECIALIZE,
                            warp_specialize=WARP_SPECIALIZE):
        pid_m, pid_n, offs_m, offs_n, mask_m, mask_n = output_tile_of(
            tile_id, M, N, BLOCK_SIZE_M, BLOCK_SIZE_N, GROUP_SIZE_M)
        acc = descriptor_dot_tile(x_desc, w_desc, pid_m * BLOCK_SIZE_M, pid_n * BLOCK_SIZE_N, K,
                                  False, INPUT_PRECISION, BLOCK_SIZE_M, BLOCK_SIZE_N,
                                  BLOCK_SIZE_K)
        _forward_epilogue(acc, b_ptr, y_ptr, preact_ptr, seed_ptr, pid_n, offs_m, offs_n, mask_m,
                          mask_n, stride_ym, dropout_threshold, dropout_scale,
                          dropout_col_offset, dropout_n_cols, ACTIVATION, HAS_BIAS,
                          WRITE_Y, SAVE_PREACT, HAS_DROPOUT, BLOCK_SIZE_N)


@triton.jit
def _load_dz(dy_ptrs, preact_ptrs, mask, ACTIVATION: tl.constexpr):
    # dz = dy * gelu'(z) in float32 for one (BM, BN) tile; masked-off elements load dy = 0.
    #   exact: gelu'(z) = Phi(z) + z * phi(z)
    #   tanh:  gelu'(z) = s + 2 z s (1 - s) du/dz,  s = sigmoid(2u),
    #          u = sqrt(2/pi) (z + 0.044715 z^3)
    dy = tl.load(dy_ptrs, mask=mask, other=0.0).to(tl.float32)
    preact = tl.load(preact_ptrs, mask=mask, other=0.0).to(tl.float32)
    return dy * activate_grad(preact, ACTIVATION)


@triton.jit
def _linear_gelu_bwd_dz_kernel(
    dy_ptr,  # (M, N)
    preact_ptr,  # (M, N)
    dz_ptr,  # (M, N) contiguous; None without WRITE_DZ
    db_partial_ptr,  # (cdiv(M, ROWS), N) float32 contiguous; None without COMPUTE_DB
    M,
    N,
    stride_dym,
    stride_dyn,
    stride_pm,
    stride_pn,
    ACTIVATION: tl.constexpr,
    WRITE_DZ: tl.constexpr,
    COMPUTE_DB: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_SIZE_M: tl.constexpr,
    BLOCK_SIZE_N: tl.constexpr,
):
    # dz = dy * gelu'(z), stored in the input dtype, for ROWS rows x BLOCK_SIZE_N columns per
    # program in (BLOCK_SIZE_M, BLOCK_SIZE_N) tiles; db_partial[block of ROWS rows, n] = the sum
    # of the float32 dz over those rows (db sums the unrounded dz).
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)
    mask_n = offs_n < N
    db_acc = tl.zeros((BLOCK_SIZE_N,), dtype=tl.float32)
    for row in range(0, ROWS, BLOCK_SIZE_M):
        offs_m = pid_m * ROWS + row + tl.arange(0, BLOCK_SIZE_M)
        mask = (offs_m < M)[:, None] & mask_n[None, :]
        dz = _load_dz(
            dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
            preact_ptr + offs_m[:, None] * stride_pm + offs_n[None, :] * stride_pn,
            mask, ACTIVATION,
        )
        if WRITE_DZ:
            dz_ptrs = dz_ptr + offs_m[:, None] * N + offs_n[None, :]
            tl.store(dz_ptrs, cast_to(dz, dz_ptr.dtype.element_ty), mask=mask)
        if COMPUTE_DB:
            db_acc += tl.sum(dz, axis=0)
    if COMPUTE_DB:
        tl.store(db_partial_ptr + pid_m * N + offs_n, db_acc, mask=mask_n)


# Each kernel holds different tiles in shared memory; the reduction dimension names which.
_fwd_tuner = Tuner(linear_gelu_fwd_kernel, "linear_gelu_fwd", matmul_configs,
                   functools.partial(prune_matmul, reduction="K"))
_preact_tuner = Tuner(linear_gelu_fwd_kernel, "linear_preact", matmul_configs,
                      functools.partial(prune_matmul, reduction="K"))
# The Hopper variants of the two above (TMA loads, persistent grid): the "tma" paths.
_prune_tma = functools.partial(prune_matmul, reduction="K", persistent=True)
_fwd_tma_tuner = Tuner(linear_gelu_fwd_tma_kernel, "linear_gelu_fwd_tma", tma_linear_configs,
                       _prune_tma)
_preact_tma_tuner = Tuner(linear_gelu_fwd_tma_kernel, "linear_preact_tma", tma_linear_configs,
                          _prune_tma)
_dz_tuner = Tuner(_linear_gelu_bwd_dz_kernel, "linear_gelu_bwd_dz", tile_configs, prune_tiles)


def _forward_key(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 activation: str, write_y: bool, save_preact: bool) -> tuple:
    (M, K), N = x2d.shape, weight.shape[0]
    return (bucket(M), N, K, x2d.dtype, activation, bias is not None, write_y,
            save_preact, input_precision(x2d.dtype))


def _forward_problem(
    tuner: Tuner, x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    write_y: bool, save_preact: bool, activation: str, p: float, col_offset: int,
    n_cols: int | None,
) -> tuple[tuple, Callable, dict]:
    """(key, grid, constant arguments) of a forward launch: what every launch of one problem
    shares (shapes, flags, dropout constants; the outputs are (M, N) contiguous)."""
    (M, K), N = x2d.shape, weight.shape[0]
    key = _forward_key(x2d, weight, bias, activation, write_y, save_preact) + (p > 0.0,)
    constants = dict(
        M=M, N=N, K=K, stride_ym=N, ACTIVATION=activation, HAS_BIAS=bias is not None,
        WRITE_Y=write_y, SAVE_PREACT=save_preact, INPUT_PRECISION=key[-2],
        dropout_n_cols=N if n_cols is None else n_cols, **dropout_constants(p, col_offset))
    if tuner.jit_kernel is linear_gelu_fwd_tma_kernel:
        # Not flattened with dropout: the Philox epilogue inside the pipelined loop spills
        # more (see README, "Hopper paths")
        constants["FLATTEN"] = range_flattens() and p == 0.0
        return key, persistent_grid(M, N, x2d.device), constants
    return key, tile_grid(M, N, "BLOCK_SIZE_M", "BLOCK_SIZE_N"), constants


def _forward_operands(tma: bool, x2d: torch.Tensor, weight: torch.Tensor,
                      bias: torch.Tensor | None, y: torch.Tensor | None,
                      preact: torch.Tensor | None, seed: torch.Tensor | None) -> dict:
    """The arguments of one forward launch that its problem does not fix: tensors, strides."""
    operands = _forward_pointers(x2d, weight, bias, y, preact, seed)
    operands.update(stride_xm=x2d.stride(0), stride_wn=weight.stride(0))
    if not tma:
        operands.update(stride_xk=x2d.stride(1), stride_wk=weight.stride(1))
    return operands


def _forward_pointers(x2d, weight, bias, y, preact, seed) -> dict:
    if bias is not None:
        bias = bias.contiguous()  # N elements: cheaper to copy than to pass another stride
    return dict(x_ptr=x2d, w_ptr=weight, b_ptr=bias, y_ptr=y, preact_ptr=preact, seed_ptr=seed)


def _dense_strides(tma: bool, K: int) -> dict:
    """``_forward_operands``' strides for contiguous x2d and weight (K columns each)."""
    return dict(stride_xm=K, stride_wn=K) if tma else \
        dict(stride_xm=K, stride_wn=K, stride_xk=1, stride_wk=1)


def launch_forward(
    tuner: Tuner, x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    y: torch.Tensor | None, preact: torch.Tensor | None, activation: str,
    seed: torch.Tensor | None = None, p: float = 0.0, col_offset: int = 0,
    n_cols: int | None = None,
) -> None:
    """Launch the forward kernel into ``y`` (gelu, then dropout with probability ``p`` and the
    1-element int64 ``seed`` when p > 0) and/or ``preact``, both (M, N) contiguous. Dropout
    draws the mask of columns ``col_offset`` .. ``col_offset + N`` of an (M, ``n_cols``)
    activation (default: the whole (M, N) one).

    ``tuner`` is a Tuner of either forward kernel: the pointer one (one program per tile) or
    the Hopper one (TMA, persistent grid), which the caller has checked can serve x2d and
    weight (``_matmul.tma_compatible``)."""
    key, grid, constants = _forward_problem(tuner, x2d, weight, bias, y is not None,
                                            preact is not None, activation, p, col_offset,
                                            n_cols)
    tma = tuner.jit_kernel is linear_gelu_fwd_tma_kernel
    with device_context(x2d):
        if tma:
            _matmul.use_tma_allocator()
        tuner.run(grid, key, **constants, **_forward_operands(
            tma, x2d, weight, bias, y, preact, seed if p > 0.0 else None))


class BoundForward(NamedTuple):
    """``launch_forward`` of one problem with its config, grid and constants kept."""

    serves: Callable[[torch.Tensor, torch.Tensor], bool]  # (x2d, weight): may launch them
    launch: Callable[..., None]  # (x2d, weight, bias, y, preact, seed=None)


def bound_forward(
    tuner: Tuner, x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    write_y: bool, save_preact: bool, activation: str, p: float = 0.0, col_offset: int = 0,
    n_cols: int | None = None,
) -> BoundForward | None:
    """``launch_forward`` bound to the problem of these operands (their shapes and dtype, a bias
    or none, the flags), for a problem that launched once already; None while its config is
    not settled. ``serves`` says whether the kept launch may take new operands of the problem:
    not when the TF32 setting changed since (float32), nor, on the Hopper kernel, for operands
    a descriptor cannot serve; ``launch_forward`` takes those."""
    key, grid, constants = _forward_problem(tuner, x2d, weight, bias, write_y, save_preact,
                                            activation, p, col_offset, n_cols)
    tma = tuner.jit_kernel is linear_gelu_fwd_tma_kernel
    with device_context(x2d):  # the config is the current device's
        launch = tuner.bound(grid, key, **constants)
        # contiguous x2d and weight, the common case: their strides bound too
        dense = tuner.bound(grid, key, **constants, **_dense_strides(tma, x2d.shape[1]))
    if launch is None:  # (dense too: the same config)
        return None
    precision = constants["INPUT_PRECISION"]

    def serves(x2d: torch.Tensor, weight: torch.Tensor) -> bool:
        return ((precision is None or input_precision(x2d.dtype) == precision)
                and (not tma or tma_compatible(x2d, weight)))

    def launch_operands(x2d, weight, bias, y, preact, seed=None) -> None:
        seed = seed if p > 0.0 else None
        with device_context(x2d):
            if tma:
                _matmul.use_tma_allocator()
            if x2d.is_contiguous() and weight.is_contiguous():
                dense(**_forward_pointers(x2d, weight, bias, y, preact, seed))
            else:
                launch(**_forward_operands(tma, x2d, weight, bias, y, preact, seed))
    return BoundForward(serves, launch_operands)


def _dz_problem(M: int, N: int, x2d: torch.Tensor, activation: str, write_dz: bool,
                need_db: bool) -> tuple[tuple, Callable, dict]:
    """(key, grid, constant arguments) of a dz launch (see ``_forward_problem``)."""
    return ((bucket(M), N, x2d.dtype, activation, write_dz, need_db),
            lambda meta: (ceil_div(M, TILE_ROWS), ceil_div(N, meta["BLOCK_SIZE_N"])),
            dict(M=M, N=N, ACTIVATION=activation, WRITE_DZ=write_dz, COMPUTE_DB=need_db,
                 ROWS=TILE_ROWS))


def _dz_outputs(M: int, N: int, x2d: torch.Tensor, write_dz: bool, need_db: bool):
    """(dz or None, db's per-64-row partial sums or None), new."""
    return (_matmul.new_output((M, N), x2d) if write_dz else None,
            torch.empty((ceil_div(M, TILE_ROWS), N), dtype=torch.float32, device=x2d.device)
            if need_db else None)


def _dz_operands(dy2d, preact, dz, partial) -> dict:
    return dict(dy_ptr=dy2d, preact_ptr=preact, dz_ptr=dz, db_partial_ptr=partial,
                stride_dym=dy2d.stride(0), stride_dyn=dy2d.stride(1),
                stride_pm=preact.stride(0), stride_pn=preact.stride(1))


def _db(partial: torch.Tensor | None, weight: torch.Tensor) -> torch.Tensor | None:
    """db from the dz kernel's partial sums, in weight's dtype."""
    if partial is None:
        return None
    return _matmul.new_output((weight.shape[0],), weight).copy_(partial.sum(0))


def _launch_dz(dy2d, x2d, weight, preact, activation: str, write_dz: bool,
               need_db: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dz, db): dz = dy * gelu'(z) in x's dtype (if ``write_dz``) and db = sum_m dz (if
    ``need_db``), by the elementwise dz kernel and a sum of its per-64-row partial sums."""
    M, N = dy2d.shape
    key, grid, constants = _dz_problem(M, N, x2d, activation, write_dz, need_db)
    dz, partial = _dz_outputs(M, N, x2d, write_dz, need_db)
    with device_context(x2d):
        _dz_tuner.run(grid, key, **constants, **_dz_operands(dy2d, preact, dz, partial))
    return dz, _db(partial, weight)


def matmul_bias(x2d: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor:
    """z = x2d @ weight.T + bias by cuBLAS: a new contiguous (M, N) tensor in x2d's dtype."""
    with autocast_off(x2d):
        if bias is None:
            return torch.mm(x2d, weight.t())
        return torch.addmm(bias, x2d, weight.t())


# ---- the forward's paths -------------------------------------------------------------------


def _forward_fused(x2d, weight, bias, activation: str, save_preact: bool):
    (M, _), N = x2d.shape, weight.shape[0]
    y = _matmul.new_output((M, N), x2d)
    preact = _matmul.new_output((M, N), x2d) if save_preact else None
    launch_forward(_fwd_tuner, x2d, weight, bias, y, preact, activation)
    return y, preact


def _forward_tma(x2d, weight, bias, activation: str, save_preact: bool):
    # The Hopper kernel where descriptors can serve x and W (a problem that chose this path for
    # its key may come again with an operand they cannot: the pointer kernel takes it then).
    if not tma_compatible(x2d, weight):
        return _forward_fused(x2d, weight, bias, activation, save_preact)
    (M, _), N = x2d.shape, weight.shape[0]
    y = _matmul.new_output((M, N), x2d)
    preact = _matmul.new_output((M, N), x2d) if save_preact else None
    launch_forward(_fwd_tma_tuner, x2d, weight, bias, y, preact, activation)
    return y, preact


def _tma_applies(x2d, weight, *args) -> bool:
    return tma_applies(x2d, weight)


def _forward_composed(x2d, weight, bias, activation: str, save_preact: bool):
    preact = matmul_bias(x2d, weight, bias)
    if save_preact:  # the backward keeps z: y is a new tensor
        return _gelu.gelu_forward_triton(preact, activation), preact
    return _gelu.gelu_forward_triton(preact, activation, out=preact), None


def _forward_addmm_gelu(x2d, weight, bias, activation: str, save_preact: bool):
    with autocast_off(x2d):
        return torch._addmm_activation(bias, x2d, weight.t(), use_gelu=True), None


# The GELU form torch._addmm_activation(use_gelu=True) computes, by device: cuBLASLt's epilogue
# (and PyTorch's own fallback beside it) is the tanh form on CUDA; on the CPU PyTorch applies its
# default, exact GELU after the matmul.
_ADDMM_GELU_FORM = {"cuda": "gelu_tanh", "cpu": "gelu"}


def _addmm_gelu_applies(x2d, weight, bias, activation: str, save_preact: bool) -> bool:
    # No z to keep, a bias (its "self" argument), and K > 0: with K = 0 it returns the bias
    # without applying the activation.
    return (not save_preact and bias is not None and x2d.shape[1] > 0
            and hasattr(torch, "_addmm_activation")
            and _ADDMM_GELU_FORM.get(x2d.device.type) == activation)


def forward_torch(x2d, weight, bias, activation: str, save_preact: bool):
    preact = matmul_bias(x2d, weight, bias)  # F.linear's addmm
    y = _gelu.gelu_forward_torch(preact, activation)
    return y, (preact if save_preact else None)


_fwd_paths = Paths(
    "linear_gelu_fwd",
    {"fused": _forward_fused, "composed": _forward_composed, "addmm_gelu": _forward_addmm_gelu,
     "torch": forward_torch, "tma": _forward_tma},
    default="fused", untuned="composed",
    applies={"addmm_gelu": _addmm_gelu_applies, "tma": _tma_applies},
    kernels=[_fwd_tuner, _gelu.fwd_tuner, _fwd_tma_tuner],
)


def _preact_fused(x2d, weight, bias):
    preact = _matmul.new_output((x2d.shape[0], weight.shape[0]), x2d)
    launch_forward(_preact_tuner, x2d, weight, bias, None, preact, activation="gelu")
    return preact


def _preact_tma(x2d, weight, bias):
    if not tma_compatible(x2d, weight):  # as in _forward_tma
        return _preact_fused(x2d, weight, bias)
    preact = _matmul.new_output((x2d.shape[0], weight.shape[0]), x2d)
    launch_forward(_preact_tma_tuner, x2d, weight, bias, None, preact, activation="gelu")
    return preact


_preact_paths = Paths(
    "linear_preact", {"fused": _preact_fused, "composed": matmul_bias, "tma": _preact_tma},
    default="fused", untuned="composed", applies={"tma": _tma_applies},
    kernels=[_preact_tuner, _preact_tma_tuner],
)


# ---- the backward's paths ------------------------------------------------------------------


def _backward_key(x2d: torch.Tensor, weight: torch.Tensor, activation: str) -> tuple:
    (M, K), N = x2d.shape, weight.shape[0]
    return (bucket(M), N, K, x2d.dtype, activation, input_precision(x2d.dtype))


def _backward_dz_once(dy2d, x2d, weight, preact, activation, need_dx, need_dw, need_db):
    dz, db = _launch_dz(dy2d, x2d, weight, preact, activation, need_dx or need_dw, need_db)
    return (*_input_and_weight_grads(dz, x2d, weight, need_dx, need_dw), db)


def _input_and_weight_grads(dz, x2d, weight, need_dx: bool, need_dw: bool):
    """(dx = dz @ W, dW = dz^T @ x) by cuBLAS, each None when not needed."""
    dx = dw = None
    with autocast_off(x2d):
        if need_dx:
            dx = torch.mm(dz, weight)
        if need_dw:
            dw = torch.mm(dz.t(), x2d)
    return dx, dw


def _backward_torch(dy2d, x2d, weight, preact, activation, need_dx, need_dw, need_db):
    (M, K), N = x2d.shape, weight.shape[0]
    # dz = dy * gelu'(z) in the input dtype, as eager's GELU backward gives it to F.linear's
    dz = _gelu.gelu_backward_torch(dy2d, preact, activation)
    dx = dw = db = None
    with autocast_off(x2d):
        if need_dx:  # dx = dz @ W
            dx = torch.mm(dz, weight, out=_matmul.new_output((M, K), x2d))
        if need_dw:  # dW = dz^T @ x
            dw = torch.mm(dz.t(), x2d, out=_matmul.new_output((N, K), weight))
        if need_db:  # db = sum_m dz
            db = torch.sum(dz, 0, out=_matmul.new_output((N,), weight))
    return dx, dw, db


# dz_once is safe untuned too: one elementwise kernel and cuBLAS. No path rebuilds dz per
# output tile inside a matmul's K loop: see the module docstring for why that cannot win.
_bwd_paths = Paths(
    "linear_gelu_bwd", {"dz_once": _backward_dz_once, "torch": _backward_torch},
    default="dz_once", untuned="dz_once", kernels=[_dz_tuner],
)


# ---- the launchers ---------------------------------------------------------------------------


def linear_gelu_forward(
    x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    activation: str, save_preact: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(y, preact): y = gelu(x2d @ weight.T + bias) and, if ``save_preact``, z = x2d @ weight.T
    + bias, both new contiguous (M, N) tensors in x2d's dtype; preact is None otherwise."""
    (M, _), N = x2d.shape, weight.shape[0]
    if M == 0 or N == 0:
        return _matmul.new_output((M, N), x2d), \
            _matmul.new_output((M, N), x2d) if save_preact else None
    key = _forward_key(x2d, weight, bias, activation, True, save_preact)
    return _fwd_paths.run(key, x2d, weight, bias, activation, save_preact)


def linear_preact(
    x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """z = x2d @ weight.T + bias, a new contiguous (M, N) tensor in x2d's dtype: bitwise what
    ``linear_gelu_forward(..., save_preact=True)`` saves when both take the same path (the
    fused kernel writing only z, or cuBLAS)."""
    (M, _), N = x2d.shape, weight.shape[0]
    if M == 0 or N == 0:
        return _matmul.new_output((M, N), x2d)
    key = _forward_key(x2d, weight, bias, "gelu", False, True)
    return _preact_paths.run(key, x2d, weight, bias)


def linear_gelu_backward(
    dy2d: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor, preact: torch.Tensor,
    activation: str, need_dx: bool, need_dw: bool, need_db: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(dx, dW, db) of y = gelu(z), z = x2d @ weight.T + b, for the upstream gradient dy2d.

    Each is a new contiguous tensor ((M, K), (N, K), (N,)) in the input dtype, or None when not
    needed. ``preact`` is z as saved by the forward (or recomputed by ``linear_preact``).
    """
    (M, K), N = x2d.shape, weight.shape[0]
    if not (need_dx or need_dw or need_db):
        return None, None, None
    if min(M, N, K) == 0:  # no tiles to launch; sums over nothing are zeros
        grads = reference.linear_gelu_backward_fp32(dy2d, x2d, weight, preact, activation)
        shapes = ((M, K), (N, K), (N,))
        likes = (x2d, weight, weight)
        return tuple(_matmul.new_output(shape, like).copy_(grad) if need else None
                     for shape, like, grad, need in zip(shapes, likes, grads,
                                                        (need_dx, need_dw, need_db)))
    key = _backward_key(x2d, weight, activation) + (need_dx, need_dw, need_db)
    return _bwd_paths.run(key, dy2d, x2d, weight, preact, activation,
                          need_dx, need_dw, need_db)


# ---- per-problem launches (the plans of ``ops/linear_gelu.py``) ------------------------------
#
# Each takes one call's operands, after that call ran through the launcher above (so its path
# and config are chosen), and returns the launcher bound to the problem (the operands' shapes,
# dtype and device, a bias or none, the flags): the same arguments less the flags. Where the
# problem's path is settled on a kernel of ours with a settled config, it allocates the outputs
# and launches with the grid, config and constant arguments kept, counting the path and launch
# as the launcher would; on another settled path it runs that path (no key, no choice); where
# nothing is settled (a choice made under capture, a recording bench) it is the launcher.


def linear_gelu_forward_launch(x2d, weight, bias, activation: str, save_preact: bool) -> Callable:
    """``linear_gelu_forward`` bound to this problem: (x2d, weight, bias) -> (y, preact)."""
    def launcher(x2d, weight, bias):
        return linear_gelu_forward(x2d, weight, bias, activation, save_preact)
    return _bound_forward_path(
        launcher, _fwd_paths, {"fused": _fwd_tuner, "tma": _fwd_tma_tuner},
        _forward_key(x2d, weight, bias, activation, True, save_preact), (x2d, weight, bias),
        (activation, save_preact), True, save_preact, activation)


def linear_preact_launch(x2d, weight, bias) -> Callable:
    """``linear_preact`` bound to this problem: (x2d, weight, bias) -> z."""
    return _bound_forward_path(
        linear_preact, _preact_paths, {"fused": _preact_tuner, "tma": _preact_tma_tuner},
        _forward_key(x2d, weight, bias, "gelu", False, True), (x2d, weight, bias), (), False,
        True, "gelu")


def _bound_forward_path(launcher: Callable, paths: Paths, tuners: dict, key: tuple,
                        tensors: tuple, fixed: tuple, write_y: bool, save_preact: bool,
                        activation: str) -> Callable:
    """``launcher`` (x2d, weight, bias) -> (y, preact), or -> preact without ``write_y``, bound
    to the problem of ``tensors`` (the launcher's first call's; ``fixed``: the path functions'
    other arguments): the kept launch when its path settled on one of ``tuners`` (path name ->
    the Tuner of the kernel it launches), else the settled path itself."""
    x2d, weight, bias = tensors
    (M, _), N = x2d.shape, weight.shape[0]
    if not (M and N):
        return launcher
    path = paths.settled(key, (*tensors, *fixed))
    if path is None:
        return launcher
    bound = None if path not in tuners else bound_forward(
        tuners[path], x2d, weight, bias, write_y, save_preact, activation)
    if bound is None:
        return paths.runner(path, fixed)
    count = paths.counted(path)
    serves, launch = bound

    def run(x2d, weight, bias):
        if not serves(x2d, weight):
            return launcher(x2d, weight, bias)
        y = _matmul.new_output((M, N), x2d) if write_y else None
        preact = _matmul.new_output((M, N), x2d) if save_preact else None
        count()
        launch(x2d, weight, bias, y, preact)
        return (y, preact) if write_y else preact
    return run


def linear_gelu_backward_launch(dy2d, x2d, weight, preact, activation: str, need_dx: bool, need_dw: bool,
                    need_db: bool) -> Callable:
    """``linear_gelu_backward`` bound to this problem: (dy2d, x2d, weight, preact) -> (dx, dW,
    db)."""
    def launcher(dy2d, x2d, weight, preact):
        return linear_gelu_backward(dy2d, x2d, weight, preact, activation, need_dx, need_dw,
                                    need_db)
    (M, K), N = x2d.shape, weight.shape[0]
    if not (need_dx or need_dw or need_db) or min(M, N, K) == 0:
        return launcher
    key = _backward_key(x2d, weight, activation) + (need_dx, need_dw, need_db)
    tensors, fixed = (dy2d, x2d, weight, preact), (activation, need_dx, need_dw, need_db)
    path = _bwd_paths.settled(key, (*tensors, *fixed))
    if path is None:
        return launcher
    path_run = _bwd_paths.runner(path, fixed)
    if path != "dz_once":
        return path_run
    write_dz = need_dx or need_dw
    dz_key, grid, constants = _dz_problem(M, N, x2d, activation, write_dz, need_db)
    with device_context(x2d):
        launch = _dz_tuner.bound(grid, dz_key, **constants)
    if launch is None:
        return path_run
    count = _bwd_paths.counted("dz_once")

    def run(dy2d, x2d, weight, preact):
        dz, partial = _dz_outputs(M, N, x2d, write_dz, need_db)
        count()
        with device_context(x2d):
            launch(**_dz_operands(dy2d, preact, dz, partial))
        return (*_input_and_weight_grads(dz, x2d, weight, need_dx, need_dw),
                _db(partial, weight))
    return run
