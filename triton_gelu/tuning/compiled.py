"""Compile the package's kernels for a GPU that need not be here, and read what ptxas made of them.

``triton.compile`` with a ``GPUTarget`` runs Triton's real pipeline down to the cubin for sm_80 or
sm_90 with the ptxas Triton ships, so none of this needs a GPU; the bundled cuobjdump reads the
registers, stack frame and SASS back. ``cases()`` gives every kernel the package launches, as its
launchers specialise it for a large FFN problem (bf16 unless asked otherwise; "+dropout" is the
same Tuner's kernel with its dropout epilogue); ``inspect_config`` turns one compile into the
facts ``facts.py`` keeps. Used by ``python -m triton_gelu.autotune --inspect`` and by
tests/aot_compile.py (which checks promises on the same compiles).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ..kernels import _matmul
from .spaces import TILE_ROWS, bucket
from .tuner import Tuner

TARGETS = {"sm80": GPUTarget("cuda", 80, 32), "sm90": GPUTarget("cuda", 90, 32)}
# The architectures facts are made for (the config spaces have no sm100 of their own yet).
ARCHES = tuple(TARGETS)
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
              ACTIVATION=activation, WRITE_DZ=True, COMPUTE_DB=True, ROWS=TILE_ROWS)
    key = (bucket(M), N, K, dtype, activation)
    return [("linear_gelu_fwd", None, fwd, key),
            ("linear_gelu_bwd_dz", None, dz,
             (bucket(M), N, dtype, activation, True, True)),
            ("ffn_fwd_gelu_dropout", None, ffn_fwd, key),
            ("ffn_bwd_dz", None, ffn_dz, key)]


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
    key = (bucket(M), N, K, dtype, activation)
    gated_key = (bucket(M), gated_n, gated_k, dtype, activation)
    return [("linear_gelu_fwd_tma", None, fwd, key),
            ("ffn_fwd_gelu_dropout_tma", None,
             {**fwd, **DROPOUT, "FLATTEN": False}, key),
            ("ffn_bwd_dz_tma", None, ffn_dz, key),
            ("geglu_fwd_tma", None, geglu, gated_key),
            ("geglu_fwd_tma+dropout", None, {**geglu, **DROPOUT}, gated_key)]


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
    key = (bucket(M), N, K, dtype, activation)
    elementwise_key = (bucket(n), dtype, activation)
    return [("geglu_fwd", None, fwd, key),
            ("geglu_act", None, act, elementwise_key),
            ("geglu_bwd_act", None, bwd_act, elementwise_key),
            ("geglu_fwd+dropout", None, {**fwd, **DROPOUT}, key),
            ("geglu_act+dropout", None, {**act, **DROPOUT}, elementwise_key),
            ("geglu_bwd_act+dropout", None, {**bwd_act, **DROPOUT},
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
    key = (bucket(n), dtype, activation)
    return [("gelu_fwd", None, fwd, key), ("gelu_bwd", None, bwd, key),
            ("gelu_dropout_fwd", None, dropout_fwd, key),
            ("gelu_dropout_bwd", None, dropout_bwd, key)]


def tuner_of(name: str) -> Tuner:
    """The Tuner the package launches ``name`` with, for its config space and pruning (a
    "+dropout" case: the same Tuner's kernel with its dropout epilogue)."""
    import importlib

    name = name.partition("+")[0]
    for module in ("triton_gelu.kernels.gelu", "triton_gelu.kernels.linear_gelu",
                   "triton_gelu.kernels.geglu", "triton_gelu.kernels.ffn"):
        for value in vars(importlib.import_module(module)).values():
            if isinstance(value, Tuner) and value.name == name:
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


def main_loop(cubin: bytes) -> tuple[int, int] | None:
    """(SASS instructions, local loads and stores) of the innermost loop holding the first
    tensor-core instruction (HGMMA on sm_90, HMMA on sm_80): the loop from the target of a
    backward branch to the branch. None for a kernel without one (the elementwise kernels)."""
    lines = [(int(m.group(1), 16), text) for text in _cubin_tool(cubin, "-sass").splitlines()
             if (m := re.search(r"/\*([0-9a-f]{4,})\*/", text))]
    mma = [at for at, text in lines if re.search(r"\b(HGMMA|HMMA)\b", text)]
    loops = [(int(m.group(1), 16), at) for at, text in lines
             if (m := re.search(r"BRA (?:`\(\.L_x_\d+\) )?0x([0-9a-f]+)", text))
             and int(m.group(1), 16) < at]
    inner = [(start, end) for start, end in loops if mma and start <= mma[0] <= end]
    if not inner:
        return None
    start, end = min(inner, key=lambda loop: loop[1] - loop[0])
    body = [text for at, text in lines if start <= at <= end]
    return len(body), sum(1 for text in body if re.search(r"\b(STL|LDL)\b", text))


def main_loop_spills(cubin: bytes) -> int:
    """Local loads and stores (spill traffic) in the main loop (see ``main_loop``)."""
    loop = main_loop(cubin)
    return 0 if loop is None else loop[1]


def mma_kind(ptx: str) -> str | None:
    """How the kernel reaches the tensor cores: "wgmma" (Hopper), "mma.sync", or None."""
    return "wgmma" if "wgmma" in ptx else "mma.sync" if "mma.sync" in ptx else None


def load_kind(ptx: str) -> str:
    """How operands reach shared memory: "tma" (cp.async.bulk.tensor), "cp.async", or "ld.global"
    (registers only)."""
    if "cp.async.bulk.tensor" in ptx:
        return "tma"
    return "cp.async" if re.search(r"cp\.async\.c[ag]\b", ptx) else "ld.global"


def inspect_config(kernel, args: dict, arch: str, config: triton.Config) -> dict:
    """The facts of one compile: registers, spills (stack bytes, and local accesses inside the
    main loop), shared memory, MMA and load kinds, SASS instructions a main-loop iteration;
    ``{"error": text}`` where it does not compile."""
    try:
        compiled = compile_kernel(kernel, args, TARGETS[arch], config)
    except Exception as exc:  # noqa: BLE001 - a config that does not compile is a fact too
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}
    ptx, cubin = compiled.asm["ptx"], compiled.asm["cubin"]
    resources = resource_usage(cubin) if _cuobjdump() else {}
    loop = main_loop(cubin) if _cuobjdump() else None
    return {"regs": resources.get("REG"), "spills": resources.get("STACK"),
            "spills_in_loop": None if loop is None else loop[1],
            "loop_instructions": None if loop is None else loop[0],
            "smem": compiled.metadata.shared, "mma": mma_kind(ptx), "loads": load_kind(ptx)}


def hopper_only(name: str) -> bool:
    """The Hopper variants are candidates on sm90+ only: never compiled for sm80."""
    return "_tma" in name


def cases(dtype: torch.dtype = torch.bfloat16, activation: str = "gelu") -> list:
    """(name, kernel, args, key) of every kernel the package launches, at a large FFN problem;
    the kernel is its Tuner's (a "+dropout" case: the same Tuner's kernel)."""
    return [(name, tuner_of(name).kernel, args, key) for name, _, args, key in _cases(
        dtype, activation)]


def _cases(dtype: torch.dtype, activation: str) -> list:
    return _matmul_cases(dtype, activation, 8192, 3072, 768) + \
        _elementwise_cases(dtype, activation, 1 << 24) + \
        _geglu_cases(dtype, activation, 8192, 16384, 2048) + \
        _hopper_cases(dtype, activation, 8192, 3072, 768, 16384, 2048)  # Gemma-2B's FFN


def kernel_names() -> list[str]:
    """Every kernel name the check compiles, in order."""
    return list(dict.fromkeys(name for name, *_ in cases()))



# ---- facts for a whole architecture (python -m triton_gelu.autotune --inspect) --------------

PROBLEM = "8192x3072x768 (gated 8192x16384x2048), bf16, activation gelu (erf)"


def _space(name: str, key: tuple, arch: str) -> list[triton.Config]:
    """The configs the package's Tuner for case ``name`` can launch for ``arch``: its space
    pruned by shape and shared-memory estimate only (``Tuner.pruned_space``) at the case's
    large problem, which every smaller problem's pruning keeps within."""
    return tuner_of(name).pruned_space(key, arch)


def _inspect_task(task: tuple) -> tuple[str, str, dict]:
    """One compile in a worker process: (case name, config text, facts)."""
    import time

    from .facts import config_text

    name, arch, kwargs, num_warps, num_stages = task
    case = next(c for c in cases() if c[0] == name)
    config = triton.Config(dict(kwargs), num_warps=num_warps, num_stages=num_stages)
    start = time.perf_counter()
    facts = inspect_config(case[1], case[2], arch, config)
    facts["compile_s"] = round(time.perf_counter() - start, 2)
    return name, config_text(kwargs, num_warps, num_stages), facts


def generate(arch: str, jobs: int = 2, names: list[str] | None = None,
             previous: dict | None = None, progress=print) -> dict:
    """Compile every case (or only ``names``) x config for ``arch`` in ``jobs`` processes and
    return the facts document; cases not compiled now are kept from ``previous``."""
    import concurrent.futures
    import multiprocessing

    from .facts import SCHEMA

    document = {"schema": SCHEMA, "arch": arch, "triton": triton.__version__,
                "dtype": "bfloat16", "problem": PROBLEM, "kernels": {}}
    kept = dict((previous or {}).get("kernels", {}))
    tasks = []
    for name, _, _, key in cases():
        if hopper_only(name) and arch != "sm90":
            continue
        if names is not None and name not in names:
            if name in kept:
                document["kernels"][name] = kept[name]
            continue
        tuner = tuner_of(name)
        document["kernels"][name] = {"tuner": tuner.name, "source_hash": tuner.source_hash,
                                     "configs": {}}
        tasks += [(name, arch, dict(c.kwargs), c.num_warps, c.num_stages)
                  for c in _space(name, key, arch)]
    # Forked workers share the imported package; each compile is one task, longest first
    # would need the facts we are making, so the space's order it is.
    context = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        for done, (name, text, facts) in enumerate(pool.map(_inspect_task, tasks), 1):
            document["kernels"][name]["configs"][text] = facts
            progress(f"[{done}/{len(tasks)}] {arch} {name} {text} " + " ".join(
                f"{k}={facts.get(k)}" for k in ("regs", "spills", "spills_in_loop",
                                                "loop_instructions", "smem", "mma", "loads",
                                                "compile_s", "error") if k in facts))
    return document
