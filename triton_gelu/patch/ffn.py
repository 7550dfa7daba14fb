"""Whole FFN chains: Linear -> GELU -> [Dropout] -> Linear becomes one ``feed_forward`` call.

In a module's chain of children (``chain.py``), four consecutive children ``linear1, act,
dropout, linear2`` (or three, without the dropout) become:

- linear1's slot: a ``FusedFeedForward`` that registers linear1's very Parameters (same names)
  and runs the whole block, reading linear2's Parameters from linear2's slot at each call;
- the GELU's and the Dropout's slots: ``nn.Identity()``;
- linear2's slot: a ``FeedForwardOutput`` that registers linear2's very Parameters under the same
  names and passes its input through (the block's output already arrives there).

So the state dict, optimizers holding the Parameters, ``model.to()`` and tensor-parallel plans
that name ``linear2`` keep working, both ways, and what ran before or after the block (GPT-2's
dropout after ``c_proj``, ``dropout2`` of ``nn.TransformerEncoderLayer``) is untouched.

A window is fused only when it is provably that block: both Linears plain (``match.linear_kind``:
``nn.Linear`` or transformers' ``Conv1D``), the activation a GELU (``match.gelu_form``), the
dropout a plain ``nn.Dropout`` with p < 1 (``match.dropout_p``), each child used once in the chain,
linear2's in_features equal to linear1's out_features, all weights of one dtype and device, and
neither Linear touched by tensor parallel or FSDP2 (hooks, DTensor parameters). A
window whose linear2 is directly followed by another GELU is left alone: that Linear fuses with
its own GELU instead (pair or block), so every GELU of ``Linear, GELU, Linear, GELU, Linear``
gets fused.
"""

from __future__ import annotations

import torch
from torch import nn

from .._checks import check_approximate, check_dropout_p
from ..functional import feed_forward
from ..modules import is_plain
from .fuse import child, keep_encoder_fast_path_exact, replace_with_identity
from .match import dropout_p, gelu_form, linear_kind


def _linear_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) weight of a held Linear; transformers' Conv1D stores it (in, out)."""
    return module.weight.t() if module.transposed else module.weight


def _features(linear: nn.Module, kind: str) -> tuple[int, int]:
    """(in_features, out_features) of an ``nn.Linear`` or a ``Conv1D``."""
    rows, cols = linear.weight.shape
    return (rows, cols) if kind == "conv1d" else (cols, rows)


class FeedForwardOutput(nn.Module):
    """linear2 of a fused FFN block, left in its slot: it keeps linear2's Parameters (names,
    objects, layout) and returns its input, which is already the block's output."""

    def __init__(self, linear2: nn.Module, block: str) -> None:
        super().__init__()
        kind = linear_kind(linear2)
        self.in_features, self.out_features = _features(linear2, kind)
        self.transposed = kind == "conv1d"
        self.block = block  # the slot of the FusedFeedForward that applies these parameters
        self.weight = linear2.weight
        self.bias = linear2.bias

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

    def __init__(
        self, linear1: nn.Module, output: FeedForwardOutput, p: float = 0.0,
        approximate: str = "none", recompute: bool = False,
    ) -> None:
        super().__init__()
        check_approximate(approximate)
        kind = linear_kind(linear1)
        self.in_features, self.hidden_features = _features(linear1, kind)
        self.transposed = kind == "conv1d"
        self.weight = linear1.weight
        self.bias = linear1.bias
        self.p = check_dropout_p(p)
        self.approximate = approximate
        self.recompute = recompute
        object.__setattr__(self, "output", output)  # a plain attribute, not a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.output
        return feed_forward(
            x, _linear_weight(self), self.bias, _linear_weight(out), out.bias, self.p,
            self.approximate, self.training, self.recompute,
        )

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, hidden_features={self.hidden_features}, "
                f"out_features={self.output.out_features}, p={self.p}, "
                f"approximate={self.approximate!r}, recompute={self.recompute}")


def fuse_feed_forwards(
    parent: nn.Module, chain: list[str], approximate: str | None, recompute: bool
) -> int:
    """Fuse every provable FFN window of ``parent``'s ``chain``; return how many."""
    count, i = 0, 0
    while i < len(chain):
        window = _window(parent, chain, i)
        if window is None:
            i += 1
            continue
        _fuse(parent, window, approximate, recompute)
        count += 1
        i += len(window)
    return count


def _window(parent: nn.Module, chain: list[str], i: int) -> list[str] | None:
    """The names [linear1, act, (dropout,) linear2] of the FFN block starting at chain[i], if
    there is a provable one."""
    names = chain[i:i + 4]
    if len(names) < 3 or linear_kind(child(parent, names[0])) is None \
            or gelu_form(child(parent, names[1])) is None:
        return None
    if dropout_p(child(parent, names[2])) is None:
        names = names[:3]
    if len(names) < 3 or any(chain.count(name) != 1 for name in names):
        return None  # a child used twice: swapping it would change its other use
    after = chain[i + len(names)] if i + len(names) < len(chain) else None
    if after is not None and gelu_form(child(parent, after)) is not None:
        return None  # linear2 is the Linear of the next GELU: it fuses with that one
    linear1, linear2 = child(parent, names[0]), child(parent, names[-1])
    if not (is_plain(linear1) and is_plain(linear2)):
        return None  # tensor parallel or FSDP2 touched it: left to the pair fusion
    kind2 = linear_kind(linear2)
    if kind2 is None or _features(linear2, kind2)[0] != \
            _features(linear1, linear_kind(linear1))[1]:
        return None
    weights = [linear1.weight, linear2.weight]
    if len({(w.dtype, w.device) for w in weights}) != 1:
        return None
    return names


def _fuse(parent: nn.Module, names: list[str], approximate: str | None, recompute: bool) -> None:
    linear1, act, linear2 = (child(parent, name) for name in (names[0], names[1], names[-1]))
    form = gelu_form(act)
    new_form = form if approximate is None else approximate
    p = dropout_p(child(parent, names[2])) if len(names) == 4 else 0.0
    output = FeedForwardOutput(linear2, block=names[0]).train(linear2.training)
    fused = FusedFeedForward(linear1, output, p, new_form, recompute)
    training = child(parent, names[2]).training if len(names) == 4 else linear1.training
    fused.train(training)
    setattr(parent, names[0], fused)
    for name in names[1:-1]:
        replace_with_identity(parent, name)
    setattr(parent, names[-1], output)
    keep_encoder_fast_path_exact(parent, form, new_form)
