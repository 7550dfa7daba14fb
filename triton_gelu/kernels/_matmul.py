"""What every matmul kernel of the package shares: tile order, tensor-core operands, the TF32
rule, launch grids and output allocation; and how the paths call cuBLAS."""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ._math import _INTERPRETING


@triton.jit
def grouped_tile(pid, num_rows, num_cols, GROUP_SIZE: tl.constexpr):
    # (row, col) tile of program ``pid`` when programs walk GROUP_SIZE rows of tiles column by
    # column: programs running together share operand tiles, so those stay in L2.
    num_pid_in_group = GROUP_SIZE * num_cols
    group_id = pid // num_pid_in_group
    first_row = group_id * GROUP_SIZE
    group_rows = tl.minimum(num_rows - first_row, GROUP_SIZE)
    row = first_row + (pid % num_pid_in_group) % group_rows
    col = (pid % num_pid_in_group) // group_rows
    return row, col


@triton.jit
def dot_operand(tile):
    # The interpreter's tl.dot mishandles bfloat16 operands; there, and only there, multiply in
    # float32. Products of fp16/bf16 values are exact in float32, so this is what the GPU computes.
    if _INTERPRETING:
        return tile.to(tl.float32)
    else:
        return tile


def input_precision(dtype: torch.dtype) -> str | None:
    """tl.dot's ``input_precision`` for operands of ``dtype``.

    float32 operands: TF32 tensor cores only when PyTorch's matmuls may use them too. For
    fp16/bf16 operands the setting means nothing: None leaves the backend's default (the allowed
    names differ between backends).
    """
    if dtype != torch.float32:
        return None
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def tile_grid(rows: int, cols: int, row_block: str, col_block: str | None = None):
    """One program per (row_block x col_block) tile; a single column of tiles without col_block."""

    def grid(meta: dict) -> tuple[int]:
        col_tiles = 1 if col_block is None else triton.cdiv(cols, meta[col_block])
        return (triton.cdiv(rows, meta[row_block]) * col_tiles,)

    return grid


def new_output(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """Every matmul launcher allocates its outputs here: tests swap in NaN-filled buffers to
    catch tiles a kernel leaves unwritten."""
    return torch.empty(shape, dtype=like.dtype, device=like.device)


def cublas_context(t: torch.Tensor):
    """Where a path calls a PyTorch matmul: autocast off, since the launchers' operands already
    are in the dtype to compute in (functional.py casts them as F.linear would), and a backward
    run inside an autocast block must not recast them."""
    device_type = t.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()
