"""The transformer FFN block y = linear2(dropout(gelu(linear1(x)))) as one op: forward, backward.

Shapes (the launchers take a 2-D x; the ops (``ops/``) flatten the leading dimensions)::

    x (M, D)    W1 (F, D)   b1 (F,)    z = x @ W1^T + b1 (M, F)    h = dropout(gelu(z)) (M, F)
                W2 (E, F)   b2 (E,)    y = h @ W2^T + b2 (M, E)    (E = D in a transformer)

Dropout keeps element (m, f) when its Philox word for the call's seed passes the threshold
(``_math.py``): the mask is a function of the seed and the position alone, the same for any tile
shape and on both paths below, so the backward regenerates it and the forward keeps only the
seed (one int64) for it. What else the forward keeps is ``ops/ffn.py``'s
choice: x and z (the launcher returns z when asked), or x alone with ``recompute``. h lives only
inside the forward launcher.

Four paths (``tuning.paths.Paths`` "ffn_fwd" and "ffn_bwd"; the same mask, results within the
tolerance rule), the plain matmuls by cuBLAS (``torch.mm`` / ``torch.addmm``) on all; where
nothing may be timed on a GPU, the composed ones (``untuned``):

fused (the default)
    forward: the linear_gelu forward kernel with dropout in its epilogue writes z (when kept) and
    h; y = h @ W2^T + b2; h is freed.
    backward: one Triton matmul dh = dy @ W2 whose epilogue loads the z tile, regenerates the mask
    and writes, once each: dz = dh * keep / (1 - p) * gelu'(z) in the input dtype; h (when dW2 is
    needed); the tile's column sums of the float32 dz (db1 is their sum over the M-tiles: no
    second pass over dz, for a float32 buffer of ceil(M / BLOCK_SIZE_M) rows, sized for the
    smallest M-tile of the config space: 1/32 of dz's bf16 bytes on sm90, 1/8 on sm80). Then
    dW2 = dy^T @ h (h freed), dx = dz @ W1, dW1 = dz^T @ x, db2 = sum_m dy.
composed
    forward: z = x @ W1^T + b1, h by one elementwise Triton kernel (GELU + dropout), y.
    backward: dh = dy @ W2, one elementwise Triton kernel writing dz and h, db1 = sum_m dz, and
    the rest as above.
torch (p == 0 only: eval, or no dropout asked for)
    eager PyTorch's block: F.linear, F.gelu, F.linear, and its backward (``aten.gelu_backward``,
    dW2 from gelu(z) rebuilt by F.gelu where eager keeps it). With dropout on it is no candidate
    (``applies``): PyTorch's dropout draws another mask than ours, which the backward regenerates.
    It makes "never slower than PyTorch" hold for the block wherever the two compute the same.

tma (sm90+, operands a tensor descriptor can serve: ``_matmul.tma_compatible``)
    fused, with linear1's forward kernel and the backward's dz kernel replaced by their Hopper
    variants: TMA loads on a persistent grid, the same epilogues (``_matmul.py``).

Why the backward writes h for cuBLAS rather than regenerating it inside a dW2 kernel: dW2 =
dy^T @ h has (E, F) output tiles reducing over M, so a kernel rebuilding h from z would redo GELU
and the 10-round Philox of every z tile once per E-tile (E / 128 = 32 times for E = 4096), while
the dz epilogue has z and the mask in registers already: one more store of M x F elements, and
the largest matmul of the backward stays with cuBLAS. h is freed as soon as dW2 exists, before
dx and dW1 are computed.

Numerics: float32 accumulation and epilogue math, one rounding per stored tensor; dz and h enter
the matmuls rounded to the input dtype (what PyTorch's own backward feeds them); db1 sums the
unrounded float32 dz on the fused path.
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
    bucket, matmul_configs, prune_matmul, tma_dropout_configs, tma_matmul_configs,
)
from ..tuning.tuner import Tuner
from . import _matmul
from . import gelu as _gelu
from ._math import (
    activate, activate_grad, cast_to, ceil_div, dropout_constants, dropout_factor_tile,
    without_dropout,
)
from ._matmul import (
    column_halves, descriptor_dot_tile, dot_tile, input_precision, output_tile, output_tile_of,
    persistent_grid, small_accumulators, tile_grid, tma_applies, tma_compatible,
    use_tma_allocator,
)
from .gelu import gelu_dropout_backward, gelu_dropout_forward
from .linear_gelu import forward_torch as _linear_gelu_torch
from .linear_gelu import (
    bound_forward, linear_gelu_fwd_kernel, linear_gelu_fwd_tma_kernel, matmul_bias, launch_forward,
)

Tensor = torch.Tensor
Grads = tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None, Tensor | None]


# The launchers (``triton_gelu.kernels`` re-exports them) and their per-problem launches.
__all__ = [
    "ffn_forward",
    "ffn_backward",
    "ffn_forward_launch",
    "ffn_backward_launch",
]


@triton.jit
def _ffn_bwd_dz_kernel(
    dy_ptr,  # (M, E)
    w2_ptr,  # (E, F)
    preact_ptr,  # (M, F): z
    seed_ptr,  # (1,) int64, the dropout seed; None without HAS_DROPOUT
    dz_ptr,  # (M, F) contiguous
    h_ptr,  # (M, F) contiguous; None without WRITE_H
    db1_part_ptr,  # (db1_part_rows, F) float32 contiguous; None without SUM_DB1
    M,
    F,
    E,
    db1_part_rows,
    stride_dym,
    stride_dye,
    stride_w2e,
    stride_w2f,
    stride_zm,
    stride_zf,
    dropout_threshold,  # round(p * 2**31): see _math.dropout_factor_tile
    dropout_scale,  # 1 / (1 - p)
    dropout_col_offset,  # column f is column dropout_col_offset + f of the whole activation,
    dropout_n_cols,  # which has dropout_n_cols columns (tensor parallel: F is a rank's shard)
    ACTIVATION: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    WRITE_H: tl.constexpr,
    SUM_DB1: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_SIZE_M: tl.constexpr,
    BLOCK_SIZE_N: tl.constexpr,  # along F
    BLOCK_SIZE_K: tl.constexpr,  # along E, the reduction
    GROUP_SIZE_M: tl.constexpr,
):
    # dh = dy @ W2: one (BM, BN) tile of the (M, F) gradient per program, reducing over E.
    pid_m, pid_n, offs_m, offs_n, mask_m, mask_n = output_tile(
        M, F, BLOCK_SIZE_M, BLOCK_SIZE_N, GROUP_SIZE_M)
    dh = dot_tile(dy_ptr, w2_ptr, offs_m, offs_n, mask_m, mask_n, E,
                  stride_dym, stride_dye, stride_w2e, stride_w2f,
                  INPUT_PRECISION, BLOCK_SIZE_M, BLOCK_SIZE_N, BLOCK_SIZE_K)

    _dz_epilogue(dh, preact_ptr, seed_ptr, dz_ptr, h_ptr, db1_part_ptr, pid_m, pid_n, offs_m,
                 mask_m, F, db1_part_rows, stride_zm, stride_zf, dropout_threshold,
                 dropout_scale, dropout_col_offset, dropout_n_cols, ACTIVATION,
                 HAS_DROPOUT, WRITE_H, SUM_DB1, BLOCK_SIZE_M, BLOCK_SIZE_N)


@triton.jit
def _dz_epilogue(
    dh,  # (BM, BN) float32: dy @ W2 for the tile
    preact_ptr, seed_ptr, dz_ptr, h_ptr, db1_part_ptr,  # as the dz kernels' arguments
    pid_m, pid_n,  # the tile's indices
    offs_m, mask_m,  # its int64 rows and their mask
    F, db1_part_rows, stride_zm, stride_zf,
    dropout_threshold, dropout_scale, dropout_col_offset, dropout_n_cols,
    ACTIVATION: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    WRITE_H: tl.constexpr,
    SUM_DB1: tl.constexpr,
    BLOCK_SIZE_M: tl.constexpr,
    BLOCK_SIZE_N: tl.constexpr,
):
    # The tile's column halves in turn, quarters for tiles of 8K elements and more: GELU', the
    # Philox mask and the stores of each part hold a part of the tile's registers at a time (the
    # whole tile's at once spilled on sm90 at every tile but 64 x 64, up to 2 KB of stack;
    # halves of 128 x 64 at 4 warps still spilled 136 bytes with Triton 3.6). Part
    # j of width w is columns pid_n * BN + j * w + arange(w), i.e. column tile
    # (BN / w) * pid_n + j, which is how the dropout mask sees it (a function of the element's
    # position, not of the tile shape).
    if BLOCK_SIZE_M * BLOCK_SIZE_N >= 8192:
        HALF: tl.constexpr = BLOCK_SIZE_N // 2
        dh_lo, dh_hi = column_halves(dh, BLOCK_SIZE_M, BLOCK_SIZE_N)
        _dz_epilogue_halves(dh_lo, preact_ptr, seed_ptr, dz_ptr, h_ptr, db1_part_ptr, pid_m,
                            2 * pid_n, offs_m, mask_m, F, db1_part_rows, stride_zm, stride_zf,
                            dropout_threshold, dropout_scale, dropout_col_offset,
                            dropout_n_cols, ACTIVATION, HAS_DROPOUT, WRITE_H, SUM_DB1,
                            BLOCK_SIZE_M, HALF)
        _dz_epilogue_halves(dh_hi, preact_ptr, seed_ptr, dz_ptr, h_ptr, db1_part_ptr, pid_m,
                            2 * pid_n + 1, offs_m, mask_m, F, db1_part_rows, stride_zm,
                            stride_zf, dropout_threshold, dropout_scale, dropout_col_offset,
                            dropout_n_cols, ACTIVATION, HAS_DROPOUT, WRITE_H, SUM_DB1,
                            BLOCK_SIZE_M, HALF)
    else:
        _dz_epilogue_halves(dh, preact_ptr, seed_ptr, dz_ptr, h_ptr, db1_part_ptr, pid_m,
                            pid_n, offs_m, mask_m, F, db1_part_rows, stride_zm, stride_zf,
                            dropout_threshold, dropout_scale, dropout_col_offset,
                            dropout_n_cols, ACTIVATION, HAS_DROPOUT, WRITE_H, SUM_DB1,
                            BLOCK_SIZE_M, BLOCK_SIZE_N)


@triton.jit
def _dz_epilogue_halves(
    dh,  # (BM, BLOCK_SIZE_N) float32: dy @ W2 for column tile pid_n of width BLOCK_SIZE_N
    preact_ptr, seed_ptr, dz_ptr, h_ptr, db1_part_ptr, pid_m, pid_n, offs_m, mask_m,
    F, db1_part_rows, stride_zm, stride_zf,
    dropout_threshold, dropout_scale, dropout_col_offset, dropout_n_cols,
    ACTIVATION: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    WRITE_H: tl.constexpr,
    SUM_DB1: tl.constexpr,
    BLOCK_SIZE_M: tl.constexpr,
    BLOCK_SIZE_N: tl.constexpr,
):
    # ``_dz_epilogue_part`` on the two column halves of ``dh`` in turn (see ``_dz_epilogue``).
    HALF: tl.constexpr = BLOCK_SIZE_N // 2
    dh_lo, dh_hi = column_halves(dh, BLOCK_SIZE_M, BLOCK_SIZE_N)
    _dz_epilogue_part(dh_lo, preact_ptr, seed_ptr, dz_ptr, h_ptr, db1_part_ptr, pid_m,
                      2 * pid_n, offs_m, mask_m, F, db1_part_rows, stride_zm, stride_zf,
                      dropout_threshold, dropout_scale, dropout_col_offset, dropout_n_cols,
                      ACTIVATION, HAS_DROPOUT, WRITE_H, SUM_DB1, HALF)
    _dz_epilogue_part(dh_hi, preact_ptr, seed_ptr, dz_ptr, h_ptr, db1_part_ptr, pid_m,
                      2 * pid_n + 1, offs_m, mask_m, F, db1_part_rows, stride_zm, stride_zf,
                      dropout_threshold, dropout_scale, dropout_col_offset, dropout_n_cols,
                      ACTIVATION, HAS_DROPOUT, WRITE_H, SUM_DB1, HALF)


@triton.jit
def _dz_epilogue_part(
    dh,  # (BM, BLOCK_SIZE_N) float32: dy @ W2 for columns tile pid_n of width BLOCK_SIZE_N
    preact_ptr, seed_ptr, dz_ptr, h_ptr, db1_part_ptr,  # as the dz kernels' arguments
    pid_m, pid_n,  # the tile's indices (pid_n in units of this part's width)
    offs_m, mask_m,  # its int64 rows and their mask
    F, db1_part_rows, stride_zm, stride_zf,
    dropout_threshold, dropout_scale, dropout_col_offset, dropout_n_cols,
    ACTIVATION: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    WRITE_H: tl.constexpr,
    SUM_DB1: tl.constexpr,
    BLOCK_SIZE_N: tl.constexpr,
):
    # Epilogue in float32, with h = dropout(gelu(z)) = gelu(z) * keep / (1 - p):
    #   dz = dh * keep / (1 - p) * gelu'(z)
    # Rows past M have dh = 0 (and z read as 0), so their dz is 0 and the column sums hold.
    # Both dz kernels (pointer loads, and TMA loads on a persistent grid) end so.
    offs_n = pid_n.to(tl.int64) * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)
    mask_n = offs_n < F
    mask = mask_m[:, None] & mask_n[None, :]
    preact = tl.load(preact_ptr + offs_m[:, None] * stride_zm + offs_n[None, :] * stride_zf,
                     mask=mask, other=0.0).to(tl.float32)
    dz = dh * activate_grad(preact, ACTIVATION)
    if HAS_DROPOUT:  # the forward's mask: a function of the seed and (m, f) (see _math)
        keep_scale = dropout_factor_tile(seed_ptr, offs_m, pid_n, dropout_n_cols,
                                         dropout_col_offset, dropout_threshold, dropout_scale,
                                         BLOCK_SIZE_N)
        dz = dz * keep_scale
    offs_out = offs_m[:, None] * F + offs_n[None, :]
    tl.store(dz_ptr + offs_out, cast_to(dz, dz_ptr.dtype.element_ty), mask=mask)
    if SUM_DB1:  # db1 = sum_m dz: this tile's column sums, in row pid_m of the partial sums
        if pid_m < db1_part_rows:  # always, unless a stale cached tile is smaller than planned
            tl.store(db1_part_ptr + pid_m.to(tl.int64) * F + offs_n, tl.sum(dz, axis=0),
                     mask=mask_n)
    if WRITE_H:  # linear2's input, regenerated for dW2 = dy^T @ h
        h = activate(preact, ACTIVATION)
        if HAS_DROPOUT:
            h = h * keep_scale
        tl.store(h_ptr + offs_out, cast_to(h, h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ffn_bwd_dz_tma_kernel(
    dy_ptr,  # (M, E), last stride 1, 16-byte aligned rows (see _matmul.tma_compatible)
    w2_ptr,  # (E, F), likewise
    preact_ptr,  # (M, F): z
    seed_ptr,  # (1,) int64, the dropout seed; None without HAS_DROPOUT
    dz_ptr,  # (M, F) contiguous
    h_ptr,  # (M, F) contiguous; None without WRITE_H
    db1_part_ptr,  # (db1_part_rows, F) float32 contiguous; None without SUM_DB1
    M,
    F,
    E,
    db1_part_rows,
    stride_dym,
    stride_w2e,
    stride_zm,
    stride_zf,
    dropout_threshold,
    dropout_scale,
    dropout_col_offset,
    dropout_n_cols,
    ACTIVATION: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    WRITE_H: tl.constexpr,
    SUM_DB1: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_SIZE_M: tl.constexpr,
    BLOCK_SIZE_N: tl.constexpr,  # along F
    BLOCK_SIZE_K: tl.constexpr,  # along E, the reduction
    GROUP_SIZE_M: tl.constexpr,
):
    # dh = dy @ W2 for Hopper: dy and W2 tiles by TMA (W2 as it is stored, (E, F): a (K, N)
    # operand), each program of a persistent grid walking output tiles in grouped order; the
    # tile loop is not flattened (the Philox epilogue would spill inside it, as the forward's).
    dy_desc = tl.make_tensor_descriptor(dy_ptr, shape=[M, E], strides=[stride_dym, 1],
                                        block_shape=[BLOCK_SIZE_M, BLOCK_SIZE_K])
    w2_desc = tl.make_tensor_descriptor(w2_ptr, shape=[E, F], strides=[stride_w2e, 1],
                                        block_shape=[BLOCK_SIZE_K, BLOCK_SIZE_N])
    num_tiles = tl.cdiv(M, BLOCK_SIZE_M) * tl.cdiv(F, BLOCK_SIZE_N)
    for tile_id in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0)):
        pid_m, pid_n, offs_m, offs_n, mask_m, mask_n = output_tile_of(
            tile_id, M, F, BLOCK_SIZE_M, BLOCK_SIZE_N, GROUP_SIZE_M)
        dh = descriptor_dot_tile(dy_desc, w2_desc, pid_m * BLOCK_SIZE_M, pid_n * BLOCK_SIZE_N,
                                 E, True, INPUT_PRECISION, BLOCK_SIZE_M, BLOCK_SIZE_N,
                                 BLOCK_SIZE_K)
        _dz_epilogue(dh, preact_ptr, seed_ptr, dz_ptr, h_ptr, db1_part_ptr, pid_m, pid_n,
                     offs_m, mask_m, F, db1_part_rows, stride_zm, stride_zf,
                     dropout_threshold, dropout_scale, dropout_col_offset, dropout_n_cols,
                     ACTIVATION, HAS_DROPOUT, WRITE_H, SUM_DB1, BLOCK_SIZE_M,
                     BLOCK_SIZE_N)

# The same forward kernel as LinearGELU's, under its own name: its keys and launch count are the
# FFN block's. Both kernels loop over a reduction the way the linear forward does ("K").
_fwd_tuner = Tuner(linear_gelu_fwd_kernel, "ffn_fwd_gelu_dropout", matmul_configs,
                   functools.partial(prune_matmul, reduction="K"))
# Its Hopper variant (TMA loads, persistent grid), the forward's "tma" path.
_fwd_tma_tuner = Tuner(linear_gelu_fwd_tma_kernel, "ffn_fwd_gelu_dropout_tma",
                       tma_dropout_configs,
                       functools.partial(prune_matmul, reduction="K", persistent=True))


def _dz_configs(arch: str | None = None) -> list[triton.Config]:
    # The matmul tiles whose accumulator leaves the GELU' + Philox epilogue room (see
    # _matmul.small_accumulators: 128 x 256 and 256 x 128 at 8 warps, 64 x 256 at 4, spill).
    return small_accumulators(matmul_configs(arch))


_dz_tuner = Tuner(_ffn_bwd_dz_kernel, "ffn_bwd_dz", _dz_configs,
                  functools.partial(prune_matmul, reduction="K"))
# Its Hopper variant: the backward's "tma" path.
_dz_tma_tuner = Tuner(_ffn_bwd_dz_tma_kernel, "ffn_bwd_dz_tma", tma_matmul_configs,
                      functools.partial(prune_matmul, reduction="K", persistent=True))


def _mm(a: Tensor, b: Tensor) -> Tensor:
    with autocast_off(a):
        return torch.mm(a, b)


def _gelu_dropout(preact: Tensor, seed: Tensor | None, p: float, activation: str,
                  like: Tensor, col_offset: int, n_cols: int) -> Tensor:
    """h = dropout(gelu(z)) by the elementwise kernel, into a new (M, F) tensor."""
    out = _matmul.new_output(tuple(preact.shape), like)
    return gelu_dropout_forward(preact, seed, p, activation, out, col_offset, n_cols)


# ---- forward ---------------------------------------------------------------------------------


def _forward_fused(
    x2d: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None,
    seed: Tensor | None, p: float, activation: str, save_preact: bool, col_offset: int,
    n_cols: int,
) -> tuple[Tensor, Tensor | None]:
    return _forward_h_by(_fwd_tuner, x2d, w1, b1, w2, b2, seed, p, activation, save_preact,
                         col_offset, n_cols)


def _forward_tma(
    x2d: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None,
    seed: Tensor | None, p: float, activation: str, save_preact: bool, col_offset: int,
    n_cols: int,
) -> tuple[Tensor, Tensor | None]:
    # fused, h by the Hopper kernel where descriptors can serve x and W1 (else the pointer
    # kernel: a key that chose this path may come again with operands they cannot serve)
    tuner = _fwd_tma_tuner if tma_compatible(x2d, w1) else _fwd_tuner
    return _forward_h_by(tuner, x2d, w1, b1, w2, b2, seed, p, activation, save_preact,
                         col_offset, n_cols)


def _tma_applies(x2d: Tensor, w1: Tensor, *args, **kwargs) -> bool:
    return tma_applies(x2d, w1)


def _forward_h_by(
    tuner: Tuner, x2d: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None,
    seed: Tensor | None, p: float, activation: str, save_preact: bool, col_offset: int,
    n_cols: int,
) -> tuple[Tensor, Tensor | None]:
    """y = h @ W2^T + b2, h = dropout(gelu(x @ W1^T + b1)) by ``tuner``'s forward kernel."""
    (M, _), hidden = x2d.shape, w1.shape[0]
    h = _matmul.new_output((M, hidden), x2d)
    preact = _matmul.new_output((M, hidden), x2d) if save_preact else None
    if M and hidden:
        launch_forward(tuner, x2d, w1, b1, h, preact, activation, seed, p,
                       col_offset, n_cols)
    return matmul_bias(h, w2, b2), preact


def _forward_composed(
    x2d: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None,
    seed: Tensor | None, p: float, activation: str, save_preact: bool, col_offset: int,
    n_cols: int,
) -> tuple[Tensor, Tensor | None]:
    preact = matmul_bias(x2d, w1, b1)
    h = _gelu_dropout(preact, seed, p, activation, x2d, col_offset, n_cols)
    return matmul_bias(h, w2, b2), (preact if save_preact else None)


# ---- backward --------------------------------------------------------------------------------


def _dz_problem(dy2d: Tensor, preact: Tensor, p: float, activation: str, write_h: bool,
                sum_db1: bool, db1_rows: int, col_offset: int, n_cols: int,
                tma: bool) -> tuple[tuple, Callable, dict]:
    """(key, grid, constant arguments) of a dz launch: what every launch of one problem shares
    (dz, h and db1's partial sums are contiguous)."""
    (M, E), hidden = dy2d.shape, preact.shape[1]
    precision = input_precision(preact.dtype)
    key = (bucket(M), hidden, E, preact.dtype, activation, p > 0.0, write_h, sum_db1,
           precision)
    constants = dict(M=M, F=hidden, E=E, db1_part_rows=db1_rows, ACTIVATION=activation,
                     WRITE_H=write_h, SUM_DB1=sum_db1, INPUT_PRECISION=precision,
                     dropout_n_cols=n_cols, **dropout_constants(p, col_offset))
    grid = persistent_grid(M, hidden, preact.device) if tma else \
        tile_grid(M, hidden, "BLOCK_SIZE_M", "BLOCK_SIZE_N")
    return key, grid, constants


def _dz_operands(tma: bool, dy2d, w2, preact, dz, h, db1_part, seed) -> dict:
    operands = dict(dy_ptr=dy2d, w2_ptr=w2, preact_ptr=preact, dz_ptr=dz, h_ptr=h,
                    db1_part_ptr=db1_part, seed_ptr=seed, stride_dym=dy2d.stride(0),
                    stride_w2e=w2.stride(0), stride_zm=preact.stride(0),
                    stride_zf=preact.stride(1))
    if not tma:
        operands.update(stride_dye=dy2d.stride(1), stride_w2f=w2.stride(1))
    return operands


def _launch_dz(
    dy2d: Tensor, w2: Tensor, preact: Tensor, seed: Tensor | None, p: float,
    activation: str, dz: Tensor, h: Tensor | None, db1_part: Tensor | None,
    col_offset: int, n_cols: int, tma: bool = False,
) -> int:
    """The dz kernel (``tma``: its Hopper variant, on operands descriptors can serve); returns
    how many rows of ``db1_part`` it wrote (one per M-tile)."""
    key, grid, constants = _dz_problem(
        dy2d, preact, p, activation, h is not None, db1_part is not None,
        0 if db1_part is None else db1_part.shape[0], col_offset, n_cols, tma)
    with device_context(preact):
        if tma:
            use_tma_allocator()
        meta = (_dz_tma_tuner if tma else _dz_tuner).run(grid, key, **constants, **_dz_operands(
            tma, dy2d, w2, preact, dz, h, db1_part, seed if p > 0.0 else None))
    return ceil_div(dy2d.shape[0], meta["BLOCK_SIZE_M"])


def _dz_outputs(x2d: Tensor, preact: Tensor, need_dw2: bool, db1_rows: int | None):
    """(dz, h or None, db1's partial sums or None), new; ``db1_rows``: None without db1."""
    shape = tuple(preact.shape)
    return (_matmul.new_output(shape, x2d),
            _matmul.new_output(shape, x2d) if need_dw2 else None,
            None if db1_rows is None else
            _matmul.new_output((db1_rows, shape[1]), x2d, torch.float32))


def _db1(dz: Tensor, db1_part: Tensor | None, rows_written: int, x2d: Tensor) -> Tensor | None:
    """db1 from the dz kernel's partial sums (None without them)."""
    if db1_part is None:
        return None
    if rows_written <= db1_part.shape[0]:
        return db1_part[:rows_written].sum(0).to(x2d.dtype)
    # a cached tile smaller than today's config space: the kernel kept in bounds
    return dz.sum(0, dtype=torch.float32).to(x2d.dtype)


def _backward_fused(
    dy2d: Tensor, x2d: Tensor, w1: Tensor, w2: Tensor, preact: Tensor, seed: Tensor | None,
    p: float, activation: str, needs: tuple[bool, ...], col_offset: int, n_cols: int,
    tma: bool = False,
) -> Grads:
    # tma: the dz kernel's Hopper variant (the "tma" path, on operands descriptors can serve)
    need_dx, need_dw1, need_db1, need_dw2, _ = needs
    (M, hidden), dz, h, db1 = preact.shape, None, None, None
    if need_dx or need_dw1 or need_db1:
        # db1's partial sums: sized for the smallest M-tile the tuner may pick
        db1_rows = ceil_div(M, (_dz_tma_tuner if tma else _dz_tuner).smallest(
            "BLOCK_SIZE_M")) if need_db1 else None
        dz, h, db1_part = _dz_outputs(x2d, preact, need_dw2, db1_rows)
        rows_written = 0
        if M and hidden:
            rows_written = _launch_dz(dy2d, w2, preact, seed, p, activation, dz, h,
                                      db1_part, col_offset, n_cols, tma)
        db1 = _db1(dz, db1_part, rows_written, x2d)
    elif need_dw2:
        h = _gelu_dropout(preact, seed, p, activation, x2d, col_offset, n_cols)
    dw2 = _mm(dy2d.t(), h) if need_dw2 else None
    del h  # transient: freed before dx and dW1 are computed
    return _linear1_grads(dy2d, x2d, w1, dz, db1, dw2, needs)


def _backward_tma(
    dy2d: Tensor, x2d: Tensor, w1: Tensor, w2: Tensor, preact: Tensor, seed: Tensor | None,
    p: float, activation: str, needs: tuple[bool, ...], col_offset: int, n_cols: int,
) -> Grads:
    # fused, dz by the Hopper kernel where descriptors can serve dy and W2 (else the pointer
    # kernel: a key that chose this path may come again with operands they cannot serve)
    return _backward_fused(dy2d, x2d, w1, w2, preact, seed, p, activation, needs,
                           col_offset, n_cols, tma=tma_compatible(dy2d, w2))


def _backward_tma_applies(dy2d: Tensor, x2d: Tensor, w1: Tensor, w2: Tensor, *args,
                          **kwargs) -> bool:
    return tma_applies(dy2d, w2)


def _backward_composed(
    dy2d: Tensor, x2d: Tensor, w1: Tensor, w2: Tensor, preact: Tensor, seed: Tensor | None,
    p: float, activation: str, needs: tuple[bool, ...], col_offset: int, n_cols: int,
) -> Grads:
    need_dx, need_dw1, need_db1, need_dw2, _ = needs
    dz = h = db1 = None
    if need_dx or need_dw1 or need_db1:
        dh = _mm(dy2d, w2)
        dz = _matmul.new_output(tuple(preact.shape), x2d)
        h = _matmul.new_output(tuple(preact.shape), x2d) if need_dw2 else None
        gelu_dropout_backward(dh, preact, seed, p, activation, dz, h, col_offset, n_cols)
        del dh
        if need_db1:
            db1 = dz.sum(0, dtype=torch.float32).to(x2d.dtype)
    elif need_dw2:
        h = _gelu_dropout(preact, seed, p, activation, x2d, col_offset, n_cols)
    dw2 = _mm(dy2d.t(), h) if need_dw2 else None
    del h
    return _linear1_grads(dy2d, x2d, w1, dz, db1, dw2, needs)


def _linear1_grads(
    dy2d: Tensor, x2d: Tensor, w1: Tensor, dz: Tensor | None, db1: Tensor | None,
    dw2: Tensor | None, needs: tuple[bool, ...],
) -> Grads:
    """(dx, dW1, db1, dW2, db2) once dz (and dW2, db1) are known: dx = dz @ W1, dW1 = dz^T @ x,
    db2 = sum_m dy, each only when needed."""
    need_dx, need_dw1, _, _, need_db2 = needs
    dx = _mm(dz, w1) if need_dx else None
    dw1 = _mm(dz.t(), x2d) if need_dw1 else None
    db2 = dy2d.sum(0) if need_db2 else None
    return dx, dw1, db1, dw2, db2


# ---- eager PyTorch (p == 0 only) --------------------------------------------------------------


def _forward_torch(
    x2d: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None,
    seed: Tensor | None, p: float, activation: str, save_preact: bool, col_offset: int,
    n_cols: int,
) -> tuple[Tensor, Tensor | None]:
    # F.linear, F.gelu, F.linear, as eager's block computes them (no dropout: see the Paths, so
    # where the columns sit does not matter)
    h, preact = _linear_gelu_torch(x2d, w1, b1, activation, save_preact)
    return matmul_bias(h, w2, b2), preact


def _backward_torch(
    dy2d: Tensor, x2d: Tensor, w1: Tensor, w2: Tensor, preact: Tensor, seed: Tensor | None,
    p: float, activation: str, needs: tuple[bool, ...], col_offset: int, n_cols: int,
) -> Grads:
    # Eager's backward: dh = dy @ W2, dz = aten.gelu_backward(dh, z) in the input dtype,
    # db1 = sum_m dz, and dW2 = dy^T @ gelu(z) (the GELU output eager keeps, rebuilt here).
    need_dx, need_dw1, need_db1, need_dw2, _ = needs
    dz = db1 = dw2 = None
    with autocast_off(x2d):
        if need_dx or need_dw1 or need_db1:
            dz = _gelu.gelu_backward_torch(torch.mm(dy2d, w2), preact, activation)
            db1 = dz.sum(0) if need_db1 else None
        if need_dw2:
            dw2 = torch.mm(dy2d.t(), _gelu.gelu_forward_torch(preact, activation))
    return _linear1_grads(dy2d, x2d, w1, dz, db1, dw2, needs)


# Where nothing may be timed on a GPU (policy "off", CUDA-graph capture) and nothing is known:
# the composed paths, cuBLAS for every matmul and an elementwise kernel whose first config is
# fine for any size (the fused kernels' first config is a guess for a matmul). "torch" is a
# candidate at p == 0 only: with dropout on, PyTorch's ops cannot draw the kernels' mask.
_forward_paths = Paths(
    "ffn_fwd",
    {"fused": _forward_fused, "composed": _forward_composed, "torch": _forward_torch,
     "tma": _forward_tma},
    default="fused", untuned="composed",
    applies={"torch": without_dropout, "tma": _tma_applies},
    kernels=[_fwd_tuner, _gelu.dropout_fwd_tuner, _fwd_tma_tuner],
)
_backward_paths = Paths(
    "ffn_bwd",
    {"fused": _backward_fused, "composed": _backward_composed, "torch": _backward_torch,
     "tma": _backward_tma},
    default="fused", untuned="composed",
    applies={"torch": without_dropout, "tma": _backward_tma_applies},
    kernels=[_dz_tuner, _gelu.dropout_fwd_tuner, _gelu.dropout_bwd_tuner, _dz_tma_tuner],
)


def _path_key(x2d: Tensor, w1: Tensor, w2: Tensor, p: float, activation: str,
              *flags: bool) -> tuple:
    """(bucket(M), D, F, E, dtype, GELU form, dropout on, *flags, TF32): what the path choice
    may depend on (``flags``: which biases and outputs a call has)."""
    return (bucket(x2d.shape[0]), x2d.shape[1], w1.shape[0], w2.shape[0], x2d.dtype,
            activation, p > 0.0, *flags, input_precision(x2d.dtype))


# ---- launchers -------------------------------------------------------------------------------


def ffn_forward(
    x2d: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
    b2: torch.Tensor | None, seed: torch.Tensor | None, p: float, activation: str,
    save_preact: bool, col_offset: int = 0, n_cols: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(y, preact): y = linear2(dropout(gelu(linear1(x2d)))) (M, E) and, if ``save_preact``,
    z = x2d @ w1.T + b1 (M, F), new contiguous tensors in x2d's dtype (preact None otherwise).

    Dropout has probability ``p`` and draws from ``seed`` (a 1-element int64 tensor on x2d's
    device; ignored, and may be None, when p == 0) the mask of columns ``col_offset`` ..
    ``col_offset + F`` of an (M, ``n_cols``) activation: by default the whole (M, F) one; under
    tensor parallel, the rank's columns of the whole hidden layer.
    """
    key = _path_key(x2d, w1, w2, p, activation, b1 is not None, b2 is not None,
                    save_preact)
    return _forward_paths.run(key, x2d, w1, b1, w2, b2, seed, p=p,
                              activation=activation, save_preact=save_preact,
                              col_offset=col_offset,
                              n_cols=w1.shape[0] if n_cols is None else n_cols)


def ffn_backward(
    dy2d: torch.Tensor, x2d: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
    preact: torch.Tensor, seed: torch.Tensor | None, p: float, activation: str,
    needs: Sequence[bool], col_offset: int = 0, n_cols: int | None = None,
) -> tuple[torch.Tensor | None, ...]:
    """(dx, dW1, db1, dW2, db2) of the FFN block for the upstream gradient dy2d (M, E), from
    the pre-activation z = ``preact`` (M, F) and the forward's ``seed``, ``p``, ``col_offset``
    and ``n_cols``.

    ``needs`` says which of the five to compute (the others are None); each is a new contiguous
    tensor ((M, D), (F, D), (F,), (E, F), (E,)) in the input dtype.
    """
    return _backward_paths.run(_path_key(x2d, w1, w2, p, activation, *needs),
                               dy2d, x2d, w1, w2, preact, seed, p=p,
                               activation=activation, needs=needs, col_offset=col_offset,
                               n_cols=w1.shape[0] if n_cols is None else n_cols)



# ---- per-problem launches (the plans of ``ops/ffn.py``; see ``linear_gelu.py``'s) -----------


def ffn_forward_launch(x2d, w1, b1, w2, b2, seed, p: float, activation: str, save_preact: bool,
                   col_offset: int = 0, n_cols: int | None = None) -> Callable:
    """``ffn_forward`` bound to this problem: (x2d, w1, b1, w2, b2, seed) -> (y, preact)."""
    n_cols = w1.shape[0] if n_cols is None else n_cols
    kwargs = dict(p=p, activation=activation, save_preact=save_preact, col_offset=col_offset,
                  n_cols=n_cols)

    def launcher(x2d, w1, b1, w2, b2, seed):
        return ffn_forward(x2d, w1, b1, w2, b2, seed, **kwargs)
    tensors = (x2d, w1, b1, w2, b2, seed)
    key = _path_key(x2d, w1, w2, p, activation, b1 is not None, b2 is not None, save_preact)
    path = _forward_paths.settled(key, tensors, kwargs)
    if path is None:
        return launcher
    tuner = {"fused": _fwd_tuner, "tma": _fwd_tma_tuner}.get(path)
    (M, _), hidden = x2d.shape, w1.shape[0]
    bound = None if tuner is None or not (M and hidden) else bound_forward(
        tuner, x2d, w1, b1, True, save_preact, activation, p, col_offset, n_cols)
    if bound is None:
        return _forward_paths.runner(path, (), kwargs)
    serves, launch = bound
    count = _forward_paths.counted(path)

    def run(x2d, w1, b1, w2, b2, seed):
        if not serves(x2d, w1):
            return launcher(x2d, w1, b1, w2, b2, seed)
        h = _matmul.new_output((M, hidden), x2d)
        preact = _matmul.new_output((M, hidden), x2d) if save_preact else None
        count()
        launch(x2d, w1, b1, h, preact, seed)
        return matmul_bias(h, w2, b2), preact
    return run


def ffn_backward_launch(dy2d, x2d, w1, w2, preact, seed, p: float, activation: str,
                    needs: Sequence[bool], col_offset: int = 0,
                    n_cols: int | None = None) -> Callable:
    """``ffn_backward`` bound to this problem: (dy2d, x2d, w1, w2, preact, seed) -> grads (its
    path settled; its kernels launch by their Tuners)."""
    n_cols = w1.shape[0] if n_cols is None else n_cols
    kwargs = dict(p=p, activation=activation, needs=needs, col_offset=col_offset,
                  n_cols=n_cols)
    key = _path_key(x2d, w1, w2, p, activation, *needs)
    tensors = (dy2d, x2d, w1, w2, preact, seed)
    path = _backward_paths.settled(key, tensors, kwargs)
    if path is None:
        return lambda *tensors: ffn_backward(*tensors, **kwargs)
    path_run = _backward_paths.runner(path, (), kwargs)
    need_dx, need_dw1, need_db1, need_dw2, _ = needs
    (M, hidden), tma = preact.shape, path == "tma"
    if path not in ("fused", "tma") or not (M and hidden) or not (
            need_dx or need_dw1 or need_db1) or (tma and not tma_compatible(dy2d, w2)):
        return path_run
    # dz's launch kept (as ``linear_gelu.bound_forward``), for operands it may take.
    tuner = _dz_tma_tuner if tma else _dz_tuner
    db1_rows = ceil_div(M, tuner.smallest("BLOCK_SIZE_M")) if need_db1 else None
    dz_key, grid, constants = _dz_problem(dy2d, preact, p, activation, need_dw2, need_db1,
                                          db1_rows or 0, col_offset, n_cols, tma)
    with device_context(preact):
        launch, meta = tuner.bound(grid, dz_key, **constants), tuner.best_meta(dz_key)
    if launch is None:
        return path_run
    precision, rows_written, count = constants["INPUT_PRECISION"], ceil_div(
        M, meta["BLOCK_SIZE_M"]), _backward_paths.counted(path)

    def run(dy2d, x2d, w1, w2, preact, seed):
        if (precision is not None and input_precision(preact.dtype) != precision) or (
                tma and not tma_compatible(dy2d, w2)):
            return path_run(dy2d, x2d, w1, w2, preact, seed)
        dz, h, db1_part = _dz_outputs(x2d, preact, need_dw2, db1_rows)
        count()
        with device_context(preact):
            if tma:
                use_tma_allocator()
            launch(**_dz_operands(tma, dy2d, w2, preact, dz, h, db1_part,
                                  seed if p > 0.0 else None))
        dw2 = _mm(dy2d.t(), h) if need_dw2 else None
        del h  # transient: freed before dx and dW1 are computed
        return _linear1_grads(dy2d, x2d, w1, dz, _db1(dz, db1_part, rows_written, x2d), dw2,
                              needs)
    return run
