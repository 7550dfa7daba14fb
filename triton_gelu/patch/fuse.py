"""The swap itself: a Linear (or GPT-2 ``Conv1D``) and the GELU after it become one fused module
holding the very same parameters, and the GELU becomes ``nn.Identity()``."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .._runtime import UnfusedFallbackWarning
from ..activations import resolve
from ..ops.linear_gelu import linear_gelu
from ..modules import LinearGELU
from .match import (
    forced_form, form_arguments, gelu_form, linear_kind, parallel_style, tp_hooks_module,
)


class Conv1DGELU(nn.Module):
    """GPT-2's ``Conv1D`` followed by GELU, fused. Keeps ``Conv1D``'s parameters as they are,
    ``weight`` (in_features, out_features) and ``bias`` (out_features,), so state dicts load."""

    weight: torch.Tensor
    bias: torch.Tensor

    def __init__(self, conv: nn.Module, approximate: str = "none", recompute: bool = False, *,
                 activation: str | None = None) -> None:
        super().__init__()
        resolve(approximate, activation)
        self.nf, self.nx = conv.nf, conv.nx
        self.weight = conv.get_parameter("weight")  # (nx, nf): nn.Linear's (out, in) transposed
        self.bias = conv.get_parameter("bias")
        self.approximate = approximate
        self.activation = activation
        self.recompute = recompute

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_gelu(x, self.weight.t(), self.bias, self.approximate, self.recompute,
                           activation=self.activation)

    def extra_repr(self) -> str:
        return (f"nf={self.nf}, nx={self.nx}, approximate={self.approximate!r}, "
                f"recompute={self.recompute}"
                + ("" if self.activation is None else f", activation={self.activation!r}"))


def fuse_pair(
    parent: nn.Module, linear_name: str, act_name: str, approximate: str | None,
    recompute: bool = False,
) -> int:
    linear = child(parent, linear_name)
    act = child(parent, act_name)
    kind = linear_kind(linear)
    form = gelu_form(act)
    if kind is None or form is None or not isinstance(linear, nn.Module):
        return 0
    style = parallel_style(linear)
    if style == "rowwise":
        warnings.warn(
            f"triton_gelu.patch: {type(parent).__name__}.{linear_name} is row-parallel "
            "(RowwiseParallel): its output is a partial sum, and GELU needs the whole sum, so it "
            f"is left unfused with {act_name}. Make it column-parallel to fuse it.",
            UnfusedFallbackWarning, stacklevel=3,
        )
        return 0
    new_form = forced_form(form, approximate)
    fused: nn.Module
    if kind == "linear" and isinstance(linear, nn.Linear):
        fused = LinearGELU.from_linear(linear, recompute=recompute, **form_arguments(new_form))
    else:
        fused = Conv1DGELU(linear, recompute=recompute, **form_arguments(new_form))
    fused.train(linear.training)
    if style is not None:
        # A column-parallel (or sequence-parallel) Linear: the fused module takes the style's
        # input and output hooks; GELU needs none (it commutes with the column split).
        tp_hooks_module().copy_tp_hooks(linear, fused)
    setattr(parent, linear_name, fused)
    replace_with_identity(parent, act_name)
    keep_encoder_fast_path_exact(parent, form, new_form)
    return 1


def replace_with_identity(parent: nn.Module, name: str) -> None:
    """Put ``nn.Identity()`` in slot ``name`` (a child module or a function attribute)."""
    old = child(parent, name)
    training = old.training if isinstance(old, nn.Module) else parent.training
    setattr(parent, name, nn.Identity().train(training))


def keep_encoder_fast_path_exact(parent: nn.Module, form: str, new_form: str) -> None:
    """The eval/no-grad fast path of ``nn.TransformerEncoderLayer``
    (torch._transformer_encoder_layer_fwd) applies the erf form from linear1's weights whatever
    the modules; turn it off when the form is forced to tanh."""
    if isinstance(parent, nn.TransformerEncoderLayer) and new_form != form and new_form == "tanh":
        parent.activation_relu_or_gelu = 0


def child(parent: nn.Module, name: str) -> object:
    """The child module or plain attribute (a function activation) ``name``, else None."""
    if name in parent._modules:
        return parent._modules[name]
    if name in vars(parent) and name not in ("forward", "training"):
        return vars(parent)[name]
    return None  # a property, a class attribute, a parameter: not something we swap
