"""Fused Linear + bias + GELU: y = gelu(x @ W^T + b), x (M, K), W (N, K), b (N,).

Providers: ours (and, when training, ours with ``recompute=True``), eager
``F.gelu(F.linear(...))``, the matmul
alone ``x @ W^T`` (the compute floor: what is left if bias and GELU were free), torch.compile
of eager (default and max-autotune), and for the tanh form the cuBLASLt GELU epilogue
``torch._addmm_activation(b, x, W^T, use_gelu=True)`` (forward only: it has no backward).

Least traffic, in elements: forward MK + NK + N + MN; backward reads dy, z, x, W and writes dx,
dW, db: 2MN + 2MK + 2NK + N. Flops: 2MNK per matmul, one forward and two backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import triton_gelu

from .contact import ODD, Contact, Kit, Problem, Timing, step_share
from .harness import (
    Case, Check, Selection, Subject, add_compile_baselines, matmul_cases, shape_text, timed,
)

NAME = "linear_gelu"
ORDER = 1


def host_entries(param, m: int, k: int, n: int, device: str) -> dict:
    """``bench --host``'s entries (as ``ops_gelu``'s): the function and the module, (m, k) -> n;
    ``param(*shape)`` makes a parameter."""
    w, b = param(n, k), param(n)
    ours = triton_gelu.LinearGELU(k, n).to(device)
    eager = torch.nn.Sequential(torch.nn.Linear(k, n), torch.nn.GELU()).to(device)
    return {"linear_gelu": (lambda x: triton_gelu.linear_gelu(x, w, b),
                            lambda x: F.gelu(F.linear(x, w, b)), [w, b]),
            "LinearGELU": (ours, eager, [*ours.parameters(), *eager.parameters()])}


def first_calls(tensor, m: int, k: int, n: int) -> dict:
    """``bench --cold-start``'s first calls (as ``ops_gelu``'s)."""
    x, w, b = tensor(m, k), tensor(n, k), tensor(n)
    return {"linear_gelu": lambda: triton_gelu.linear_gelu(x, w, b)}


def first_contact() -> dict:
    """``first_contact.py``'s cases (as ``ops_gelu``'s): BERT-base's and Llama-7B's first
    layers, and Llama's at decode (M = 1 and 16, inference)."""
    def problem(kit: Kit) -> Problem:
        _, k, n = kit.shape
        w, b = kit.weight(n, k), kit.bias(n)
        return Problem(
            [kit.x, w, b],
            lambda x, w, b: triton_gelu.linear_gelu(x, w, b, kit.approximate, kit.recompute),
            lambda x, w, b: kit.gelu(F.linear(x, w, b)), ["x", "w", "b"])

    def timings(dry_run: bool) -> list[Timing]:
        shapes = {"8192x768x3072": ODD if dry_run else (8192, 768, 3072),
                  "4096x4096x11008": (29, 53, 43) if dry_run else (4096, 4096, 11008)}
        cases = []
        for name, shape in shapes.items():
            cases += [Timing(f"linear_gelu fwd {name}", "linear_gelu", "fwd", shape,
                             ops=("linear_gelu_fwd",)),
                      Timing(f"linear_gelu fwd+bwd {name}", "linear_gelu", "fwd+bwd", shape,
                             ops=("linear_gelu_fwd", "linear_gelu_bwd"))]
        return cases + [
            Timing(f"linear_gelu infer decode M={m} 4096x11008", "linear_gelu", "infer",
                   (m, 53, 43) if dry_run else (m, 4096, 11008), ops=("linear_gelu_fwd",))
            for m in (1, 16)]

    def floor(mode: str, m: int, k: int, n: int) -> tuple[float, float]:
        # bf16 x, W, b, z / y once a pass; 2MNK flops a matmul
        return step_share(((3 * m * n + 3 * m * k + 3 * n * k) * 2, 6 * m * n * k), mode)

    return {"linear_gelu": Contact(("linear_gelu_fwd", "linear_gelu_bwd", "linear_preact"),
                                   problem, timings, floor)}


def traffic(m: int, k: int, n: int, mode: str) -> int:
    """Least elements a linear(+GELU) layer must move in ``mode``."""
    fwd = m * k + n * k + n + m * n
    bwd = 2 * m * n + 2 * m * k + 2 * n * k + n
    return {"infer": fwd, "fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def matmul_flops(m: int, k: int, n: int, mode: str) -> int:
    return 2 * m * n * k * {"infer": 1, "fwd": 1, "bwd": 2, "fwd+bwd": 3}[mode]


def operands(shape, dtype, device, requires_grad=True):
    """x ~ N(0, 1), W ~ N(0, 1/K), b ~ N(0, 1): the pre-activation is O(1), where GELU bends."""
    m, k, n = shape
    x = torch.randn(m, k, device=device).to(dtype)
    weight = (torch.randn(n, k, device=device) / k**0.5).to(dtype)
    bias = torch.randn(n, device=device).to(dtype)
    return [t.requires_grad_(requires_grad) for t in (x, weight, bias)]


def _build(shape, dtype: torch.dtype, approximate: str, mode: str, baselines: list[str],
           device: str) -> dict:
    x, weight, bias = operands(shape, dtype, device)

    def eager(x, weight, bias):
        return F.gelu(F.linear(x, weight, bias), approximate=approximate)

    fns = {"ours": lambda x, w, b: triton_gelu.linear_gelu(x, w, b, approximate)}
    if mode != "infer":  # inference keeps no pre-activation either way
        fns["ours-recompute"] = lambda x, w, b: triton_gelu.linear_gelu(x, w, b, approximate,
                                                                        True)
    if "eager" in baselines:
        fns["eager"] = eager
    add_compile_baselines(fns, eager, baselines)
    if "matmul" in baselines:
        fns["matmul"] = lambda x, w, b: torch.matmul(x, w.t())
    if "addmm-act" in baselines and approximate == "tanh" and mode in ("infer", "fwd"):
        fns["addmm-act"] = lambda x, w, b: torch._addmm_activation(b, x, w.t(), use_gelu=True)
    return {name: timed(fn, [x, weight, bias], mode) for name, fn in fns.items()}


def cases(sel: Selection) -> list[Case]:
    return matmul_cases(NAME, sel, _build, lambda shape, mode, counter: counter(*shape, mode),
                        traffic, matmul_flops)


def checks(shape: tuple[int, int, int], dtype: torch.dtype, approximate: str,
           device: str) -> list[Check]:
    x, weight, bias = operands(shape, dtype, device, requires_grad=False)

    def ours(recompute):
        return Subject(lambda x, w, b: triton_gelu.linear_gelu(x, w, b, approximate, recompute),
                       [weight, bias])

    def eager(x, w, b):
        return F.gelu(F.linear(x, w, b), approximate=approximate)

    return [Check(
        f"{NAME} {str(dtype).removeprefix('torch.')} {approximate} {shape_text(shape)}",
        x, ["w", "b"], ours={"ours": ours(False), "ours-recompute": ours(True)},
        torch_same=Subject(eager, [weight, bias]),
        ref64=Subject(eager, [weight.double(), bias.double()]),
    )]
