"""``nn.Module`` wrappers over the public functions (each declared with its op in ``ops/``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .activations import resolve
from .ops._core import distributed
from .ops.ffn import feed_forward
from .ops.gated_ffn import gated_feed_forward
from .ops.geglu import geglu
from .ops.gelu import gelu
from .ops.linear_gelu import linear_gelu


class GELU(nn.Module):
    """Drop-in for ``torch.nn.GELU``: same constructor, repr and (empty) state dict."""

    def __init__(self, approximate: str = "none", *, activation: str | None = None) -> None:
        super().__init__()
        resolve(approximate, activation)
        self.approximate = approximate
        self.activation = activation  # None: the form approximate names

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu(x, self.approximate, activation=self.activation)

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}" + _activation_repr(self.activation)


def _activation_repr(activation: str | None) -> str:
    return "" if activation is None else f", activation={activation!r}"


class LinearGELU(nn.Module):
    """``nn.Linear`` followed by GELU, fused: y = gelu(x @ weight.T + bias).

    Same parameters (names, shapes, initialisation) as ``nn.Linear(in_features, out_features,
    bias)``, so an ``nn.Linear`` state dict loads into it. ``recompute=True`` trades memory for
    compute: the backward recomputes the pre-activation instead of saving it.
    """

    weight: torch.Tensor  # as nn.Linear declares them: from_linear shares a Linear's own
    bias: torch.Tensor | None

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, approximate: str = "none",
        recompute: bool = False, device: torch.device | str | None = None,
        dtype: torch.dtype | None = None, *, activation: str | None = None,
    ) -> None:
        super().__init__()
        resolve(approximate, activation)
        factory_kwargs: dict[str, Any] = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.approximate = approximate
        self.activation = activation  # None: the form approximate names
        self.recompute = recompute
        self.weight = nn.Parameter(torch.empty((out_features, in_features), **factory_kwargs))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory_kwargs))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's own initialisation (same distributions and the same random draws).
        nn.Linear.reset_parameters(self)  # type: ignore[arg-type]  # it reads only our fields

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, approximate: str = "none", recompute: bool = False, *,
        activation: str | None = None,
    ) -> LinearGELU:
        """A LinearGELU sharing ``linear``'s Parameter objects (no copy, no new init)."""
        module = cls(
            linear.in_features, linear.out_features, bias=linear.bias is not None,
            approximate=approximate, recompute=recompute, device="meta", activation=activation,
        )
        module.weight = linear.weight
        module.bias = linear.bias
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_gelu(x, self.weight, self.bias, self.approximate, self.recompute,
                           activation=self.activation)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, approximate={self.approximate!r}, "
            f"recompute={self.recompute}" + _activation_repr(self.activation)
        )


class FeedForward(nn.Module):
    """Transformer feed-forward block: Linear -> GELU -> Dropout -> Linear as one fused op
    (``triton_gelu.feed_forward``): GELU and dropout run in the first matmul's epilogue and the
    backward keeps only x and the pre-activation (x alone with ``recompute=True``).

    Submodules ``linear1`` (LinearGELU: its ``approximate`` and ``recompute`` are the block's),
    ``dropout`` (its ``p`` and ``training`` are read at each call) and ``linear2`` (nn.Linear);
    their parameters are read at each call too. Under tensor parallel
    (``triton_gelu.parallel.FeedForwardParallel`` on the block: DTensor parameters) the whole
    block runs fused on each rank's shards. When linear1 or linear2 carry hooks (a plan naming
    them, a user's) or parameters of another kind, the submodules are applied instead, so their
    hooks run: LinearGELU's fusion only. The state dict of the PyTorch block ``linear1, dropout,
    activation=nn.GELU(), linear2`` loads unchanged.
    """

    def __init__(
        self, d_model: int, dim_feedforward: int = 2048, dropout: float = 0.1,
        approximate: str = "none", bias: bool = True, recompute: bool = False,
        device: torch.device | str | None = None, dtype: torch.dtype | None = None, *,
        activation: str | None = None,
    ) -> None:
        super().__init__()
        factory_kwargs: dict[str, Any] = {"device": device, "dtype": dtype}
        self.linear1 = LinearGELU(
            d_model, dim_feedforward, bias=bias, approximate=approximate, recompute=recompute,
            activation=activation, **factory_kwargs,
        )
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model, bias=bias, **factory_kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        linear1, dropout, linear2 = self.linear1, self.dropout, self.linear2
        read = read_by_parent(linear1, linear2)
        if read is None:
            # Hooks on linear1 or linear2 (a tensor-parallel plan naming them, a user's): apply
            # the submodules, so that their hooks run.
            return linear2(dropout(linear1(x)))
        (w1, b1), (w2, b2) = read
        return feed_forward(x, w1, b1, w2, b2, dropout.p, linear1.approximate, dropout.training,
                            linear1.recompute, activation=linear1.activation)


def has_hooks(module: nn.Module) -> bool:
    """Whether ``module`` carries forward or backward (pre-)hooks."""
    return any(
        getattr(module, hooks, None)
        for hooks in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                      "_backward_pre_hooks")
    )


def is_plain(module: nn.Module) -> bool:
    """No hooks and only plain ``nn.Parameter``s: nothing (a tensor-parallel style, FSDP2, a
    user's hook) expects ``module``'s own forward to run or its parameters to be other tensors
    (DTensor shards), so a fused op may read its parameters instead of calling it."""
    return not has_hooks(module) and all(
        type(p) is nn.Parameter for p in module.parameters(recurse=False))


def read_by_parent(*linears: nn.Module) -> tuple | None:
    """The (weight, bias) of each of a block's Linear children, when the block may read them
    into its fused op instead of calling the children: no hooks, and each a plain
    ``nn.Parameter`` or a DTensor (the block is tensor-parallel: the fused op runs on the shards,
    the block's own hooks lay out x). None otherwise: the block applies its children. Read once
    per call, what the fused op is given is what was checked."""
    pairs = []
    for linear in linears:
        if has_hooks(linear):
            return None
        weight, bias = linear.weight, linear.bias
        for p in (weight, bias):
            if p is not None and type(p) is not nn.Parameter and not distributed(p):
                return None
        pairs.append((weight, bias))
    return tuple(pairs)


def _projection(in_features: int, out_features: int, bias: bool, factory_kwargs: dict
                ) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=bias, **factory_kwargs)


def _check_pair(gate_proj: nn.Linear, up_proj: nn.Linear) -> None:
    for name, linear in (("gate_proj", gate_proj), ("up_proj", up_proj)):
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{name} must be an nn.Linear, got {type(linear).__name__}")
    if gate_proj.weight.shape != up_proj.weight.shape or \
            (gate_proj.bias is None) != (up_proj.bias is None):
        raise ValueError(
            f"gate_proj {gate_proj} and up_proj {up_proj} must have the same shapes and both "
            "or neither have a bias"
        )


class GeGLU(nn.Module):
    """Gated GELU: gelu(gate_proj(x)) * up_proj(x), both projections and the gate in one kernel.

    ``gate_proj`` and ``up_proj`` are ``nn.Linear(in_features, hidden_features, bias)`` (names,
    shapes and initialisation), named as in Hugging Face Gemma's MLP so its state dict entries
    load as they are. T5 v1.1 / Flan-T5 name them ``wi_0`` (gate, under the GELU) and ``wi_1``
    (up): map ``wi_0`` -> ``gate_proj`` and ``wi_1`` -> ``up_proj``, or build from the Linears
    themselves with ``GeGLU.from_linears(ff.wi_0, ff.wi_1)``, which shares their Parameters.

    ``approximate="tanh"`` is Gemma's ``gelu_pytorch_tanh`` and T5's ``gelu_new``; ``"none"`` the
    exact erf form. ``recompute=True`` keeps only x for the backward (g and u are recomputed).
    Tensor parallel: ``triton_gelu.parallel.ColwiseParallel`` splits both projections alike
    (Shard(0)) and the kernel runs on each rank's columns.
    """

    def __init__(
        self, in_features: int, hidden_features: int, bias: bool = False,
        approximate: str = "tanh", recompute: bool = False,
        device: torch.device | str | None = None, dtype: torch.dtype | None = None, *,
        activation: str | None = None,
    ) -> None:
        super().__init__()
        resolve(approximate, activation, default="tanh")
        factory_kwargs = {"device": device, "dtype": dtype}
        self.gate_proj = _projection(in_features, hidden_features, bias, factory_kwargs)
        self.up_proj = _projection(in_features, hidden_features, bias, factory_kwargs)
        self.approximate = approximate
        self.activation = activation  # None: the form approximate names
        self.recompute = recompute

    @classmethod
    def from_linears(
        cls, gate_proj: nn.Linear, up_proj: nn.Linear, approximate: str = "tanh",
        recompute: bool = False, *, activation: str | None = None,
    ) -> GeGLU:
        """A GeGLU holding the given Linears themselves (their Parameters shared, no copy)."""
        _check_pair(gate_proj, up_proj)
        module = cls(gate_proj.in_features, gate_proj.out_features,
                     bias=gate_proj.bias is not None, approximate=approximate,
                     recompute=recompute, device="meta", activation=activation)
        module.gate_proj, module.up_proj = gate_proj, up_proj
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_proj, up_proj = self.gate_proj, self.up_proj
        read = read_by_parent(gate_proj, up_proj)
        if read is None:
            # Hooks on a projection (a plan naming it, a user's): apply them, unfused.
            return gelu(gate_proj(x), activation=_gated_form(self)) * up_proj(x)
        (w_gate, b_gate), (w_up, b_up) = read
        return geglu(x, w_gate, w_up, b_gate, b_up, self.approximate, self.recompute,
                     activation=self.activation)

    def extra_repr(self) -> str:
        return (f"approximate={self.approximate!r}, recompute={self.recompute}"
                + _activation_repr(self.activation))


def _gated_form(block: GeGLU | GatedFeedForward) -> str:
    """The gated block's activation name (its approximate's default is "tanh")."""
    return resolve(block.approximate, block.activation, default="tanh")


class GatedFeedForward(nn.Module):
    """The gated FFN block of Gemma and T5 v1.1: down_proj(dropout(GeGLU(x))).

    Children ``gate_proj``, ``up_proj`` (as in ``GeGLU``), ``dropout`` and ``down_proj``
    (``nn.Linear(d_ff, d_model, bias)``): a Gemma MLP's state dict loads as it is; T5's
    DenseGatedActDense after renaming wi_0 -> gate_proj, wi_1 -> up_proj, wo -> down_proj.

    The backward keeps x, g and u and regenerates the down projection's input h = gelu(g) * u
    from them instead of saving it: (d_model + 2 d_ff) / (d_model + 4 d_ff) of eager PyTorch's
    saved bytes, x alone with ``recompute=True``. Dropout (``dropout.p`` and its mode are read
    at each call) runs in the GeGLU kernel's epilogue in training; the backward regenerates its
    mask from a seed (8 bytes kept) instead of keeping the mask and the dropout output as eager
    does: (d_model + 2 d_ff) / (d_model + 5 d_ff) of eager's saved bytes at p > 0 on the CPU.
    Tensor parallel: ``triton_gelu.parallel.FeedForwardParallel`` on the block runs it fused on
    each rank's shards, dropout included; a plan naming the projections runs them unfused, hooks
    and all.
    """

    def __init__(
        self, d_model: int, d_ff: int, dropout: float = 0.0, approximate: str = "tanh",
        bias: bool = False, recompute: bool = False, device: torch.device | str | None = None,
        dtype: torch.dtype | None = None, *, activation: str | None = None,
    ) -> None:
        super().__init__()
        resolve(approximate, activation, default="tanh")
        factory_kwargs = {"device": device, "dtype": dtype}
        self.gate_proj = _projection(d_model, d_ff, bias, factory_kwargs)
        self.up_proj = _projection(d_model, d_ff, bias, factory_kwargs)
        self.dropout = nn.Dropout(dropout)
        self.down_proj = _projection(d_ff, d_model, bias, factory_kwargs)
        self.approximate = approximate
        self.activation = activation  # None: the form approximate names
        self.recompute = recompute

    @classmethod
    def from_linears(
        cls, gate_proj: nn.Linear, up_proj: nn.Linear, down_proj: nn.Linear,
        dropout: float = 0.0, approximate: str = "tanh", recompute: bool = False, *,
        activation: str | None = None,
    ) -> GatedFeedForward:
        """A block holding the given Linears themselves (their Parameters shared, no copy)."""
        _check_pair(gate_proj, up_proj)
        if not isinstance(down_proj, nn.Linear) or \
                down_proj.in_features != gate_proj.out_features:
            raise ValueError(f"down_proj must be an nn.Linear({gate_proj.out_features}, ...), "
                             f"got {down_proj}")
        module = cls(gate_proj.in_features, gate_proj.out_features, dropout=dropout,
                     approximate=approximate, bias=gate_proj.bias is not None,
                     recompute=recompute, device="meta", activation=activation)
        module.gate_proj, module.up_proj, module.down_proj = gate_proj, up_proj, down_proj
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_proj, up_proj, down_proj = self.gate_proj, self.up_proj, self.down_proj
        read = read_by_parent(gate_proj, up_proj, down_proj)
        if read is None:
            # Hooks on a projection (a tensor-parallel plan naming them, a user's): apply the
            # children, so that their hooks run (unfused).
            gate = gelu(gate_proj(x), activation=_gated_form(self))
            return down_proj(self.dropout(gate * up_proj(x)))
        (w_gate, b_gate), (w_up, b_up), (w_down, b_down) = read
        return gated_feed_forward(x, w_gate, w_up, w_down, b_gate, b_up, b_down,
                                  self.approximate, self.dropout.p, self.training,
                                  self.recompute, activation=self.activation)

    def extra_repr(self) -> str:
        return (f"approximate={self.approximate!r}, recompute={self.recompute}"
                + _activation_repr(self.activation))
