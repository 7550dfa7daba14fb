"""The first GPU run's plumbing, on the CPU: ``python -m bench.first_contact --dry-run`` runs the
same code under the Triton interpreter at tiny shapes (scripts/gpu_session.sh first-contact on a
GPU), and the ratios of a timed case come from its clock."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAGES = ("environment", "correctness", "timings", "memory")
PUBLIC = ("gelu", "linear_gelu", "feed_forward", "geglu", "gated_feed_forward")


def _run(out: Path, *args: str, session: bool = False) -> subprocess.CompletedProcess:
    """``python -m bench.first_contact --dry-run --out OUT``, or with ``session`` the GPU
    lease's command, ``OUT=... scripts/gpu_session.sh first-contact --dry-run``."""
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "TRITON_GELU_TUNE")}
    if session:
        command = ["bash", "scripts/gpu_session.sh", "first-contact", "--dry-run", *args]
        env["OUT"] = str(out)
    else:
        command = [sys.executable, "-m", "bench.first_contact", "--dry-run", "--out", str(out),
                   *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)


def _records(out: Path, stage: str) -> list[dict]:
    return [json.loads(line) for line in (out / f"{stage}.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """A run stopped by its deadline at once, then called again to continue: (out, runs)."""
    out = tmp_path_factory.mktemp("first-contact")
    stopped = _run(out, "--budget-s", "0")
    finished = _run(out, session=True)
    again = _run(out, "--workers", "0")
    return out, (stopped, finished, again)


def test_the_deadline_stops_cleanly_and_a_second_call_continues(dry_run):
    out, (stopped, finished, again) = dry_run
    assert stopped.returncode == 3, stopped.stdout + stopped.stderr
    assert "case(s) remain" in stopped.stdout and "call again" in stopped.stdout, stopped.stdout
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    assert "first_contact: complete" in finished.stdout, finished.stdout[-2000:]
    assert again.returncode == 0 and "first_contact: complete" in again.stdout, again.stdout
    # The third call had nothing left: only its environment record is new.
    assert [r["call"] for r in _records(out, "environment")] == [1, 2, 3]
    for stage in STAGES[1:]:
        keys = [r["key"] for r in _records(out, stage)]
        assert len(keys) == len(set(keys)), f"{stage}: a case was written twice"


def test_it_writes_four_json_lines_files(dry_run):
    out, _ = dry_run
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{s}.jsonl" for s in STAGES)
    for stage in STAGES:
        for record in _records(out, stage):
            assert record["stage"] == stage and record["key"] and "finished" in record, record
    env = _records(out, "environment")[0]
    assert env["dry_run"] is True and env["copy_gbps"] is None
    assert env["report"].startswith("triton_gelu"), env["report"][:200]


def test_every_public_op_and_every_path_is_checked_against_float64(dry_run):
    out, _ = dry_run
    records = _records(out, "correctness")
    failed = [(r["key"], r.get("error"), [o for o in r.get("outputs", []) if not o["ok"]])
              for r in records if not r["ok"]]
    assert not failed, failed
    from triton_gelu.tuning.paths import path_choosers

    ran = {(op, path) for r in records for op, path in r["ran"].items()}
    for public, ops in (("gelu", ("gelu_fwd", "gelu_bwd")),
                        ("linear_gelu", ("linear_gelu_fwd", "linear_gelu_bwd", "linear_preact")),
                        ("feed_forward", ("ffn_fwd", "ffn_bwd")),
                        ("geglu", ("geglu_fwd", "geglu_bwd")),
                        ("gated_feed_forward", ("geglu_fwd", "geglu_bwd"))):
        mine = [r for r in records if r["op"] == public]
        assert {r["dtype"] for r in mine} == {"fp32", "fp16", "bf16"}, public
        for op in ops:
            for path in path_choosers[op].paths:
                forced = [r for r in mine if r["forced"] == {op: path}]
                assert len(forced) >= 3, f"{public}: {op}={path} forced {len(forced)} times"
                # cuBLASLt's GELU epilogue is a CUDA op: on the CPU it never applies.
                if (op, path) != ("linear_gelu_fwd", "addmm_gelu"):
                    assert (op, path) in ran, f"{op}={path} never ran"
        grads = {o["name"] for r in mine for o in r["outputs"]}
        assert "y" in grads and "dx" in grads and len(grads) >= 2, (public, grads)
    assert {r["p"] for r in records if r["op"] == "feed_forward"} == {0.0, 0.1}


def test_timings_and_memory_keep_their_schema_without_a_gpu(dry_run):
    out, _ = dry_run
    timings = _records(out, "timings")
    assert {r["op"] for r in timings} == set(PUBLIC)
    assert {r["mode"] for r in timings} == {"fwd", "bwd", "fwd+bwd", "infer"}
    for r in timings:
        assert r["ok"] and r["ours_ms"] is None and r["candidates"], r
        assert r["vs_eager"] is None and r["vs_compile"] is None, r
        for name in ("eager", "compile", *r["candidates"]):
            entry = r["providers"][name]
            assert entry["first_call_s"] > 0 and entry["first_call_warm_s"] > 0, (r["key"], name)
    memory = _records(out, "memory")
    assert [r["p"] for r in memory] == [0.0, 0.1]
    for r in memory:
        assert 0 < r["saved_vs_eager"] < 1 and r["peak_vs_eager"] is None, r


class FakeClock:
    """Times each provider by the order it is timed in: eager, compile, then the candidates."""

    def __init__(self, times: list[float]) -> None:
        self.times = list(times)

    def sync(self) -> None:
        pass

    def now_ms(self) -> float:
        return 0.0

    def time_ms(self, fn) -> float:
        return self.times.pop(0)


def test_ours_is_the_fastest_candidate_that_applies_and_ratios_follow(monkeypatch, device):
    from bench import first_contact, harness

    monkeypatch.setattr(harness, "compiled", lambda fn, mode: fn)  # no Inductor compile here
    case = first_contact.Timing("t", "linear_gelu", "fwd", (37, 45, 51), approximate="none",
                                ops=("linear_gelu_fwd",))
    # eager 4.0, compile 3.0; fused 2.0, composed 1.0, (addmm_gelu: does not apply, not timed),
    # torch 5.0
    record = first_contact.run_timing(case, device, FakeClock([4.0, 3.0, 2.0, 1.0, 5.0]), {},
                                      {"copy_gbps": 1.0, "matmul_tflops": 1.0})
    assert record["chosen"] == "linear_gelu_fwd=composed", record
    assert record["ours_ms"] == 1.0 and record["vs_eager"] == 4.0 and record["vs_compile"] == 3.0
    assert record["providers"]["linear_gelu_fwd=addmm_gelu"]["applies"] is False
    assert "linear_gelu_fwd=addmm_gelu" not in record["candidates"]
    assert record["fraction_of_floor"] > 0


def test_the_suite_in_slices_skips_what_passed_and_stops_at_its_deadline(tmp_path):
    """scripts/gpu_session.sh tests: a ledger of finished tests (tests/conftest.py) lets the next
    call skip what passed; no test starts past the deadline."""
    ledger = tmp_path / "ledger.txt"
    env = {**os.environ, "TRITON_GELU_TEST_LEDGER": str(ledger)}
    target = "tests/test_table.py"

    def pytest(**extra):
        return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               "-p", "no:xdist", target], cwd=REPO, env={**env, **extra},
                              capture_output=True, text=True, timeout=300)

    stopped = pytest(TRITON_GELU_TEST_DEADLINE="0")
    assert stopped.returncode == 3 and "deadline reached" in stopped.stdout, stopped.stdout
    assert not ledger.exists() or ledger.read_text() == ""
    first = pytest()
    assert first.returncode == 0, first.stdout[-2000:]
    lines = ledger.read_text().splitlines()
    assert lines and all(line.startswith(("passed ", "skipped ")) for line in lines), lines
    assert all(target in line for line in lines)
    second = pytest()
    assert second.returncode == 5 and f"{len(lines)} deselected" in second.stdout, second.stdout
    assert ledger.read_text().splitlines() == lines
