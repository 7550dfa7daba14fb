"""Autotuning: config spaces per architecture, problem keys, pruning, the choice of a kernel's
config (``Tuner``) and of an op's path (``Paths``), and where those choices are remembered.

A ``Tuner`` wraps one ``@triton.jit`` kernel and picks its launch config per problem key; a
``Paths`` picks, per problem key, between the named ways of computing one op (the fused Triton
kernel, cuBLAS plus an elementwise kernel, PyTorch's own op). Both answer a launch with one dict
lookup when warm. On a miss they decide, in this order:

1. a forced path (``Paths`` only: ``TRITON_GELU_PATH`` / ``force_path``, ``_settings.py``);
2. the on-disk cache of this device, Triton version and kernel source (JSON in
   ``_cache.cache_dir()``; under the ``full`` policy only entries that were tuned under ``full``);
3. no timing while a CUDA stream captures a graph or under the ``off`` policy: the cache entry,
   else the shipped table's (``_table.py``), else the default (a Tuner: the first config of its
   pruned space; a Paths: its ``untuned`` path), with one warning per problem under capture;
4. otherwise timing, holding the cache file's inter-process lock (``_cache.locked``) and
   re-reading the file first, so that of many processes tuning the same key only the first
   times it: ``full`` times every config of the pruned space, ``fast`` (the default) the
   table's config (or, without one, the table's nearest problem's) and its ``NEIGHBOURS``
   nearest configs, every config where the table has nothing; paths are all timed under both.
   Each candidate is timed with ``triton.testing.do_bench`` (median), a path after one warm-up
   call (which also lets the Tuners inside it tune); the fastest is written to the cache with
   every candidate's time.

The cache is one JSON file per (kernel or op, device name, Triton version, hash of the source of
the kernel and of every ``@triton.jit`` helper it calls), so editing a kernel or its math retunes
and nothing else does; a path file also names the torch version (cuBLAS comes with it). It lives
in ``$TRITON_GELU_CACHE_DIR``, else ``$XDG_CACHE_HOME/triton_gelu``, else
``~/.cache/triton_gelu``; delete the directory (or run ``python -m triton_gelu.autotune
--clear``) to forget every tuning. Files are written atomically; an unreadable file, and an entry
that is no longer in its pruned config space, are ignored.

Under the Triton interpreter nothing is timed (the interpreter cannot benchmark) and nothing is
read or written: a kernel runs with the single small config of the interpreter's space and an op
with its ``default`` path. A timing function can be injected (``Tuner(..., bench=fake)``,
``Paths(..., bench=fake)``) so the whole logic, caching and locking included, runs on the CPU.

Key conventions: elementwise kernels key on ``(bucket(numel), dtype, ...)``, matmul kernels on
``(bucket(M), N, K, dtype, ...)``. Config spaces are ``configs(arch)`` and prune functions
``prune(configs, key, arch)``, where ``arch`` is ``"sm90"``, ``"sm80"``, ``"sm86"``, ``"sm89"``,
``"default"`` (any other GPU) or ``None`` (the interpreter).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import math
import re
import time
import types
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl

from . import _table
from ._cache import cache_dir, clear_cache, locked, read_entries, write_document  # noqa: F401
from ._runtime import capturing, interpreting, path_runs, record_launch
from ._settings import PATH_ENV, forced_path, tune_policy

Grid = Callable[[dict], tuple]
Bench = Callable[[Callable[[], None]], float]

# Shared memory a block may use (opt-in maximum), per architecture; "default" is conservative
# (sm75, AMD LDS). ``matmul_smem_bytes`` estimates what Triton allocates; a config that passes the
# estimate and still fails to compile is timed as infinitely slow.
SMEM_BYTES = {"sm90": 232448, "sm80": 166912, "sm86": 101376, "sm89": 101376, "default": 65536}
_ARCH_OF_CAPABILITY = {(9, 0): "sm90", (8, 0): "sm80", (8, 6): "sm86", (8, 9): "sm89"}


def bucket(n: int) -> int:
    """Round a size up to a power of two, so a new token count does not retune."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def arch_of(capability: tuple[int, int], hip: bool = False) -> str:
    """The config-space name of a CUDA compute capability ("default" for ROCm and the rest)."""
    return "default" if hip else _ARCH_OF_CAPABILITY.get(tuple(capability), "default")


def config_kwargs(config: triton.Config) -> dict:
    """Launch keyword arguments of a config (meta-parameters plus num_warps/num_stages)."""
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


def _key_itemsize(key: tuple) -> int:
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
    n_bucket, vector = key[0], 16 // _key_itemsize(key)
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
    m_bucket, n, vector = key[0], key[1], 16 // _key_itemsize(key)
    smallest_m = min(c.kwargs["BLOCK_SIZE_M"] for c in configs)
    smallest_n = min(c.kwargs["BLOCK_SIZE_N"] for c in configs)
    kept = [
        c for c in configs
        if c.kwargs["BLOCK_SIZE_M"] <= max(m_bucket, smallest_m)
        and c.kwargs["BLOCK_SIZE_N"] <= max(bucket(n), smallest_n)
        and c.kwargs["BLOCK_SIZE_M"] * c.kwargs["BLOCK_SIZE_N"] >= c.num_warps * 32 * vector
    ]
    return kept or configs[:1]


# ---- neighbours: the short list the fast policy times ---------------------------------------

NEIGHBOURS = 4


def _config_id(config: triton.Config) -> tuple:
    return tuple(sorted(config.kwargs.items())), config.num_warps, config.num_stages


def config_distance(a: triton.Config, b: triton.Config) -> float:
    """Steps between two configs of one space: the sum of |log2| of the ratio of each
    power-of-two parameter (block sizes, GROUP_SIZE_M, num_warps) plus the difference in
    num_stages; infinite between configs with different meta-parameters."""
    if a.kwargs.keys() != b.kwargs.keys():
        return math.inf
    pairs = [(a.kwargs[k], b.kwargs[k]) for k in a.kwargs] + [(a.num_warps, b.num_warps)]
    return sum(abs(math.log2(x) - math.log2(y)) for x, y in pairs) \
        + abs(a.num_stages - b.num_stages)


def neighbourhood(
    seed: triton.Config, configs: list[triton.Config], count: int = NEIGHBOURS
) -> list[triton.Config]:
    """The fast policy's candidates: ``seed`` and the ``count`` configs of ``configs`` (a pruned
    space) nearest to it by ``config_distance``, ties in the space's order."""
    others = [c for c in configs if _config_id(c) != _config_id(seed)]
    others.sort(key=lambda c: config_distance(seed, c))  # stable: keeps the space's order
    return [seed, *others[:count]]


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
    itemsize = _key_itemsize(key)
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


# ---- what the cache is keyed on ------------------------------------------------------------


def _python_fn(obj):
    """The Python function under a ``@triton.jit`` object (JIT or interpreted, possibly wrapped
    by triton.autotune / heuristics), else None."""
    if not hasattr(obj, "arg_names"):
        return None
    while not isinstance(obj, types.FunctionType) and hasattr(obj, "fn"):
        obj = obj.fn
    return obj if isinstance(obj, types.FunctionType) else None


def source_hash(kernel) -> str:
    """sha256 of the kernel's source and, transitively, of every @triton.jit helper it calls and
    every constexpr global it reads (looked up by name, also one module attribute deep)."""
    digest, seen = hashlib.sha256(), set()

    def visit(fn: types.FunctionType) -> None:
        if fn in seen:
            return
        seen.add(fn)
        try:
            digest.update(inspect.getsource(fn).encode())
        except (OSError, TypeError):  # no source file: fall back to the bytecode
            digest.update(fn.__code__.co_code)
        names = fn.__code__.co_names
        for name in names:
            value = fn.__globals__.get(name)
            targets = [value]
            if isinstance(value, types.ModuleType):
                targets = [getattr(value, attr, None) for attr in names]
            for target in targets:
                inner = _python_fn(target)
                if inner is not None:
                    visit(inner)
                elif target is value and isinstance(value, tl.constexpr):
                    digest.update(f"{name}={value.value!r}".encode())

    visit(_python_fn(kernel) or kernel)
    return digest.hexdigest()


@dataclass(frozen=True)
class Device:
    """What the tuner needs to know about the device a launch runs on."""

    index: int  # -1: the Triton interpreter
    name: str
    arch: str | None


_devices: dict[int, Device] = {}


def device_of(index: int) -> Device:
    """Describe CUDA device ``index`` (queried once, at the first launch on it)."""
    device = _devices.get(index)
    if device is None:
        if index < 0:
            device = Device(index, "interpreter", None)
        else:
            capability = torch.cuda.get_device_capability(index)
            arch = arch_of(capability, hip=torch.version.hip is not None)
            device = Device(index, torch.cuda.get_device_name(index), arch)
        _devices[index] = device
    return device


def key_string(key: tuple) -> str:
    """A stable text form of a key for the JSON cache: ``8192|torch.bfloat16|False``."""
    return "|".join(str(k) for k in key)


_KEY_WORDS = {"True": True, "False": False, "None": None}


def parse_key(text: str) -> tuple:
    """The key a ``key_string`` text stands for (sizes, torch dtypes, flags, strings)."""
    def field(part: str):
        if part.isdigit():
            return int(part)
        if part in _KEY_WORDS:
            return _KEY_WORDS[part]
        dtype = getattr(torch, part.removeprefix("torch."), None) if part.startswith("torch.") \
            else None
        return dtype if isinstance(dtype, torch.dtype) else part
    return tuple(field(part) for part in text.split("|"))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "device"


# ---- what every chooser shares: memory, disk, table, policy, capture, lock ------------------

# Seconds spent timing candidates in this process (the bench reports it per first call); a
# path's timing includes the Tuners tuning inside it, so only the outermost timing counts.
tuned_seconds = 0.0
_timing_depth = 0


class UntunedWarning(UserWarning):
    """A problem met first while a CUDA graph was being captured ran with an untimed choice."""


def _valid_ms(ms: float) -> float | None:
    return None if math.isinf(ms) or math.isnan(ms) else ms


class _Chooser:
    """Where a Tuner's or a Paths' choices are remembered, and when it may time.

    Subclasses give ``section`` (their part of the shipped table), ``_compute_hash`` and
    ``cache_path``; ``_decide`` runs steps 2-4 of the module docstring for one problem.
    """

    section = ""

    def __init__(self, name: str, bench: Bench | None) -> None:
        self.name = name
        self.bench = bench
        self._interpreted = interpreting()
        self._source_hash: str | None = None
        self._disk_entries: dict[int, dict[str, dict]] = {}  # device index -> cache entries
        self._warned: set[str] = set()
        # (device index, key) -> what to launch: the hot path's one lookup; and every choice
        # made, with how (the CLI and the bench report them).
        self.best: dict[tuple, object] = {}
        self.choices: dict[tuple, Any] = {}  # -> Choice (Tuner) or PathChoice (Paths)

    @property
    def tunes(self) -> bool:
        """Whether misses may be timed: on a GPU; under the interpreter only with a bench."""
        return self.bench is not None or not self._interpreted

    @property
    def source_hash(self) -> str:
        if self._source_hash is None:
            self._source_hash = self._compute_hash()
        return self._source_hash

    def _compute_hash(self) -> str:
        raise NotImplementedError

    def cache_path(self, device: Device) -> Path:
        raise NotImplementedError

    def forget(self) -> None:
        """Forget what this process chose and read (the files on disk stay)."""
        self._disk_entries.clear()
        self._warned.clear()
        self.best.clear()
        self.choices.clear()

    def _disk(self, device: Device) -> dict[str, dict]:
        entries = self._disk_entries.get(device.index)
        if entries is None:
            entries = self._disk_entries[device.index] = read_entries(self.cache_path(device))
        return entries

    def _table(self, device: Device) -> dict[str, dict]:
        return _table.section_entries(device.arch, self.section, self.name, self.source_hash)

    def _save(self, device: Device, key_text: str, entry: dict) -> None:
        path = self.cache_path(device)
        entries = read_entries(path)  # another process may have added entries meanwhile
        entries[key_text] = entry
        self._disk_entries[device.index] = entries
        write_document(path, {
            "kind": self.section, "name": self.name, "device": device.name, "arch": device.arch,
            "triton": triton.__version__, "torch": torch.__version__,
            "source_hash": self.source_hash, "entries": entries,
        })

    def _warn_untuned(self, key_text: str, source: str) -> None:
        if key_text in self._warned:
            return
        self._warned.add(key_text)
        what = "the shipped table's choice" if source == "table" else "its default"
        warnings.warn(
            f"triton_gelu: {self.name} [{key_text}] was first met during CUDA-graph capture, "
            f"where nothing may be timed; it runs {what}, untuned. Run one step before "
            "capturing (or triton_gelu.autotune.warmup(model, inputs)) to tune it.",
            UntunedWarning, stacklevel=5,
        )

    def _decide(
        self, device: Device, key: tuple,
        tune: Callable[[dict | None], dict | None],
        untuned: Callable[[], dict],
        valid: Callable[[object], bool],
    ) -> tuple[dict | None, str, bool]:
        """(entry, source, final) for ``key``; ``final`` is False for a choice made under capture,
        which a later uncaptured call may time. ``tune(seed)`` times candidates and returns the
        winning entry (None if none ran); ``untuned()`` is the default entry; ``valid(entry)``
        says whether an entry from disk or the table is usable here."""
        global tuned_seconds, _timing_depth
        key_text = key_string(key)
        policy = tune_policy()
        entry = self._disk(device).get(key_text)
        if valid(entry) and (policy != "full" or entry.get("policy", "full") == "full"):
            return entry, "cache", True
        under_capture = capturing()
        if under_capture or policy == "off":
            if valid(entry):
                return entry, "cache", True
            table_entry = self._table(device).get(key_text)
            entry, source = (table_entry, "table") if valid(table_entry) else (untuned(), "default")
            if under_capture:
                self._warn_untuned(key_text, source)
            return entry, source, not under_capture
        path = self.cache_path(device)
        with locked(path):
            self._disk_entries.pop(device.index, None)  # re-read: another process may have tuned
            entry = self._disk(device).get(key_text)
            if valid(entry) and (policy != "full" or entry.get("policy", "full") == "full"):
                return entry, "cache", True
            seed = None
            if policy == "fast":
                table = self._table(device)
                seed = table.get(key_text) if valid(table.get(key_text)) else None
                if seed is None:
                    near = _table.nearest(table, key_text)
                    seed = near if valid(near) else None
            start = time.perf_counter()
            _timing_depth += 1
            try:
                entry = tune(seed)
            finally:
                _timing_depth -= 1
                if _timing_depth == 0:
                    tuned_seconds += time.perf_counter() - start
            if entry is not None:
                entry = {**entry, "policy": policy}
                self._save(device, key_text, entry)
        return entry, "tuned", True


def _do_bench(fn: Callable[[], None]) -> float:
    return triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median")


# ---- config choice --------------------------------------------------------------------------


class Choice(NamedTuple):
    config: triton.Config
    ms: float  # measured when tuned (NaN when nothing was timed here)
    source: str  # "tuned", "cache", "table", "default" or "only" (nothing could be timed)


def config_entry(config: triton.Config, ms: float | None = None) -> dict:
    """A config as a cache or table entry."""
    return {"kwargs": dict(config.kwargs), "num_warps": config.num_warps,
            "num_stages": config.num_stages, "ms": ms}


def _entry_config(entry: object) -> triton.Config | None:
    """The config recorded by an entry, or None if the entry is missing or malformed."""
    try:
        return triton.Config(dict(entry["kwargs"]), num_warps=int(entry["num_warps"]),
                             num_stages=int(entry["num_stages"]))
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def _takes(fn: Callable | None, n_args: int) -> bool:
    if fn is None:
        return False
    try:
        inspect.signature(fn).bind(*range(n_args))
        return True
    except (TypeError, ValueError):
        return False


# Every tuner by name, so ``python -m triton_gelu.autotune`` can report what each one chose.
tuners: dict[str, Tuner] = {}


class Tuner(_Chooser):
    """Pick, remember and persist the fastest config of ``configs(arch)`` for each problem key.

    ``bench`` times a zero-argument callable and returns milliseconds; the default is
    ``triton.testing.do_bench``. Passing one also enables tuning under the interpreter (tests).
    """

    section = "tuners"

    def __init__(
        self,
        kernel,
        name: str,
        configs: Callable[..., list[triton.Config]],
        prune: Callable[..., list[triton.Config]] | None = None,
        bench: Bench | None = None,
    ) -> None:
        super().__init__(name, bench)
        self.kernel = kernel
        self.configs = configs
        self.prune = prune
        # Older call sites pass configs() and prune(configs, key) without the arch argument.
        self._configs_take_arch = _takes(configs, 1)
        self._prune_takes_arch = _takes(prune, 3)
        # best: (device index, key) -> (meta-parameters, launch kwargs); choices: -> Choice
        tuners[name] = self

    def _compute_hash(self) -> str:
        return source_hash(self.kernel)

    def cache_path(self, device: Device) -> Path:
        version = _slug(triton.__version__)
        return cache_dir() / (f"{self.name}.{_slug(device.name)}.triton-{version}."
                              f"{self.source_hash[:16]}.json")

    def pruned_space(self, key: tuple, arch: str | None) -> list[triton.Config]:
        """The config space of ``arch``, pruned for ``key``."""
        configs = self.configs(arch) if self._configs_take_arch else self.configs()
        if self.prune is not None:
            pruned = (self.prune(configs, key, arch) if self._prune_takes_arch
                      else self.prune(configs, key))
            configs = pruned or configs[:1]
        return configs

    def candidates(self, key: tuple, arch: str | None) -> list[triton.Config]:
        """The pruned config space of ``arch`` for ``key`` (the space's first config alone when
        nothing can be timed)."""
        if not self.tunes:
            configs = self.configs(arch) if self._configs_take_arch else self.configs()
            return configs[:1]
        return self.pruned_space(key, arch)

    # ---- tuning ----

    def _time(self, grid: Grid, config: triton.Config, kwargs: dict) -> float:
        launch = config_kwargs(config)
        bench = self.bench or _do_bench
        try:
            return float(bench(lambda: self.kernel[grid(config.kwargs)](**kwargs, **launch)))
        except Exception:  # a config that does not compile or fit on this device
            return math.inf

    def choose(self, slot: tuple, grid: Grid, kwargs: dict) -> Choice:
        """Config for ``slot`` = (device index, key), decided now (see the module docstring)."""
        return self._choose(slot, grid, kwargs)[0]

    def _choose(self, slot: tuple, grid: Grid, kwargs: dict,
                aliased: tuple[str, ...] = ()) -> tuple[Choice, bool]:
        """(choice, final): a choice made under CUDA-graph capture is not final."""
        device = device_of(slot[0])
        key = slot[1]
        candidates = self.candidates(key, device.arch)
        if not self.tunes:
            return Choice(candidates[0], math.nan, "only"), True
        allowed = {_config_id(c) for c in candidates}

        def valid(entry: object) -> bool:
            config = _entry_config(entry)
            return config is not None and _config_id(config) in allowed

        def tune(seed: dict | None) -> dict | None:
            configs = candidates if seed is None else neighbourhood(
                next(c for c in candidates if _config_id(c) == _config_id(_entry_config(seed))),
                candidates)
            # An output that is also an input (in place) is timed into a copy: the kernel must
            # run once, on the real tensors, after the choice.
            timed_kwargs = {**kwargs, **{name: kwargs[name].clone() for name in aliased}}
            times = [self._time(grid, c, timed_kwargs) for c in configs]
            best = min(range(len(configs)), key=times.__getitem__)
            return None if math.isinf(times[best]) else config_entry(configs[best], times[best])

        entry, source, final = self._decide(
            device, key, tune, lambda: config_entry(candidates[0]), valid)
        if entry is None:  # nothing ran: launch the first config so its error surfaces
            return Choice(candidates[0], math.inf, "tuned"), True
        ms = entry.get("ms")
        return Choice(_entry_config(entry), math.nan if ms is None else float(ms), source), final

    def _current_device(self) -> int:
        return -1 if self._interpreted else torch.cuda.current_device()

    def smallest(self, meta: str) -> int:
        """The smallest value of meta-parameter ``meta`` in this tuner's config space on the
        current device: a kernel whose output size depends on its tile (one row of partial sums
        per tile) gets a buffer sized for any config it may be launched with."""
        arch = device_of(self._current_device()).arch
        configs = self.configs(arch) if self._configs_take_arch else self.configs()
        return min(c.kwargs[meta] for c in configs)

    def run(self, grid: Grid, key: tuple, *, aliased: tuple[str, ...] = (), **kwargs) -> dict:
        """Launch the kernel with the tuned config for ``key``; kwargs are the kernel arguments.
        Returns the meta-parameters it launched with.

        Tuning launches the kernel several times on the real arguments, so kernels must be
        idempotent (pure stores, no accumulation into their outputs); an output that aliases an
        input (an in-place launch) is named in ``aliased`` and timed into a copy instead.
        """
        slot = (self._current_device(), key)
        launch = self.best.get(slot)
        if launch is None:
            choice, final = self._choose(slot, grid, kwargs, aliased)
            self.choices[slot] = choice
            launch = (choice.config.kwargs, config_kwargs(choice.config))
            if final:
                self.best[slot] = launch
        record_launch(self.name)
        self.kernel[grid(launch[0])](**kwargs, **launch[1])
        return launch[0]


# ---- path choice: one op, several ways to compute it ----------------------------------------


class PathChoice(NamedTuple):
    path: str
    ms: float  # the winner's time when timed (NaN when nothing was timed here)
    candidates: dict[str, float | None]  # every path timed -> ms (None: it failed)
    source: str  # "tuned", "cache", "table", "default", "only" or "forced"


# Every op with paths by name, for the CLI, the exporter and the tests.
path_choosers: dict[str, Paths] = {}
_recorders: list[list[tuple[str, PathChoice]]] = []


@contextlib.contextmanager
def recording_paths() -> Iterator[list[tuple[str, PathChoice]]]:
    """Collect (op, choice) for every path run inside the block (the bench's "path" column)."""
    seen: list[tuple[str, PathChoice]] = []
    _recorders.append(seen)
    try:
        yield seen
    finally:
        _recorders.remove(seen)


def _callable_text(fn: Callable) -> str:
    """The source of a path callable, for the cache key (its qualified name if it has none);
    never a repr, which could hold a memory address."""
    fn = inspect.unwrap(fn)
    if isinstance(fn, functools.partial):
        return _callable_text(fn.func)
    try:
        return inspect.getsource(fn)
    except (OSError, TypeError):
        return f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', type(fn).__name__)}"


PathName = str | Callable[[tuple], str]


class Paths(_Chooser):
    """The named ways to compute one op, and the choice between them per problem key.

    ``paths`` maps a name to a callable; every callable takes the op's arguments and returns the
    op's outputs as new tensors (never writing into its inputs), with results within the suite's
    tolerance rules, so any of them may serve any call.

    - ``default``: the path where nothing can be timed and nothing is known: under the Triton
      interpreter (so the test suite runs the kernels) and, unless ``untuned`` says otherwise,
      on a GPU under the ``off`` policy or CUDA-graph capture;
    - ``untuned``: the path on a GPU for a problem that may not be timed (policy ``off``,
      capture) and has no cached or shipped choice; the safe one, e.g. cuBLAS + our GELU;
    - both may be a name or a function of the key returning one; the arguments below are
      optional and keyword-only;
    - ``applies``: {name: predicate(*args, **kwargs)}: a path whose predicate is false is not a
      candidate for that problem (e.g. cuBLASLt's GELU epilogue only has the tanh form); it is
      asked on a miss only, so it must depend on nothing but the key and the device;
    - ``kernels``: the Tuners (or ``@triton.jit`` kernels) the paths launch; the cache and the
      table are keyed on their source hashes and the paths' own source. Default: every Tuner
      registered when the op first tunes (safe: any kernel edit retunes the choice);
    - ``bench``: a timing function (tests), as for ``Tuner``.

    A path forced with ``$TRITON_GELU_PATH`` or ``triton_gelu.autotune.force_path``
    (``_settings.py``) always wins where it applies (where it does not, a warning says so once
    and the op chooses as usual).
    """

    section = "paths"

    def __init__(
        self, op: str, paths: dict[str, Callable], default: PathName, *,
        untuned: PathName | None = None,
        applies: dict[str, Callable[..., bool]] | None = None,
        kernels: Iterable | None = None,
        bench: Bench | None = None,
    ) -> None:
        super().__init__(op, bench)
        for what, name in (("default", default), ("untuned", untuned)):
            if isinstance(name, str) and name not in paths:
                raise ValueError(f"{what} path {name!r} of {op} is not one of {list(paths)}")
        unknown = set(applies or ()) - set(paths)
        if unknown:
            raise ValueError(f"applies names unknown paths of {op}: {sorted(unknown)}")
        self.op = op
        self.paths = paths
        self.default = default
        self.untuned = default if untuned is None else untuned
        self.applies = dict(applies or {})
        self.kernels = None if kernels is None else list(kernels)
        # best: (device index, key) -> path name; choices: -> PathChoice
        self._forced_warned: set[str] = set()
        path_choosers[op] = self

    def _compute_hash(self) -> str:
        digest = hashlib.sha256(self.op.encode())
        for name, fn in self.paths.items():
            digest.update(f"\0{name}\0{_callable_text(fn)}".encode())
        kernels = self.kernels if self.kernels is not None else list(tuners.values())
        for kernel in sorted(kernels, key=lambda k: getattr(k, "name", "")):
            digest.update((kernel.source_hash if isinstance(kernel, Tuner)
                           else source_hash(kernel)).encode())
        return digest.hexdigest()

    def cache_path(self, device: Device) -> Path:
        versions = f"triton-{_slug(triton.__version__)}.torch-{_slug(torch.__version__)}"
        return cache_dir() / f"paths.{self.op}.{_slug(device.name)}.{versions}." \
                             f"{self.source_hash[:16]}.json"

    def applicable(self, args: tuple, kwargs: dict) -> list[str]:
        """The paths that can compute this call, in registration order."""
        return [name for name in self.paths
                if name not in self.applies or self.applies[name](*args, **kwargs)]

    @staticmethod
    def _name(spec: PathName, key: tuple, names: list[str]) -> str:
        name = spec(key) if callable(spec) else spec
        return name if name in names else names[0]

    def _device_index(self, args: tuple) -> int:
        if self._interpreted:
            return -1
        tensor = next((a for a in args if isinstance(a, torch.Tensor)), None)
        return -1 if tensor is None else tensor.get_device()  # -1 on the CPU

    def _time(self, names: list[str], args: tuple, kwargs: dict) -> dict | None:
        bench = self.bench or _do_bench
        times = {}
        for name in names:
            def call(fn=self.paths[name]):
                return fn(*args, **kwargs)
            try:
                call()  # warm-up: compiles, and lets the Tuners inside the path tune first
                times[name] = float(bench(call))
            except Exception:  # a path that cannot run this problem on this device
                times[name] = math.inf
        best = min(names, key=times.__getitem__)
        if math.isinf(times[best]):
            return None
        return {"path": best, "ms": times[best],
                "candidates": {name: _valid_ms(ms) for name, ms in times.items()}}

    def _choose(self, slot: tuple, args: tuple, kwargs: dict) -> tuple[PathChoice, bool]:
        key = slot[1]
        names = self.applicable(args, kwargs)
        if len(names) == 1:
            return PathChoice(names[0], math.nan, {}, "only"), True
        if not self.tunes:
            return PathChoice(self._name(self.default, key, names), math.nan, {}, "default"), True

        def valid(entry: object) -> bool:
            return isinstance(entry, dict) and entry.get("path") in names

        entry, source, final = self._decide(
            device_of(slot[0]), key, lambda seed: self._time(names, args, kwargs),
            lambda: {"path": self._name(self.untuned, key, names), "ms": None, "candidates": {}},
            valid)
        if entry is None:  # no path ran: take the default, so its error surfaces
            return PathChoice(self._name(self.default, key, names), math.inf, {}, "tuned"), True
        ms = entry.get("ms")
        return PathChoice(entry["path"], math.nan if ms is None else float(ms),
                          dict(entry.get("candidates", {})), source), final

    def choose(self, key: tuple, args: tuple, kwargs: dict) -> str:
        """The path for ``key`` and these arguments: forced, remembered, or decided now."""
        return self._resolve(key, args, kwargs)[0]

    def _forced(self, forced: str, args: tuple, kwargs: dict) -> str | None:
        if forced not in self.paths:
            raise ValueError(
                f"{PATH_ENV} / force_path asks {self.op} for path {forced!r}; "
                f"its paths are {', '.join(self.paths)}"
            )
        if forced in self.applies and not self.applies[forced](*args, **kwargs):
            if forced not in self._forced_warned:
                self._forced_warned.add(forced)
                warnings.warn(f"triton_gelu: path {forced!r} of {self.op} is forced but does not "
                              "apply to this problem; choosing as usual", stacklevel=5)
            return None
        return forced

    def _resolve(self, key: tuple, args: tuple, kwargs: dict) -> tuple[str, PathChoice | None]:
        forced = forced_path(self.op)
        if forced is not None and self._forced(forced, args, kwargs) is not None:
            return forced, PathChoice(forced, math.nan, {}, "forced")
        slot = (self._device_index(args), key)
        name = self.best.get(slot)
        if name is not None:
            return name, None
        choice, final = self._choose(slot, args, kwargs)
        self.choices[slot] = choice
        if final:
            self.best[slot] = choice.path
        return choice.path, choice

    def run(self, key: tuple, *args, **kwargs):
        """Compute the op by the path chosen for ``key``."""
        name, choice = self._resolve(key, args, kwargs)
        path_runs[(self.op, name)] += 1
        if _recorders:
            if choice is None:
                choice = self.choices.get((self._device_index(args), key))
            for seen in _recorders:
                seen.append((self.op, choice or PathChoice(name, math.nan, {}, "cache")))
        return self.paths[name](*args, **kwargs)
