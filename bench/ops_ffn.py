"""The transformer feed-forward block: linear2(dropout(gelu(linear1(x)))), d_model -> d_ff
-> d_model.

Ours is ``triton_gelu.FeedForward`` (the whole block as one fused op; also with
``recompute=True``); eager is the same block from ``nn.Linear``, ``nn.GELU`` and ``nn.Dropout``
with the same weights; the matmul floor is the two matmuls alone. Timed cases run in training
with dropout p = 0.1 for every provider (the case the fused dropout is for); the correctness
check runs at p = 0, where every provider does the same arithmetic. Shapes (M, K, N) are
(tokens, d_model, d_ff). Traffic and flops are those of the two linear layers.

Every fwd+bwd case also reports the bytes autograd keeps between forward and backward, ours
over eager's (``memory.saved_activation_bytes``, parameters excluded; exact on any device), at
p = 0 and p = 0.1, with and without recompute (``saved_ratios``); the CPU check prints the same
figures. Inference cases ("infer") run both blocks in eval mode: no dropout, as when serving.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

import triton_gelu

from .contact import ODD, Contact, Kit, Problem, Timing, step_share
from .harness import (
    Case, Check, Selection, Subject, add_compile_baselines, matmul_cases, shape_text, timed,
)
from .memory import saved_activation_bytes
from .ops_linear_gelu import matmul_flops, traffic

NAME = "ffn"
ORDER = 2
DROPOUT = 0.1  # the timed cases' dropout probability
SAVED_P = (0.0, 0.1)  # the saved-bytes figures' dropout probabilities


class EagerFeedForward(nn.Module):
    """The PyTorch block, named as in nn.TransformerEncoderLayer: FeedForward's state dict
    loads into it."""

    def __init__(self, d_model: int, d_ff: int, approximate: str, dropout: float = 0.0,
                 **factory) -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_ff, **factory)
        self.activation = nn.GELU(approximate)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ff, d_model, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.dropout(self.activation(self.linear1(x))))


def blocks(shape, dtype, approximate, device, dropout=0.0):
    """(ours, eager) with the same weights and dropout probability, and x."""
    m, d_model, d_ff = shape
    ours = triton_gelu.FeedForward(d_model, d_ff, dropout=dropout, approximate=approximate,
                                   device=device, dtype=dtype)
    eager = EagerFeedForward(d_model, d_ff, approximate, dropout, device=device, dtype=dtype)
    eager.load_state_dict(ours.state_dict())
    return ours, eager, torch.randn(m, d_model, device=device).to(dtype)


def saved_ratios(shape, dtype: torch.dtype, approximate: str, device: str) -> dict[str, float]:
    """Saved-activation bytes of ours (and ours with recompute) over eager's, in training, at
    each of SAVED_P: ``{"ours p=0": 0.556, ...}``."""
    def saved(module: nn.Module, x: torch.Tensor) -> int:
        return saved_activation_bytes(lambda: module(x), exclude=list(module.parameters()))

    ratios = {}
    for p in SAVED_P:
        ours, eager, x = blocks(shape, dtype, approximate, device, p)
        x.requires_grad_(True)
        eager_bytes = saved(eager, x)
        ratios[f"ours p={p:g}"] = saved(ours, x) / eager_bytes
        ratios[f"ours-recompute p={p:g}"] = saved(_with_recompute(ours), x) / eager_bytes
    return ratios


def host_entries(param, m: int, k: int, n: int, device: str) -> dict:
    """``bench --host``'s entries (as ``ops_gelu``'s): the function at p = 0 and the module,
    (m, k) -> n -> k."""
    w1, b1, w2, b2 = param(n, k), param(n), param(k, n), param(k)
    ours = triton_gelu.FeedForward(k, n, dropout=0.0).to(device)
    eager = nn.Sequential(nn.Linear(k, n), nn.GELU(), nn.Dropout(0.0), nn.Linear(n, k))
    return {
        "feed_forward": (lambda x: triton_gelu.feed_forward(x, w1, b1, w2, b2),
                         lambda x: F.linear(F.dropout(F.gelu(F.linear(x, w1, b1)), 0.0), w2, b2),
                         [w1, b1, w2, b2]),
        "FeedForward": (ours, eager.to(device), [*ours.parameters(), *eager.parameters()]),
    }


def first_calls(tensor, m: int, k: int, n: int) -> dict:
    """``bench --cold-start``'s first calls (as ``ops_gelu``'s), without and with dropout."""
    x, w, b, w2, b2 = tensor(m, k), tensor(n, k), tensor(n), tensor(k, n), tensor(k)
    return {"feed_forward": lambda: triton_gelu.feed_forward(x, w, b, w2, b2, p=0.0),
            "feed_forward p=0.1": lambda: triton_gelu.feed_forward(x, w, b, w2, b2, p=0.1)}


def first_contact() -> dict:
    """``first_contact.py``'s cases (as ``ops_gelu``'s): the block at p = 0 and 0.1, timed at
    BERT-base's shape in training."""
    def problem(kit: Kit) -> Problem:
        _, k, n = kit.shape
        w1, b1 = kit.weight(n, k), kit.bias(n)
        w2, b2 = kit.weight(k, n), kit.bias(k)
        return Problem(
            [kit.x, w1, b1, w2, b2],
            kit.seeded(lambda x, w1, b1, w2, b2: triton_gelu.feed_forward(
                x, w1, b1, w2, b2, p=kit.p, approximate=kit.approximate,
                recompute=kit.recompute)),
            lambda x, w1, b1, w2, b2: F.linear(kit.dropout(kit.gelu(F.linear(x, w1, b1))), w2,
                                               b2),
            ["x", "w1", "b1", "w2", "b2"])

    def timings(dry_run: bool) -> list[Timing]:
        shape = ODD if dry_run else (8192, 768, 3072)
        return [Timing(f"feed_forward p={p:g} fwd+bwd 8192x768x3072", "feed_forward",
                       "fwd+bwd", shape, p=p, ops=("ffn_fwd", "ffn_bwd")) for p in (0.0, 0.1)]

    def floor(mode: str, m: int, k: int, n: int) -> tuple[float, float]:
        return step_share(((4 * m * n + 6 * m * k + 6 * n * k) * 2, 12 * m * n * k), mode)

    return {"feed_forward": Contact(("ffn_fwd", "ffn_bwd"), problem, timings, floor,
                                    dropout=(0.0, 0.1))}


def _build(shape, dtype: torch.dtype, approximate: str, mode: str, baselines: list[str],
           device: str) -> dict:
    ours, eager, x = blocks(shape, dtype, approximate, device, DROPOUT)
    x.requires_grad_(True)
    w1, w2 = eager.linear1.weight, eager.linear2.weight
    fns = {"ours": ours}
    if mode == "infer":  # serving: eval mode (no dropout), nothing kept for a backward
        ours.eval()
        eager.eval()
    else:
        fns["ours-recompute"] = _with_recompute(ours)
    if "eager" in baselines:
        fns["eager"] = eager
    add_compile_baselines(fns, eager, baselines)
    if "matmul" in baselines:
        fns["matmul"] = lambda x: torch.matmul(torch.matmul(x, w1.t()), w2.t())
    params = {name: list(fns[name].parameters()) for name in fns if name.startswith("ours")}
    return {name: timed(fn, [x], mode, params.get(name, list(eager.parameters())))
            for name, fn in fns.items()}


def _with_recompute(ours: nn.Module) -> nn.Module:
    """A copy of ``ours`` (same weights) that recomputes the pre-activation in the backward."""
    copied = copy.deepcopy(ours)
    copied.linear1.recompute = True
    return copied


def _cost(shape, mode: str, counter) -> int:
    m, d_model, d_ff = shape
    return counter(m, d_model, d_ff, mode) + counter(m, d_ff, d_model, mode)


def cases(sel: Selection) -> list[Case]:
    return matmul_cases(NAME, sel, _build, _cost, traffic, matmul_flops, saved_ratios)


def checks(shape: tuple[int, int, int], dtype: torch.dtype, approximate: str,
           device: str) -> list[Check]:
    ours, eager, x = blocks(shape, dtype, approximate, device)
    ours_recompute = _with_recompute(ours)
    names = [name for name, _ in eager.named_parameters()]
    eager64 = EagerFeedForward(shape[1], shape[2], approximate, device=device,
                               dtype=torch.float64)
    eager64.load_state_dict(eager.state_dict())

    def functional(module):
        # The module as a function of (x, *params), so the check can differentiate its params.
        return lambda x, *params: torch.func.functional_call(module, dict(zip(names, params)), x)

    def subject(module):
        return Subject(functional(module), [dict(module.named_parameters())[n] for n in names])

    return [Check(
        f"{NAME} {str(dtype).removeprefix('torch.')} {approximate} {shape_text(shape)}",
        x, [n.replace(".", "_") for n in names],
        ours={"ours": subject(ours), "ours-recompute": subject(ours_recompute)},
        torch_same=Subject(functional(eager), list(eager.parameters())),
        ref64=Subject(functional(eager64), list(eager64.parameters())),
    )]
