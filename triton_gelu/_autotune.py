"""Autotuning: config spaces per architecture, problem keys, pruning, and a persistent cache.

A ``Tuner`` wraps one ``@triton.jit`` kernel. On each launch it looks the problem key up in
memory (one dict lookup when warm). On a miss it reads the architecture of the current GPU, takes
that architecture's config space, prunes it for the problem, and asks the on-disk cache; only if
the cache has no entry does it time every candidate with ``triton.testing.do_bench``, keep the
fastest, and write it back to the cache.

The cache is one JSON file per (kernel name, device name, Triton version, hash of the kernel's
source and of every ``@triton.jit`` helper it calls), so editing a kernel or its math retunes and
nothing else does. It lives in ``$TRITON_GELU_CACHE_DIR``, else ``$XDG_CACHE_HOME/triton_gelu``,
else ``~/.cache/triton_gelu``; delete the directory (or run ``python -m triton_gelu.autotune
--clear``) to forget every tuning. Files are written atomically; an unreadable file is ignored.

Under the Triton interpreter nothing is timed (the interpreter cannot benchmark) and nothing is
read or written: the kernel runs with the single small config of the interpreter's space. A
timing function can be injected (``Tuner(..., bench=fake)``) so the tuning and caching logic can
be tested on the CPU.

Key conventions: elementwise kernels key on ``(bucket(numel), dtype, ...)``, matmul kernels on
``(bucket(M), N, K, dtype, ...)``. Config spaces are ``configs(arch)`` and prune functions
``prune(configs, key, arch)``, where ``arch`` is ``"sm90"``, ``"sm80"``, ``"sm86"``, ``"sm89"``,
``"default"`` (any other GPU) or ``None`` (the interpreter).
"""

from __future__ import annotations

import hashlib
import inspect
import math
import re
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._cache import cache_dir, clear_cache, read_entries, write_document  # noqa: F401 (re-exported)
from ._runtime import interpreting, record_launch
from ._settings import PATH_ENV, forced_path

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
_MATMUL_TILES = {
    "sm90": (  # 227 KB; wgmma needs 64-row warpgroups, so no BLOCK_SIZE_M below 64
        (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 128, 8, 3),
        (64, 256, 64, 4, 4), (128, 128, 64, 8, 3), (128, 128, 32, 8, 3), (64, 256, 64, 8, 3),
        (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 128, 128, 4, 3), (128, 64, 128, 4, 3),
        (64, 64, 64, 4, 4),
    ),
    "sm80": (  # 163 KB; the Triton matmul tutorial's A100 tiles, backward-sized and small-M ones
        (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (64, 256, 32, 4, 4), (128, 128, 32, 4, 4),
        (128, 128, 64, 8, 3), (128, 128, 32, 4, 3), (128, 256, 64, 8, 2), (64, 256, 32, 4, 3),
        (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (128, 64, 64, 4, 3), (64, 128, 64, 4, 3),
        (64, 64, 32, 4, 5), (32, 64, 32, 2, 5), (16, 128, 64, 4, 3),
    ),
    "sm86": (  # 99 KB and fewer SMs: smaller tiles, fewer stages
        (128, 256, 32, 8, 3), (128, 128, 64, 8, 3), (128, 128, 32, 4, 4), (64, 256, 32, 4, 4),
        (128, 128, 32, 8, 2), (128, 128, 64, 8, 2), (128, 64, 32, 4, 3), (64, 128, 32, 4, 3),
        (64, 64, 64, 4, 3), (64, 64, 32, 4, 4), (32, 64, 32, 2, 5), (16, 64, 64, 4, 3),
    ),
    "default": (  # fits 64 KB: safe on any GPU Triton supports
        (128, 128, 32, 4, 3), (64, 128, 32, 4, 3), (128, 64, 32, 4, 3), (64, 64, 32, 4, 3),
        (128, 64, 32, 4, 2), (64, 128, 32, 4, 2), (64, 64, 64, 4, 2), (64, 64, 32, 4, 2),
        (32, 64, 32, 2, 3),
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


REDUCTIONS = ("K", "N", "M")


def matmul_smem_bytes(
    config: triton.Config, itemsize: int, arch: str | None = None, reduction: str = "K"
) -> int:
    """Shared memory Triton allocates for a matmul config, estimated per pipeline stage.

    ``reduction`` names the dimension the kernel loops over, which decides its operand tiles:

    - "K", y = x @ W^T: an x (BM, BK) and a W (BK, BN) tile;
    - "N", dx = dz @ W: the dy and z (BM, BN) tiles dz is built from, and a W (BN, BK) tile;
    - "M", dW = dz^T @ x: the dy and z (BM, BN) tiles, an x (BM, BK) tile, and db's partial
      sums (up to 32 bytes per column).

    Triton keeps num_stages - 1 buffers of each tile, and on sm90 (and, to be safe, on unknown
    GPUs) num_stages buffers of the tiles fed straight to the tensor cores. Fitted on sm80 and
    sm90 compiles of the package's kernels with Triton 3.6 and 3.9 (tests/aot_compile.py):
    never below the real figure near the limits, and within a few KB above it.
    """
    bm, bn, bk = (config.kwargs[f"BLOCK_SIZE_{d}"] for d in "MNK")
    staged, direct = {"K": (0, bm * bk + bk * bn), "N": (2 * bm * bn, bn * bk),
                      "M": (2 * bm * bn, bm * bk)}[reduction]
    stages = config.num_stages
    direct_buffers = stages - 1 if arch in ("sm80", "sm86", "sm89") else stages
    extra = 32 * bn if reduction == "M" else 0
    return ((stages - 1) * staged + direct_buffers * direct) * itemsize + extra


def prune_matmul(
    configs: list[triton.Config], key: tuple, arch: str | None = None,
    reduction: str | None = None,
) -> list[triton.Config]:
    """Drop tiles that cannot fit in shared memory, and tiles far larger than the problem.

    ``key`` starts with (bucket(M), N, K). A tile side may be at most the problem's side rounded
    up to a power of two, or 64 (tensor-core instructions pad smaller tiles to 64 rows anyway,
    and a small-M problem is bound by reading the weight, not by the wasted rows).

    ``reduction`` ("K", "N" or "M", see ``matmul_smem_bytes``) says which kernel the configs are
    for; without it a tile must fit as any of the three, which is safe but keeps the forward
    from its biggest tiles. Pass it per tuner: ``functools.partial(prune_matmul, reduction="N")``.
    """
    itemsize = _key_itemsize(key)
    limit = SMEM_BYTES.get(arch or "default", SMEM_BYTES["default"])
    roles = REDUCTIONS if reduction is None else (reduction,)

    def smem(c: triton.Config) -> int:
        return max(matmul_smem_bytes(c, itemsize, arch, r) for r in roles)

    bounds = {dim: max(bucket(size), 64) for dim, size in zip("MNK", key[:3])}
    kept = [
        c for c in configs
        if all(c.kwargs[f"BLOCK_SIZE_{d}"] <= bounds[d] for d in "MNK") and smem(c) <= limit
    ]
    return kept or [min(configs, key=smem)]


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


class Choice(NamedTuple):
    config: triton.Config
    ms: float  # measured when tuned (NaN when nothing was timed)
    source: str  # "tuned", "cache" or "only" (a single candidate, nothing timed)


def _entry_choice(entry: object) -> Choice | None:
    """The choice recorded by a cache entry, or None if the entry is missing or malformed."""
    try:
        config = triton.Config(dict(entry["kwargs"]), num_warps=int(entry["num_warps"]),
                               num_stages=int(entry["num_stages"]))
        return Choice(config, float(entry.get("ms", math.nan)), "cache")
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


def _do_bench(fn: Callable[[], None]) -> float:
    return triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median")


# Every tuner by name, so ``python -m triton_gelu.autotune`` can report what each one chose.
tuners: dict[str, Tuner] = {}


class Tuner:
    """Pick, remember and persist the fastest config of ``configs(arch)`` for each problem key.

    ``bench`` times a zero-argument callable and returns milliseconds; the default is
    ``triton.testing.do_bench``. Passing one also enables tuning under the interpreter (tests).
    """

    def __init__(
        self,
        kernel,
        name: str,
        configs: Callable[..., list[triton.Config]],
        prune: Callable[..., list[triton.Config]] | None = None,
        bench: Bench | None = None,
    ) -> None:
        self.kernel = kernel
        self.name = name
        self.configs = configs
        self.prune = prune
        self.bench = bench
        # Older call sites pass configs() and prune(configs, key) without the arch argument.
        self._configs_take_arch = _takes(configs, 1)
        self._prune_takes_arch = _takes(prune, 3)
        self._interpreted = interpreting()
        # (device index, key) -> (meta-parameters, launch kwargs): the hot path's one lookup.
        self.best: dict[tuple, tuple[dict, dict]] = {}
        self.choices: dict[tuple, Choice] = {}
        self._tables: dict[int, dict[str, dict]] = {}  # device index -> cache entries
        self._source_hash: str | None = None
        tuners[name] = self

    # ---- public helpers (also used by the CLI and the tests) ----

    @property
    def tunes(self) -> bool:
        """Whether misses are timed: always on a GPU; under the interpreter only with a bench."""
        return self.bench is not None or not self._interpreted

    @property
    def source_hash(self) -> str:
        if self._source_hash is None:
            self._source_hash = source_hash(self.kernel)
        return self._source_hash

    def cache_path(self, device: Device) -> Path:
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", device.name).strip("-") or "device"
        version = re.sub(r"[^A-Za-z0-9_.-]+", "-", triton.__version__)
        return cache_dir() / f"{self.name}.{slug}.triton-{version}.{self.source_hash[:16]}.json"

    def candidates(self, key: tuple, arch: str | None) -> list[triton.Config]:
        configs = self.configs(arch) if self._configs_take_arch else self.configs()
        if not self.tunes:
            return configs[:1]
        if self.prune is not None:
            pruned = (self.prune(configs, key, arch) if self._prune_takes_arch
                      else self.prune(configs, key))
            configs = pruned or configs[:1]
        return configs

    # ---- tuning ----

    def _time(self, grid: Grid, config: triton.Config, kwargs: dict) -> float:
        launch = config_kwargs(config)
        bench = self.bench or _do_bench
        try:
            return float(bench(lambda: self.kernel[grid(config.kwargs)](**kwargs, **launch)))
        except Exception:  # a config that does not compile or fit on this device
            return math.inf

    def _table(self, device: Device) -> dict[str, dict]:
        table = self._tables.get(device.index)
        if table is None:
            table = self._tables[device.index] = read_entries(self.cache_path(device))
        return table

    def _save(self, device: Device, key_text: str, entry: dict) -> None:
        path = self.cache_path(device)
        entries = read_entries(path)  # another process may have added entries meanwhile
        entries[key_text] = entry
        self._table(device)[key_text] = entry
        document = {
            "kernel": self.name, "device": device.name, "arch": device.arch,
            "triton": triton.__version__, "source_hash": self.source_hash, "entries": entries,
        }
        write_document(path, document)

    def choose(self, slot: tuple, grid: Grid, kwargs: dict) -> Choice:
        """Config for ``slot`` = (device index, key): memory, then disk, then timing."""
        device = device_of(slot[0])
        key = slot[1]
        candidates = self.candidates(key, device.arch)
        if not self.tunes:
            return Choice(candidates[0], math.nan, "only")
        key_text = key_string(key)
        cached = _entry_choice(self._table(device).get(key_text))
        if cached is not None:
            return cached
        times = [self._time(grid, c, kwargs) for c in candidates]
        best = min(range(len(candidates)), key=times.__getitem__)
        if math.isinf(times[best]):  # nothing ran: launch the first so its error surfaces
            return Choice(candidates[0], math.inf, "tuned")
        config = candidates[best]
        self._save(device, key_text, {
            "kwargs": config.kwargs, "num_warps": config.num_warps,
            "num_stages": config.num_stages, "ms": times[best],
        })
        return Choice(config, times[best], "tuned")

    def _device_index(self) -> int:
        return -1 if self._interpreted else torch.cuda.current_device()

    def smallest(self, meta: str) -> int:
        """The smallest value of meta-parameter ``meta`` in this tuner's config space on the
        current device: a kernel whose output size depends on its tile (one row of partial sums
        per tile) gets a buffer sized for any config it may be launched with."""
        arch = device_of(self._device_index()).arch
        configs = self.configs(arch) if self._configs_take_arch else self.configs()
        return min(c.kwargs[meta] for c in configs)

    def run(self, grid: Grid, key: tuple, **kwargs) -> dict:
        """Launch the kernel with the tuned config for ``key``; kwargs are the kernel arguments.
        Returns the meta-parameters it launched with.

        Tuning launches the kernel several times on the real arguments, so kernels must be
        idempotent (pure stores, no accumulation into their outputs).
        """
        slot = (self._device_index(), key)
        launch = self.best.get(slot)
        if launch is None:
            choice = self.choose(slot, grid, kwargs)
            self.choices[slot] = choice
            launch = self.best[slot] = (choice.config.kwargs, config_kwargs(choice.config))
        record_launch(self.name)
        self.kernel[grid(launch[0])](**kwargs, **launch[1])
        return launch[0]


# ---- paths: one op, several ways to compute it ----------------------------------------------

# Every op with paths by name, for the CLI and the tests.
path_choosers: dict[str, Paths] = {}


class Paths:
    """The named ways to compute one op, and the choice between them per problem key.

    ``paths`` maps a name to a callable; every callable takes the op's arguments and returns the
    op's outputs as new tensors (never writing into its inputs), with results within the suite's
    tolerance rules, so any of them may serve any call. ``default`` names the path taken when
    nothing else decides. A path forced with ``$TRITON_GELU_PATH`` or
    ``triton_gelu.autotune.force_path`` (``_settings.py``) always wins.
    """

    def __init__(self, op: str, paths: dict[str, Callable], default: str) -> None:
        if default not in paths:
            raise ValueError(f"default path {default!r} of {op} is not one of {list(paths)}")
        self.op = op
        self.paths = paths
        self.default = default
        path_choosers[op] = self

    def choose(self, key: tuple, args: tuple, kwargs: dict) -> str:
        """The path for ``key``: a forced one, else the default."""
        forced = forced_path(self.op)
        if forced is not None:
            if forced not in self.paths:
                raise ValueError(
                    f"{PATH_ENV} / force_path asks {self.op} for path {forced!r}; "
                    f"its paths are {', '.join(self.paths)}"
                )
            return forced
        return self.default

    def run(self, key: tuple, *args, **kwargs):
        """Compute the op by the path chosen for ``key``."""
        return self.paths[self.choose(key, args, kwargs)](*args, **kwargs)
