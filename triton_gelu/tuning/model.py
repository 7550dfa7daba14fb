"""A cost model: configs and paths ranked per problem from what is known without a GPU.

Each estimate is a roofline with the losses a config can be blamed for:

- **flops** at the architecture's tensor-core peak, counted on the padded tiles: a tile hanging
  over the problem's edge computes its whole self (``tile waste``), and the K loop runs whole
  ``BLOCK_SIZE_K`` steps;
- **waves**: the SMs run ``occupancy`` programs each at once; a grid of 1.1 waves takes 2 (the
  last wave's idle SMs are paid for);
- **tensor-core feed**: a small tile reads more operand bytes per flop from shared memory
  (arithmetic intensity BM*BN/(BM+BN) below what the MMA needs to run at peak);
- **instruction issue**: from the compile facts, the SASS instructions of one main-loop
  iteration (``loop_instructions``), issued by 4 schedulers per SM: a kernel doing elementwise
  work inside its K loop (as the backward kernels that rebuilt dz = dy * GELU'(z) per output
  tile did: 1,600-8,900 instructions an iteration on sm90) is bound by this, not by the tensor
  cores;
- **bytes** moved to and from HBM at its bandwidth (each operand and output once; L2 keeps the
  re-reads of a grouped launch order);
- a fixed launch cost per kernel.

The time is the largest of compute, issue and memory, plus the launch. It ranks; it does not
promise figures. Configs the facts condemn never reach it (``facts.admissible``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

from . import facts as _facts


class Arch(NamedTuple):
    sms: int
    tensor_tflops: float  # dense fp16/bf16 tensor-core peak
    tf32_tflops: float
    hbm_gbps: float
    clock_ghz: float  # boost clock, for instruction issue
    mma_intensity: float  # tile arithmetic intensity BM*BN/(BM+BN) the MMA needs for its peak


# Sources: NVIDIA H100 Tensor Core GPU datasheet (SXM5: 132 SMs, 989.4 dense BF16/FP16 TFLOPS,
# 494.7 TF32, 3.35 TB/s HBM3, 1.98 GHz boost; the H200 has the same SMs and peak at 4.8 TB/s:
# the H100's bandwidth is the conservative one) and the NVIDIA A100 datasheet (SXM4 80 GB: 108
# SMs, 312 dense BF16/FP16 TFLOPS, 156 TF32, 2.039 TB/s HBM2e, 1.41 GHz boost). The intensity:
# a 128x128 tile (64) feeds wgmma at its rate, a 64x128 one (43) mma.sync on Ampere.
ARCHES = {
    "sm90": Arch(132, 989.4, 494.7, 3350.0, 1.98, 64.0),
    "sm80": Arch(108, 312.0, 156.0, 2039.0, 1.41, 43.0),
    "sm86": Arch(84, 142.0, 71.0, 936.0, 1.70, 43.0),  # RTX 3090 (GA102 whitepaper)
    "sm89": Arch(128, 330.0, 165.0, 1008.0, 2.52, 43.0),  # RTX 4090 (AD102 whitepaper)
    "default": Arch(80, 100.0, 50.0, 900.0, 1.5, 43.0),
}
LAUNCH_S = 4e-6  # a kernel launch and its tail, roughly
# The share of the tensor-core peak a well-fed large matmul reaches, ours and cuBLAS alike (so the
# paths compare on the losses the model can tell apart).
MMA_EFFICIENCY = 0.8
REGISTERS = 65536  # a register file per SM (sm80 and sm90)
THREADS = 2048  # resident threads per SM (sm80 and sm90)
ISSUE_PER_CLOCK = 4  # warp schedulers per SM
BYTES_IN_FLIGHT = 40 * 1024  # per SM, to cover HBM latency at full bandwidth (Little's law)


def arch_figures(arch: str | None) -> Arch:
    return ARCHES.get(arch or "default", ARCHES["default"])


def _occupancy(arch: str, num_warps: int, regs: int | None, smem: int) -> int:
    """Programs resident per SM: threads, registers and shared memory each bound it."""
    from .facts import SMEM_LIMIT

    threads = num_warps * 32
    by_threads = THREADS // threads
    by_regs = REGISTERS // (max(regs or 32, 1) * threads) if regs else by_threads
    by_smem = SMEM_LIMIT.get(arch, 101376) // smem if smem else by_threads
    return max(1, min(by_threads, by_regs, by_smem, 32))


def matmul_time(config, M: int, N: int, K: int, itemsize: int, arch: str | None,
                reduction: str = "K", gated: bool = False, fact: dict | None = None,
                outputs: int = 1) -> float:
    """Seconds a matmul config takes for an (M, N) x K problem (see the module docstring).

    ``reduction`` says which problem dimension the kernel loops over (``spaces.
    matmul_smem_bytes``): "K" tiles the output (M, N) by (BM, BN); "N" (dx = dz @ W) tiles
    (M, K) by (BM, BK) and loops over N by BN; "M" (dW = dz^T @ x) tiles (N, K) by (BN, BK) and
    loops over M by BM. ``gated``: two weights, twice the flops."""
    figures = arch_figures(arch)
    bm, bn, bk = (config.kwargs[f"BLOCK_SIZE_{d}"] for d in "MNK")
    (rows, tile_r), (cols, tile_c), (depth, step) = {
        "K": ((M, bm), (N, bn), (K, bk)),
        "N": ((M, bm), (K, bk), (N, bn)),
        "M": ((N, bn), (K, bk), (M, bm)),
    }[reduction]
    programs = math.ceil(rows / tile_r) * math.ceil(cols / tile_c)
    steps = math.ceil(depth / step)
    weights = 2 if gated else 1
    flops_per_program = 2.0 * tile_r * tile_c * steps * step * weights
    peak = (figures.tf32_tflops if itemsize == 4 else figures.tensor_tflops) * 1e12
    intensity = tile_r * tile_c / (tile_r + tile_c)
    feed = min(1.0, intensity / figures.mma_intensity)
    fact = fact or {}
    smem = fact.get("smem") or 0
    occupancy = _occupancy(arch or "default", config.num_warps, fact.get("regs"), smem)
    waves = math.ceil(programs / (figures.sms * occupancy))
    # A wave's programs share their SM's tensor cores: a wave takes occupancy programs' time.
    per_program = flops_per_program / (peak * MMA_EFFICIENCY / figures.sms) / feed
    compute = waves * occupancy * per_program if programs >= figures.sms * occupancy \
        else per_program * min(occupancy, math.ceil(programs / figures.sms))
    issue = 0.0
    if fact.get("loop_instructions"):
        cycles = fact["loop_instructions"] * config.num_warps / ISSUE_PER_CLOCK
        serial = math.ceil(programs / figures.sms)  # programs an SM runs, one after another
        issue = serial * steps * cycles / (figures.clock_ghz * 1e9)
    moved = (M * K + weights * N * K + outputs * M * N) * itemsize
    memory = moved / (figures.hbm_gbps * 1e9)
    return max(compute, issue, memory) + LAUNCH_S


def elementwise_time(block: int, num_warps: int, numel: int, itemsize: int, arch: str | None,
                     tensors: int = 2, fact: dict | None = None) -> float:
    """Seconds a memory-bound kernel of ``tensors`` (M, N)-sized reads and writes takes with
    ``block`` elements per program: bandwidth, unless too few bytes are in flight per SM or the
    last wave runs mostly idle."""
    figures = arch_figures(arch)
    fact = fact or {}
    programs = math.ceil(numel / block)
    occupancy = _occupancy(arch or "default", num_warps, fact.get("regs"), 0)
    resident = min(programs, figures.sms * occupancy)
    in_flight = resident * block * itemsize / figures.sms
    latency_bound = min(1.0, in_flight / BYTES_IN_FLIGHT)
    waves = math.ceil(programs / (figures.sms * occupancy))
    fill = programs / (waves * figures.sms * occupancy)
    moved = tensors * numel * itemsize
    return moved / (figures.hbm_gbps * 1e9) / latency_bound / max(fill, 0.25) + LAUNCH_S


def _itemsize(key: tuple) -> int:
    return next((k.itemsize for k in key if hasattr(k, "itemsize") and not isinstance(k, int)), 2)


def config_time(tuner, config, key: tuple, arch: str | None) -> float:
    """The model's seconds for one of ``tuner``'s configs at problem ``key``; NaN where the
    model does not know the kernel's shape (every config then ranks equal)."""
    fact = _facts.facts_of(arch, tuner.name, config)
    itemsize = _itemsize(key)
    kwargs = config.kwargs
    if all(f"BLOCK_SIZE_{d}" in kwargs for d in "MNK"):
        roles = getattr(tuner.prune, "keywords", {}) if tuner.prune is not None else {}
        return matmul_time(config, key[0], key[1], key[2], itemsize, arch,
                           roles.get("reduction") or "K", roles.get("gated", False), fact)
    if "BLOCK_SIZE_M" in kwargs and "BLOCK_SIZE_N" in kwargs:  # a tile over (M, N)
        return elementwise_time(kwargs["BLOCK_SIZE_M"] * kwargs["BLOCK_SIZE_N"],
                                config.num_warps, key[0] * key[1], itemsize, arch, 3, fact)
    if "BLOCK_SIZE" in kwargs:
        return elementwise_time(kwargs["BLOCK_SIZE"], config.num_warps, key[0], itemsize, arch,
                                2, fact)
    return math.nan


def rank_configs(tuner, configs: list, key: tuple, arch: str | None) -> list:
    """``configs`` fastest first by the model (stable: ties keep the space's order); as they
    are where no architecture is known (the interpreter)."""
    if arch is None:
        return list(configs)
    times = [config_time(tuner, c, key, arch) for c in configs]
    order = sorted(range(len(configs)),
                   key=lambda i: (0.0 if math.isnan(times[i]) else times[i], i))
    return [configs[i] for i in order]


# ---- paths: which ways of computing an op can win at a problem -----------------------------

# A path whose estimate is more than this many times the best one's is not timed (the model
# ranks; its figures are not exact, so a close second is still timed).
PATH_MARGIN = 1.3
# Always timed where it applies: PyTorch's own computation compiles nothing of ours, and keeping
# it a candidate keeps every op never slower than eager PyTorch.
ALWAYS_TIMED = ("torch",)


class _Costs:
    """The pieces paths are made of, in seconds, for one architecture and dtype."""

    def __init__(self, arch: str | None, dtype, tuners: dict) -> None:
        self.arch, self.dtype, self.tuners = arch, dtype, tuners
        self.itemsize = getattr(dtype, "itemsize", 2)
        self.figures = arch_figures(arch)

    def ours(self, tuner_name: str, *sizes: int) -> float:
        """Our kernel at its best config by the model (NaN: no such Tuner here)."""
        tuner = self.tuners.get(tuner_name)
        if tuner is None:
            return math.nan
        key = (*sizes, self.dtype)
        configs = tuner.candidates(key, self.arch) if tuner.tunes else tuner.pruned_space(
            key, self.arch)
        times = [config_time(tuner, c, key, self.arch) for c in configs]
        return min((t for t in times if not math.isnan(t)), default=math.nan)

    def cublas(self, M: int, N: int, K: int) -> float:
        peak = (self.figures.tf32_tflops if self.itemsize == 4 else self.figures.tensor_tflops)
        compute = 2.0 * M * N * K / (peak * 1e12 * MMA_EFFICIENCY)
        memory = (M * K + N * K + M * N) * self.itemsize / (self.figures.hbm_gbps * 1e9)
        return max(compute, memory) + LAUNCH_S

    def elementwise(self, numel: int, tensors: int) -> float:
        return tensors * numel * self.itemsize / (self.figures.hbm_gbps * 1e9) + LAUNCH_S


def _linear_gelu_fwd(key: tuple, c: _Costs) -> dict[str, float]:
    M, N, K = key[:3]
    composed = c.cublas(M, N, K) + c.elementwise(M * N, 3)
    return {"fused": c.ours("linear_gelu_fwd", M, N, K),
            "tma": c.ours("linear_gelu_fwd_tma", M, N, K),
            "composed": composed, "torch": composed, "addmm_gelu": c.cublas(M, N, K)}


def _linear_preact(key: tuple, c: _Costs) -> dict[str, float]:
    M, N, K = key[:3]
    return {"fused": c.ours("linear_preact", M, N, K),
            "tma": c.ours("linear_preact_tma", M, N, K), "composed": c.cublas(M, N, K)}


def _linear_gelu_bwd(key: tuple, c: _Costs) -> dict[str, float]:
    M, N, K = key[:3]
    mm_dx, mm_dw = c.cublas(M, K, N), c.cublas(N, K, M)
    return {"dz_once": c.ours("linear_gelu_bwd_dz", M, N) + mm_dx + mm_dw,
            "torch": c.elementwise(M * N, 3) + mm_dx + mm_dw}


def _ffn_fwd(key: tuple, c: _Costs) -> dict[str, float]:
    M, D, F, E = key[:4]
    second = c.cublas(M, E, F)
    composed = c.cublas(M, F, D) + c.elementwise(M * F, 3) + second
    return {"fused": c.ours("ffn_fwd_gelu_dropout", M, F, D) + second,
            "tma": c.ours("ffn_fwd_gelu_dropout_tma", M, F, D) + second,
            "composed": composed, "torch": composed}


def _ffn_bwd(key: tuple, c: _Costs) -> dict[str, float]:
    M, D, F, E = key[:4]
    rest = c.cublas(M, D, F) + c.cublas(F, D, M) + c.cublas(E, F, M)
    composed = c.cublas(M, F, E) + c.elementwise(M * F, 4) + rest
    return {"fused": c.ours("ffn_bwd_dz", M, F, E) + rest,
            "tma": c.ours("ffn_bwd_dz_tma", M, F, E) + rest,
            "composed": composed, "torch": composed}


def _geglu_fwd(key: tuple, c: _Costs) -> dict[str, float]:
    M, N, K = key[:3]
    composed = c.cublas(M, 2 * N, K) + c.elementwise(M * N, 3)
    return {"fused": c.ours("geglu_fwd", M, N, K), "tma": c.ours("geglu_fwd_tma", M, N, K),
            "composed": composed, "torch": composed + c.elementwise(M * N, 2)}


def _geglu_bwd(key: tuple, c: _Costs) -> dict[str, float]:
    M, N, K = key[:3]
    matmuls = c.cublas(M, K, 2 * N) + c.cublas(2 * N, K, M)
    return {"once": c.ours("geglu_bwd_act", M * N) + matmuls,
            "torch": c.elementwise(M * N, 7) + matmuls}


def _gelu(tuner: str):
    def paths(key: tuple, c: _Costs) -> dict[str, float]:
        return {"triton": c.ours(tuner, key[0]), "torch": c.elementwise(key[0], 2)}
    return paths


# op -> its paths' estimates from the op's path key. An op or path not here is always timed.
PATH_MODELS = {
    "linear_gelu_fwd": _linear_gelu_fwd, "linear_preact": _linear_preact,
    "linear_gelu_bwd": _linear_gelu_bwd, "ffn_fwd": _ffn_fwd, "ffn_bwd": _ffn_bwd,
    "geglu_fwd": _geglu_fwd, "geglu_bwd": _geglu_bwd,
    "gelu_fwd": _gelu("gelu_fwd"), "gelu_bwd": _gelu("gelu_bwd"),
}


def path_times(op: str, key: tuple, arch: str | None, tuners: dict) -> dict[str, float]:
    """The model's seconds per path of ``op`` at its path key ({} where it has no model);
    ``tuners``: every Tuner by name (``tuner.tuners``), for the kernels the paths launch."""
    estimate = PATH_MODELS.get(op)
    if estimate is None or arch is None:
        return {}
    dtype = next((k for k in key if hasattr(k, "itemsize") and not isinstance(k, int)), None)
    return estimate(key, _Costs(arch, dtype, tuners))


def paths_worth_timing(op: str, names: list[str], key: tuple, arch: str | None,
                       tuners: dict) -> list[str]:
    """``names`` less the paths the model shows cannot win here (slower than ``PATH_MARGIN``
    times the best estimate); a path without an estimate, and ``ALWAYS_TIMED``, are kept."""
    times = path_times(op, key, arch, tuners)
    known = [times[n] for n in names if not math.isnan(times.get(n, math.nan))]
    if not known:
        return names
    best = min(known)
    return [n for n in names if n in ALWAYS_TIMED or math.isnan(times.get(n, math.nan))
            or times[n] <= PATH_MARGIN * best]
