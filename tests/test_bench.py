"""The benchmark on the CPU: its no-GPU mode end to end, and every piece of the GPU mode that does
not need a GPU (ratios, floors, error rows, reports, plots) from fake timings."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import triton_gelu
from bench import harness, ops_ffn, ops_geglu, ops_gelu, ops_linear_gelu
from bench.harness import Case, Check, Selection, Subject

REPO = Path(__file__).resolve().parents[1]
DEVICE_FIGURES = {"copy_gbps": 2000.0, "matmul_tflops": 800.0}


# ---- the CPU mode, as CI runs it ---------------------------------------------------------------


def test_cpu_mode_checks_every_op_and_times_nothing(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # bench sets it
    env["CUDA_VISIBLE_DEVICES"] = ""
    out = tmp_path / "results"
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--preset", "tiny", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Timings need a GPU" in output and "Traceback" not in output, output
    for op in ("gelu", "linear_gelu", "ffn", "geglu"):
        for dtype in ("bfloat16", "float16", "float32"):
            lines = [line for line in output.splitlines()
                     if line.startswith(f"ok   {op} {dtype}")]
            assert lines and all("max error" in line and "torch" in line for line in lines), (
                f"no error lines for {op} {dtype}:\n{output}")
    assert "FAIL" not in output
    for dtype in ("bfloat16", "float16", "float32"):  # saved bytes are exact on any device
        line = next(line for line in output.splitlines()
                    if line.startswith(f"saved ffn {dtype} none 37x45x51: "))
        assert "ours p=0.1" in line and "ours-recompute p=0 " in line, line
        # GeGLU keeps x, g and u per token (k + 2n) where eager keeps x, g, gelu(g) and u
        # (k + 3n), and the block's eager also h (k + 4n); recompute keeps x (k): at k = 45,
        # n = 51 (tests/test_geglu.py asserts the formulas)
        line = next(line for line in output.splitlines()
                    if line.startswith(f"saved geglu {dtype} none 37x45x51: "))
        assert "ours 0.742x, ours-recompute 0.227x, block ours 0.590x, block ours-recompute " \
               "0.181x" in line, line
    assert " ms" not in output and "GB/s" not in output, "CPU mode must not print timings"
    assert not out.exists(), "CPU mode must not write results"


def test_compare_catches_a_wrong_kernel():
    x = torch.randn(64, dtype=torch.bfloat16)
    check = Check("scaled gelu", x, [],
                  ours={"ours": Subject(lambda t: F.gelu(t) * 1.05)},
                  torch_same=Subject(F.gelu), ref64=Subject(F.gelu))
    results = harness.compare(check)
    assert [r["what"] for r in results] == ["scaled gelu ours y", "scaled gelu ours dx"]
    assert not any(r["ok"] for r in results)
    assert harness.check_lines(results)[0].startswith("FAIL scaled gelu ours y: max error")


# ---- ratios, floors and rows from fake timings ---------------------------------------------------


def _case(mode="fwd+bwd", bytes_=4e9, flops=8e12, build=None) -> Case:
    return Case("linear_gelu", mode, "8192x768x3072", "bf16", "none", bytes_, flops,
                build or (lambda: {}))


def test_summarize_ratios_and_floors():
    timings = {"ours": 20.0, "ours-recompute": 25.0, "eager": 30.0, "matmul": 16.0}
    peaks = {"ours": 300 * 2**20, "ours-recompute": 200 * 2**20, "eager": 400 * 2**20}
    record = harness.summarize(_case(), timings, peaks, {"compile": "BackendCompilerFailed: x"},
                               DEVICE_FIGURES)
    # floors: 4e9 B / 2000 GB/s = 2 ms; 8e12 flop / 800 TFLOP/s = 10 ms -> compute-bound, 10 ms
    assert record["floor_memory_ms"] == pytest.approx(2.0)
    assert record["floor_compute_ms"] == pytest.approx(10.0)
    assert record["floor_ms"] == pytest.approx(10.0) and record["bound"] == "compute"
    ours = record["providers"]["ours"]
    assert ours["tflops"] == pytest.approx(400.0) and ours["gbps"] == pytest.approx(200.0)
    assert ours["fraction_of_floor"] == pytest.approx(0.5)
    assert ours["fraction_of_peak"] == pytest.approx(0.5)
    assert ours["fraction_of_bandwidth"] == pytest.approx(0.1)
    assert record["speedup"] == pytest.approx({"eager": 1.5, "matmul": 0.8})
    assert ours["memory_vs_eager"] == pytest.approx(0.75)
    assert record["providers"]["ours-recompute"]["memory_vs_eager"] == pytest.approx(0.5)
    assert record["providers"]["compile"] == {"ms": None, "error": "BackendCompilerFailed: x"}


def test_memory_bound_case_reports_fraction_of_bandwidth():
    record = harness.summarize(_case("fwd", bytes_=2e9, flops=0.0),
                               {"ours": 1.05, "eager": 1.5}, {}, {}, DEVICE_FIGURES)
    assert record["bound"] == "memory" and record["floor_ms"] == pytest.approx(1.0)
    assert record["providers"]["ours"]["fraction_of_floor"] == pytest.approx(1 / 1.05)
    line = harness.progress_line(3, 12, record)
    assert line.startswith("[ 3/12] linear_gelu fwd bf16 none 8192x768x3072: ours 1.0500 ms")
    assert "1905 GB/s" in line and "0.95 of the memory floor" in line and "vs eager 1.43x" in line


class FakeClock(harness.GpuClock):
    """Runs each callable once (so its code is exercised) and reports canned figures."""

    def __init__(self, ms=1.0, peak=1000):
        self.ms, self.peak, self.timed, self.clock_ms = ms, peak, 0, 0.0

    def sync(self):
        pass

    def now_ms(self):  # every reading 5 ms after the last: a first call takes 5 ms
        self.clock_ms += 5.0
        return self.clock_ms

    def time_ms(self, fn):
        fn()
        self.timed += 1
        return self.ms(fn) if callable(self.ms) else self.ms

    def peak_bytes(self, fn):
        fn()
        return self.peak


def test_a_failing_provider_is_recorded_and_the_run_goes_on():
    def broken():
        raise RuntimeError("torch.compile failed\nlong traceback text")

    providers = {"ours": lambda: (lambda: "ours"), "eager": lambda: (lambda: "eager"),
                 "compile": broken}
    clock = FakeClock(ms=lambda fn: {"ours": 2.0, "eager": 3.0}[fn()])
    record = harness.run_case(_case(build=lambda: providers), DEVICE_FIGURES, clock)
    assert record["providers"]["compile"]["error"] == "RuntimeError: torch.compile failed"
    assert record["speedup"] == {"eager": 1.5}
    assert "compile failed" in harness.progress_line(1, 1, record)
    report = harness.markdown_report({"device": "Fake GPU"}, [record])
    assert "## Failures" in report and "compile: RuntimeError: torch.compile failed" in report


def test_tf32_flag_follows_the_dtype_and_is_restored():
    seen = {}

    def build(dtype):
        seen[dtype] = torch.backends.cuda.matmul.allow_tf32
        return {}
    before = torch.backends.cuda.matmul.allow_tf32
    for dtype in ("tf32", "fp32"):
        case = Case("x", "fwd", "1", dtype, "none", 1.0, 1.0, lambda d=dtype: build(d))
        harness.run_case(case, DEVICE_FIGURES, FakeClock())
    assert seen == {"tf32": True, "fp32": False}
    assert torch.backends.cuda.matmul.allow_tf32 == before


# ---- the real ops' cases on the CPU (interpreter), with a fake clock -----------------------------


@pytest.fixture
def timed_paths(tmp_path, monkeypatch):
    """Every Paths of the package times (1.0 ms for every candidate, without running it again
    after its warm-up call), into a temporary cache; the Tuners keep their single interpreter
    config. What the choosers chose is forgotten before and after."""
    from triton_gelu.tuning.paths import path_choosers

    monkeypatch.setenv("TRITON_GELU_CACHE_DIR", str(tmp_path / "paths-cache"))
    for paths in path_choosers.values():
        paths.forget()
        monkeypatch.setattr(paths, "bench", lambda fn: 1.0)
    yield
    for paths in path_choosers.values():
        paths.forget()


def test_every_op_builds_runs_and_reports(tmp_path, timed_paths):
    sel = Selection(shapes=[(37, 45, 51)], gelu_sizes_mb=[0.01], dtypes=["bf16", "tf32"],
                    approximates=["tanh"], modes=list(harness.MODES),
                    baselines=["eager", "matmul", "addmm-act"], device="cpu",
                    decode_shapes=[(1, 45, 51)])
    cases = [c for op in (ops_gelu, ops_linear_gelu, ops_ffn) for c in op.cases(sel)]
    # gelu: one dtype (tf32 is fp32 there; fp32 not asked) x fwd, bwd; the others 2 x 4 modes
    # at 37 tokens and 2 x infer at the decode shape.
    assert [(c.op, c.mode, c.dtype) for c in cases[:3]] == [
        ("gelu", "fwd", "bf16"), ("gelu", "bwd", "bf16"), ("gelu", "fwd", "fp32")]
    assert len(cases) == 4 + 10 + 10
    assert [c.mode for c in cases if c.shape == "1x45x51"] == ["infer"] * 4
    clock = FakeClock(ms=2.0, peak=4096)
    records = [harness.run_case(c, DEVICE_FIGURES, clock) for c in cases]
    errors = [(harness.label(r), n, e["error"]) for r in records
              for n, e in r["providers"].items() if "error" in e]
    assert not errors, errors

    by_label = {harness.label(r): r for r in records}
    linear = by_label["linear_gelu fwd bf16 tanh 37x45x51"]
    assert set(linear["providers"]) == {"ours", "ours-recompute", "eager", "matmul", "addmm-act"}
    # The path ours took and every candidate's time (the fake timer's 1.0 ms: a tie, so the
    # first registered path), and what its first call cost on the fake clock.
    assert linear["path"] == "fused"
    assert linear["candidates"] == {"fused": 1.0, "composed": 1.0, "torch": 1.0}
    assert linear["paths"]["linear_gelu_fwd"]["source"] == "tuned"
    assert linear["first_call_ms"] == 5.0 and linear["tuning_ms"] >= 0.0
    infer = by_label["linear_gelu infer bf16 tanh 1x45x51"]
    assert set(infer["providers"]) == {"ours", "eager", "matmul", "addmm-act"}
    # The FFN block serves in eval mode: no dropout, no recompute variant; PyTorch's own block
    # is then a candidate path. Its timed training cases run dropout 0.1, which only our paths
    # draw, so there the candidates are ours.
    ffn_infer = by_label["ffn infer bf16 tanh 1x45x51"]
    assert set(ffn_infer["providers"]) == {"ours", "eager", "matmul"}
    assert ffn_infer["path"] == "fused"
    assert ffn_infer["candidates"] == {"fused": 1.0, "composed": 1.0, "torch": 1.0}
    ffn_train = by_label["ffn fwd+bwd bf16 tanh 37x45x51"]
    assert ffn_train["path"] == "ffn_fwd=fused, ffn_bwd=fused", ffn_train["path"]
    assert set(ffn_train["candidates"]) == {"ffn_fwd=fused", "ffn_fwd=composed",
                                            "ffn_bwd=fused", "ffn_bwd=composed"}
    both = by_label["linear_gelu fwd+bwd bf16 tanh 37x45x51"]
    assert both["path"] == "linear_gelu_fwd=fused, linear_gelu_bwd=dz_once", both["path"]
    assert set(both["candidates"]) == {
        "linear_gelu_fwd=fused", "linear_gelu_fwd=composed", "linear_gelu_fwd=torch",
        "linear_gelu_bwd=dz_once", "linear_gelu_bwd=torch"}
    assert by_label["gelu bwd bf16 tanh 0.01 MB"]["path"] == "triton"
    m, k, n = 37, 45, 51
    assert linear["flops"] == 2 * m * n * k
    assert linear["bytes"] == (m * k + n * k + n + m * n) * 2
    assert set(by_label["linear_gelu bwd bf16 tanh 37x45x51"]["providers"]) == {
        "ours", "ours-recompute", "eager", "matmul"}  # _addmm_activation has no backward
    ffn = by_label["ffn fwd+bwd tf32 tanh 37x45x51"]
    assert ffn["flops"] == 3 * 2 * (2 * m * k * n)
    assert ffn["providers"]["ours"]["memory_vs_eager"] == 1.0
    assert {"ours", "ours-recompute", "eager", "matmul"} == set(ffn["providers"])
    # Saved activations per token, in float32 elements: eager keeps x, z and GELU's output
    # (k + 2n); at p = 0.1 x, z, the mask and the dropout output (k + 3n). Ours keeps x and z
    # (k + n; with recompute k) and the 8-byte seed when p > 0.
    eager0, eager1 = m * (k + 2 * n) * 4, m * (k + 3 * n) * 4
    assert ffn["saved_vs_eager"] == pytest.approx({
        "ours p=0": m * (k + n) * 4 / eager0, "ours-recompute p=0": m * k * 4 / eager0,
        "ours p=0.1": (m * (k + n) * 4 + 8) / eager1,
        "ours-recompute p=0.1": (m * k * 4 + 8) / eager1,
    })
    assert "saved_vs_eager" not in by_label["ffn fwd tf32 tanh 37x45x51"]  # once per problem
    gelu = by_label["gelu bwd bf16 tanh 0.01 MB"]
    assert gelu["bytes"] == 3 * (int(0.01 * 2**20) // 2) * 2 and gelu["bound"] == "memory"

    meta = {"device": "Fake GPU", "driver": "0", "torch": torch.__version__, "triton": "x",
            "date": "2025-01-01T00:00:00+00:00", **DEVICE_FIGURES}
    paths = harness.write_results(tmp_path, "fake-gpu", meta, records)
    document = json.loads((tmp_path / "fake-gpu.json").read_text())
    assert document["meta"]["device"] == "Fake GPU" and len(document["records"]) == len(records)
    report = (tmp_path / "fake-gpu.md").read_text()
    for op in ("gelu", "linear_gelu", "ffn"):
        assert f"## {op}" in report
    assert "| vs eager | vs matmul | vs addmm-act |" in report
    assert "| saved ours p=0 | saved ours-recompute p=0 | saved ours p=0.1 |" in report
    assert "| path | candidates (ms) | 1st call ms | tuning ms |" in report
    assert "copy bandwidth 2000 GB/s, bf16 matmul peak 800 TFLOP/s" in report
    table_rows = [line for line in report.splitlines() if line.startswith("| fwd |")]
    assert len(table_rows) == 2 + 2 + 2
    assert "| fused | fused 1.0000 / composed 1.0000 / torch 1.0000 | 5.0 |" in \
        "\n".join(table_rows)
    assert len([line for line in report.splitlines() if line.startswith("| infer |")]) == 8
    saved = document["records"][0]
    assert {"path", "candidates", "first_call_ms", "tuning_ms"} <= set(saved), set(saved)
    pytest.importorskip("matplotlib")
    pngs = [p for p in paths if p.suffix == ".png"]
    assert sorted(p.name for p in pngs) == ["fake-gpu-ffn.png", "fake-gpu-gelu.png",
                                            "fake-gpu-linear_gelu.png"]
    assert all(p.stat().st_size > 1000 for p in pngs)


def test_report_lists_the_cases_below_the_eager_target():
    slow = harness.summarize(_case(), {"ours": 10.0, "eager": 9.0}, {}, {}, DEVICE_FIGURES,
                             {"path": "composed", "candidates": {"composed": 10.0}})
    fine = harness.summarize(_case("fwd"), {"ours": 9.9, "eager": 9.8}, {}, {}, DEVICE_FIGURES)
    report = harness.markdown_report({}, [slow, fine])
    section = report.split("## Below 0.98x eager")[1]
    assert "linear_gelu fwd+bwd bf16 none 8192x768x3072: 0.90x, path composed" in section
    assert "linear_gelu fwd " not in section, "0.99x is within the target"
    clean = harness.markdown_report({}, [fine])
    assert "None: every case with an eager figure is at or above it." in clean


def test_the_hopper_paths_are_candidates_where_descriptors_serve(timed_paths):
    # At a shape whose rows are 16-byte aligned (K = 48: 96-byte bf16 rows) each forward's
    # Hopper path ("tma": TMA loads, persistent grid) is timed beside the others, so the first
    # GPU run records where it pays. (The interpreter lets it apply as an sm90 GPU would; at
    # 37x45x51 above, an odd K, it does not.)
    sel = Selection(shapes=[(37, 48, 51)], gelu_sizes_mb=[], dtypes=["bf16"],
                    approximates=["tanh"], modes=["infer"], baselines=["eager"], device="cpu")
    cases = [c for op in (ops_linear_gelu, ops_ffn, ops_geglu) for c in op.cases(sel)]
    records = [harness.run_case(c, DEVICE_FIGURES, FakeClock(ms=2.0, peak=4096)) for c in cases]
    assert [r["op"] for r in records] == ["linear_gelu", "ffn", "geglu"]
    for record in records:
        assert "tma" in record["candidates"], (harness.label(record), record["candidates"])


def test_geglu_builds_runs_and_reports(tmp_path, timed_paths):
    sel = Selection(shapes=[(37, 45, 51)], gelu_sizes_mb=[], dtypes=["bf16"],
                    approximates=["tanh"], modes=list(harness.MODES),
                    baselines=["eager", "matmul"], device="cpu")
    cases = ops_geglu.cases(sel)
    assert [c.mode for c in cases] == list(harness.MODES)
    records = [harness.run_case(c, DEVICE_FIGURES, FakeClock(ms=2.0, peak=4096)) for c in cases]
    errors = [(harness.label(r), n, e["error"]) for r in records
              for n, e in r["providers"].items() if "error" in e]
    assert not errors, errors
    m, k, n = 37, 45, 51
    infer, fwd, bwd, both = records
    assert set(fwd["providers"]) == {"ours", "ours-recompute", "eager", "matmul"}
    assert fwd["flops"] == infer["flops"] == 2 * (2 * m * n * k)
    assert bwd["flops"] == 4 * (2 * m * n * k)
    assert fwd["bytes"] == (m * k + 2 * n * k + 3 * m * n) * 2
    assert infer["bytes"] == (m * k + 2 * n * k + m * n) * 2
    assert bwd["bytes"] == (3 * m * n + 2 * m * k + 4 * n * k) * 2
    assert both["providers"]["ours"]["memory_vs_eager"] == 1.0  # the fake clock's peak
    # Saved per token: ours x, g, u (k + 2n); eager's op x, g, gelu(g), u (k + 3n), its block
    # also h (k + 4n); recompute x alone.
    # With dropout (p = 0.1) eager's block keeps the mask (bf16 on the CPU) and the dropout
    # output instead of h (k + 5n), ours the 8-byte seed besides.
    assert both["saved_vs_eager"] == pytest.approx({
        "ours": (k + 2 * n) / (k + 3 * n), "ours-recompute": k / (k + 3 * n),
        "block ours": (k + 2 * n) / (k + 4 * n), "block ours-recompute": k / (k + 4 * n),
        "block ours p=0.1": (m * (k + 2 * n) * 2 + 8) / (m * (k + 5 * n) * 2),
        "block ours-recompute p=0.1": (m * k * 2 + 8) / (m * (k + 5 * n) * 2)})
    # The path ours took and every candidate's time (a tie: the first registered path), eager
    # PyTorch's own computation among them.
    assert (infer["path"], fwd["path"], bwd["path"]) == ("fused", "fused", "once")
    assert fwd["candidates"] == {"fused": 1.0, "composed": 1.0, "torch": 1.0}
    assert bwd["candidates"] == {"once": 1.0, "torch": 1.0}
    assert both["path"] == "geglu_fwd=fused, geglu_bwd=once", both["path"]
    assert all("saved_vs_eager" not in r for r in (infer, fwd, bwd))
    report = harness.markdown_report({"device": "Fake GPU", **DEVICE_FIGURES}, records)
    assert "## geglu" in report
    assert "| saved ours | saved ours-recompute | saved block ours | saved block ours-recompute |" \
        in report
    # GeGLU runs at its own presets unless shapes or presets are asked for.
    assert _selection().geglu_shapes == [(8192, 2048, 16384), (8192, 768, 2048)]
    assert _selection("--quick").geglu_shapes == [(8192, 2048, 16384)]
    assert _selection("--preset", "t5-base").shapes == [(8192, 768, 2048)]
    assert _selection("--preset", "bert-base").geglu_shapes == [(8192, 768, 3072)]
    assert _selection(gpu=False).geglu_shapes == [(37, 45, 51)]


def test_markdown_marks_missing_figures():
    record = harness.summarize(_case(), {"ours": 10.0}, {}, {}, DEVICE_FIGURES)
    report = harness.markdown_report({}, [record])
    row = next(line for line in report.splitlines() if line.startswith("| fwd+bwd"))
    assert "10.0000" in row and not math.isnan(record["providers"]["ours"]["tflops"])


# ---- the command line --------------------------------------------------------------------------


def _selection(*argv, gpu=True):
    from bench import __main__ as cli

    return cli.selection(cli._parser().parse_args(list(argv)), gpu)


def test_default_quick_and_cpu_selections():
    full = _selection()
    assert full.dtypes == ["bf16", "fp16", "fp32", "tf32"]
    assert full.shapes == [(8192, 768, 3072), (8192, 1024, 4096), (8192, 1600, 6400),
                           (8192, 4096, 11008)]
    assert full.decode_shapes == [(1, 768, 3072), (16, 768, 3072), (64, 768, 3072),
                                  (1, 4096, 11008), (16, 4096, 11008), (64, 4096, 11008)]
    assert full.modes == ["infer", "fwd", "bwd", "fwd+bwd"]
    assert _selection("--preset", "gpt2-xl").decode_shapes == []
    assert _selection("--preset", "llama-7b", "--decode", "2").decode_shapes == [(2, 4096, 11008)]
    assert _selection("--decode", "").decode_shapes == []
    assert full.gelu_sizes_mb == [1, 4, 16, 64, 256, 1024]
    assert full.baselines == list(harness.BASELINES)
    quick = _selection("--quick")
    assert (quick.dtypes, quick.shapes) == (["bf16"], [(8192, 768, 3072)])
    assert quick.decode_shapes == [(1, 768, 3072)]
    assert "compile-max" not in quick.baselines and "compile" in quick.baselines
    assert _selection("--no-compile").baselines == ["eager", "matmul", "addmm-act"]
    cpu = _selection(gpu=False)
    assert cpu.shapes == [(37, 45, 51)] and cpu.dtypes == ["bf16", "fp16", "fp32"]
    assert cpu.decode_shapes == []
    assert _selection("--shapes", "128x128x128", gpu=False).shapes == [(128, 128, 128)]
    custom = _selection("--shapes", "4096x512x2048", "--tokens", "7", "--preset", "llama-7b")
    assert custom.shapes == [(4096, 512, 2048)] and custom.decode_shapes == []
    assert _selection("--preset", "llama-7b", "--tokens", "1024").shapes == [(1024, 4096, 11008)]


@pytest.mark.parametrize("argv, message", [
    (["--ops", "softmax"], "unknown op softmax"),
    (["--dtypes", "fp8"], "unknown dtype fp8"),
    (["--preset", "gpt5"], "unknown preset gpt5"),
    (["--sizes", "big"], "--sizes takes MB"),
    (["--decode", "one"], "--decode takes token counts"),
    # The interpreter would run it for minutes without a word: refused, saying what it takes.
    (["--shapes", "4096x1024x4096", "--modes", "fwd+bwd"], "4096x1024x4096 is GPU-sized"),
])
def test_bad_options_exit_with_a_message(argv, message):
    from bench import __main__ as cli

    with pytest.raises(SystemExit, match=message):
        cli.main(argv)


def test_a_bench_cut_short_by_its_budget_continues_where_it_stopped(tmp_path, monkeypatch,
                                                                    timed_paths):
    """Each case is a JSON line as soon as it is timed; the same command skips those lines, and
    no case starts past --budget-s (exit 3, saying what remains)."""
    from bench import __main__ as bench_main

    clock = FakeClock()
    monkeypatch.setattr(harness, "GpuClock", lambda: clock)
    monkeypatch.setattr(harness, "measure_device", lambda clock: dict(DEVICE_FIGURES))
    monkeypatch.setattr(harness, "environment", lambda: {"device": "Fake GPU", "driver": "0",
                                                         "torch": "x", "triton": "x"})
    sel = Selection(shapes=[(37, 45, 51)], gelu_sizes_mb=[0.01], dtypes=["bf16"],
                    approximates=["tanh"], modes=["infer", "fwd"], baselines=["eager"],
                    device="cpu")
    lines = tmp_path / "fake.jsonl"

    assert bench_main.run_bench(["linear_gelu"], sel, tmp_path, "fake", budget_s=0) == 3
    assert harness.read_lines(lines) == []
    assert bench_main.run_bench(["linear_gelu"], sel, tmp_path, "fake") == 0
    first = [harness.label(r) for r in harness.read_lines(lines)]
    assert first == ["linear_gelu infer bf16 tanh 37x45x51", "linear_gelu fwd bf16 tanh 37x45x51"]
    timed = clock.timed
    assert bench_main.run_bench(["linear_gelu"], sel, tmp_path, "fake") == 0
    assert clock.timed == timed, "a case already in the lines ran again"
    assert [harness.label(r) for r in harness.read_lines(lines)] == first
    assert len(json.loads((tmp_path / "fake.json").read_text())["records"]) == 2


def test_host_times_each_variant_on_the_paths_it_names():
    """bench --host: every mode and variant of an entry, ours against eager in the same run;
    the eager-path variant runs PyTorch's paths, the stubbed one launches no kernel (its tuners
    get their kernels back after), the fallback runs no launcher of ours."""
    from bench import host
    from triton_gelu.testing import count_paths

    tuners = host._tuners()
    kernels = [t.kernel for t in tuners]
    with count_paths() as ran:
        records = host.measure(entries=["linear_gelu"], rounds=1, calls=1)
    assert [(r["mode"], r["variant"]) for r in records] == [
        (m, v) for m in host.MODES for v in host.VARIANTS]
    for r in records:
        assert r["entry"] == "linear_gelu" and r["ours_us"] > 0 and r["eager_us"] > 0
        assert r["ratio"] == pytest.approx(r["ours_us"] / r["eager_us"], rel=0.02, abs=2e-3)
    assert ran[("linear_gelu_fwd", "torch")] > 0, ran  # the eager-path variant's
    assert [t.kernel for t in tuners] == kernels and host._NO_LAUNCH not in kernels
    assert "| linear_gelu | fwd+bwd |" in host.markdown(records)


def test_host_cold_start_and_first_contact_cover_every_public_op():
    """A new op's public function and module must be in ``bench --host`` and ``--cold-start``,
    and its function in a GPU's first contact: all take them from the ops' bench modules
    (``bench/ops_<op>.py``, found by ``bench.op_modules``), so this fails where a module does
    not declare one."""
    from bench import cold_start, first_contact, host

    public = {name: getattr(triton_gelu, name) for name in triton_gelu.__all__}
    functions = {name for name, obj in public.items()
                 if getattr(obj, "__module__", "").startswith("triton_gelu.ops.")}
    modules = {name for name, obj in public.items()
               if isinstance(obj, type) and issubclass(obj, torch.nn.Module)}
    assert {"gelu", "geglu", "GELU", "GeGLU"} <= functions | modules, (functions, modules)
    assert set(host._entries("cpu")) == functions | modules
    assert set(cold_start.op_names()) == functions
    contacts = first_contact.contacts()
    assert set(contacts) == functions
    # every path op a public op names is one the package chooses paths for
    assert all(first_contact.path_names(op) for c in contacts.values() for op in c.ops)
