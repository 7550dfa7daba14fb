"""What every matmul kernel of the package shares: tile order, the main loop of an output tile,
tensor-core operands, the TF32 rule, launch grids and output allocation; and how the paths call
cuBLAS.

Hopper (sm90+) variants: the main loop of an output tile can load its operands through tensor
descriptors (TMA: ``tl.make_tensor_descriptor``, one copy engine request per tile instead of
cp.async from every thread; out-of-bounds rows and columns read as zero, so the loop has no
masks) and the kernel can be persistent (one program per SM walking the output tiles in grouped
order, ``persistent_grid``). Descriptors are made in the kernel rather than on the host
(``triton.tools.tensor_descriptor.TensorDescriptor``): a host descriptor fixes its block shape
before the launch, so every autotune config would need its own descriptor (a pre-launch hook
the ``Tuner`` does not have), while an in-kernel descriptor takes the config's constexpr block
sizes; both Triton 3.6 and 3.9 (and their interpreters) run it. Its cost is a 128-byte tensor
map per program in a global scratch buffer, which Triton allocates through
``triton.set_allocator`` (``use_tma_allocator``). ``tma_compatible`` is the host's check that a
descriptor can serve an operand at all.
"""

from __future__ import annotations

import functools
import inspect

import torch
import triton
import triton.language as tl

from .._runtime import interpreting
from ._math import INTERPRETING, ceil_div


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
def output_tile(M, N, BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr,
                GROUP_SIZE_M: tl.constexpr):
    # The (BLOCK_SIZE_M, BLOCK_SIZE_N) tile of an (M, N) output this program computes, in
    # grouped order: its tile indices, its int64 row and column offsets and their masks.
    return output_tile_of(tl.program_id(0), M, N, BLOCK_SIZE_M, BLOCK_SIZE_N, GROUP_SIZE_M)


@triton.jit
def output_tile_of(tile_id, M, N, BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr,
                   GROUP_SIZE_M: tl.constexpr):
    # output_tile for tile ``tile_id`` of the grouped order (a persistent program's current one).
    pid_m, pid_n = grouped_tile(
        tile_id, tl.cdiv(M, BLOCK_SIZE_M), tl.cdiv(N, BLOCK_SIZE_N), GROUP_SIZE_M
    )
    offs_m = pid_m.to(tl.int64) * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)
    return pid_m, pid_n, offs_m, offs_n, offs_m < M, offs_n < N


@triton.jit
def column_halves(tile, BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr):
    # The (BM, BN / 2) left and right halves of a (BM, BN) tile (columns j * BN / 2 + arange):
    # an epilogue run on each in turn holds half its values at a time, so ptxas needs not
    # spill a heavy epilogue's (ffn._dz_epilogue, geglu._forward_epilogue).
    return tl.split(tl.permute(tl.reshape(tile, (BLOCK_SIZE_M, 2, BLOCK_SIZE_N // 2)), (0, 2, 1)))


@triton.jit
def dot_operand(tile):
    # The interpreter's tl.dot mishandles bfloat16 operands; there, and only there, multiply in
    # float32. Products of fp16/bf16 values are exact in float32, so this is what the GPU computes.
    if INTERPRETING:
        return tile.to(tl.float32)
    else:
        return tile


@triton.jit
def dot_tile(
    a_ptr,  # (M, K), read through its strides
    b_ptr,  # (K, N), read through its strides
    offs_m,  # (BLOCK_SIZE_M,) int64 rows of A
    offs_n,  # (BLOCK_SIZE_N,) int64 columns of B
    mask_m,
    mask_n,
    K,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_SIZE_M: tl.constexpr,
    BLOCK_SIZE_N: tl.constexpr,
    BLOCK_SIZE_K: tl.constexpr,
):
    # acc[m, n] = sum_k A[m, k] * B[k, n] for one (BLOCK_SIZE_M, BLOCK_SIZE_N) tile, float32
    # accumulation, BLOCK_SIZE_K at a time; rows and columns outside the masks read as 0.
    offs_k = tl.arange(0, BLOCK_SIZE_K)
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak  # (BM, BK)
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn  # (BK, BN)
    acc = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_SIZE_K)):
        k_left = K - k * BLOCK_SIZE_K
        a = tl.load(a_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & mask_n[None, :], other=0.0)
        acc = tl.dot(dot_operand(a), dot_operand(b), acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_SIZE_K * stride_ak
        b_ptrs += BLOCK_SIZE_K * stride_bk
    return acc


@triton.jit
def descriptor_dot_tile(
    a_desc,  # (M, K) tensor descriptor, block (BLOCK_SIZE_M, BLOCK_SIZE_K)
    b_desc,  # (N, K) descriptor, block (BLOCK_SIZE_N, BLOCK_SIZE_K): a weight, multiplied as
    #          its transpose; with B_IS_KN a (K, N) one, block (BLOCK_SIZE_K, BLOCK_SIZE_N)
    off_m,  # first row of the tile in A
    off_n,  # first output column of the tile
    K,
    B_IS_KN: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_SIZE_M: tl.constexpr,
    BLOCK_SIZE_N: tl.constexpr,
    BLOCK_SIZE_K: tl.constexpr,
):
    # acc[m, n] = sum_k A[off_m + m, k] * B^T[k, off_n + n]: dot_tile's loop on TMA loads. The
    # copy engine zero-fills what lies outside the tensor, so no masks (and a K that is no
    # multiple of BLOCK_SIZE_K sums zeros past its end).
    acc = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_SIZE_K)):
        a = a_desc.load([off_m, k * BLOCK_SIZE_K])
        if B_IS_KN:
            b = dot_operand(b_desc.load([k * BLOCK_SIZE_K, off_n]))
        else:
            b = dot_operand(b_desc.load([off_n, k * BLOCK_SIZE_K])).T
        acc = tl.dot(dot_operand(a), b, acc, input_precision=INPUT_PRECISION)
    return acc


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
        col_tiles = 1 if col_block is None else ceil_div(cols, meta[col_block])
        return (ceil_div(rows, meta[row_block]) * col_tiles,)

    return grid


# ---- Hopper: tensor descriptors and persistent grids ------------------------------------------

_TMA_ALIGN = 16  # bytes: a descriptor's base address and every stride but the last


def tma_api() -> bool:
    """Whether this Triton makes tensor descriptors in kernels (``tl.make_tensor_descriptor``,
    Triton 3.3+ as a public name) and lets us allocate their scratch (``triton.set_allocator``)."""
    return hasattr(tl, "make_tensor_descriptor") and hasattr(triton, "set_allocator")


@functools.cache
def range_flattens() -> bool:
    """Whether ``tl.range`` takes ``flatten`` (fuse a persistent kernel's tile loop with its K
    loop, so the pipeline keeps loading across tiles)."""
    return "flatten" in inspect.signature(tl.range.__init__).parameters


def tma_compatible(*tensors: torch.Tensor) -> bool:
    """Whether tensor descriptors can serve every one of these 2-D operands: last stride 1, the
    other stride and the base address multiples of 16 bytes (TMA's rules). False sends a problem
    to the pointer kernels, e.g. an odd K in bf16, a transposed weight, a column slice at an odd
    offset."""
    for t in tensors:
        if t.dim() != 2 or t.stride(1) != 1 or t.stride(0) <= 0 or t.data_ptr() % _TMA_ALIGN:
            return False  # (a stride-0 row: an expanded tensor, which a tensor map cannot be)
        if (t.stride(0) * t.element_size()) % _TMA_ALIGN:
            return False
    return True


def tma_device(t: torch.Tensor) -> bool:
    """Whether ``t``'s device runs the descriptor kernels: a CUDA GPU of compute capability 9.0
    or later (Hopper's TMA), not ROCm; and the interpreter, where tests force the Hopper paths
    (it never takes them by itself: nothing is timed there)."""
    if interpreting():
        return t.device.type == "cpu"
    return (t.is_cuda and torch.version.hip is None
            and torch.cuda.get_device_capability(t.device)[0] >= 9)


def tma_applies(*operands: torch.Tensor) -> bool:
    """The Hopper paths' ``Paths`` predicate on a problem's 2-D operands (checked before any
    launch): the API, the device, and every operand descriptor-compatible."""
    return tma_api() and tma_device(operands[0]) and tma_compatible(*operands)


# Programs of a persistent grid under the interpreter: fewer than the tiles of most test shapes,
# so the tests walk several tiles per program.
_INTERPRETER_PROGRAMS = 3


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def persistent_grid(rows: int, cols: int, device: torch.device, row_block: str = "BLOCK_SIZE_M",
                    col_block: str = "BLOCK_SIZE_N"):
    """One program per SM (never more than there are tiles), each walking the (row_block x
    col_block) tiles of a (rows, cols) output in grouped order."""
    programs = _sm_count(device.index if device.index is not None else torch.cuda.current_device()
                         ) if device.type == "cuda" else _INTERPRETER_PROGRAMS

    def grid(meta: dict) -> tuple[int]:
        tiles = ceil_div(rows, meta[row_block]) * ceil_div(cols, meta[col_block])
        return (max(1, min(programs, tiles)),)

    return grid


def _scratch(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    # Global scratch of a kernel launch (the tensor maps of in-kernel descriptors), on the
    # current device (the launchers run under ``device_context``).
    return torch.empty(size, dtype=torch.int8, device="cuda")


def use_tma_allocator() -> None:
    """Give Triton the allocator in-kernel descriptors need (their tensor maps live in global
    scratch). Set at each Hopper launch, not at import; it replaces an allocator set before,
    with one doing the same: torch memory on the current device. (The interpreter needs none.)"""
    if not interpreting():
        triton.set_allocator(_scratch)


def new_output(
    shape: tuple[int, ...], like: torch.Tensor, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Every matmul launcher allocates what its kernels write here (in ``like``'s dtype unless
    ``dtype`` is given): tests swap in NaN-filled buffers to catch tiles a kernel leaves
    unwritten."""
    # Tensor.new_empty: the cheapest allocation on the host (torch.empty's dtype and device
    # arguments cost ~0.2 us, a torch.Size for shape ~0.5 us more).
    return like.new_empty(shape) if dtype is None else like.new_empty(shape, dtype=dtype)


def small_accumulators(configs: list[triton.Config]) -> list[triton.Config]:
    """``configs`` less the tiles whose (BM, BN) float32 accumulator takes more than 64
    registers a thread. For kernels with a heavy epilogue (the FFN backward's GELU' and Philox)
    or two accumulators (GeGLU's forward): ptxas spills those tiles on sm90 (the GeGLU forward's
    256 x 128 inside its main loop), however the epilogue is split (see ``ffn._dz_epilogue``).
    The interpreter's single small config always passes."""
    return [c for c in configs
            if c.kwargs["BLOCK_SIZE_M"] * c.kwargs["BLOCK_SIZE_N"] <= 64 * 32 * c.num_warps]
