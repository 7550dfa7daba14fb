"""Every kernel compiles for sm_80 and sm_90 within shared memory, on the tensor cores, with
16-byte accesses: checked by Triton's real compiler, no GPU needed (see aot_compile.py).

Compiling every config takes minutes of one core, so the work is split by architecture and by
kernel group into separate tests, which pytest-xdist spreads over its workers; a test checks
that the groups cover every kernel the script knows, each once. The Hopper variants (TMA loads,
persistent grid) compile for sm_90 only, with their own promises (TMA in the PTX, no spills in
the main loop, shared memory within the tuner's estimate: see aot_compile.py).
"""

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("aot_compile.py")
ARCHES = ("sm90", "sm80")
# Kernel names (``aot_compile.py --list``) in groups of roughly equal compile time.
GROUPS = {
    "linear_fwd": ("linear_gelu_fwd",),
    "elementwise": ("linear_gelu_bwd_dz", "gelu_fwd", "gelu_bwd", "gelu_dropout_fwd",
                    "gelu_dropout_bwd", "geglu_act", "geglu_bwd_act", "geglu_act+dropout",
                    "geglu_bwd_act+dropout"),
    "ffn": ("ffn_fwd_gelu_dropout", "ffn_bwd_dz"),
    "geglu_fwd": ("geglu_fwd", "geglu_fwd+dropout"),
    # The Hopper variants (TMA, persistent grid): sm_90 only, every config of their spaces.
    "hopper": ("linear_gelu_fwd_tma", "ffn_fwd_gelu_dropout_tma", "ffn_bwd_dz_tma",
               "geglu_fwd_tma", "geglu_fwd_tma+dropout"),
}
HOPPER_ONLY = ("hopper",)


def _can_compile_for_cuda() -> bool:
    try:
        from triton.backends import backends
    except ImportError:
        return False
    return "nvidia" in backends


needs_cuda_backend = pytest.mark.skipif(not _can_compile_for_cuda(),
                                        reason="triton has no CUDA backend here")


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the default today; silences 3.9's notice
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True,
                          text=True, timeout=1500)


@functools.cache
def _kernel_names() -> tuple[str, ...]:
    run = _run("--list")
    assert run.returncode == 0, run.stderr[-2000:]
    return tuple(run.stdout.split())


@needs_cuda_backend
def test_the_groups_cover_every_kernel_once():
    grouped = [name for names in GROUPS.values() for name in names]
    missing = sorted(set(_kernel_names()) - set(grouped))
    unknown = sorted(set(grouped) - set(_kernel_names()))
    twice = sorted({name for name in grouped if grouped.count(name) > 1})
    assert not (missing or unknown or twice), \
        f"GROUPS: missing {missing}, unknown {unknown}, listed twice {twice}"


@needs_cuda_backend
@pytest.mark.parametrize("arch, group", [(arch, group) for arch in ARCHES for group in GROUPS
                                         if arch == "sm90" or group not in HOPPER_ONLY])
def test_every_kernel_compiles_for_ampere_and_hopper(arch, group):
    run = _run("--arch", arch, "--names", ",".join(GROUPS[group]))
    tail = "\n".join((run.stdout + run.stderr).splitlines()[-40:])
    assert run.returncode == 0, f"ahead-of-time compile check failed:\n{tail}"
    assert "every kernel compiled" in run.stdout, tail
    compiled = {line.split()[2] for line in run.stdout.splitlines() if line.startswith("ok ")}
    assert compiled == set(GROUPS[group]), f"compiled {sorted(compiled)}, not {GROUPS[group]}"
