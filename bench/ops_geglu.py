"""Gated GELU (GeGLU): h = gelu(x @ W_gate^T) * (x @ W_up^T), x (M, K), W_gate and W_up (N, K).

Providers: ours (and ours with ``recompute=True``), eager ``F.gelu(F.linear(x, W_gate)) *
F.linear(x, W_up)``, torch.compile of eager (default and max-autotune), and the matmuls alone:
x @ [W_gate; W_up]^T as one (M, K) x (K, 2N) matmul, the same flops with nothing else (the
compute floor). No biases, as in Gemma and T5. Shapes: Gemma-2B's FFN (2048 -> 16384) and
T5-base's (768 -> 2048) at the harness's token count, or ``--shapes`` / ``--preset``.

Least traffic, in elements: the training forward reads x, W_gate and W_up and writes h, g
and u: MK + 2NK + 3MN (inference writes h only: MK + 2NK + MN); the backward reads dh, g, u, x and both weights and writes dx and both
weight gradients: 3MN + 2MK + 4NK. Flops: 2MNK per matmul, two forward and four backward.

Saved bytes (``saved_bytes_lines``): what the GeGLU op and the gated block (GeGLU -> down) keep
for the backward against eager PyTorch, counted with ``bench/memory.py`` on any device. The
ratio does not depend on the token count (every saved tensor is per token), so the CPU mode
measures it at the real FFN widths with a few tokens.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

import triton_gelu
from triton_gelu.autotune import force_path

from .harness import (
    Case, Check, Selection, Subject, add_compile_baselines, matmul_cases, shape_text, timed,
)
from .memory import saved_activation_bytes

NAME = "geglu"
# (in_features, hidden_features) of the gated FFNs the issue names.
PRESETS = {"gemma-2b": (2048, 16384), "t5-base": (768, 2048)}


def traffic(m: int, k: int, n: int, mode: str) -> int:
    """Least elements GeGLU must move in ``mode`` (a training forward writes g and u too;
    inference writes h only)."""
    infer = m * k + 2 * n * k + m * n
    fwd = infer + 2 * m * n
    bwd = 3 * m * n + 2 * m * k + 4 * n * k
    return {"infer": infer, "fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def matmul_flops(m: int, k: int, n: int, mode: str) -> int:
    return 2 * m * n * k * {"infer": 2, "fwd": 2, "bwd": 4, "fwd+bwd": 6}[mode]


def operands(shape, dtype, device, requires_grad=True):
    """x ~ N(0, 1), W_gate and W_up ~ N(0, 1/K): g and u are O(1), where GELU bends."""
    m, k, n = shape
    x = torch.randn(m, k, device=device).to(dtype)
    w_gate, w_up = ((torch.randn(n, k, device=device) / k**0.5).to(dtype) for _ in "gu")
    return [t.requires_grad_(requires_grad) for t in (x, w_gate, w_up)]


def eager_geglu(approximate: str):
    def eager(x, w_gate, w_up):
        return F.gelu(F.linear(x, w_gate), approximate=approximate) * F.linear(x, w_up)
    return eager


def _build(shape, dtype: torch.dtype, approximate: str, mode: str, baselines: list[str],
           device: str) -> dict:
    inputs = operands(shape, dtype, device)
    fns = {
        "ours": lambda x, wg, wu: triton_gelu.geglu(x, wg, wu, approximate=approximate),
        "ours-recompute": lambda x, wg, wu: triton_gelu.geglu(x, wg, wu, approximate=approximate,
                                                              recompute=True),
    }
    eager = eager_geglu(approximate)
    if "eager" in baselines:
        fns["eager"] = eager
    add_compile_baselines(fns, eager, baselines)
    factories = {name: timed(fn, inputs, mode) for name, fn in fns.items()}
    if "matmul" in baselines:
        both = torch.cat([inputs[1].detach(), inputs[2].detach()]).requires_grad_(True)
        factories["matmul"] = timed(lambda x, w: torch.matmul(x, w.t()), [inputs[0], both], mode)
    return factories


def cases(sel: Selection) -> list[Case]:
    return matmul_cases(NAME, dataclasses.replace(sel, shapes=sel.geglu_shapes or sel.shapes),
                        _build, lambda shape, mode, counter: counter(*shape, mode), traffic,
                        matmul_flops)


def checks(shape: tuple[int, int, int], dtype: torch.dtype, approximate: str,
           device: str) -> list[Check]:
    x, w_gate, w_up = operands(shape, dtype, device, requires_grad=False)

    def ours(recompute):
        return Subject(lambda x, wg, wu: triton_gelu.geglu(x, wg, wu, approximate=approximate,
                                                           recompute=recompute), [w_gate, w_up])

    eager = eager_geglu(approximate)
    return [Check(
        f"{NAME} {str(dtype).removeprefix('torch.')} {approximate} {shape_text(shape)}",
        x, ["w_gate", "w_up"], ours={"ours": ours(False), "ours-recompute": ours(True)},
        torch_same=Subject(eager, [w_gate, w_up]),
        ref64=Subject(eager, [w_gate.double(), w_up.double()]),
    )]


# ---- what the backward keeps -----------------------------------------------------------------


def saved_bytes(k: int, n: int, device: str, tokens: int = 2,
                dtype: torch.dtype = torch.bfloat16) -> dict[str, int]:
    """Bytes per token the backward keeps, for the GeGLU op and the gated block, ours (saved
    and recompute) and eager's; exact (``saved_activation_bytes``), parameters excluded."""
    x, w_gate, w_up = operands((tokens, k, n), dtype, device)
    w_down = (torch.randn(k, n, device=device) / n**0.5).to(dtype).requires_grad_(True)
    params = [w_gate, w_up, w_down]
    eager = eager_geglu("tanh")
    fns = {
        "op eager": lambda: eager(x, w_gate, w_up),
        "op ours": lambda: triton_gelu.geglu(x, w_gate, w_up),
        "op recompute": lambda: triton_gelu.geglu(x, w_gate, w_up, recompute=True),
        "block eager": lambda: F.linear(eager(x, w_gate, w_up), w_down),
        "block ours": lambda: triton_gelu.gated_feed_forward(x, w_gate, w_up, w_down),
        "block recompute": lambda: triton_gelu.gated_feed_forward(x, w_gate, w_up, w_down,
                                                                  recompute=True),
    }
    # What is saved does not depend on the path; on the CPU the composed forward (cuBLAS-style
    # matmuls in PyTorch) keeps the interpreter off GPU-sized matmuls.
    path = "composed" if device == "cpu" else "fused"
    with force_path(geglu_fwd=path):
        return {name: saved_activation_bytes(fn, exclude=params) // tokens
                for name, fn in fns.items()}


def saved_bytes_lines(device: str, dtype: torch.dtype = torch.bfloat16) -> list[str]:
    """One line per preset and kind: ours vs eager, bytes per token and the ratio."""
    lines = [f"Saved for the backward, per token, {str(dtype).removeprefix('torch.')} "
             "(bench/memory.py: saved_activation_bytes; exact on any device):"]
    for preset, (k, n) in PRESETS.items():
        figures = saved_bytes(k, n, device, dtype=dtype)
        for kind in ("op", "block"):
            eager = figures[f"{kind} eager"]
            what = "GeGLU op" if kind == "op" else "gated block (GeGLU -> down)"
            lines.append(
                f"  {preset} {k}->{n} {what}: ours {figures[f'{kind} ours']} B "
                f"({figures[f'{kind} ours'] / eager:.3f}x eager's {eager} B), recompute "
                f"{figures[f'{kind} recompute']} B ({figures[f'{kind} recompute'] / eager:.3f}x)"
            )
    return lines
