"""``nn.Module`` wrappers over the functional API."""

from __future__ import annotations

import torch
from torch import nn

from ._checks import check_approximate
from .functional import feed_forward, gelu, linear_gelu


class GELU(nn.Module):
    """Drop-in for ``torch.nn.GELU``: same constructor, repr and (empty) state dict."""

    def __init__(self, approximate: str = "none") -> None:
        super().__init__()
        check_approximate(approximate)
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu(x, approximate=self.approximate)

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}"


class LinearGELU(nn.Module):
    """``nn.Linear`` followed by GELU, fused: y = gelu(x @ weight.T + bias).

    Same parameters (names, shapes, initialisation) as ``nn.Linear(in_features, out_features,
    bias)``, so an ``nn.Linear`` state dict loads into it. ``recompute=True`` trades memory for
    compute: the backward recomputes the pre-activation instead of saving it.
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, approximate: str = "none",
        recompute: bool = False, device=None, dtype=None,
    ) -> None:
        super().__init__()
        check_approximate(approximate)
        factory_kwargs = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.approximate = approximate
        self.recompute = recompute
        self.weight = nn.Parameter(torch.empty((out_features, in_features), **factory_kwargs))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory_kwargs))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's own initialisation (same distributions and the same random draws).
        nn.Linear.reset_parameters(self)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, approximate: str = "none", recompute: bool = False
    ) -> LinearGELU:
        """A LinearGELU sharing ``linear``'s Parameter objects (no copy, no new init)."""
        module = cls(
            linear.in_features, linear.out_features, bias=linear.bias is not None,
            approximate=approximate, recompute=recompute, device="meta",
        )
        module.weight = linear.weight
        module.bias = linear.bias
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_gelu(x, self.weight, self.bias, self.approximate, self.recompute)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, approximate={self.approximate!r}, "
            f"recompute={self.recompute}"
        )


class FeedForward(nn.Module):
    """Transformer feed-forward block: Linear -> GELU -> Dropout -> Linear as one fused op
    (``functional.feed_forward``): GELU and dropout run in the first matmul's epilogue and the
    backward keeps only x and the pre-activation (x alone with ``recompute=True``).

    Submodules ``linear1`` (LinearGELU: its ``approximate`` and ``recompute`` are the block's),
    ``dropout`` (its ``p`` and ``training`` are read at each call) and ``linear2`` (nn.Linear);
    their parameters are read at each call too. When linear1 or linear2 carry hooks or non-plain
    parameters (a tensor-parallel plan), the submodules are applied instead, LinearGELU's fusion
    only, so their hooks run. The state dict of the PyTorch block ``linear1, dropout,
    activation=nn.GELU(), linear2`` loads unchanged.
    """

    def __init__(
        self, d_model: int, dim_feedforward: int = 2048, dropout: float = 0.1,
        approximate: str = "none", bias: bool = True, recompute: bool = False, device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory_kwargs = {"device": device, "dtype": dtype}
        self.linear1 = LinearGELU(
            d_model, dim_feedforward, bias=bias, approximate=approximate, recompute=recompute,
            **factory_kwargs,
        )
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model, bias=bias, **factory_kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (is_plain(self.linear1) and is_plain(self.linear2)):
            # Tensor parallel (its styles hook linear1 and linear2 and shard their parameters)
            # or user hooks: apply the submodules, so that their hooks run.
            return self.linear2(self.dropout(self.linear1(x)))
        return feed_forward(
            x, self.linear1.weight, self.linear1.bias, self.linear2.weight, self.linear2.bias,
            self.dropout.p, self.linear1.approximate, self.dropout.training,
            self.linear1.recompute,
        )


def is_plain(module: nn.Module) -> bool:
    """No hooks and only plain ``nn.Parameter``s: nothing (a tensor-parallel style, FSDP2, a
    user's hook) expects ``module``'s own forward to run or its parameters to be other tensors
    (DTensor shards), so a fused op may read its parameters instead of calling it."""
    hooks = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return not any(getattr(module, name, None) for name in hooks) and all(
        type(p) is nn.Parameter for p in module.parameters(recurse=False))
