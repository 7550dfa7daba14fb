"""Without Triton (macOS, Windows, CPU-only containers): ``import triton_gelu`` works, every public
name runs on the PyTorch fallback with the suite's numerics, torch.compile of a patched model
still traces, and one warning says why. tests/no_triton.py does the work in a subprocess that
hides Triton from the import system; see its docstring, and add a row to its CHECKS for each new
public name.

Also: the two sets of launchers (triton_gelu.kernels, triton_gelu.fallback) have the same names
and signatures, so _backend.launchers may return either.
"""

from __future__ import annotations

import inspect
import json
import subprocess
import sys

import no_triton
import pytest

import triton_gelu
from triton_gelu import fallback, kernels


def test_every_public_name_has_a_fallback_check():
    names = set(no_triton.public_names())
    missing, stale = names - set(no_triton.CHECKS), set(no_triton.CHECKS) - names
    assert not missing, (
        f"public names with no check of their PyTorch fallback: {sorted(missing)}; add a row to "
        "CHECKS in tests/no_triton.py"
    )
    assert not stale, f"CHECKS rows for names that are not public: {sorted(stale)}"
    assert set(triton_gelu.__all__) <= names


def _run_hidden(tmp_path) -> dict:
    env = no_triton.hidden_env(tmp_path, TRITON_INTERPRET="1")  # hidden Triton wins over it
    proc = subprocess.run([sys.executable, no_triton.__file__], env=env, capture_output=True,
                          text=True, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("NO_TRITON_RESULT ")]
    assert proc.returncode == 0 and lines, f"rc {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return json.loads(lines[-1].removeprefix("NO_TRITON_RESULT "))


def test_without_triton(tmp_path):
    """One subprocess (torch.compile in it is slow) runs every check; all failures are listed."""
    run = _run_hidden(tmp_path)
    failures = {
        name: outcome for name, outcome in {**run["checks"], **run["extras"]}.items()
        if outcome != "ok" and not outcome.startswith("skipped:")
    }
    assert not failures, "\n\n".join(f"{name}:\n{tb}" for name, tb in failures.items())
    assert run["public_names"] == no_triton.public_names()
    assert run["import_errors"] == {}, f"modules that need Triton: {run['import_errors']}"
    assert run["imported"] == [], f"imported anyway: {run['imported']}"
    warned = run["fallback_warnings"]
    assert len(warned) == 1, f"expected one TritonUnavailableWarning, got {len(warned)}: {warned}"
    assert "No module named 'triton'" in warned[0], warned[0]
    not_run = {name: outcome for name, outcome in run["extras"].items() if outcome != "ok"}
    if not_run:
        pytest.skip(f"everything else passed; not run here: {not_run}")


def test_kernels_and_fallback_have_the_same_launchers():
    assert kernels.__all__ == fallback.__all__
    for name in kernels.__all__:
        triton_side = inspect.signature(getattr(kernels, name))
        torch_side = inspect.signature(getattr(fallback, name))
        assert triton_side == torch_side, f"{name}: kernels{triton_side}, fallback{torch_side}"
    # and the per-problem launches the plans bind (a tensor-parallel shard's plan on the
    # fallback binds the fallback's)
    launches = {name for name in dir(kernels) if name.endswith("_launch")}
    assert launches == {f"{name}_launch" for name in kernels.__all__}, launches
    assert launches <= set(dir(fallback)), launches - set(dir(fallback))
