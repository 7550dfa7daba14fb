"""Whole FFN chains: Linear -> GELU -> [Dropout] -> Linear becomes one ``feed_forward`` call.

In a module's chain of children (``chain.py``), four consecutive children ``linear1, act,
dropout, linear2`` (or three, without the dropout) become:

- linear1's slot: a ``FusedFeedForward`` that registers linear1's very Parameters (same names)
  and runs the whole block, reading linear2's Parameters from linear2's slot at each call;
- the GELU's and the Dropout's slots: ``nn.Identity()``;
- linear2's slot: a ``FeedForwardOutput`` that registers linear2's very Parameters under the same
  names and passes its input through (the block's output already arrives there).

So the state dict, optimizers holding the Parameters and ``model.to()`` keep working, both ways,
and what ran before or after the block (GPT-2's dropout after ``c_proj``, ``dropout2`` of
``nn.TransformerEncoderLayer``) is untouched. Tensor-parallel plans naming the two slots do not
apply after the patch (the styles refuse a ``FusedFeedForward`` and a ``FeedForwardOutput``: an
error, never a wrong result): parallelize a fused block with
``triton_gelu.parallel.FeedForwardParallel`` on linear1's slot, or parallelize first (below).

A window is fused only when it is provably that block: both Linears plain (``match.linear_kind``:
``nn.Linear`` or transformers' ``Conv1D``), the activation a GELU (``match.gelu_form``), the
dropout a plain ``nn.Dropout`` with p < 1 (``match.dropout_p``), each child used once in the chain,
linear2's in_features equal to linear1's out_features, all weights of one dtype and device, and
neither Linear touched by FSDP2 or hooked, but in one case of tensor parallel: a block PyTorch's
styles parallelized the way the fused block runs (linear1 ``ColwiseParallel`` and linear2
``RowwiseParallel`` on one mesh, or both ``SequenceParallel``: ``match.parallel_block_style``) is
fused, with linear1's input hook and linear2's output hook moved onto the ``FusedFeedForward``,
which then runs on each rank's shards (``_dtensor.run_block``). Other tensor-parallel Linears are
left to the pair fusion. A window whose linear2 is directly followed by another GELU is left
alone: that Linear fuses with its own GELU instead (pair or block), so every GELU of
``Linear, GELU, Linear, GELU, Linear`` gets fused.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .._checks import check_dropout_p
from ..activations import resolve
from ..ops.ffn import feed_forward
from ..modules import is_plain
from .fuse import child, keep_encoder_fast_path_exact, replace_with_identity
from .match import (
    dropout_p, forced_form, form_arguments, gelu_form, linear_kind, parallel_block_style,
    tp_hooks_module,
)


class _Linear(NamedTuple):
    """A Linear of a block: the module, and whether it stores its weight (in, out) (Conv1D)."""

    module: nn.Module
    transposed: bool

    @property
    def weight(self) -> torch.Tensor:
        return self.module.get_parameter("weight")

    @property
    def features(self) -> tuple[int, int]:
        """(in_features, out_features)."""
        rows, cols = self.weight.shape
        return (rows, cols) if self.transposed else (cols, rows)


def _as_linear(obj: object) -> _Linear | None:
    kind = linear_kind(obj)
    if kind is None or not isinstance(obj, nn.Module):
        return None
    return _Linear(obj, kind == "conv1d")


def _linear_weight(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """The (out, in) weight of a held Linear; transformers' Conv1D stores it (in, out)."""
    return weight.t() if transposed else weight


class FeedForwardOutput(nn.Module):
    """linear2 of a fused FFN block, left in its slot: it keeps linear2's Parameters (names,
    objects, layout) and returns its input, which is already the block's output."""

    weight: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, linear2: nn.Module, block: str) -> None:
        super().__init__()
        held = _as_linear(linear2)
        if held is None:
            raise TypeError(f"linear2 must be an nn.Linear or a Conv1D, got {type(linear2)}")
        self.in_features, self.out_features = held.features
        self.transposed = held.transposed
        self.block = block  # the slot of the FusedFeedForward that applies these parameters
        self.weight = held.weight
        self.bias = linear2._parameters.get("bias")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, applied by {self.block!r}")


class FusedFeedForward(nn.Module):
    """linear1 -> GELU -> dropout -> linear2 in linear1's slot, as one ``feed_forward`` call.

    Registers linear1's Parameters as ``weight`` / ``bias``; linear2's stay registered in their
    own slot (``output``, a ``FeedForwardOutput`` held here without being a child, so nothing is
    counted twice) and are read from it at each call. Dropout with probability ``p`` applies in
    training mode.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    output: FeedForwardOutput

    def __init__(
        self, linear1: nn.Module, output: FeedForwardOutput, p: float = 0.0,
        approximate: str = "none", recompute: bool = False, *, activation: str | None = None,
    ) -> None:
        super().__init__()
        resolve(approximate, activation)
        held = _as_linear(linear1)
        if held is None:
            raise TypeError(f"linear1 must be an nn.Linear or a Conv1D, got {type(linear1)}")
        self.in_features, self.hidden_features = held.features
        self.transposed = held.transposed
        self.weight = held.weight
        self.bias = linear1._parameters.get("bias")
        self.p = check_dropout_p(p)
        self.approximate = approximate
        self.activation = activation
        self.recompute = recompute
        object.__setattr__(self, "output", output)  # a plain attribute, not a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.output
        return feed_forward(
            x, _linear_weight(self.weight, self.transposed), self.bias,
            _linear_weight(out.weight, out.transposed), out.bias, self.p, self.approximate,
            self.training, self.recompute, activation=self.activation,
        )

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, hidden_features={self.hidden_features}, "
                f"out_features={self.output.out_features}, p={self.p}, "
                f"approximate={self.approximate!r}, recompute={self.recompute}"
                + ("" if self.activation is None else f", activation={self.activation!r}"))


class _Block(NamedTuple):
    """A provable FFN window of a chain: its slots' names and what fills them."""

    names: list[str]  # [linear1, act, (dropout,) linear2]
    linear1: nn.Module
    linear2: nn.Module
    form: str  # the GELU's
    p: float  # the dropout's (0 without one)
    training: bool  # the dropout's (linear1's without one)
    parallel: bool  # linear1 and linear2 carry a tensor-parallel plan's hooks (parallel_block_style)


def fuse_feed_forwards(
    parent: nn.Module, chain: list[str], approximate: str | None, recompute: bool
) -> int:
    """Fuse every provable FFN window of ``parent``'s ``chain``; return how many."""
    count, i = 0, 0
    while i < len(chain):
        block = _window(parent, chain, i)
        if block is None:
            i += 1
            continue
        _fuse(parent, block, approximate, recompute)
        count += 1
        i += len(block.names)
    return count


def _window(parent: nn.Module, chain: list[str], i: int) -> _Block | None:
    """The FFN block starting at chain[i], if there is a provable one."""
    names = chain[i:i + 4]
    if len(names) < 3:
        return None
    linear1, form = _as_linear(child(parent, names[0])), gelu_form(child(parent, names[1]))
    dropout = child(parent, names[2])
    p = dropout_p(dropout)
    if p is None:
        names, p, dropout = names[:3], 0.0, None
    linear2 = _as_linear(child(parent, names[-1]))
    if linear1 is None or form is None or linear2 is None:
        return None
    if any(chain.count(name) != 1 for name in names):
        return None  # a child used twice: swapping it would change its other use
    after = chain[i + len(names)] if i + len(names) < len(chain) else None
    if after is not None and gelu_form(child(parent, after)) is not None:
        return None  # linear2 is the Linear of the next GELU: it fuses with that one
    parallel = not (is_plain(linear1.module) and is_plain(linear2.module))
    if parallel and parallel_block_style([linear1.module], linear2.module) is None:
        return None  # FSDP2, hooks, or a plan the block does not serve: left to the pair fusion
    if linear2.features[0] != linear1.features[1]:
        return None
    if len({(w.dtype, w.device) for w in (linear1.weight, linear2.weight)}) != 1:
        return None
    training = dropout.training if isinstance(dropout, nn.Module) else linear1.module.training
    return _Block(names, linear1.module, linear2.module, form, p, training, parallel)


def _fuse(parent: nn.Module, block: _Block, approximate: str | None, recompute: bool) -> None:
    new_form = forced_form(block.form, approximate)
    output = FeedForwardOutput(block.linear2, block=block.names[0])
    output.train(block.linear2.training)
    fused = FusedFeedForward(block.linear1, output, block.p, recompute=recompute,
                             **form_arguments(new_form))
    fused.train(block.training)
    if block.parallel:
        tp_hooks_module().move_tp_block_hooks(
            [block.linear1], block.linear2, fused)
    setattr(parent, block.names[0], fused)
    for name in block.names[1:-1]:
        replace_with_identity(parent, name)
    setattr(parent, block.names[-1], output)
    keep_encoder_fast_path_exact(parent, block.form, new_form)
