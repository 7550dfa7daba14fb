"""Run every benchmark: ``python -m bench`` from the repository root (``--help`` for options).

On a GPU: GELU forward/backward, fused Linear+bias+GELU infer/fwd/bwd/fwd+bwd, the
FeedForward block and GeGLU (at Gemma-2B and T5-base FFN shapes), at 8192 tokens and at decode
sizes (1, 16, 64 tokens, inference only), against eager PyTorch, the matmul alone, torch.compile
(default and max-autotune) and, for tanh, torch._addmm_activation; bf16, fp16, fp32 (IEEE) and
tf32. Each case also records the path ours took, every candidate path's time and ours' first-call
(tuning) time. A progress line per case, a markdown table at the end, and JSON + markdown + PNG
under ``bench/results/``.

Without a GPU: the same command checks every op under the Triton interpreter at small sizes
against float64 references and says that timings need a GPU; it times nothing and writes nothing.
Both modes report the bytes the FFN block, GeGLU and the gated block keep for the backward
against eager PyTorch's (exact on any device): the check per dtype, the benchmark in every
fwd+bwd case's ``saved`` columns.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import re
import sys
import time
import zlib
from pathlib import Path

import torch

# Triton reads TRITON_INTERPRET once, at import: decide before anything imports it.
GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
if not GPU:
    os.environ["TRITON_INTERPRET"] = "1"

from triton_gelu._runtime import launches  # noqa: E402
from triton_gelu.autotune import (  # noqa: E402
    DECODE_PRESETS, DECODE_TOKENS, PRESETS, TOKENS, decode_shapes, parse_shape,
)

from . import harness, op_modules, ops_geglu  # noqa: E402

OPS = {op.NAME: op for op in op_modules()}  # bench/ops_<op>.py
TINY = (37, 45, 51)  # multiples of no block size: every masked edge runs
# The largest M*K*N the interpreter check takes: 2M multiply-adds, about 20 s for every op and
# dtype on one core (256x256x512, 16x as much, took 330 s).
INTERPRETER_MAX_WORK = 2**21
GELU_SIZES_MB = (1, 4, 16, 64, 256, 1024)
QUICK = {"dtypes": "bf16", "preset": "bert-base", "sizes": "1,64,1024", "decode": "1",
         "geglu": "gemma-2b"}
ALL_PRESETS = {**PRESETS, **ops_geglu.PRESETS}  # any op may run at any preset's shape


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"presets ({TOKENS} tokens, in -> out): "
               + ", ".join(f"{k} {a}->{b}" for k, (a, b) in PRESETS.items())
               + "; GeGLU's (its default): "
               + ", ".join(f"{k} {a}->{b}" for k, (a, b) in ops_geglu.PRESETS.items())
               + f"; tiny {'x'.join(map(str, TINY))} (the CPU check)",
    )
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated: {', '.join(OPS)}")
    p.add_argument("--dtypes", help="comma-separated: bf16, fp16, fp32 (IEEE), tf32 "
                                    "(default: all; --quick: bf16; CPU: bf16, fp16, fp32)")
    p.add_argument("--approximate", default="none,tanh", help="comma-separated: none, tanh")
    p.add_argument("--modes", default=",".join(harness.MODES),
                   help="comma-separated: infer, fwd, bwd, fwd+bwd (GELU has fwd and bwd)")
    p.add_argument("--shapes", nargs="+", type=parse_shape, metavar="MxKxN",
                   help="matmul shapes: tokens x in_features x out_features")
    p.add_argument("--preset", help="comma-separated presets, or 'all' (default; --quick: "
                                    "bert-base; CPU: tiny)")
    p.add_argument("--tokens", type=int, default=TOKENS, help="tokens (M) of the presets")
    p.add_argument("--decode", help="comma-separated token counts of the decode cases, in "
                                    f"infer mode at the {' and '.join(DECODE_PRESETS)} widths "
                                    "when those presets are selected ('' for none; default: "
                                    f"{','.join(map(str, DECODE_TOKENS))}; --quick: 1)")
    p.add_argument("--sizes", help="GELU input sizes in MB (default: "
                                   f"{','.join(map(str, GELU_SIZES_MB))}; --quick: 1,64,1024)")
    p.add_argument("--baselines", default=",".join(harness.BASELINES),
                   help=f"comma-separated: {', '.join(harness.BASELINES)}")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    p.add_argument("--quick", action="store_true",
                   help="bf16, bert-base, three GELU sizes, no max-autotune")
    p.add_argument("--host", action="store_true",
                   help="host time per call of every entry point and module against eager "
                        "PyTorch, on any machine (bench/host.py)")
    p.add_argument("--fallback-throughput", action="store_true",
                   help="with --host: also the fallback's forward+backward at 2048x768->3072")
    p.add_argument("--json", type=Path, metavar="FILE",
                   help="with --host or --cold-start: write the records there")
    p.add_argument("--check", action="store_true",
                   help="only the correctness check (the default without a GPU)")
    p.add_argument("--cold-start", action="store_true",
                   help="no GPU needed: what a first call of each op compiles and times per "
                        "architecture and tuning policy, and what --export compiles (the real "
                        "tuner replayed with fake timings: bench/cold_start.py)")
    p.add_argument("--out", type=Path, default=Path("bench/results"), help="results directory")
    p.add_argument("--tag", default="", help="appended to the result files' names (a slice of "
                                              "a run: --tag llama-decode)")
    p.add_argument("--budget-s", type=float, default=math.inf,
                   help="start no case after this many seconds; the cases already in "
                        "<out>/<stem>.jsonl are skipped, so the same command continues")
    return p


def _choose(what: str, names: list[str], allowed) -> list[str]:
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise SystemExit(f"bench: unknown {what} {', '.join(unknown)}; "
                         f"choose from {', '.join(allowed)}")
    return names


def _shapes(args, gpu: bool) -> list[tuple[int, int, int]]:
    if args.shapes:
        big = [s for s in args.shapes if math.prod(s) > INTERPRETER_MAX_WORK]
        if big and not gpu:
            raise SystemExit(
                f"bench: --shapes {' '.join('x'.join(map(str, s)) for s in big)} is GPU-sized; "
                "without a GPU the check runs every kernel in Triton's interpreter (numpy), "
                f"about 10 s per million multiply-adds for all ops and dtypes, so it takes "
                f"M*K*N <= {INTERPRETER_MAX_WORK} (e.g. 64x96x128, or the default tiny "
                f"{'x'.join(map(str, TINY))}); timings at that size need a GPU")
        return args.shapes
    preset = args.preset or (QUICK["preset"] if args.quick else "all")
    names = _choose("preset", _split(preset), [*ALL_PRESETS, "tiny", "all"])
    names = list(dict.fromkeys(p for n in names for p in (PRESETS if n == "all" else [n])))
    if not gpu and names != ["tiny"]:
        if args.preset:
            print(f"bench: preset {preset!r} is GPU-sized; the interpreter check uses 'tiny'")
        names = ["tiny"]
    return [TINY if n == "tiny" else (args.tokens, *ALL_PRESETS[n]) for n in names]


def _geglu_shapes(args, gpu: bool, shapes: list[tuple[int, int, int]]):
    """GeGLU's own presets (Gemma-2B, T5-base) unless shapes or presets were asked for."""
    if args.shapes or args.preset or not gpu:
        return shapes
    names = [QUICK["geglu"]] if args.quick else list(ops_geglu.PRESETS)
    return [(args.tokens, *ops_geglu.PRESETS[n]) for n in names]


def _decode_shapes(args, shapes: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Decode cases at the selected presets among DECODE_PRESETS (none with --shapes)."""
    text = args.decode if args.decode is not None else (
        QUICK["decode"] if args.quick else ",".join(map(str, DECODE_TOKENS)))
    try:
        tokens = [int(t) for t in _split(text)]
    except ValueError:
        raise SystemExit(f"bench: --decode takes token counts, like 1,16,64; got {text!r}")
    if args.shapes:
        return []
    widths = {(k, n) for _, k, n in shapes}
    presets = tuple(p for p in DECODE_PRESETS if PRESETS[p] in widths)
    return decode_shapes(tokens, presets)


def selection(args, gpu: bool) -> harness.Selection:
    default_dtypes = QUICK["dtypes"] if args.quick else ("bf16,fp16,fp32,tf32" if gpu
                                                         else "bf16,fp16,fp32")
    baselines = _choose("baseline", _split(args.baselines), harness.BASELINES)
    if args.no_compile:
        baselines = [b for b in baselines if not b.startswith("compile")]
    if args.quick:
        baselines = [b for b in baselines if b != "compile-max"]
    sizes = args.sizes or (QUICK["sizes"] if args.quick else ",".join(map(str, GELU_SIZES_MB)))
    try:
        sizes_mb = [float(s) for s in _split(sizes)]
    except ValueError:
        raise SystemExit(f"bench: --sizes takes MB, like 1,64,1024; got {sizes!r}")
    shapes = _shapes(args, gpu)
    decode = _decode_shapes(args, shapes)  # checked everywhere; decode sizes are GPU-only
    return harness.Selection(
        shapes=shapes, geglu_shapes=_geglu_shapes(args, gpu, shapes), gelu_sizes_mb=sizes_mb,
        decode_shapes=decode if gpu else [],
        dtypes=_choose("dtype", _split(args.dtypes or default_dtypes), harness.DTYPES),
        approximates=_choose("approximate", _split(args.approximate), ("none", "tanh")),
        modes=_choose("mode", _split(args.modes), harness.MODES),
        baselines=baselines,
    )


# ---- the correctness check (CPU, or --check) ---------------------------------------------------


def run_check(ops: list[str], sel: harness.Selection, device: str) -> int:
    if device == "cpu":
        why = "TRITON_INTERPRET is set" if torch.cuda.is_available() else "No GPU"
        print(f"{why}: checking every op under the Triton interpreter at small sizes against "
              "float64. Timings need a GPU; nothing is timed here.")
    else:
        print(f"Correctness check on {torch.cuda.get_device_name()} at small sizes.")
    dtypes = list(dict.fromkeys("fp32" if d == "tf32" else d for d in sel.dtypes))
    failures = total = 0
    for name in ops:
        before = sum(launches.values())
        for shape in sel.shapes:
            for dtype in dtypes:
                for approximate in sel.approximates:
                    # The same inputs every run, so a result reproduces.
                    torch.manual_seed(zlib.crc32(f"{name} {shape} {dtype} {approximate}".encode()))
                    with harness.precision("fp32"):  # float32 in IEEE, like the reference
                        for check in OPS[name].checks(shape, harness.DTYPES[dtype],
                                                      approximate, device):
                            results = harness.compare(check)
                            for line in harness.check_lines(results):
                                print(line)
                            total += len(results)
                            failures += sum(not r["ok"] for r in results)
                        saved_ratios = getattr(OPS[name], "saved_ratios", None)
                        # Bytes are exact anywhere: report them (once: the form changes none).
                        if saved_ratios is not None and approximate == sel.approximates[0]:
                            ratios = saved_ratios(shape, harness.DTYPES[dtype], approximate,
                                                  device)
                            print(harness.saved_line(name, shape, harness.DTYPES[dtype],
                                                     approximate, ratios))
        if sum(launches.values()) == before:
            print(f"FAIL {name}: no Triton kernel ran (a PyTorch fallback answered)")
            failures += 1
    print(f"{total - failures}/{total} comparisons no worse than 2x torch's own error + ulps"
          + (f"; {failures} FAILED" if failures else ""))
    if device == "cpu":
        print("Timings need a GPU: run `python -m bench` on a machine with CUDA.")
    return 1 if failures else 0


# ---- the benchmark (GPU) -----------------------------------------------------------------------


def run_bench(ops: list[str], sel: harness.Selection, out: Path, stem: str,
              budget_s: float = math.inf) -> int:
    deadline = time.monotonic() + budget_s
    clock = harness.GpuClock()
    meta = harness.environment()
    print(f"{meta['device']}, driver {meta['driver']}, torch {meta['torch']}, "
          f"triton {meta['triton']}")
    meta.update(harness.measure_device(clock))
    meta.update(argv=sys.argv[1:], selection=vars(sel))
    print(f"measured: copy bandwidth {meta['copy_gbps']:.0f} GB/s, bf16 matmul peak "
          f"{meta['matmul_tflops']:.0f} TFLOP/s")
    cases = [case for name in ops for case in OPS[name].cases(sel)]
    # One JSON line per finished case, flushed: a run cut short keeps them, and the same
    # command skips them.
    lines = out / f"{stem}.jsonl"
    records = harness.read_lines(lines)
    done = {harness.label(r) for r in records}
    remaining = []
    for i, case in enumerate(cases, 1):
        if harness.case_label(case) in done:
            continue
        if time.monotonic() >= deadline:
            remaining.append(harness.case_label(case))
            continue
        if any(b.startswith("compile") for b in sel.baselines):
            import torch._dynamo as dynamo

            dynamo.reset()  # a fresh compile per case, never the recompile-limit fallback
        record = harness.run_case(case, meta, clock)
        records.append(record)
        harness.append_line(lines, record)
        print(harness.progress_line(i, len(cases), record), flush=True)
        gc.collect()
        torch.cuda.empty_cache()
    print()
    if remaining:
        print(f"bench: budget reached; {len(remaining)} case(s) remain (first: {remaining[0]}); "
              "run the same command again to continue")
    print(harness.markdown_report(meta, records))
    for path in harness.write_results(out, stem, meta, records):
        print(f"wrote {path}")
    ours_failed = [harness.label(r) for r in records
                   if "error" in r["providers"].get(harness.OURS, {"error": "not run"})]
    if ours_failed:  # a baseline failing (torch.compile) is recorded; ours failing is a bug
        print(f"bench: ours failed in {len(ours_failed)} case(s): {', '.join(ours_failed)}")
    return 1 if ours_failed else 3 if remaining else 0


def run_cold_start(json_path: Path | None, quick: bool = False) -> int:
    """Print (and with ``json_path`` write) the cold-start records (``bench/cold_start.py``);
    ``quick``: the default policy on sm90 at the smallest preset only."""
    import json

    from bench import cold_start

    if quick:
        rows = cold_start.records(arches=("sm90",), policies=("fast",), presets=("bert-base",),
                                  ops=cold_start.op_names())
    else:
        rows = cold_start.records()
    print("cold start: configs a first call compiles (and paths it times), tuner replayed "
          "with fake timings, no kernel run")
    print(cold_start.table(rows))
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(rows, indent=1) + "\n")
        print(f"wrote {json_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.cold_start:
        if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            # The replay needs the interpreter's launchers (CPU and meta tensors), which a
            # process is given at its start: run it in one of its own.
            import subprocess

            env = {**os.environ, "TRITON_INTERPRET": "1"}
            argv = sys.argv[1:] if argv is None else argv
            return subprocess.call([sys.executable, "-m", "bench", *argv], env=env)
        return run_cold_start(args.json)
    if args.host:
        from . import host

        return host.main(args.json, args.fallback_throughput)
    ops = _choose("op", _split(args.ops), OPS)
    sel = selection(args, GPU and not args.check)
    if not GPU or args.check:
        status = run_check(ops, sel, "cuda" if GPU else "cpu")
        if not GPU:  # what a GPU's first calls would compile, which needs none (quick)
            run_cold_start(None, quick=True)
        return status
    stem = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")
    tag = re.sub(r"[^a-z0-9]+", "-", args.tag.lower()).strip("-")
    stem += ("-quick" if args.quick else "") + (f"-{tag}" if tag else "")
    return run_bench(ops, sel, args.out, stem, args.budget_s)


if __name__ == "__main__":
    sys.exit(main())
