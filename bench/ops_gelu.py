"""Standalone GELU, forward and backward: memory-bound, sized from 1 MB to 1 GB of input.

Least traffic: forward reads x and writes y (2 elements per element), backward reads dy and x
and writes dx (3). The forward is timed on an input that does not require grad (the kernel alone);
the backward through the graph of one forward.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

import triton_gelu

from .contact import Contact, Kit, Problem, Timing
from .harness import DTYPES, Case, Check, Selection, Subject, add_compile_baselines, timed

NAME = "gelu"
ORDER = 0
MODES = ("fwd", "bwd")


def host_entries(param, m: int, k: int, n: int, device: str) -> dict:
    """``bench --host``'s entries (name -> (ours(x), eager(x), parameters)): the function and
    the module, on x (m, k)."""
    return {"gelu": (triton_gelu.gelu, F.gelu, []),
            "GELU": (triton_gelu.GELU(), torch.nn.GELU(), [])}


def first_calls(tensor, m: int, k: int, n: int) -> dict:
    """``bench --cold-start``'s first calls (label -> a forward), GELU on the (m, n) hidden
    activation; ``tensor(*shape)`` makes an operand."""
    return {"gelu": lambda: triton_gelu.gelu(tensor(m, n))}


def first_contact() -> dict:
    """``first_contact.py``'s cases (public op -> ``contact.Contact``): GELU on an (M, N)
    activation, forward and backward timed on 2^28 elements (bf16)."""
    def problem(kit: Kit) -> Problem:
        m, _, n = kit.shape
        x = (3 * torch.randn(m, n, device=kit.device)).to(kit.dtype)  # GELU's bend and tails
        return Problem([x], lambda x: triton_gelu.gelu(x, kit.approximate), kit.gelu, ["x"])

    def timings(dry_run: bool) -> list[Timing]:
        shape = (37, 1, 51) if dry_run else (2**14, 1, 2**14)  # (M, -, N): the activation
        return [Timing("gelu fwd 2^28", "gelu", "fwd", shape, ops=("gelu_fwd",)),
                Timing("gelu bwd 2^28", "gelu", "bwd", shape, ops=("gelu_bwd",))]

    def floor(mode: str, m: int, k: int, n: int) -> tuple[float, float]:
        return (2 if mode == "fwd" else 3) * m * n * 2, 0.0  # bf16 x, y (and dy, dx)

    return {"gelu": Contact(("gelu_fwd", "gelu_bwd"), problem, timings, floor)}


def _build(numel: int, dtype: torch.dtype, approximate: str, mode: str,
           baselines: list[str],
           device: str) -> dict:
    x = torch.randn(numel, dtype=dtype, device=device, requires_grad=mode != "fwd")

    def ours(t):
        return triton_gelu.gelu(t, approximate=approximate)

    def eager(t):
        return F.gelu(t, approximate=approximate)

    fns = {"ours": ours}
    if "eager" in baselines:
        fns["eager"] = eager
    add_compile_baselines(fns, eager, baselines)
    return {name: timed(fn, [x], mode) for name, fn in fns.items()}


def cases(sel: Selection) -> list[Case]:
    out = []
    for mb in sel.gelu_sizes_mb:
        for dtype_name in dict.fromkeys("fp32" if d == "tf32" else d for d in sel.dtypes):
            dtype = DTYPES[dtype_name]
            numel = int(mb * 2**20) // dtype.itemsize
            for approximate in sel.approximates:
                for mode in (m for m in sel.modes if m in MODES):
                    out.append(Case(
                        NAME, mode, f"{mb:g} MB", dtype_name, approximate,
                        bytes=(2 if mode == "fwd" else 3) * numel * dtype.itemsize, flops=0.0,
                        build=functools.partial(_build, numel, dtype, approximate, mode,
                                                sel.baselines, sel.device),
                    ))
    return out


def checks(shape: tuple[int, int, int], dtype: torch.dtype, approximate: str,
           device: str) -> list[Check]:
    m, _, n = shape
    x = (3 * torch.randn(m, n, device=device)).to(dtype)  # GELU bends within a few units of 0
    return [Check(
        f"{NAME} {str(dtype).removeprefix('torch.')} {approximate} {m}x{n}", x, [],
        ours={"ours": Subject(lambda t: triton_gelu.gelu(t, approximate=approximate))},
        torch_same=Subject(lambda t: F.gelu(t, approximate=approximate)),
        ref64=Subject(lambda t: F.gelu(t, approximate=approximate)),
    )]
