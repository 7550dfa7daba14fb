"""Config spaces per architecture, the shared-memory model and pruning. Config spaces are
``configs(arch)`` and prune functions ``prune(configs, key, arch)``, where ``arch`` is ``"sm90"``, ``"sm80"``, ``"sm86"``, ``"sm89"``,
``"default"`` (any other GPU) or ``None`` (the interpreter). Key conventions: elementwise kernels
key on ``(bucket(numel), dtype, ...)``, matmul kernels on ``(bucket(M), N, K, dtype, ...)``.
"""

from __future__ import annotations

import torch
import triton


# Shared memory a block may use (opt-in maximum), per architecture; "default" is conservative
# (sm75, AMD LDS). ``matmul_smem_bytes`` estimates what Triton allocates; a config that passes the
# estimate and still fails to compile is timed as infinitely slow.
SMEM_BYTES = {"sm90": 232448, "sm80": 166912, "sm86": 101376, "sm89": 101376, "default": 65536}
_ARCH_OF_CAPABILITY = {(9, 0): "sm90", (8, 0): "sm80", (8, 6): "sm86", (8, 9): "sm89"}


def bucket(n: int) -> int:
    """Round a size up to a power of two, so a new token count does not retune."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()



def config_kwargs(config: triton.Config) -> dict:
    """Launch keyword arguments of a config (meta-parameters plus num_warps/num_stages)."""
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


def key_itemsize(key: tuple) -> int:
    """Bytes per element of the first torch dtype in a key (2 if the key holds none)."""
    return next((k.itemsize for k in key if isinstance(k, torch.dtype)), 2)


# ---- config spaces ------------------------------------------------------------------------


def elementwise_configs(arch: str | None = None) -> list[triton.Config]:
    """Block sizes for the memory-bound kernels; the interpreter (arch None) gets one config."""
    if arch is None:
        return [triton.Config({"BLOCK_SIZE": 1024}, num_warps=4)]
    if arch in ("sm90", "sm80"):  # HBM: many bytes in flight per SM
        blocks, warps = (1024, 2048, 4096, 8192, 16384), (4, 8, 16)
    elif arch in ("sm86", "sm89"):
        blocks, warps = (1024, 2048, 4096, 8192), (4, 8)
    else:
        blocks, warps = (1024, 2048, 4096), (4, 8)
    return [triton.Config({"BLOCK_SIZE": b}, num_warps=w) for b in blocks for w in warps]


def prune_elementwise(
    configs: list[triton.Config], key: tuple, arch: str | None = None
) -> list[triton.Config]:
    """Drop blocks larger than the (bucketed) tensor, and warps that would not each get a full
    16-byte vector per thread."""
    n_bucket, vector = key[0], 16 // key_itemsize(key)
    smallest = min(c.kwargs["BLOCK_SIZE"] for c in configs)
    return [
        c for c in configs
        if c.kwargs["BLOCK_SIZE"] <= max(n_bucket, smallest)
        and c.kwargs["BLOCK_SIZE"] >= c.num_warps * 32 * vector
    ]


# (BLOCK_SIZE_M, BLOCK_SIZE_N, BLOCK_SIZE_K, num_warps, num_stages) per architecture. Each space
# mixes the big tiles the forward matmul wants with tiles whose fused backward (which stages two
# (BM, BN) tiles, dy and z, per pipeline stage) still fits; ``prune_matmul`` keeps what fits.
# Small M (decode, M <= 64) keeps only tiles of at most 64 rows (see ``prune_matmul``): narrow
# 16- and 32-row tiles where mma.sync allows them (Ampere, Ada), 64 rows on Hopper (wgmma's
# warpgroup tile; the dW kernel's rows are BLOCK_SIZE_N, so that stays >= 64 there too). Split-K
# is left out: at M <= 64 the GELU epilogue would need a second pass after the K reduction, which
# is what the composed path (cuBLAS, then our GELU kernel) already is, and the path choice takes
# it wherever it is faster.
_MATMUL_TILES = {
    "sm90": (  # 227 KB; wgmma needs 64-row warpgroups, so no BLOCK_SIZE_M below 64
        (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 128, 8, 3),
        (64, 256, 64, 4, 4), (128, 128, 64, 8, 3), (128, 128, 32, 8, 3), (64, 256, 64, 8, 3),
        (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 128, 128, 4, 3), (128, 64, 128, 4, 3),
        (64, 64, 64, 4, 4),
        # decode (M <= 64): the weight streams through; deeper K tiles keep more bytes in flight
        (64, 64, 128, 4, 4), (64, 64, 256, 4, 3),
    ),
    "sm80": (  # 163 KB; the Triton matmul tutorial's A100 tiles, backward-sized and small-M ones
        (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (64, 256, 32, 4, 4), (128, 128, 32, 4, 4),
        (128, 128, 64, 8, 3), (128, 128, 32, 4, 3), (128, 256, 64, 8, 2), (64, 256, 32, 4, 3),
        (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (128, 64, 64, 4, 3), (64, 128, 64, 4, 3),
        (64, 64, 32, 4, 5), (32, 64, 32, 2, 5), (16, 128, 64, 4, 3),
        (16, 64, 128, 4, 4), (32, 64, 128, 4, 4),  # decode (M <= 64): narrow rows, deep K
    ),
    "sm86": (  # 99 KB and fewer SMs: smaller tiles, fewer stages
        (128, 256, 32, 8, 3), (128, 128, 64, 8, 3), (128, 128, 32, 4, 4), (64, 256, 32, 4, 4),
        (128, 128, 32, 8, 2), (128, 128, 64, 8, 2), (128, 64, 32, 4, 3), (64, 128, 32, 4, 3),
        (64, 64, 64, 4, 3), (64, 64, 32, 4, 4), (32, 64, 32, 2, 5), (16, 64, 64, 4, 3),
        (16, 64, 128, 4, 3),  # decode (M <= 64)
    ),
    "default": (  # fits 64 KB: safe on any GPU Triton supports
        (128, 128, 32, 4, 3), (64, 128, 32, 4, 3), (128, 64, 32, 4, 3), (64, 64, 32, 4, 3),
        (128, 64, 32, 4, 2), (64, 128, 32, 4, 2), (64, 64, 64, 4, 2), (64, 64, 32, 4, 2),
        (32, 64, 32, 2, 3), (32, 64, 64, 4, 2),
    ),
}
_MATMUL_TILES["sm89"] = _MATMUL_TILES["sm86"]


def matmul_configs(arch: str | None = None) -> list[triton.Config]:
    """Tiles for the matmul kernels (meta-parameters BLOCK_SIZE_M/N/K, GROUP_SIZE_M)."""
    if arch is None:
        return [triton.Config(
            {"BLOCK_SIZE_M": 32, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 4},
            num_warps=4, num_stages=1,
        )]
    return [
        triton.Config(
            {"BLOCK_SIZE_M": bm, "BLOCK_SIZE_N": bn, "BLOCK_SIZE_K": bk, "GROUP_SIZE_M": 8},
            num_warps=warps, num_stages=stages,
        )
        for bm, bn, bk, warps, stages in _MATMUL_TILES.get(arch, _MATMUL_TILES["default"])
    ]


# The Hopper variants' tiles (TMA loads, persistent grid: ``kernels/_matmul.py``), for sm90 and
# any later GPU (the Paths take them on compute capability 9.0+ only; ``prune_matmul`` drops what
# a smaller shared memory cannot hold). Fewer than the pointer kernels': TMA needs no tiles sized
# for the backward, and a persistent grid no small tiles to fill the SMs; the decode tile keeps a
# deep K. wgmma's 64-row warpgroups: no BLOCK_SIZE_M below 64. Left out because ptxas spills
# them (tests/aot_compile.py reads the stack frame of every compile): (128, 256, 64, 8, 3) and
# (128, 128, 64, 4, 4), whose float32 accumulator takes 128 registers a thread before the
# epilogue's (the pointer kernel's 128 x 256 tile spills too).
_TMA_MATMUL_TILES = (
    (128, 128, 64, 8, 4), (128, 128, 128, 8, 3), (128, 128, 64, 8, 3),
    (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 128, 4, 4),
)


# The warp-specialized tile of the linear forward's Hopper kernel (WARP_SPECIALIZE: tl.range's
# warp_specialize on its tile loop, not flattened): a producer warp issues the TMA loads while one
# warpgroup of 4 warps runs wgmma and the epilogue with more registers (setmaxnreg). Compiled for
# sm90 by Triton 3.6 and 3.9 it takes 168 registers and no stack, where the same tile without it
# spills (above); with 8 warps Triton does not specialize.
_TMA_WARP_SPECIALIZED_TILE = (128, 128, 64, 4, 4)


def tma_matmul_configs(arch: str | None = None) -> list[triton.Config]:
    """Tiles for the Hopper matmul kernels; the interpreter gets the pointer kernels' one."""
    if arch is None:
        return matmul_configs(None)
    return [
        triton.Config(
            {"BLOCK_SIZE_M": bm, "BLOCK_SIZE_N": bn, "BLOCK_SIZE_K": bk, "GROUP_SIZE_M": 8},
            num_warps=warps, num_stages=stages,
        )
        for bm, bn, bk, warps, stages in _TMA_MATMUL_TILES
    ]


def tma_dropout_configs(arch: str | None = None) -> list[triton.Config]:
    """``tma_matmul_configs`` for the linear forward's Hopper kernel (which takes
    WARP_SPECIALIZE) with dropout in its epilogue: none warp-specialized (with the Philox
    epilogue Triton 3.9 does not specialize the tile, and it spills 1.7 KB)."""
    return [triton.Config({**c.kwargs, "WARP_SPECIALIZE": False}, num_warps=c.num_warps,
                          num_stages=c.num_stages) for c in tma_matmul_configs(arch)]


def tma_linear_configs(arch: str | None = None) -> list[triton.Config]:
    """``tma_dropout_configs`` and, last, the warp-specialized tile (on a GPU)."""
    bm, bn, bk, warps, stages = _TMA_WARP_SPECIALIZED_TILE
    specialized = [] if arch is None else [triton.Config(
        {"BLOCK_SIZE_M": bm, "BLOCK_SIZE_N": bn, "BLOCK_SIZE_K": bk, "GROUP_SIZE_M": 8,
         "WARP_SPECIALIZE": True}, num_warps=warps, num_stages=stages)]
    return tma_dropout_configs(arch) + specialized


def tile_configs(arch: str | None = None) -> list[triton.Config]:
    """(BLOCK_SIZE_M, BLOCK_SIZE_N) tiles for elementwise kernels over an (M, N) matrix whose
    programs each cover ``TILE_ROWS`` rows (the backward's dz kernel)."""
    if arch is None:
        return [triton.Config({"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32}, num_warps=4)]
    tiles = ((16, 256, 4), (32, 256, 8), (8, 512, 4), (16, 512, 8), (32, 128, 4), (64, 128, 8),
             (64, 64, 4), (16, 128, 4))
    return [triton.Config({"BLOCK_SIZE_M": bm, "BLOCK_SIZE_N": bn}, num_warps=w)
            for bm, bn, w in tiles]


# Rows each program of a ``tile_configs`` kernel covers (a multiple of every BLOCK_SIZE_M): the
# dz kernel's db partial sums are (cdiv(M, TILE_ROWS), N), whatever tile the tuner picks.
TILE_ROWS = 64


def prune_tiles(
    configs: list[triton.Config], key: tuple, arch: str | None = None
) -> list[triton.Config]:
    """``key`` starts with (bucket(M), N): drop tiles far larger than the matrix, and warps that
    would not each get a full 16-byte vector per thread."""
    m_bucket, n, vector = key[0], key[1], 16 // key_itemsize(key)
    smallest_m = min(c.kwargs["BLOCK_SIZE_M"] for c in configs)
    smallest_n = min(c.kwargs["BLOCK_SIZE_N"] for c in configs)
    kept = [
        c for c in configs
        if c.kwargs["BLOCK_SIZE_M"] <= max(m_bucket, smallest_m)
        and c.kwargs["BLOCK_SIZE_N"] <= max(bucket(n), smallest_n)
        and c.kwargs["BLOCK_SIZE_M"] * c.kwargs["BLOCK_SIZE_N"] >= c.num_warps * 32 * vector
    ]
    return kept or configs[:1]


def config_id(config: triton.Config) -> tuple:
    return tuple(sorted(config.kwargs.items())), config.num_warps, config.num_stages


REDUCTIONS = ("K", "N", "M")


def matmul_smem_bytes(
    config: triton.Config, itemsize: int, arch: str | None = None, reduction: str = "K",
    gated: bool = False, persistent: bool = False,
) -> int:
    """Shared memory Triton allocates for a matmul config, estimated per pipeline stage.

    ``reduction`` names the dimension the kernel loops over, which decides its operand tiles:

    - "K", y = x @ W^T: an x (BM, BK) and a W (BK, BN) tile;
    - "N", dx = dz @ W: the dy and z (BM, BN) tiles dz is built from, and a W (BN, BK) tile;
    - "M", dW = dz^T @ x: the dy and z (BM, BN) tiles, an x (BM, BK) tile, and db's partial
      sums (up to 32 bytes per column).

    ``gated`` is the GeGLU kernels' version of each role (``kernels/geglu.py``): two weights,
    W_gate and W_up, so two W tiles where there was one ("K", "N"); the gradient tiles are built
    from three (BM, BN) tiles, dh, g and u, instead of two ("N", "M"); and "M" sums two biases.

    Triton keeps num_stages - 1 buffers of each tile, and on sm90 (and, to be safe, on unknown
    GPUs) num_stages buffers of the tiles fed straight to the tensor cores. Fitted on sm80 and
    sm90 compiles of the package's kernels with Triton 3.6 and 3.9 (tests/aot_compile.py):
    never below the real figure near the limits, and within a few KB above it.

    ``persistent``: the Hopper kernels (TMA, persistent grid, a flattened tile loop): num_stages
    buffers of the operand tiles, and at most one (BM, BN) tile in the input dtype more, which
    the epilogue of a flattened loop takes while the next tile's loads are in flight (sm90
    compiles with Triton 3.9: from a quarter of that tile to all of it).
    """
    if persistent:
        bm, bn, bk = (config.kwargs[f"BLOCK_SIZE_{d}"] for d in "MNK")
        weights = 2 if gated else 1
        return (config.num_stages * (bm * bk + weights * bk * bn) + bm * bn) * itemsize + 1024
    bm, bn, bk = (config.kwargs[f"BLOCK_SIZE_{d}"] for d in "MNK")
    weights, grad_inputs = (2, 3) if gated else (1, 2)
    staged, direct = {"K": (0, bm * bk + weights * bk * bn),
                      "N": (grad_inputs * bm * bn, weights * bn * bk),
                      "M": (grad_inputs * bm * bn, bm * bk)}[reduction]
    stages = config.num_stages
    direct_buffers = stages - 1 if arch in ("sm80", "sm86", "sm89") else stages
    extra = 32 * bn * weights if reduction == "M" else 0
    return ((stages - 1) * staged + direct_buffers * direct) * itemsize + extra


def prune_matmul(
    configs: list[triton.Config], key: tuple, arch: str | None = None,
    reduction: str | None = None, gated: bool = False, persistent: bool = False,
) -> list[triton.Config]:
    """Drop tiles that cannot fit in shared memory, and tiles far larger than the problem.

    ``key`` starts with (bucket(M), N, K). A tile side may be at most the problem's side rounded
    up to a power of two, or 64 (tensor-core instructions pad smaller tiles to 64 rows anyway,
    and a small-M problem is bound by reading the weight, not by the wasted rows).

    ``reduction`` ("K", "N" or "M", see ``matmul_smem_bytes``) says which kernel the configs are
    for; without it a tile must fit as any of the three, which is safe but keeps the forward
    from its biggest tiles. Pass it per tuner: ``functools.partial(prune_matmul, reduction="N")``
    (and ``gated=True`` for the GeGLU kernels, ``persistent=True`` for the Hopper ones).
    """
    itemsize = key_itemsize(key)
    limit = SMEM_BYTES.get(arch or "default", SMEM_BYTES["default"])
    roles = REDUCTIONS if reduction is None else (reduction,)

    def smem(c: triton.Config) -> int:
        return max(matmul_smem_bytes(c, itemsize, arch, r, gated, persistent) for r in roles)

    bounds = {dim: max(bucket(size), 64) for dim, size in zip("MNK", key[:3])}
    kept = [
        c for c in configs
        if all(c.kwargs[f"BLOCK_SIZE_{d}"] <= bounds[d] for d in "MNK") and smem(c) <= limit
    ]
    if kept:
        return kept
    # Nothing fits (float32 in a kernel that stages many tiles, like the gated dx): the smallest
    # tile with as many pipeline stages as fit, else the smallest tile as it is.
    smallest = min(configs, key=smem)
    for stages in range(smallest.num_stages - 1, 0, -1):
        fewer = triton.Config(dict(smallest.kwargs), num_warps=smallest.num_warps,
                              num_stages=stages)
        if smem(fewer) <= limit:
            return [fewer]
    return [smallest]
