"""Gated GELU (GeGLU): h = gelu(x @ W_gate^T) * (x @ W_up^T), x (M, K), W_gate and W_up (N, K).

Providers: ours (and ours with ``recompute=True``), eager ``F.gelu(F.linear(x, W_gate)) *
F.linear(x, W_up)``, torch.compile of eager (default and max-autotune), and the matmuls alone:
x @ [W_gate; W_up]^T as one (M, K) x (K, 2N) matmul, the same flops with nothing else (the
compute floor). No biases, as in Gemma and T5. Shapes: Gemma-2B's FFN (2048 -> 16384) and
T5-base's (768 -> 2048) at the harness's token count, or ``--shapes`` / ``--preset``.

Least traffic, in elements: the training forward reads x, W_gate and W_up and writes h, g
and u: MK + 2NK + 3MN (inference writes h only: MK + 2NK + MN); the backward reads dh, g, u, x and both weights and writes dx and both
weight gradients: 3MN + 2MK + 4NK. Flops: 2MNK per matmul, two forward and four backward.

Saved bytes (``saved_ratios``, every fwd+bwd case's ``saved`` columns; the CPU check prints them
too): what the GeGLU op and the gated block (GeGLU -> down, and GeGLU -> dropout -> down in
training at p = 0.1, against eager's ``F.dropout``) keep for the backward over eager PyTorch's,
counted with ``bench/memory.py`` on any device. The ratio does not depend on the token count
(every saved tensor is per token; the dropout seed's 8 bytes aside).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import triton_gelu

from .contact import Contact, Kit, Problem, Timing, step_share
from .harness import (
    Case, Check, Selection, Subject, add_compile_baselines, matmul_cases, shape_text, timed,
)
from .memory import saved_activation_bytes

NAME = "geglu"
ORDER = 3
SAVED_P = 0.1  # the gated block's dropout probability in its saved-bytes figures
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


class EagerGeGLU(nn.Module):
    """Gemma's MLP without its down projection, in eager PyTorch."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=False)
        self.up_proj = nn.Linear(d_model, d_ff, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x)


class EagerGated(EagerGeGLU):
    """Gemma's MLP, in eager PyTorch."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__(d_model, d_ff)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(super().forward(x))


def host_entries(param, m: int, k: int, n: int, device: str) -> dict:
    """``bench --host``'s entries (as ``ops_gelu``'s): GeGLU and the gated block, functions and
    modules, (m, k) -> n (-> k)."""
    w_gate, w_up, w_down = param(n, k), param(n, k), param(k, n)
    eager = eager_geglu("tanh")
    geglu = triton_gelu.GeGLU(k, n).to(device)
    gated = triton_gelu.GatedFeedForward(k, n).to(device)
    eager_geglu_module, eager_gated = EagerGeGLU(k, n).to(device), EagerGated(k, n).to(device)
    return {
        "geglu": (lambda x: triton_gelu.geglu(x, w_gate, w_up),
                  lambda x: eager(x, w_gate, w_up), [w_gate, w_up]),
        "gated_feed_forward": (
            lambda x: triton_gelu.gated_feed_forward(x, w_gate, w_up, w_down),
            lambda x: F.linear(eager(x, w_gate, w_up), w_down), [w_gate, w_up, w_down]),
        "GeGLU": (geglu, eager_geglu_module,
                  [*geglu.parameters(), *eager_geglu_module.parameters()]),
        "GatedFeedForward": (gated, eager_gated,
                             [*gated.parameters(), *eager_gated.parameters()]),
    }


def first_calls(tensor, m: int, k: int, n: int) -> dict:
    """``bench --cold-start``'s first calls (as ``ops_gelu``'s): GeGLU, and the gated block in
    training without and with dropout."""
    x, w_gate, w_up, w_down = tensor(m, k), tensor(n, k), tensor(n, k), tensor(k, n)
    return {
        "geglu": lambda: triton_gelu.geglu(x, w_gate, w_up),
        "gated_feed_forward": lambda: triton_gelu.gated_feed_forward(
            x, w_gate, w_up, w_down, training=True),
        "gated_feed_forward p=0.1": lambda: triton_gelu.gated_feed_forward(
            x, w_gate, w_up, w_down, dropout=0.1, training=True),
    }


def first_contact() -> dict:
    """``first_contact.py``'s cases (as ``ops_gelu``'s): GeGLU, and the gated block with
    dropout p = 0.1, both timed at Gemma-2B's shape in training."""
    def problem(kit: Kit, gated: bool) -> Problem:
        _, k, n = kit.shape
        wg, wu = kit.weight(n, k), kit.weight(n, k)
        eager = eager_geglu(kit.approximate)
        if not gated:
            return Problem([kit.x, wg, wu], lambda x, wg, wu: triton_gelu.geglu(
                x, wg, wu, approximate=kit.approximate, recompute=kit.recompute), eager,
                ["x", "w_gate", "w_up"])
        wd = kit.weight(k, n)
        return Problem(
            [kit.x, wg, wu, wd],
            kit.seeded(lambda x, wg, wu, wd: triton_gelu.gated_feed_forward(
                x, wg, wu, wd, approximate=kit.approximate, dropout=kit.p, training=True,
                recompute=kit.recompute)),
            lambda x, wg, wu, wd: F.linear(kit.dropout(eager(x, wg, wu)), wd),
            ["x", "w_gate", "w_up", "w_down"])

    def timings(public: str, dry_run: bool) -> list[Timing]:
        return [Timing(f"{public} fwd+bwd 4096x2048x16384", public, "fwd+bwd",
                       (31, 47, 39) if dry_run else (4096, 2048, 16384), approximate="tanh",
                       ops=("geglu_fwd", "geglu_bwd"))]

    def floor(gated: bool) -> Callable:
        def bytes_and_flops(mode: str, m: int, k: int, n: int) -> tuple[float, float]:
            if gated:
                return step_share(((8 * m * n + 4 * m * k + 9 * n * k) * 2, 18 * m * n * k),
                                  mode)
            return step_share(((6 * m * n + 3 * m * k + 6 * n * k) * 2, 12 * m * n * k), mode)
        return bytes_and_flops

    ops = ("geglu_fwd", "geglu_bwd")
    return {
        "geglu": Contact(ops, functools.partial(problem, gated=False),
                         functools.partial(timings, "geglu"), floor(False)),
        "gated_feed_forward": Contact(
            ops, functools.partial(problem, gated=True),
            functools.partial(timings, "gated_feed_forward"), floor(True), dropout=(0.1,)),
    }


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
                        matmul_flops, saved_ratios)


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


def saved_ratios(shape, dtype: torch.dtype, approximate: str, device: str) -> dict[str, float]:
    """Saved-activation bytes of the GeGLU op and of the gated block (GeGLU -> down; and with
    dropout SAVED_P), ours (and with recompute) over eager's, in training:
    ``{"ours": 0.742, ...}``; exact (``saved_activation_bytes``), parameters excluded."""
    x, w_gate, w_up = operands(shape, dtype, device)
    w_down = (torch.randn(shape[1], shape[2], device=device) / shape[2]**0.5).to(dtype)
    w_down.requires_grad_(True)
    params = [w_gate, w_up, w_down]
    eager = eager_geglu(approximate)

    def saved(fn) -> int:
        return saved_activation_bytes(fn, exclude=params)

    def ours(recompute: bool):
        return lambda: triton_gelu.geglu(x, w_gate, w_up, approximate=approximate,
                                         recompute=recompute)

    def block(recompute: bool, p: float = 0.0):
        return lambda: triton_gelu.gated_feed_forward(x, w_gate, w_up, w_down,
                                                      approximate=approximate, dropout=p,
                                                      training=True, recompute=recompute)

    def eager_block(p: float = 0.0):
        def run():
            h = eager(x, w_gate, w_up)
            return F.linear(F.dropout(h, p, training=True) if p else h, w_down)
        return run

    op_eager = saved(lambda: eager(x, w_gate, w_up))
    block_eager, dropout_eager = saved(eager_block()), saved(eager_block(SAVED_P))
    return {"ours": saved(ours(False)) / op_eager,
            "ours-recompute": saved(ours(True)) / op_eager,
            "block ours": saved(block(False)) / block_eager,
            "block ours-recompute": saved(block(True)) / block_eager,
            f"block ours p={SAVED_P:g}": saved(block(False, SAVED_P)) / dropout_eager,
            f"block ours-recompute p={SAVED_P:g}": saved(block(True, SAVED_P)) / dropout_eager}
