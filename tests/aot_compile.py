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

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from triton_gelu.tuning import spaces as _spaces  # noqa: E402
from triton_gelu.tuning.compiled import (  # noqa: E402
    TARGETS, _cuobjdump, cases, compile_kernel, hopper_only, kernel_names, main_loop_spills,
    resource_usage, tuner_of,
)


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
        if smem > _spaces.SMEM_BYTES[arch]:
            problems.append(
                f"uses {smem} B of shared memory, {arch} has {_spaces.SMEM_BYTES[arch]}"
            )
        if is_matmul:
            want = "wgmma" if arch == "sm90" else "mma.sync"
            if want not in ptx:
                problems.append(f"no {want} in the PTX: the matmul is not on the tensor cores")
        elif "ld.global.v4" not in ptx or "st.global.v4" not in ptx:
            problems.append("no 16-byte vector loads and stores in the PTX")
        estimate, usage = "", ""
        if is_matmul:  # the tuner's estimate beside the real figure, to keep the fit honest
            roles = getattr(tuner_of(kernel_name).prune, "keywords", {})
            itemsize = 2 if key[3] != torch.float32 else 4
            estimated = _spaces.matmul_smem_bytes(config, itemsize, arch, **roles)
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
                for name, kernel, args, key in cases(dtype, activation):
                    if parts is not None and not any(part in name for part in parts):
                        continue
                    if exact is not None and name not in exact:
                        continue
                    if name in EPILOGUE_ONLY and dtype == torch.float16:
                        continue
                    if hopper_only(name) and arch != "sm90":
                        continue
                    kept = tuner_of(name).candidates(key, arch)
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
