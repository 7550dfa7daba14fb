"""Fakes for testing tuning on the CPU: a timer with canned figures, a tiny copy kernel loaded
from a real file (so its source hash is real), and the worker of the many-process test (it must
live in an importable module for ``multiprocessing``'s spawn start)."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import torch
import triton

KERNEL_SOURCE = '''
import triton
import triton.language as tl


@triton.jit
def _scale(x):
    return x * {factor}


@triton.jit
def _copy_kernel(x_ptr, y_ptr, n_elements, BLOCK_SIZE: tl.constexpr):
    offs = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n_elements
    tl.store(y_ptr + offs, _scale(tl.load(x_ptr + offs, mask=mask)), mask=mask)
'''


def load_kernel(directory: Path, factor: str, module: str):
    """Import a copy kernel y = factor * x from a file (its source hash depends on ``factor``)."""
    path = directory / f"{module}.py"
    if not path.exists():
        path.write_text(KERNEL_SOURCE.format(factor=factor))
    spec = importlib.util.spec_from_file_location(module, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod._copy_kernel


def tile_tuners(kernel, name: str, tiles=((16, 16), (16, 64), (64, 32))):
    """(label, Tuner) pairs launching the matmul ``kernel`` with one tile shape (BLOCK_SIZE_M,
    BLOCK_SIZE_N) of ``tiles`` each, other than the interpreter's (a dropout epilogue's mask
    must not depend on the tile)."""
    from triton_gelu._autotune import Tuner

    for block_m, block_n in tiles:
        config = triton.Config({"BLOCK_SIZE_M": block_m, "BLOCK_SIZE_N": block_n,
                                "BLOCK_SIZE_K": 16, "GROUP_SIZE_M": 2}, num_warps=4)
        label = f"{block_m}x{block_n}"
        yield label, Tuner(kernel, f"{name}_{label}", lambda arch=None, config=config: [config])


def three_configs(arch=None):
    return [triton.Config({"BLOCK_SIZE": b}, num_warps=4, num_stages=1) for b in (16, 32, 64)]


class FakeTimer:
    """Returns canned times in call order and counts its calls; runs each callable once (so
    the code it times is exercised), then sleeps ``delay`` seconds (to widen races)."""

    def __init__(self, times, delay: float = 0.0):
        self.times, self.calls, self.delay = list(times), 0, delay

    def __call__(self, fn) -> float:
        fn()
        self.calls += 1
        time.sleep(self.delay)
        return self.times[(self.calls - 1) % len(self.times)]


def launch(tuner, n: int = 100) -> torch.Tensor:
    """Run a copy-kernel tuner on arange(n); return y (NaN where nothing was stored)."""
    from triton_gelu._autotune import bucket

    x = torch.arange(n, dtype=torch.float32)
    y = torch.full_like(x, float("nan"))
    tuner.run(lambda meta: (triton.cdiv(n, meta["BLOCK_SIZE"]),), (bucket(n), x.dtype),
              x_ptr=x, y_ptr=y, n_elements=n)
    return y


# ---- two ways of computing one op, for Paths tests -------------------------------------------


def double_by_add(x: torch.Tensor) -> torch.Tensor:
    return x + x


def double_by_mul(x: torch.Tensor) -> torch.Tensor:
    return x * 2


# ---- the many-process test's worker ------------------------------------------------------------


def tuning_worker(rank: int, kernel_dir: str, barrier, results) -> None:
    """One rank: tune the same kernel and op as every other rank, at the same moment, with a
    timer that makes a different candidate fastest in each rank; report what it ended with."""
    try:
        from triton_gelu._autotune import Paths, Tuner

        kernel = load_kernel(Path(kernel_dir), "2.0", "mp_kernel")
        shift = rank % 3
        timer = FakeTimer([1.0 + (i + shift) % 3 for i in range(3)], delay=0.05)
        tuner = Tuner(kernel, "mp_copy", three_configs, bench=timer)
        paths = Paths("mp_double", {"add": double_by_add, "mul": double_by_mul}, default="add",
                      bench=FakeTimer([1.0, 2.0] if rank % 2 else [2.0, 1.0], delay=0.05),
                      kernels=[tuner])
        barrier.wait(timeout=60)
        y = launch(tuner)
        doubled = paths.run(("key",), torch.arange(4.0))
        (config,) = tuner.choices.values()
        (path,) = paths.choices.values()
        results.put((rank, config.config.kwargs["BLOCK_SIZE"], config.source, path.path,
                     path.source, bool(torch.equal(y, 2.0 * torch.arange(100.0))),
                     bool(torch.equal(doubled, torch.arange(4.0) * 2)), None))
    except Exception as e:  # reported to the parent, which fails the test with it
        results.put((rank, None, None, None, None, False, False, repr(e)))
