"""Compile every kernel for real GPUs, ahead of time, on a machine without one.

The interpreter runs the kernels' Python, not Triton's compiler: a kernel can pass every
interpreted test and still fail to compile, or compile to something slow. This script drives
``triton.compile`` for sm_80 and sm_90 (Triton ships ptxas, so it needs no GPU) over the configs
the tuner would try for a large FFN problem, and checks what the GPU would get:

- every config that survives pruning compiles and fits the architecture's shared memory;
- the matmuls use Hopper's wgmma on sm_90 (fp16/bf16/tf32 operands), mma elsewhere;
- the elementwise kernels (the backward's dz kernel included) load and store 16 bytes per
  access on aligned contiguous tensors;
- the Hopper variants (``*_tma``, sm_90 only: the "tma" paths) load by TMA
  (``cp.async.bulk.tensor``, no cp.async) into wgmma, their shared memory is within the tuner's
  estimate, and ptxas spills nothing inside the main loop (no local load or store in the SASS
  of the innermost loop holding the wgmma instructions, read from the cubin by the bundled
  cuobjdump); with the tile loop flattened into it (FLATTEN, where the epilogue is light: the
  linear forward without dropout) nothing at all (no stack frame). Unflattened, the heavier
  epilogues (dropout's Philox, GeGLU's two accumulators) spill a few registers after the K loop,
  as the pointer kernels do. Each of their lines shows registers, stack and main-loop spills.

Run it without TRITON_INTERPRET (``python tests/aot_compile.py``); tests/test_aot_compile.py does.
It prints one line per compile and exits non-zero if any promise is broken. ``--quick``
compiles one config per kernel and dtype; ``--only a,b`` only the kernels whose tuner name
contains one of the substrings (e.g. ``--only geglu``, ``--only ffn,gelu_dropout`` or
``--only linear_gelu_bwd_dz``); ``--block-m N`` only configs with BLOCK_SIZE_M == N; ``--names a,b`` only the kernels with
exactly these names; ``--arch sm90`` only one architecture; ``--list`` prints every kernel name
and exits (tests/test_aot_compile.py splits the work by them, so pytest-xdist spreads it). The FFN
block's kernels (the linear forward's and the GELU kernels with a dropout epilogue) and the GeGLU
kernels' dropout variants (the gated block's: ``geglu_fwd+dropout``, ``geglu_act+dropout``,
``geglu_bwd_act+dropout``, each its Tuner's kernel with HAS_DROPOUT) compile one config per dtype
(``EPILOGUE_ONLY``).
"""

from __future__ import annotations

import os
import sys
import time

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("aot_compile.py compiles real kernels: run it without TRITON_INTERPRET")

import re  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from triton_gelu import _autotune  # noqa: E402
from triton_gelu.kernels import _matmul  # noqa: E402
from triton_gelu.kernels.ffn import _ffn_bwd_dz_kernel, _ffn_bwd_dz_tma_kernel  # noqa: E402
from triton_gelu.kernels.geglu import (  # noqa: E402
    _geglu_act_kernel, _geglu_bwd_act_kernel, _geglu_fwd_kernel, _geglu_fwd_tma_kernel,
)
from triton_gelu.kernels.gelu import _gelu_bwd_kernel, _gelu_fwd_kernel  # noqa: E402
from triton_gelu.kernels.linear_gelu import (  # noqa: E402
    _linear_gelu_bwd_dz_kernel, linear_gelu_fwd_kernel, linear_gelu_fwd_tma_kernel,
)

TARGETS = {"sm80": GPUTarget("cuda", 80, 32), "sm90": GPUTarget("cuda", 90, 32)}
SHORT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int64: "i64"}


def compile_kernel(kernel, args: dict, target: GPUTarget, config: triton.Config):
    """``triton.compile`` ``kernel`` as the JIT would specialise a launch with ``args``.

    ``args`` maps each non-meta parameter to a torch dtype (a pointer), None (an absent optional
    pointer), an int (a size or stride) or a constexpr value. Like the JIT: pointers are 16-byte
    aligned, ints divisible by 16 are marked so, and ints equal to 1 become constants.
    """
    args = {**args, **config.kwargs}
    signature, constexprs, attrs = {}, {}, {}
    for index, param in enumerate(kernel.params):
        value = args[param.name]
        if isinstance(value, float) and not param.is_constexpr:
            signature[param.name] = "fp32"  # a float argument: never specialised
        elif param.is_constexpr or value is None or value is True or value is False \
                or isinstance(value, str) or value == 1:
            signature[param.name] = "constexpr"
            constexprs[param.name] = value
        elif isinstance(value, torch.dtype):
            signature[param.name] = "*" + SHORT[value]
            attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            signature[param.name] = "i32"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    return triton.compile(source, target=target, options=options)


# No dropout, and dropout with p = 0.1 (the threshold and scale the launchers pass) on a
# tensor-parallel rank's hidden columns 4096 .. of 16384 (the mask's position; both branches of
# the epilogue's mask, on a group of 4 columns and inside one, are compiled whatever the value).
NO_DROPOUT = dict(seed_ptr=None, dropout_threshold=0, dropout_scale=1.0, dropout_col_offset=0,
                  dropout_n_cols=4096, HAS_DROPOUT=False)
DROPOUT = dict(seed_ptr=torch.int64, dropout_threshold=214748365, dropout_scale=1 / 0.9,
               dropout_col_offset=4096, dropout_n_cols=16384, HAS_DROPOUT=True)


def _matmul_cases(dtype: torch.dtype, activation: str, M: int, N: int, K: int):
    """(name, kernel, args, key) of the linear forward and the backward's dz kernel on contiguous
    operands, and the FFN block's: the forward with dropout, the backward's dz = dy @ W2
    (N = d_ff, reducing over K = d_model)."""
    precision = "tf32" if dtype == torch.float32 else None
    fwd = dict(x_ptr=dtype, w_ptr=dtype, b_ptr=dtype, y_ptr=dtype, preact_ptr=dtype,
               M=M, N=N, K=K, stride_xm=K, stride_xk=1, stride_wn=K, stride_wk=1, stride_ym=N,
               ACTIVATION=activation, HAS_BIAS=True, WRITE_Y=True, SAVE_PREACT=True,
               INPUT_PRECISION=precision, **NO_DROPOUT)
    ffn_fwd = {**fwd, **DROPOUT}
    ffn_dz = dict(dy_ptr=dtype, w2_ptr=dtype, preact_ptr=dtype, dz_ptr=dtype, h_ptr=dtype,
                  db1_part_ptr=torch.float32, M=M, F=N, E=K, db1_part_rows=M // 64,
                  stride_dym=K, stride_dye=1, stride_w2e=N, stride_w2f=1, stride_zm=N,
                  stride_zf=1, ACTIVATION=activation, WRITE_H=True, SUM_DB1=True,
                  INPUT_PRECISION=precision, **DROPOUT)
    dz = dict(dy_ptr=dtype, preact_ptr=dtype, dz_ptr=dtype, db_partial_ptr=torch.float32,
              M=M, N=N, stride_dym=N, stride_dyn=1, stride_pm=N, stride_pn=1,
              ACTIVATION=activation, WRITE_DZ=True, COMPUTE_DB=True, ROWS=_autotune.TILE_ROWS)
    key = (_autotune.bucket(M), N, K, dtype, activation)
    return [("linear_gelu_fwd", linear_gelu_fwd_kernel, fwd, key),
            ("linear_gelu_bwd_dz", _linear_gelu_bwd_dz_kernel, dz,
             (_autotune.bucket(M), N, dtype, activation, True, True)),
            ("ffn_fwd_gelu_dropout", linear_gelu_fwd_kernel, ffn_fwd, key),
            ("ffn_bwd_dz", _ffn_bwd_dz_kernel, ffn_dz, key)]


def _hopper_cases(dtype: torch.dtype, activation: str, M: int, N: int, K: int, gated_n: int,
                  gated_k: int):
    """(name, kernel, args, key) of the Hopper variants (TMA, persistent grid) as the launchers
    pass them: the linear forward's tile loop flattened where this Triton can, except under a
    dropout epilogue; GeGLU's and the FFN backward's dz kernel's never.
    The GeGLU ones at Gemma-2B's FFN (``gated_n``, ``gated_k``), as ``_geglu_cases``."""
    precision = "tf32" if dtype == torch.float32 else None
    flatten = _matmul.range_flattens()
    fwd = dict(x_ptr=dtype, w_ptr=dtype, b_ptr=dtype, y_ptr=dtype, preact_ptr=dtype,
               M=M, N=N, K=K, stride_xm=K, stride_wn=K, stride_ym=N,
               ACTIVATION=activation, HAS_BIAS=True, WRITE_Y=True, SAVE_PREACT=True,
               INPUT_PRECISION=precision, FLATTEN=flatten, **NO_DROPOUT)
    geglu = dict(x_ptr=dtype, wg_ptr=dtype, wu_ptr=dtype, bg_ptr=dtype, bu_ptr=dtype,
                 h_ptr=dtype, g_ptr=dtype, u_ptr=dtype, M=M, N=gated_n, K=gated_k,
                 stride_xm=gated_k, stride_wgn=gated_k, stride_wun=gated_k, stride_om=gated_n,
                 ACTIVATION=activation, HAS_GATE_BIAS=True, HAS_UP_BIAS=True, WRITE_H=True,
                 SAVE_GATE_UP=True, INPUT_PRECISION=precision, **NO_DROPOUT)
    ffn_dz = dict(dy_ptr=dtype, w2_ptr=dtype, preact_ptr=dtype, dz_ptr=dtype, h_ptr=dtype,
                  db1_part_ptr=torch.float32, M=M, F=N, E=K, db1_part_rows=M // 64,
                  stride_dym=K, stride_w2e=N, stride_zm=N, stride_zf=1, ACTIVATION=activation,
                  WRITE_H=True, SUM_DB1=True, INPUT_PRECISION=precision, **DROPOUT)
    key = (_autotune.bucket(M), N, K, dtype, activation)
    gated_key = (_autotune.bucket(M), gated_n, gated_k, dtype, activation)
    return [("linear_gelu_fwd_tma", linear_gelu_fwd_tma_kernel, fwd, key),
            ("ffn_fwd_gelu_dropout_tma", linear_gelu_fwd_tma_kernel,
             {**fwd, **DROPOUT, "FLATTEN": False}, key),
            ("ffn_bwd_dz_tma", _ffn_bwd_dz_tma_kernel, ffn_dz, key),
            ("geglu_fwd_tma", _geglu_fwd_tma_kernel, geglu, gated_key),
            ("geglu_fwd_tma+dropout", _geglu_fwd_tma_kernel, {**geglu, **DROPOUT}, gated_key)]


def _geglu_cases(dtype: torch.dtype, activation: str, M: int, N: int, K: int):
    """(name, kernel, args, key) of the GeGLU kernels on contiguous operands; "+dropout": the
    gated block's dropout epilogues (the forward's, the composed forward's elementwise kernel,
    the backward's elementwise kernel)."""
    precision = "tf32" if dtype == torch.float32 else None
    fwd = dict(x_ptr=dtype, wg_ptr=dtype, wu_ptr=dtype, bg_ptr=dtype, bu_ptr=dtype,
               h_ptr=dtype, g_ptr=dtype, u_ptr=dtype, M=M, N=N, K=K, stride_xm=K,
               stride_xk=1, stride_wgn=K, stride_wgk=1, stride_wun=K, stride_wuk=1,
               stride_om=N, ACTIVATION=activation, HAS_GATE_BIAS=True, HAS_UP_BIAS=True,
               WRITE_H=True, SAVE_GATE_UP=True, INPUT_PRECISION=precision, **NO_DROPOUT)
    n = M * N
    act = dict(g_ptr=dtype, u_ptr=dtype, h_ptr=dtype, n_elements=n, n_cols=N,
               ACTIVATION=activation, **NO_DROPOUT)
    bwd_act = dict(dh_ptr=dtype, g_ptr=dtype, u_ptr=dtype, dg_ptr=dtype, du_ptr=dtype,
                   h_ptr=dtype, n_elements=n, n_cols=N, stride_dh_row=N, ACTIVATION=activation,
                   WRITE_H=True, CONTIGUOUS=True, **NO_DROPOUT)
    key = (_autotune.bucket(M), N, K, dtype, activation)
    elementwise_key = (_autotune.bucket(n), dtype, activation)
    return [("geglu_fwd", _geglu_fwd_kernel, fwd, key),
            ("geglu_act", _geglu_act_kernel, act, elementwise_key),
            ("geglu_bwd_act", _geglu_bwd_act_kernel, bwd_act, elementwise_key),
            ("geglu_fwd+dropout", _geglu_fwd_kernel, {**fwd, **DROPOUT}, key),
            ("geglu_act+dropout", _geglu_act_kernel, {**act, **DROPOUT}, elementwise_key),
            ("geglu_bwd_act+dropout", _geglu_bwd_act_kernel, {**bwd_act, **DROPOUT},
             elementwise_key)]


def _elementwise_cases(dtype: torch.dtype, activation: str, n: int):
    fwd = dict(x_ptr=dtype, y_ptr=dtype, n_elements=n, n_cols=n, stride_x_row=n,
               ACTIVATION=activation, CONTIGUOUS=True, **NO_DROPOUT)
    bwd = dict(dy_ptr=dtype, x_ptr=dtype, dx_ptr=dtype, h_ptr=None, n_elements=n, n_cols=n,
               stride_dy_row=n, stride_x_row=n, ACTIVATION=activation, CONTIGUOUS=True,
               WRITE_H=False, **NO_DROPOUT)
    # The FFN block's composed path: GELU + dropout, and its backward also writing h.
    dropout_fwd = {**fwd, **DROPOUT}
    dropout_bwd = {**bwd, "h_ptr": dtype, "WRITE_H": True, **DROPOUT}
    key = (_autotune.bucket(n), dtype, activation)
    return [("gelu_fwd", _gelu_fwd_kernel, fwd, key), ("gelu_bwd", _gelu_bwd_kernel, bwd, key),
            ("gelu_dropout_fwd", _gelu_fwd_kernel, dropout_fwd, key),
            ("gelu_dropout_bwd", _gelu_bwd_kernel, dropout_bwd, key)]


def _tuner_of(name: str):
    """The Tuner the package launches ``name`` with, for its config space and pruning (a
    "+dropout" case: the same Tuner's kernel with its dropout epilogue)."""
    import importlib

    name = name.partition("+")[0]
    for module in ("triton_gelu.kernels.gelu", "triton_gelu.kernels.linear_gelu",
                   "triton_gelu.kernels.geglu", "triton_gelu.kernels.ffn"):
        for value in vars(importlib.import_module(module)).values():
            if isinstance(value, _autotune.Tuner) and value.name == name:
                return value
    raise LookupError(name)


def _cuobjdump() -> str | None:
    """Triton's bundled cuobjdump (beside its ptxas), if this install has one."""
    from triton.backends.nvidia import compiler as nvidia

    path = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
    return path if os.access(path, os.X_OK) else None


def _cubin_tool(cubin: bytes, flag: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([_cuobjdump(), flag, f.name], capture_output=True, text=True,
                              check=True).stdout


def resource_usage(cubin: bytes) -> dict[str, int]:
    """{"REG": registers a thread, "STACK": bytes of stack frame (spills), ...} of a cubin."""
    line = next(ln for ln in _cubin_tool(cubin, "-res-usage").splitlines() if "REG:" in ln)
    return {name: int(value) for name, value in re.findall(r"(\w+):(\d+)", line)}


def main_loop_spills(cubin: bytes) -> int:
    """Local loads and stores (spill traffic) in the SASS of the innermost loop holding the
    wgmma (HGMMA) instructions: the loop from the target of a backward branch to the branch."""
    lines = [(int(m.group(1), 16), text) for text in _cubin_tool(cubin, "-sass").splitlines()
             if (m := re.search(r"/\*([0-9a-f]{4,})\*/", text))]
    mma = [at for at, text in lines if "HGMMA" in text]
    loops = [(int(m.group(1), 16), at) for at, text in lines
             if (m := re.search(r"BRA (?:`\(\.L_x_\d+\) )?0x([0-9a-f]+)", text))
             and int(m.group(1), 16) < at]
    inner = [(start, end) for start, end in loops if mma and start <= mma[0] <= end]
    if not inner:
        return 0
    start, end = min(inner, key=lambda loop: loop[1] - loop[0])
    return sum(1 for at, text in lines
               if start <= at <= end and re.search(r"\b(STL|LDL)\b", text))


def check(kernel_name, kernel, args, key, arch, configs, failures) -> None:
    if not configs:
        return
    is_matmul = "BLOCK_SIZE_K" in configs[0].kwargs
    dtype = next(k for k in key if isinstance(k, torch.dtype))
    for config in configs:
        start = time.perf_counter()
        label = f"{arch} {kernel_name} {dtype} activation={args['ACTIVATION']} {config}"
        try:
            compiled = compile_kernel(kernel, args, TARGETS[arch], config)
        except Exception as exc:  # noqa: BLE001 - report every failure, then exit non-zero
            failures.append(f"{label}: does not compile: {type(exc).__name__}: {exc}"[:400])
            print("FAIL", failures[-1], flush=True)
            continue
        ptx, smem = compiled.asm["ptx"], compiled.metadata.shared
        problems = []
        if smem > _autotune.SMEM_BYTES[arch]:
            problems.append(
                f"uses {smem} B of shared memory, {arch} has {_autotune.SMEM_BYTES[arch]}"
            )
        if is_matmul:
            want = "wgmma" if arch == "sm90" else "mma.sync"
            if want not in ptx:
                problems.append(f"no {want} in the PTX: the matmul is not on the tensor cores")
        elif "ld.global.v4" not in ptx or "st.global.v4" not in ptx:
            problems.append("no 16-byte vector loads and stores in the PTX")
        estimate, usage = "", ""
        if is_matmul:  # the tuner's estimate beside the real figure, to keep the fit honest
            roles = getattr(_tuner_of(kernel_name).prune, "keywords", {})
            itemsize = 2 if key[3] != torch.float32 else 4
            estimated = _autotune.matmul_smem_bytes(config, itemsize, arch, **roles)
            estimate = f" (estimated {estimated})"
        if "_tma" in kernel_name:  # the Hopper variants' promises
            if "cp.async.bulk.tensor" not in ptx or re.search(r"cp\.async\.c[ag]\b", ptx):
                problems.append("operands not loaded by TMA alone (cp.async.bulk.tensor)")
            if smem > estimated:
                problems.append(f"uses {smem} B of shared memory, above the tuner's estimate "
                                f"{estimated}: it may keep a config that does not fit")
            if _cuobjdump() is not None:
                cubin = compiled.asm["cubin"]
                resources = resource_usage(cubin)
                in_loop = main_loop_spills(cubin)
                usage = f" regs={resources['REG']} stack={resources['STACK']} " \
                        f"main-loop-spills={in_loop}"
                if in_loop:
                    problems.append(f"{in_loop} local loads/stores in the main loop")
                if config.kwargs.get("WARP_SPECIALIZE") and "setmaxnreg" not in ptx:
                    problems.append("WARP_SPECIALIZE, but no warp specialization in the PTX "
                                    "(no setmaxnreg)")
                if args.get("FLATTEN") and resources["STACK"]:
                    problems.append(f"ptxas spills: a {resources['STACK']}-byte stack frame")
        status = "ok  " if not problems else "FAIL"
        print(f"{status} {label} smem={smem}{estimate}{usage} "
              f"{time.perf_counter() - start:.1f}s", flush=True)
        failures.extend(f"{label}: {p}" for p in problems)


def _option(name: str) -> str | None:
    """The value of ``--name value`` (or ``--name=value``), else None."""
    for i, arg in enumerate(sys.argv):
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
        if arg == name and i + 1 < len(sys.argv):
            return sys.argv[i + 1]
    return None


# The FFN block's kernels are the linear forward's and the GELU kernels' (every config of which
# is compiled) with a dropout epilogue (Philox: several seconds per matmul compile), so one
# config (the largest tile) per dtype, fp16 left to bf16: the epilogue is what is new. The same
# for the GeGLU kernels' dropout epilogues (the gated block's).
EPILOGUE_ONLY = ("ffn_fwd_gelu_dropout", "ffn_bwd_dz", "gelu_dropout_fwd", "gelu_dropout_bwd",
                 "geglu_fwd+dropout", "geglu_act+dropout", "geglu_bwd_act+dropout",
                 "ffn_fwd_gelu_dropout_tma", "geglu_fwd_tma+dropout", "ffn_bwd_dz_tma")


def hopper_only(name: str) -> bool:
    """The Hopper variants are candidates on sm90+ only: never compiled for sm80."""
    return "_tma" in name


def _cases(dtype: torch.dtype, activation: str) -> list:
    return _matmul_cases(dtype, activation, 8192, 3072, 768) + \
        _elementwise_cases(dtype, activation, 1 << 24) + \
        _geglu_cases(dtype, activation, 8192, 16384, 2048) + \
        _hopper_cases(dtype, activation, 8192, 3072, 768, 16384, 2048)  # Gemma-2B's FFN


def kernel_names() -> list[str]:
    """Every kernel name the check compiles, in order."""
    return list(dict.fromkeys(name for name, *_ in _cases(torch.bfloat16, "gelu")))


def main() -> int:
    if "--list" in sys.argv:
        print("\n".join(kernel_names()))
        return 0
    failures: list[str] = []
    quick = "--quick" in sys.argv
    only = _option("--only")
    parts = [part for part in only.split(",") if part] if only else None
    names = _option("--names")
    exact = set(names.split(",")) if names else None
    block_m = _option("--block-m")
    arches = [_option("--arch")] if _option("--arch") else ["sm90", "sm80"]
    for arch in arches:
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            every_config = dtype == torch.bfloat16 and not quick
            for activation in ("gelu", "gelu_tanh", "quick_gelu"):
                if activation != "gelu" and dtype != torch.bfloat16:
                    continue
                for name, kernel, args, key in _cases(dtype, activation):
                    if parts is not None and not any(part in name for part in parts):
                        continue
                    if exact is not None and name not in exact:
                        continue
                    if name in EPILOGUE_ONLY and dtype == torch.float16:
                        continue
                    if hopper_only(name) and arch != "sm90":
                        continue
                    kept = _tuner_of(name).candidates(key, arch)
                    every = every_config and activation == "gelu" and name not in EPILOGUE_ONLY
                    kept = kept if every else kept[:1]
                    if block_m is not None:
                        kept = [c for c in kept
                                if c.kwargs.get("BLOCK_SIZE_M") == int(block_m)]
                    check(name, kernel, args, key, arch, kept, failures)
    if failures:
        print(f"\n{len(failures)} broken:", *failures, sep="\n")
        return 1
    print(f"\nevery kernel compiled for {' and '.join(arches)} within shared memory, on the "
          "tensor cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
