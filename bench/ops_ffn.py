"""The transformer feed-forward block: linear2(dropout(gelu(linear1(x)))), d_model -> d_ff
-> d_model.

Ours is ``triton_gelu.FeedForward`` (linear1 + GELU fused); eager is the same block from
``nn.Linear`` and ``nn.GELU`` with the same weights; the matmul floor is the two matmuls alone.
Dropout is 0 so every provider does the same arithmetic. Shapes (M, K, N) are (tokens, d_model,
d_ff). Traffic and flops are those of the two linear layers.
"""

from __future__ import annotations

import torch
from torch import nn

import triton_gelu

from .harness import (
    Case, Check, Selection, Subject, add_compile_baselines, matmul_cases, shape_text, timed,
)
from .ops_linear_gelu import matmul_flops, traffic

NAME = "ffn"


class EagerFeedForward(nn.Module):
    """The PyTorch block, named as in nn.TransformerEncoderLayer: FeedForward's state dict
    loads into it."""

    def __init__(self, d_model: int, d_ff: int, approximate: str, **factory) -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_ff, **factory)
        self.activation = nn.GELU(approximate)
        self.dropout = nn.Dropout(0.0)
        self.linear2 = nn.Linear(d_ff, d_model, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.dropout(self.activation(self.linear1(x))))


def blocks(shape, dtype, approximate, device):
    """(ours, eager) with the same weights, and x."""
    m, d_model, d_ff = shape
    ours = triton_gelu.FeedForward(d_model, d_ff, dropout=0.0, approximate=approximate,
                                   device=device, dtype=dtype)
    eager = EagerFeedForward(d_model, d_ff, approximate, device=device, dtype=dtype)
    eager.load_state_dict(ours.state_dict())
    return ours, eager, torch.randn(m, d_model, device=device).to(dtype)


def _build(shape, dtype: torch.dtype, approximate: str, mode: str, baselines: list[str],
           device: str) -> dict:
    ours, eager, x = blocks(shape, dtype, approximate, device)
    x.requires_grad_(True)
    w1, w2 = eager.linear1.weight, eager.linear2.weight
    fns = {"ours": ours}
    if "eager" in baselines:
        fns["eager"] = eager
    add_compile_baselines(fns, eager, baselines)
    if "matmul" in baselines:
        fns["matmul"] = lambda x: torch.matmul(torch.matmul(x, w1.t()), w2.t())
    params = {"ours": list(ours.parameters())}
    return {name: timed(fn, [x], mode, params.get(name, list(eager.parameters())))
            for name, fn in fns.items()}


def _cost(shape, mode: str, counter) -> int:
    m, d_model, d_ff = shape
    return counter(m, d_model, d_ff, mode) + counter(m, d_ff, d_model, mode)


def cases(sel: Selection) -> list[Case]:
    return matmul_cases(NAME, sel, _build, _cost, traffic, matmul_flops)


def checks(shape: tuple[int, int, int], dtype: torch.dtype, approximate: str,
           device: str) -> list[Check]:
    ours, eager, x = blocks(shape, dtype, approximate, device)
    names = [name for name, _ in eager.named_parameters()]
    eager64 = EagerFeedForward(shape[1], shape[2], approximate, device=device,
                               dtype=torch.float64)
    eager64.load_state_dict(eager.state_dict())

    def functional(module):
        # The module as a function of (x, *params), so the check can differentiate its params.
        return lambda x, *params: torch.func.functional_call(module, dict(zip(names, params)), x)

    return [Check(
        f"{NAME} {str(dtype).removeprefix('torch.')} {approximate} {shape_text(shape)}",
        x, [n.replace(".", "_") for n in names],
        ours={"ours": Subject(functional(ours), [dict(ours.named_parameters())[n]
                                                 for n in names])},
        torch_same=Subject(functional(eager), list(eager.parameters())),
        ref64=Subject(functional(eager64), list(eager64.parameters())),
    )]
