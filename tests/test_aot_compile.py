"""Every kernel compiles for sm_80 and sm_90 within shared memory, on the tensor cores, with
16-byte accesses: checked by Triton's real compiler, no GPU needed (see aot_compile.py)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("aot_compile.py")


def _can_compile_for_cuda() -> bool:
    try:
        from triton.backends import backends
    except ImportError:
        return False
    return "nvidia" in backends


@pytest.mark.skipif(not _can_compile_for_cuda(), reason="triton has no CUDA backend here")
def test_every_kernel_compiles_for_ampere_and_hopper():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the default today; silences 3.9's notice
    run = subprocess.run(
        [sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=1500
    )
    tail = "\n".join((run.stdout + run.stderr).splitlines()[-40:])
    assert run.returncode == 0, f"ahead-of-time compile check failed:\n{tail}"
    assert "every kernel compiled" in run.stdout, tail
