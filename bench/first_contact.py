"""The first run on a GPU: ``python -m bench.first_contact`` (``scripts/gpu_session.sh
first-contact``). What a short lease on a borrowed GPU can answer, in about 6 minutes with a cold
Triton cache, written as it goes.

Four stages, each one JSON-lines file under ``--out`` (one record per line, flushed as soon as
it is finished, so a run that is killed still leaves every finished record):

1. ``environment.jsonl``: ``python -m triton_gelu``'s report, ``nvidia-smi``, the versions and
   the device's ceilings measured in the same run (copy bandwidth, bf16 matmul TFLOP/s);
2. ``correctness.jsonl``: every public op, as its bench module declares it (``first_contact()``:
   gelu, linear_gelu, feed_forward at p = 0 and 0.1, geglu, gated_feed_forward at p = 0.1),
   with each path of each of its ops forced in turn
   (fp32 with the exact form, fp16 with tanh, bf16 with the exact form), the output and every
   gradient against float64 with the suite's rule (no worse than twice PyTorch's error in the
   same dtype plus a few ulps; dropout against the call's own mask), at one odd shape (the
   Hopper paths at one whose rows TMA can load);
3. ``timings.jsonl``: bf16 cases timed with ``triton.testing.do_bench`` (medians after
   warm-up) for eager PyTorch, ``torch.compile`` of the same code, and ours with each candidate
   path forced (ours = the fastest, ``chosen``); ratios to eager and to torch.compile; the
   first-call seconds (compiling included) of each provider, cold (the warm-up pass) and warm;
4. ``memory.jsonl``: peak memory of one FFN-block training step against eager, and the bytes
   autograd keeps for the backward (exact on any device).

Compiling is the long part of a cold run, and it uses one core per process: the correctness
cases and a warm-up pass over the timing cases (which fills Triton's and Inductor's caches and
records the cold first-call seconds) run in ``--workers`` processes; timings then run in this
process alone, so nothing else runs on the GPU while a case is timed. Tuning is off
(``TRITON_GELU_TUNE=off``): each path runs its kernels' default configs (or the shipped table's
choice), which is what a first call without tuning gets; the ``export`` stage tunes.

``--budget-s`` (default 330) is a deadline: no case starts past it, the files are closed
cleanly and the run says what remains. Calling it again with the same ``--out`` skips every
record already there, so a run cut short continues where it stopped (on a fresh machine,
scripts/gpu_session.sh first copies the committed files of the same day and GPU into $OUT).

``--dry-run`` runs the same code on the CPU under the Triton interpreter at tiny shapes and
times nothing (``ms`` null), writing the same files with the same schema, in a few minutes: the
test suite runs it, so the GPU run's plumbing is tested on every commit.
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import contextlib
import datetime
import itertools
import multiprocessing
import os
import platform
import re
import subprocess
import sys
import time
import warnings
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

# Triton reads TRITON_INTERPRET once, at import: decide before anything imports it. Worker
# processes inherit the decision through the environment.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")

import torch.nn.functional as F  # noqa: E402

from triton_gelu import autotune  # noqa: E402
from triton_gelu.testing import dropout_seed  # noqa: E402
from triton_gelu.reference import dropout_keep  # noqa: E402

from . import harness, op_modules  # noqa: E402
from .contact import ODD, Contact, Kit, Problem, Timing  # noqa: E402
from .memory import saved_activation_bytes  # noqa: E402

STAGES = ("environment", "correctness", "timings", "memory")
BUDGET_S = 330
# The Hopper ("tma") paths serve only rows of 16-byte multiples (an odd K or N in bf16 keeps
# the default kernels): their cases take K and N multiples of 8, still of no block size.
ALIGNED = (37, 48, 56)
# The forms of the correctness stage, one per dtype: both forms run, at a third of the compiles.
FORMS = {"fp32": "none", "fp16": "tanh", "bf16": "none"}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def path_names(op: str) -> list[str]:
    from triton_gelu.tuning import paths as _paths
    import triton_gelu.kernels  # noqa: F401 (registers every op's paths)

    return list(_paths.path_choosers[op].paths)


# ---- the problems: each op module's declaration (``contact.py``) -------------------------------


def contacts() -> dict[str, Contact]:
    """Public op -> its first-contact cases, as each bench op module declares them
    (``first_contact()``), in the modules' order."""
    return {public: contact for module in op_modules()
            for public, contact in module.first_contact().items()}


def _mask_of_call(seed: int, rows: int, cols: int, p: float, device) -> torch.Tensor:
    """The keep mask a dropout call draws after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return dropout_keep(dropout_seed(device), rows, cols, p)


def problem(op: str, shape: tuple[int, int, int], dtype: torch.dtype, approximate: str,
            device: str, p: float = 0.0, recompute: bool = False,
            same_mask: bool = False) -> Problem:
    """Public op ``op``'s problem: x ~ N(0, 1) and its module's other inputs (weights ~ N(0,
    1/K), so pre-activations are O(1), where GELU bends).

    Dropout: eager is ``F.dropout`` (PyTorch's own, the baseline to time); with ``same_mask``
    ours draws its seed after ``torch.manual_seed(call_seed)`` and eager applies the mask that
    seed gives (``reference.dropout_keep``), so eager is the same function as ours (to check)."""
    m, k, n = shape
    x = torch.randn(m, k, device=device).to(dtype)
    call_seed = int(torch.randint(0, 2**31, ()))
    keep = _mask_of_call(call_seed, m, n, p, device) if p and same_mask else None

    def dropout(h):
        if keep is None:
            return F.dropout(h, p, training=True) if p else h
        return h * (keep.to(h.dtype) / (1.0 - p))

    def seeded(fn):
        def run(*args):
            if keep is not None:
                torch.manual_seed(call_seed)
            return fn(*args)
        return run

    found = contacts().get(op)
    if found is None:
        raise ValueError(f"first_contact: unknown op {op!r}")
    return found.problem(Kit(shape, dtype, approximate, device, p, recompute, x, dropout,
                             seeded))


def _recorded_paths(fn: Callable[[], object]) -> tuple[object, dict[str, str]]:
    """Run ``fn``; return its result and the path each op took."""
    from triton_gelu.tuning import paths as _paths

    with _paths.recording_paths() as seen:
        out = fn()
    return out, {op: choice.path for op, choice in seen}


@contextlib.contextmanager
def _forcing(paths: dict[str, str]) -> Iterator[None]:
    """``force_path(**paths)``, quietly where a path does not apply: the records say so."""
    with autotune.force_path(**paths), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is forced but does not apply")
        yield


# ---- stage 2: correctness ---------------------------------------------------------------------


def correctness_cases() -> list[dict]:
    """Each public op x dtype x (op, path) forced, as picklable specs."""
    cases = []
    for public, contact in contacts().items():
        for p, (dtype, approximate) in itertools.product(contact.dropout, FORMS.items()):
            for op in contact.ops:
                for path in path_names(op):
                    what = f"{public}{f' p={p:g}' if p else ''}"
                    cases.append({"key": f"{what} {dtype} {approximate} {op}={path}",
                                  "public": public, "p": p, "dtype": dtype,
                                  "approximate": approximate, "forced": {op: path},
                                  "recompute": op == "linear_preact",
                                  "shape": ALIGNED if path == "tma" else ODD})
    return cases


def _gradients(fn, inputs: list[torch.Tensor], dy: torch.Tensor | None):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    y = fn(*leaves)
    dy = torch.randn_like(y) if dy is None else dy.to(y.dtype)
    return [y.detach(), *torch.autograd.grad(y, leaves, dy)], dy


def run_correctness(spec: dict, device: str) -> dict:
    """One correctness record: every output of ours with the spec's path forced, against
    float64 and against PyTorch in the same dtype."""
    torch.manual_seed(zlib.crc32(spec["key"].encode()))
    dtype = DTYPES[spec["dtype"]]
    prob = problem(spec["public"], spec["shape"], dtype, spec["approximate"], device, spec["p"],
                   spec["recompute"], same_mask=True)
    start = time.perf_counter()
    with harness.precision("fp32"), _forcing(spec["forced"]):
        (ours, dy), ran = _recorded_paths(lambda: _gradients(prob.ours, prob.inputs, None))
    seconds = time.perf_counter() - start
    with harness.precision("fp32"):
        theirs, _ = _gradients(prob.eager, prob.inputs, dy)
        ref, _ = _gradients(prob.eager, [t.double() for t in prob.inputs], dy)
    outputs = [{"name": name, **harness.error_figures(o, t, r)}
               for name, o, t, r in zip(["y", *(f"d{n}" for n in prob.names)], ours, theirs, ref)]
    (op, path), = spec["forced"].items()
    return {**_head("correctness", spec["key"]), "op": spec["public"], "p": spec["p"],
            "dtype": spec["dtype"], "approximate": spec["approximate"],
            "shape": list(spec["shape"]),
            "forced": spec["forced"], "ran": ran, "applies": ran.get(op) == path,
            "outputs": outputs, "ok": all(o["ok"] for o in outputs), "seconds": seconds}


# ---- stage 3: timings -------------------------------------------------------------------------


def timing_cases(dry_run: bool) -> list[Timing]:
    return [case for contact in contacts().values() for case in contact.timings(dry_run)]


def providers(case: Timing, device: str) -> tuple[dict[str, Callable], dict[str, dict]]:
    """(name -> factory of the timed callable, name -> the paths it forces): eager, compile
    and ours with each candidate path forced (``op=path``)."""
    import torch._dynamo

    torch._dynamo.reset()  # a fresh compile per case, never the recompile-limit fallback
    torch.manual_seed(zlib.crc32(case.key.encode()))
    prob = problem(case.public, case.shape, torch.bfloat16, case.approximate, device, case.p)
    training = case.mode != "infer"
    inputs = [t.requires_grad_(training) for t in prob.inputs]
    fns: dict[str, Callable] = {"eager": prob.eager,
                                "compile": harness.compiled(prob.eager, None)}
    forced: dict[str, dict] = {}
    for op in case.ops:
        for path in path_names(op):
            name = f"{op}={path}"
            fns[name], forced[name] = prob.ours, {op: path}
    return {name: harness.timed(fn, inputs, case.mode) for name, fn in fns.items()}, forced


def first_calls(case: Timing, device: str, clock) -> dict:
    """Each provider's first call (compiling included) in seconds, and the paths it ran: the
    warm-up pass, run in a worker so compiles proceed in parallel."""
    factories, forced = providers(case, device)
    out = {}
    for name, factory in factories.items():
        start = clock.now_ms()
        try:
            with _forcing(forced.get(name, {})):
                _, ran = _recorded_paths(factory())
            out[name] = {"first_call_s": (clock.now_ms() - start) / 1e3, "ran": ran}
        except Exception as e:  # a baseline failing (torch.compile) is recorded
            out[name] = {"error": harness.error_text(e)}
    return out


def run_timing(case: Timing, device: str, clock, cold: dict, ceilings: dict) -> dict:
    """Time every provider of ``case`` in this process; the record with its ratios."""
    factories, forced = providers(case, device)
    results: dict[str, dict] = {}
    for name, factory in factories.items():
        entry = dict(cold.get(name, {}))
        entry.pop("error", None)
        try:
            start = clock.now_ms()
            with _forcing(forced.get(name, {})):
                fn = factory()
                _, ran = _recorded_paths(fn)
                entry["first_call_warm_s"] = (clock.now_ms() - start) / 1e3
                if name in forced:
                    (op, path), = forced[name].items()
                    entry["applies"] = ran.get(op) == path
                    if not entry["applies"]:  # forced where it does not apply: not a candidate
                        results[name] = entry
                        continue
                entry["ms"] = clock.time_ms(fn)
        except Exception as e:
            entry["error"] = harness.error_text(e)
        results[name] = entry
        fn = factory = None
    candidates = {name: results[name].get("ms") for name in forced
                  if results[name].get("applies")}
    timed = {name: ms for name, ms in candidates.items() if ms is not None}
    chosen = min(timed, key=timed.__getitem__) if timed else None
    ours_ms = timed.get(chosen) if chosen else None

    def ratio(baseline: str) -> float | None:
        ms = results.get(baseline, {}).get("ms")
        return ms / ours_ms if ms and ours_ms else None

    floor_ms = None
    if ceilings.get("copy_gbps") and ceilings.get("matmul_tflops"):
        prob_bytes, prob_flops = contacts()[case.public].floor(case.mode, *case.shape)
        floor_ms = max(prob_bytes / ceilings["copy_gbps"] / 1e6,
                       prob_flops / ceilings["matmul_tflops"] / 1e9)
    return {**_head("timings", case.key), "op": case.public, "mode": case.mode,
            "shape": list(case.shape), "dtype": "bf16", "approximate": case.approximate,
            "p": case.p, "chosen": chosen, "ours_ms": ours_ms,
            "vs_eager": ratio("eager"), "vs_compile": ratio("compile"),
            "fraction_of_floor": floor_ms / ours_ms if floor_ms and ours_ms else None,
            "candidates": candidates, "providers": results,
            "ok": all("error" not in results[n] for n in forced)}


# ---- stage 4: memory --------------------------------------------------------------------------


def run_memory(p: float, dry_run: bool, device: str, clock) -> dict:
    """Peak memory of one FFN-block training step (fwd+bwd, bf16) and the bytes autograd keeps
    for its backward, ours over eager."""
    key = f"feed_forward p={p:g} fwd+bwd"
    shape = ODD if dry_run else (8192, 768, 3072)
    torch.manual_seed(zlib.crc32(key.encode()))
    prob = problem("feed_forward", shape, torch.bfloat16, "none", device, p)
    inputs = [t.requires_grad_(True) for t in prob.inputs]
    params = inputs[1:]
    figures = {}
    for name, fn in (("ours", prob.ours), ("eager", prob.eager)):
        step = harness.timed(fn, inputs, "fwd+bwd")()
        step()  # compiles first: the peak is the step's, not the compiler's
        figures[name] = {
            "peak_bytes": clock.peak_bytes(step),
            "saved_bytes": saved_activation_bytes(lambda: fn(*inputs), exclude=params),
        }

    def ratio(what: str) -> float | None:
        ours, eager = figures["ours"][what], figures["eager"][what]
        return ours / eager if ours is not None and eager else None

    return {**_head("memory", key), "op": "feed_forward", "p": p, "shape": list(shape),
            "dtype": "bf16", "ours": figures["ours"], "eager": figures["eager"],
            "peak_vs_eager": ratio("peak_bytes"), "saved_vs_eager": ratio("saved_bytes"),
            "ok": True}


# ---- stage 1: the environment -----------------------------------------------------------------


def _command_text(args: list[str]) -> str:
    try:
        run = subprocess.run(args, capture_output=True, text=True, timeout=60)
        return (run.stdout + run.stderr).strip()
    except (OSError, subprocess.SubprocessError) as e:
        return f"unavailable: {e}"


def environment(call: int, clock, dry_run: bool) -> dict:
    meta = harness.environment()
    ceilings = {"copy_gbps": None, "matmul_tflops": None}
    if not dry_run:
        ceilings = harness.measure_device(clock)
    return {**_head("environment", f"environment call {call}"), **meta, **ceilings,
            "dry_run": dry_run, "call": call, "platform": platform.platform(),
            "report": _command_text([sys.executable, "-m", "triton_gelu"]),
            "nvidia_smi": _command_text(["nvidia-smi"]) if not dry_run else None, "ok": True}


# ---- the run: files, workers, deadline --------------------------------------------------------


class DryClock:
    """The clock of the dry run: wall time only; nothing is timed or measured on a device."""

    def sync(self) -> None:
        pass

    def now_ms(self) -> float:
        return time.perf_counter() * 1e3

    def time_ms(self, fn) -> None:
        return None

    def peak_bytes(self, fn) -> None:
        return None


def _head(stage: str, key: str) -> dict:
    return {"stage": stage, "key": key,
            "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds")}


class Records:
    """The four files: what they hold already (a run to continue), and one more record."""

    def __init__(self, out: Path) -> None:
        self.paths = {stage: out / f"{stage}.jsonl" for stage in STAGES}
        self.done = {stage: {r["key"]: r for r in harness.read_lines(path)}
                     for stage, path in self.paths.items()}

    def write(self, record: dict) -> None:
        self.done[record["stage"]][record["key"]] = record
        harness.append_line(self.paths[record["stage"]], record)


def _worker_init() -> None:
    autotune.set_policy("off")
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")


def _worker_correctness(spec: dict, device: str) -> dict:
    try:
        return run_correctness(spec, device)
    except Exception as e:
        return {**_head("correctness", spec["key"]), "op": spec["public"],
                "forced": spec["forced"], "error": harness.error_text(e), "ok": False}


def _worker_first_calls(case: Timing, device: str, dry_run: bool) -> tuple[str, dict]:
    clock = DryClock() if dry_run else harness.GpuClock()
    try:
        return case.key, first_calls(case, device, clock)
    except Exception as e:
        return case.key, {"error": harness.error_text(e)}


def _parallel(jobs: list[tuple[Callable, tuple]], workers: int,
              deadline: float) -> Iterator[object]:
    """Run ``fn(*args)`` for each job in ``workers`` processes (inline for 0), yielding results
    as they finish; no job starts past ``deadline`` (time.monotonic)."""
    if workers == 0:
        _worker_init()
        for fn, args in jobs:
            if time.monotonic() >= deadline:
                return
            yield fn(*args)
        return
    # Each worker compiles one thing at a time: the workers are the parallelism (Inductor would
    # otherwise start a compile pool of every core in each of them).
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    context = multiprocessing.get_context("spawn")  # CUDA does not survive fork
    with futures.ProcessPoolExecutor(workers, mp_context=context,
                                     initializer=_worker_init) as pool:
        pending, queue = set(), list(jobs)
        while queue or pending:
            while queue and len(pending) < workers and time.monotonic() < deadline:
                fn, args = queue.pop(0)
                pending.add(pool.submit(fn, *args))
            if not pending:
                break
            done, pending = futures.wait(pending, return_when=futures.FIRST_COMPLETED)
            for job in done:
                yield job.result()


def _interleaved(cases: list[dict]) -> list[dict]:
    """The cases in rounds of one per (op, p, dtype): the cases running at once in the workers
    compile different kernels, and the later cases of a group find its kernels compiled."""
    groups: dict[tuple, list[dict]] = {}
    for case in cases:
        groups.setdefault((case["public"], case["p"], case["dtype"]), []).append(case)
    rounds = max((len(g) for g in groups.values()), default=0)
    return [g[i] for i in range(rounds) for g in groups.values() if i < len(g)]


def _default_out(dry_run: bool) -> Path:
    day = datetime.date.today().isoformat()
    where = torch.cuda.get_device_name() if GPU else "cpu-dry-run"
    if dry_run and GPU:
        where += "-dry-run"
    return Path("bench/results") / f"{day}-{re.sub(r'[^a-z0-9]+', '-', where.lower()).strip('-')}"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.first_contact",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="the results folder (default: $OUT, else "
                                            "bench/results/<date>-<gpu>)")
    p.add_argument("--budget-s", type=float, default=BUDGET_S,
                   help=f"start no case after this many seconds (default {BUDGET_S})")
    p.add_argument("--workers", type=int, help="processes for the correctness cases and the "
                                               "warm-up pass (default: GPU min(8, cores / 2), "
                                               "dry run 2; 0: this process)")
    p.add_argument("--dry-run", action="store_true",
                   help="the CPU plumbing check: interpreter, tiny shapes, no timings")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    dry_run = args.dry_run or not GPU
    if not GPU and not args.dry_run:
        print("first_contact: no GPU visible (or TRITON_INTERPRET is set): running the dry run")
    out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else
                       _default_out(dry_run))
    workers = args.workers if args.workers is not None else (
        2 if dry_run else max(1, min(8, (os.cpu_count() or 2) // 2)))
    start = time.monotonic()
    deadline = start + args.budget_s
    device = "cpu" if dry_run and not GPU else "cuda"
    clock = DryClock() if dry_run else harness.GpuClock()
    autotune.set_policy("off")
    out.mkdir(parents=True, exist_ok=True)
    records = Records(out)
    failures: list[str] = []
    remaining: list[str] = []

    def elapsed() -> str:
        return f"{time.monotonic() - start:6.1f}s"

    def keep(record: dict) -> None:
        records.write(record)
        if not record.get("ok"):
            failures.append(f"{record['stage']}: {record['key']}")
        print(f"[{elapsed()}] {record['stage']:<11} {'ok  ' if record.get('ok') else 'FAIL'} "
              f"{record['key']}{_summary(record)}", flush=True)

    calls = len(records.done["environment"])
    env = environment(calls + 1, clock, dry_run)
    keep(env)
    ceilings = {k: env[k] for k in ("copy_gbps", "matmul_tflops")}
    print(f"writing to {out} ({workers} worker process{'es' if workers != 1 else ''}, "
          f"budget {args.budget_s:.0f} s{', dry run' if dry_run else ''})", flush=True)

    todo = _interleaved([c for c in correctness_cases()
                         if c["key"] not in records.done["correctness"]])
    timings = [c for c in timing_cases(dry_run) if c.key not in records.done["timings"]]
    jobs = [(_worker_correctness, (spec, device)) for spec in todo]
    jobs += [(_worker_first_calls, (case, device, dry_run)) for case in timings]
    cold: dict[str, dict] = {}
    for result in _parallel(jobs, workers, deadline):
        if isinstance(result, dict):
            keep(result)
        else:
            key, calls_of = result
            cold[key] = calls_of
    remaining += [c["key"] for c in todo if c["key"] not in records.done["correctness"]]

    for case in timings:
        if time.monotonic() >= deadline:
            remaining.append(case.key)
            continue
        record = run_timing(case, device, clock, cold.get(case.key, {}), ceilings)
        keep(record)
        if not dry_run:
            torch.cuda.empty_cache()

    for p in (0.0, 0.1):
        key = f"feed_forward p={p:g} fwd+bwd"
        if key in records.done["memory"]:
            continue
        if time.monotonic() >= deadline:
            remaining.append(key)
            continue
        keep(run_memory(p, dry_run, device, clock))
    print(f"[{elapsed()}] wrote {', '.join(str(p) for p in records.paths.values())}")
    if failures:
        print(f"first_contact: {len(failures)} record(s) failed: " + "; ".join(failures[:20]))
    if remaining:
        print(f"first_contact: budget reached; {len(remaining)} case(s) remain "
              f"({', '.join(remaining[:8])}{', ...' if len(remaining) > 8 else ''}): call "
              "again with the same --out to continue")
        return 3
    print("first_contact: complete" + ("" if not failures else " (with failures)"))
    return 1 if failures else 0


def _summary(record: dict) -> str:
    if "error" in record:
        return f": {record['error']}"
    if record["stage"] == "correctness":
        worst = max(record["outputs"], key=lambda o: o["err"] / o["bound"] if o["bound"] else 0)
        ran = "" if record["applies"] else " (does not apply: ran " + ", ".join(
            f"{k}={v}" for k, v in record["ran"].items()) + ")"
        return f": worst {worst['name']} error {worst['err']:.2e} (bound {worst['bound']:.2e}){ran}"
    if record["stage"] == "timings":
        if record["ours_ms"] is None:
            return f": chosen {record['chosen']} (not timed)"
        parts = [f"{record['ours_ms']:.4f} ms by {record['chosen']}"]
        for what in ("vs_eager", "vs_compile"):
            if record[what] is not None:
                parts.append(f"{what.replace('_', ' ')} {record[what]:.2f}x")
        return ": " + ", ".join(parts)
    if record["stage"] == "memory":
        peak, saved = record["peak_vs_eager"], record["saved_vs_eager"]
        return (f": saved {saved:.3f}x of eager's"
                + (f", peak {peak:.3f}x" if peak is not None else ""))
    if record["stage"] == "environment" and record.get("copy_gbps"):
        return (f": copy {record['copy_gbps']:.0f} GB/s, bf16 matmul "
                f"{record['matmul_tflops']:.0f} TFLOP/s")
    return ""


if __name__ == "__main__":
    sys.exit(main())
