"""Test harness: run every Triton kernel natively on a GPU, under the interpreter without one.

TRITON_INTERPRET must be set before triton is first imported, so this happens here, at the top
of the first module pytest loads, before the tests import triton_gelu.
"""

import os
import sys
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton was imported before TRITON_INTERPRET=1 could be set")
    os.environ["TRITON_INTERPRET"] = "1"

# Every op's Tuners and Paths registered (tuning.tuner.tuners, tuning.paths.path_choosers), as
# after each op's first call: the tests of the tuning units read those registries. The one
# place the tests import the kernels' modules (after TRITON_INTERPRET is set, above).
import triton_gelu.kernels  # noqa: E402,F401

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pytest_report_header(config):
    import triton

    where = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU, Triton interpreter"
    return f"triton_gelu tests on {where}; torch {torch.__version__}, triton {triton.__version__}"


@pytest.fixture(autouse=True)
def _seed(request):
    # A different seed per test, the same in every run (str hash() is salted per process, so
    # crc32), so a failure reproduces.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(autouse=True)
def _fresh_plans():
    # Each test plans its problems anew, so a setting it changes (monkeypatch.setenv, a
    # fallback it forces) applies to every call it makes, as in a fresh process.
    from triton_gelu.autotune import clear_plans

    clear_plans()


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture
def ieee_float32():
    """PyTorch's float32 matmuls are the baseline: both in IEEE float32 (a test file that
    compares matmuls with them sets ``pytestmark = pytest.mark.usefixtures("ieee_float32")``)."""
    from helpers import tf32

    with tf32(False):
        yield


@pytest.fixture
def poison_outputs():
    """Every buffer allocated during the test starts as NaN (helpers.poisoned_allocations), so
    an element a kernel does not store shows up in the outputs (and in the transient buffers
    they are computed from)."""
    from helpers import poisoned_allocations

    with poisoned_allocations():
        yield


@pytest.fixture
def timed_choosers(tmp_path, monkeypatch):
    """Every Tuner and Paths of the package times with one fake timer (so they tune under the
    interpreter too), into a temporary cache, with what they chose forgotten before and after.
    The timer returns 1.0 ms for everything: the first candidate of each wins."""
    from fakes import FakeTimer

    from triton_gelu.tuning.paths import path_choosers
    from triton_gelu.tuning.tuner import tuners

    monkeypatch.setenv("TRITON_GELU_CACHE_DIR", str(tmp_path / "timed-cache"))
    timer = FakeTimer([1.0])
    choosers = [*tuners.values(), *path_choosers.values()]
    for chooser in choosers:
        chooser.forget()
        monkeypatch.setattr(chooser, "bench", timer)
    yield timer
    for chooser in choosers:
        chooser.forget()


# ---- a suite run in slices (scripts/gpu_session.sh tests) -------------------------------------
# With TRITON_GELU_TEST_LEDGER=FILE each finished test appends "outcome nodeid" to FILE as it
# ends, and a test FILE lists as passed or skipped is not run again; with
# TRITON_GELU_TEST_DEADLINE (seconds since the epoch) no test starts after it. A GPU lease's
# commands of a few minutes each then run the whole suite between them.

LEDGER = os.environ.get("TRITON_GELU_TEST_LEDGER")
DEADLINE = float(os.environ.get("TRITON_GELU_TEST_DEADLINE", "inf"))


def _ledger_settled() -> set[str]:
    if not LEDGER or not os.path.exists(LEDGER):
        return set()
    with open(LEDGER) as f:
        return {line.split(" ", 1)[1].strip() for line in f
                if line.startswith(("passed ", "skipped "))}


def pytest_collection_modifyitems(config, items):
    settled = _ledger_settled()
    if settled:
        keep = [item for item in items if item.nodeid not in settled]
        config.hook.pytest_deselected(items=[i for i in items if i.nodeid in settled])
        items[:] = keep


def pytest_runtest_setup(item):
    import time

    if time.time() >= DEADLINE:
        pytest.exit("deadline reached: run the same command again to continue", returncode=3)


def pytest_runtest_logreport(report):
    # Every call's outcome, and a setup or teardown that did not pass (a skip, an error).
    if not LEDGER or not (report.when == "call" or report.outcome != "passed"):
        return
    with open(LEDGER, "a") as f:
        f.write(f"{report.outcome} {report.nodeid}\n")
        f.flush()
        os.fsync(f.fileno())
