"""The shared benchmark harness: cases, timing, ratios, floors, correctness checks and reports.

Each op module (``ops_*.py``) only says how to build its inputs and its provider callables; this
module runs them. On a GPU, every figure is the median of ``triton.testing.do_bench`` after a
warm-up call (which also compiles and autotunes), and the same run measures the device's copy
bandwidth and bf16 matmul peak, so results are reported as ratios:

- speedup of ours vs each baseline: baseline ms / ours ms (> 1: ours is faster);
- the two floors of a case: ``bytes / copy bandwidth`` (memory) and ``flops / bf16 matmul
  peak`` (compute); the larger is the floor, and ``floor / ms`` is the fraction achieved;
- peak memory of a fwd+bwd step, above its inputs, vs eager PyTorch;
- which path ours took (``tuning.paths.Paths``: fused kernel, cuBLAS + our GELU, PyTorch's own op)
  with every candidate path's time, and what ours' first call cost (``first_call_ms``: building
  the inputs, compiling and tuning included; ``tuning_ms``: the part spent timing candidates);
- for ops that give them (the FFN block, GeGLU), the bytes autograd keeps between forward and
  backward (``memory.saved_activation_bytes``: exact, on any device) vs eager PyTorch.

Without a GPU nothing is timed: ``check`` compares every op with a float64 reference under the
Triton interpreter, with the test suite's rule (no worse than twice torch's own error in the same
dtype, plus a few ulps).
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import math
import os
import platform
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

# Dtype names on the command line: "fp32" is IEEE float32, "tf32" float32 with TF32 matmuls.
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
          "tf32": torch.float32}
OURS = "ours"
EAGER = "eager"
# Baselines in report order; "matmul" is the matmul alone (the compute floor of a fused op).
BASELINES = ("eager", "compile", "compile-max", "matmul", "addmm-act")
# "infer": a forward with nothing requiring grad (serving: no pre-activation kept); the matmul
# ops' "fwd" is a training forward (inputs require grad).
MODES = ("infer", "fwd", "bwd", "fwd+bwd")
# Below this speedup against eager a case misses the "never slower than PyTorch" target.
TARGET_VS_EAGER = 0.98
# The tests' slack above twice torch's error (tests/helpers.py).
ATOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}

Factory = Callable[[], Callable[[], object]]  # builds (may run a forward), returns the timed fn


@dataclass
class Case:
    """One benchmark figure set: an op in one mode, shape, dtype and GELU form."""

    op: str
    mode: str  # "fwd", "bwd" or "fwd+bwd"
    shape: str
    dtype: str  # a key of DTYPES
    approximate: str
    bytes: float  # the least memory traffic the op needs
    flops: float
    build: Callable[[], dict[str, Factory]]  # provider name -> factory; allocates the inputs
    # Saved-activation bytes over eager's, per variant ("ours p=0.1", ...), when the op has them.
    saved: Callable[[], dict[str, float]] | None = None


@dataclass
class Selection:
    """What to run, from the command line; each op takes the parts it uses."""

    shapes: list[tuple[int, int, int]]  # (M, K, N): tokens, in_features, out_features
    gelu_sizes_mb: list[float]  # standalone GELU input sizes
    dtypes: list[str]
    approximates: list[str]
    modes: list[str]
    baselines: list[str]
    device: str = "cuda"
    # Serving one token at a time (and small batches): benchmarked in "infer" mode only.
    decode_shapes: list[tuple[int, int, int]] = field(default_factory=list)
    geglu_shapes: list[tuple[int, int, int]] = field(default_factory=list)  # gated FFN shapes


def shape_text(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def matmul_cases(name: str, sel: Selection, build: Callable,
                 cost: Callable[[tuple, str, Callable], int],
                 bytes_per: Callable[[int, int, int, str], int],
                 flops_per: Callable[[int, int, int, str], int],
                 saved: Callable[..., dict[str, float]] | None = None) -> list[Case]:
    """One Case per shape x dtype x GELU form x mode of a matmul op (all of MODES; the decode
    shapes in "infer" mode only).

    ``cost(shape, mode, counter)`` adds up ``counter(m, k, n, mode)`` over the op's matmuls;
    ``build(shape, dtype, approximate, mode, baselines, device)`` makes the timed callables;
    ``saved(shape, dtype, approximate, device)``, if given, the saved-bytes ratios of the
    fwd+bwd case.
    """
    out = []
    shapes = [(shape, sel.modes) for shape in sel.shapes]
    shapes += [(shape, [m for m in sel.modes if m == "infer"]) for shape in sel.decode_shapes]
    for shape, modes in shapes:
        for dtype_name in sel.dtypes:
            dtype = DTYPES[dtype_name]
            for approximate in sel.approximates:
                for mode in (m for m in modes if m in MODES):
                    out.append(Case(
                        name, mode, shape_text(shape), dtype_name, approximate,
                        bytes=cost(shape, mode, bytes_per) * dtype.itemsize,
                        flops=cost(shape, mode, flops_per),
                        build=functools.partial(build, shape, dtype, approximate, mode,
                                                sel.baselines, sel.device),
                        saved=functools.partial(saved, shape, dtype, approximate, sel.device)
                        if saved is not None and mode == "fwd+bwd" else None,
                    ))
    return out


# ---- timing closures shared by the ops -----------------------------------------------------


def timed(fn: Callable, inputs: Sequence[torch.Tensor], mode: str,
          params: Sequence[torch.Tensor] = ()) -> Factory:
    """The factory of the callable to time for ``fn(*inputs)`` in ``mode``.

    infer: the forward under ``torch.inference_mode``. fwd: the forward alone. bwd: the backward
    alone, through the graph of one forward kept with ``retain_graph``. fwd+bwd: both. Gradients
    go to every input and param that requires grad, with ``torch.autograd.grad`` (nothing
    accumulates between repetitions).
    """
    leaves = [t for t in (*inputs, *params) if t.requires_grad]

    def infer():
        with torch.inference_mode():
            return fn(*inputs)

    def factory():
        if mode == "infer":
            return infer
        if mode == "fwd":
            return lambda: fn(*inputs)
        y = fn(*inputs)
        dy = torch.randn_like(y)
        if mode == "bwd":
            return lambda: torch.autograd.grad(y, leaves, dy, retain_graph=True,
                                               allow_unused=True)
        del y
        return lambda: torch.autograd.grad(fn(*inputs), leaves, dy, allow_unused=True)

    return factory


def compiled(fn: Callable, mode: str | None) -> Callable:
    """``torch.compile(fn)`` (``mode`` None: default; "max-autotune"); compiles on first call."""
    return torch.compile(fn, mode=mode, dynamic=False)


def add_compile_baselines(fns: dict[str, Callable], eager: Callable, baselines: Iterable[str]):
    if "compile" in baselines:
        fns["compile"] = compiled(eager, None)
    if "compile-max" in baselines:
        fns["compile-max"] = compiled(eager, "max-autotune")


@contextlib.contextmanager
def precision(dtype: str):
    """TF32 matmuls on for "tf32", off for "fp32" (IEEE); the flag is restored afterwards."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = dtype == "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


# ---- the GPU side: device figures and timing -----------------------------------------------


class GpuClock:
    """Times callables on the current GPU. Tests replace it with a fake."""

    def sync(self) -> None:
        torch.cuda.synchronize()

    def time_ms(self, fn: Callable[[], object]) -> float:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    def now_ms(self) -> float:
        """Wall-clock milliseconds, after the GPU's queue drained."""
        self.sync()
        return time.perf_counter() * 1e3

    def peak_bytes(self, fn: Callable[[], object]) -> int:
        """Peak memory allocated while ``fn`` runs, above what was allocated before."""
        self.sync()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        self.sync()
        return torch.cuda.max_memory_allocated() - before


def measure_device(clock: GpuClock) -> dict:
    """Copy bandwidth (GB/s, read + write of a 1 GiB buffer) and bf16 matmul peak (TFLOP/s,
    8192^3), measured once per run: the denominators of every fraction."""
    src = torch.empty(2**28, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = clock.time_ms(lambda: dst.copy_(src))
    copy_gbps = 2 * src.nbytes / copy_ms / 1e6
    del src, dst
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    matmul_ms = clock.time_ms(lambda: a @ b)
    return {"copy_gbps": copy_gbps, "matmul_tflops": 2 * 8192**3 / matmul_ms / 1e9}


def _driver_version() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        )
        return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown (nvidia-smi unavailable)"


def environment() -> dict:
    """Who measured: device, driver, library versions, date."""
    import triton

    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "triton": triton.__version__,
        "python": platform.python_version(), "cuda_runtime": torch.version.cuda,
    }
    if torch.cuda.is_available():
        meta.update(device=torch.cuda.get_device_name(),
                    capability=".".join(map(str, torch.cuda.get_device_capability())),
                    driver=_driver_version())
    return meta


def error_text(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200] if lines else ''}"


def path_summary(seen: list) -> dict:
    """What ``tuning.paths.recording_paths`` saw during ours' first call: per op, the path taken,
    how it was chosen and every candidate's ms; plus the flat "path" and "candidates" (an op's
    own names when one op chose, "op=name" when several did)."""
    ops = {}
    for op, choice in seen:  # the last call of an op wins
        ops[op] = {"path": choice.path, "source": choice.source,
                   "candidates": dict(choice.candidates)}
    if len(ops) == 1:
        (only,) = ops.values()
        return {"path": only["path"], "candidates": only["candidates"], "paths": ops}
    return {"path": ", ".join(f"{op}={o['path']}" for op, o in ops.items()),
            "candidates": {f"{op}={name}": ms for op, o in ops.items()
                           for name, ms in o["candidates"].items()},
            "paths": ops}


def run_case(case: Case, device: dict, clock: GpuClock) -> dict:
    """Time every provider of ``case``; return its record (see ``summarize``)."""
    from triton_gelu.tuning import chooser as _chooser
    from triton_gelu.tuning import paths as _paths

    timings, peaks, errors, first = {}, {}, {}, {}
    with precision(case.dtype):
        try:
            factories = case.build()
        except Exception as e:  # inputs that do not fit, an op missing from this build
            return summarize(case, {}, {}, {OURS: error_text(e)}, device)
        for name, factory in factories.items():
            try:
                start, tuned = clock.now_ms(), _chooser.tuned_seconds
                fn = factory()
                with _paths.recording_paths() as seen:
                    fn()  # warm-up: compiles, autotunes, chooses paths
                if name == OURS:
                    first = {"first_call_ms": clock.now_ms() - start,
                             "tuning_ms": (_chooser.tuned_seconds - tuned) * 1e3,
                             **path_summary(seen)}
                clock.sync()
                timings[name] = clock.time_ms(fn)
                if case.mode == "fwd+bwd":
                    peaks[name] = clock.peak_bytes(fn)
            except Exception as e:  # e.g. torch.compile failing: record it, keep going
                errors[name] = error_text(e)
            fn = None
    record = summarize(case, timings, peaks, errors, device, first)
    if case.saved is not None:
        try:
            record["saved_vs_eager"] = case.saved()
        except Exception as e:
            record["providers"].setdefault(OURS, {})["error"] = error_text(e)
    return record


def summarize(case: Case, timings: dict[str, float], peaks: dict[str, int],
              errors: dict[str, str], device: dict, ours_first_call: dict | None = None) -> dict:
    """A case's record: its figures per provider and every ratio derived from them.

    floor_memory_ms = bytes / copy bandwidth; floor_compute_ms = flops / bf16 matmul peak;
    floor_ms is the larger. Per provider: ms, GB/s, TFLOP/s, fraction_of_floor = floor_ms / ms,
    and for ours speedup[baseline] = baseline ms / ours ms; memory_vs_eager = peak / eager peak.
    ``ours_first_call`` (from ``run_case``) adds "path", "candidates", "paths",
    "first_call_ms" and "tuning_ms".
    """
    copy_gbps, matmul_tflops = device["copy_gbps"], device["matmul_tflops"]
    floor_memory_ms = case.bytes / copy_gbps / 1e6
    floor_compute_ms = case.flops / matmul_tflops / 1e9
    floor_ms = max(floor_memory_ms, floor_compute_ms)
    providers = {}
    for name in [*timings, *(n for n in errors if n not in timings)]:
        ms = timings.get(name)
        entry: dict = {"ms": ms}
        if ms is not None and ms > 0:
            entry.update(
                gbps=case.bytes / ms / 1e6, tflops=case.flops / ms / 1e9,
                fraction_of_bandwidth=case.bytes / ms / 1e6 / copy_gbps,
                fraction_of_peak=case.flops / ms / 1e9 / matmul_tflops,
                fraction_of_floor=floor_ms / ms,
            )
        if name in peaks:
            entry["peak_mb"] = peaks[name] / 2**20
            if peaks.get(EAGER):
                entry["memory_vs_eager"] = peaks[name] / peaks[EAGER]
        if name in errors:
            entry["error"] = errors[name]
        providers[name] = entry
    ours_ms = timings.get(OURS)
    speedup = {name: timings[name] / ours_ms for name in timings
               if not name.startswith(OURS) and ours_ms}
    return {
        "op": case.op, "mode": case.mode, "shape": case.shape, "dtype": case.dtype,
        "approximate": case.approximate, "bytes": case.bytes, "flops": case.flops,
        "floor_memory_ms": floor_memory_ms, "floor_compute_ms": floor_compute_ms,
        "floor_ms": floor_ms, "bound": "memory" if floor_memory_ms >= floor_compute_ms
        else "compute", "providers": providers, "speedup": speedup,
        "path": None, "candidates": {}, "paths": {}, "first_call_ms": None, "tuning_ms": None,
        **(ours_first_call or {}),
    }


def label(record: dict) -> str:
    return (f"{record['op']} {record['mode']} {record['dtype']} {record['approximate']} "
            f"{record['shape']}")


def case_label(case: Case) -> str:
    """``label`` of the record ``case`` will make."""
    return f"{case.op} {case.mode} {case.dtype} {case.approximate} {case.shape}"


def read_lines(path: Path) -> list[dict]:
    """The records of a JSON-lines file (none if it does not exist; a line cut short by a kill
    is dropped, so its case runs again)."""
    records = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return records


def append_line(path: Path, record: dict) -> None:
    """Append one record to a JSON-lines file, flushed to disk before returning."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def progress_line(index: int, total: int, record: dict) -> str:
    """``[ 3/48] linear_gelu fwd bf16 none 8192x768x3072: ours 0.412 ms (...) | eager 1.31x``"""
    head = f"[{index:>{len(str(total))}}/{total}] {label(record)}:"
    ours = record["providers"].get(OURS, {})
    if ours.get("ms") is None:
        return f"{head} ours failed: {ours.get('error', 'not run')}"
    figures = (f"{ours['gbps']:.0f} GB/s" if record["bound"] == "memory"
               else f"{ours['tflops']:.1f} TFLOP/s")
    parts = [f"{head} ours {ours['ms']:.4f} ms ({figures}, {ours['fraction_of_floor']:.2f} "
             f"of the {record['bound']} floor)"]
    if record.get("path"):
        parts.append(f"path {record['path']}")
    for name, entry in record["providers"].items():
        if name == OURS:
            continue
        if name in record["speedup"]:
            parts.append(f"vs {name} {record['speedup'][name]:.2f}x")
        elif "error" in entry:
            parts.append(f"{name} failed")
    return " | ".join(parts)


# ---- reports ---------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{value:{spec}}{suffix}"


def markdown_report(meta: dict, records: list[dict]) -> str:
    """Markdown: the run's device figures, then one table per op, one line per case."""
    lines = [
        f"# triton_gelu benchmark on {meta.get('device', '?')}",
        "",
        f"{meta.get('date', '?')}; driver {meta.get('driver', '?')}, torch "
        f"{meta.get('torch', '?')}, triton {meta.get('triton', '?')}. Measured in this run: "
        f"copy bandwidth {_fmt(meta.get('copy_gbps'), '.0f')} GB/s, bf16 matmul peak "
        f"{_fmt(meta.get('matmul_tflops'), '.0f')} TFLOP/s.",
        "",
        "Times are medians of `triton.testing.do_bench`. *of floor* = max(bytes / copy "
        "bandwidth, flops / bf16 matmul peak) / time. *vs X* = X's time / ours (> 1: ours is "
        "faster); *vs matmul* compares with the matmul alone, the compute floor. *mem* = peak "
        "memory of fwd+bwd / eager's; *saved* = bytes autograd keeps between forward and "
        "backward (parameters excluded) / eager's. fwd of the matmul ops is a training forward "
        "(inputs require grad); infer runs under `torch.inference_mode`. *path* is the way ours "
        "computed the case (chosen per problem by timing every candidate path: *candidates*, "
        "ms); *1st call* is ours' first call (inputs, compiling and tuning included) and "
        "*tuning* the part of it spent timing candidates.",
    ]
    for op in dict.fromkeys(r["op"] for r in records):
        rows = [r for r in records if r["op"] == op]
        baselines = [b for b in BASELINES if any(b in r["providers"] for r in rows)]
        variants = sorted({n for r in rows for n in r["providers"] if n.startswith(OURS + "-")})
        memory = [n for n in [OURS, *variants]
                  if any("memory_vs_eager" in r["providers"].get(n, {}) for r in rows)]
        saved = list(dict.fromkeys(k for r in rows for k in r.get("saved_vs_eager", {})))
        header = ["mode", "dtype", "approx", "shape", "ours ms", "GB/s", "TFLOP/s",
                  "floor ms (mem / compute)", "of floor",
                  *(f"vs {b}" for b in baselines), *(f"{v} ms" for v in variants),
                  *(f"mem {n}" for n in memory), *(f"saved {k}" for k in saved), "path",
                  "candidates (ms)", "1st call ms", "tuning ms"]
        lines += ["", f"## {op}", "", "| " + " | ".join(header) + " |",
                  "|" + "---|" * len(header)]
        for r in rows:
            ours = r["providers"].get(OURS, {})
            cells = [
                r["mode"], r["dtype"], r["approximate"], r["shape"],
                _fmt(ours.get("ms"), ".4f") if ours.get("ms") else
                f"failed: {ours.get('error', '?')}",
                _fmt(ours.get("gbps"), ".0f"),
                _fmt(ours.get("tflops") if r["flops"] else None, ".1f"),
                f"{r['floor_memory_ms']:.3g} / {r['floor_compute_ms']:.3g}",
                _fmt(ours.get("fraction_of_floor"), ".2f"),
            ]
            for b in baselines:
                if b in r["speedup"]:
                    cells.append(f"{r['speedup'][b]:.2f}x")
                else:
                    cells.append("failed" if "error" in r["providers"].get(b, {}) else "-")
            cells += [_fmt(r["providers"].get(v, {}).get("ms"), ".4f") for v in variants]
            cells += [_fmt(r["providers"].get(n, {}).get("memory_vs_eager"), ".2f", "x")
                      for n in memory]
            cells += [_fmt(r.get("saved_vs_eager", {}).get(k), ".3f", "x") for k in saved]
            cells += [r.get("path") or "-", _candidates_text(r.get("candidates", {})),
                      _fmt(r.get("first_call_ms"), ".1f"), _fmt(r.get("tuning_ms"), ".1f")]
            lines.append("| " + " | ".join(cells) + " |")
    slower = [r for r in records
              if r["speedup"].get(EAGER, TARGET_VS_EAGER) < TARGET_VS_EAGER]
    lines += ["", f"## Below {TARGET_VS_EAGER}x eager", ""]
    lines += [f"- {label(r)}: {r['speedup'][EAGER]:.2f}x, path {r.get('path') or '-'}"
              for r in slower] or ["None: every case with an eager figure is at or above it."]
    failures = [(label(r), n, e["error"]) for r in records for n, e in r["providers"].items()
                if "error" in e]
    if failures:
        lines += ["", "## Failures", ""]
        lines += [f"- {case}, {name}: {error}" for case, name, error in failures]
    return "\n".join(lines) + "\n"


def _candidates_text(candidates: dict) -> str:
    return " / ".join(f"{name} {_fmt(ms, '.4f')}" for name, ms in candidates.items()) or "-"


def write_results(out_dir: Path, stem: str, meta: dict, records: list[dict]) -> list[Path]:
    """``{stem}.json`` (meta + every record), ``{stem}.md`` and the speedup plots."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps({"meta": meta, "records": records}, indent=1) + "\n")
    md_path.write_text(markdown_report(meta, records))
    written = [json_path, md_path]
    try:
        from . import plots
    except ImportError as e:  # matplotlib missing: the tables still stand
        print(f"bench: no plots ({e})")
    else:
        written += plots.plot_speedups(records, out_dir, stem, BASELINES)
    return written


# ---- correctness (the CPU mode) --------------------------------------------------------------


@dataclass
class Subject:
    """A function of x with its parameters, in the order shared by every subject of a check."""

    fn: Callable[[torch.Tensor], torch.Tensor]
    params: list[torch.Tensor] = field(default_factory=list)


@dataclass
class Check:
    """One correctness comparison: our subjects against torch in the same dtype and float64."""

    what: str
    x: torch.Tensor
    param_names: list[str]
    ours: dict[str, Subject]  # "ours", "ours-recompute", ...
    torch_same: Subject
    ref64: Subject  # its params are float64


def _outputs(subject: Subject, x: torch.Tensor, dy: torch.Tensor | None):
    x = x.detach().clone().requires_grad_(True)
    params = [p.detach().clone().requires_grad_(True) for p in subject.params]
    fn = subject.fn
    y = fn(x, *params)
    dy = torch.randn_like(y) if dy is None else dy.to(y.dtype)
    grads = torch.autograd.grad(y, [x, *params], dy, allow_unused=True)
    return [y.detach(), *grads], dy


def compare(check: Check) -> list[dict]:
    """Max error of each of our outputs (y, dx, each param's grad) vs float64, and torch's."""
    torch_out, dy = _outputs(check.torch_same, check.x, None)
    ref_out, _ = _outputs(check.ref64, check.x.double(), dy)
    names = ["y", "dx", *(f"d{n}" for n in check.param_names)]
    results = []
    for variant, subject in check.ours.items():
        ours_out, _ = _outputs(subject, check.x, dy)
        for name, ours, theirs, ref in zip(names, ours_out, torch_out, ref_out):
            results.append({"what": f"{check.what} {variant} {name}",
                            **error_figures(ours, theirs, ref)})
    return results


def error_figures(ours: torch.Tensor, theirs: torch.Tensor, ref: torch.Tensor) -> dict:
    """The suite's rule (tests/helpers.py): ours' max error against the float64 ``ref`` is no
    worse than twice PyTorch's (``theirs``, in ours' dtype) plus a few ulps of ref's magnitude
    (a parameter gradient sums over the tokens, so it can be far above 1)."""
    ref = ref.double().cpu()
    err = (ours.double().cpu() - ref).abs().nan_to_num(math.inf).max().item()
    torch_err = (theirs.double().cpu() - ref).abs().nan_to_num(0.0).max().item()
    scale = max(1.0, ref.abs().nan_to_num(0.0).max().item()) if ref.numel() else 1.0
    bound = 2 * torch_err + ATOL[ours.dtype] * scale
    return {"err": err, "torch_err": torch_err, "bound": bound, "ok": err <= bound}


def saved_line(op: str, shape: tuple[int, ...], dtype: torch.dtype, approximate: str,
               ratios: dict[str, float]) -> str:
    """The check's report of an op's saved-activation bytes over eager's (``Case.saved``)."""
    figures = ", ".join(f"{name} {ratio:.3f}x" for name, ratio in ratios.items())
    return (f"saved {op} {str(dtype).removeprefix('torch.')} {approximate} "
            f"{shape_text(shape)}: {figures} of eager's saved activation bytes")


def check_lines(results: list[dict]) -> list[str]:
    return [f"{'ok  ' if r['ok'] else 'FAIL'} {r['what']}: max error {r['err']:.2e}, torch "
            f"{r['torch_err']:.2e}" for r in results]
