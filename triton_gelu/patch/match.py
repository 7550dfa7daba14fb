"""What the patcher accepts as a Linear and as a GELU.

What counts as a Linear: ``nn.Linear`` with its own ``forward`` (or a subclass whose ``forward``
compiles to ``input @ self.weight.T (+ self.bias)``, Falcon's ``FalconLinear``), no hooks (but those a PyTorch
tensor-parallel style installed), no parametrization, a float32/float16/bfloat16 weight;
transformers' ``Conv1D``. What counts as GELU: ``nn.GELU``,
``F.gelu`` (also via ``functools.partial`` with ``approximate=``), this package's ``GELU`` /
``gelu``, and from ``transformers.activations``: ``GELUActivation`` (erf), ``GELUTanh`` /
``PytorchGELUTanh``, ``NewGELUActivation`` (``gelu_new``), ``AccurateGELUActivation`` and
``FastGELUActivation`` (``gelu_fast``: sqrt(2/pi) written to 10 digits, the same float32 constant)
in the tanh form; ``QuickGELUActivation`` (``quick_gelu``: x * sigmoid(1.702 x), CLIP's) as the
``"quick_gelu"`` form. Clipped GELU (``gelu_10``) and anything else are left alone.
What counts as the dropout between GELU and a second Linear: a plain ``nn.Dropout`` with p < 1
(``nn.Identity`` counts as p = 0).

transformers is never imported here: its classes are recognised by module path and name.
"""

from __future__ import annotations

import functools
import math
import sys

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import FLOAT_DTYPES
from ..ops.gelu import gelu as _tg_gelu
from ..modules import GELU, has_hooks
from .template import match_template


# ---- what is a GELU --------------------------------------------------------------------------


def gelu_form(act: object) -> str | None:
    """``"none"`` or ``"tanh"`` when ``act`` provably computes GELU in that form (torch's
    ``approximate``), ``"quick_gelu"`` for quick GELU, else None."""
    if isinstance(act, nn.Module):
        if has_hooks(act) or "forward" in vars(act) or has_state(act):
            return None
        cls = type(act)
        if isinstance(act, (nn.GELU, GELU)) and cls.forward in (nn.GELU.forward, GELU.forward):
            return act.approximate if act.approximate in ("none", "tanh") else None
        if cls.__module__ == "transformers.activations":
            rule = _HF_GELU_FORMS.get(cls.__name__)
            return rule(act) if rule is not None else None
        return None
    return _functional_gelu_form(act)


def _functional_gelu_form(fn: object) -> str | None:
    if fn is F.gelu or fn is _tg_gelu:
        return "none"
    if (
        isinstance(fn, functools.partial)
        and (fn.func is F.gelu or fn.func is _tg_gelu)
        and not fn.args
        and set(fn.keywords) <= {"approximate"}
    ):
        form = fn.keywords.get("approximate", "none")
        return form if form in ("none", "tanh") else None
    return None


def _bound_to(act: nn.Module, method_name: str) -> bool:
    """``act.act`` is ``act``'s own (class-defined) method ``method_name``."""
    fn = getattr(act, "act", None)
    method = getattr(type(act), method_name, None)
    return (method is not None and getattr(fn, "__func__", None) is method
            and getattr(fn, "__self__", None) is act)


def _hf_gelu_erf(act: nn.Module) -> str | None:
    # GELUActivation: self.act is F.gelu, or its own _gelu_python (x * 0.5 * (1 + erf(x/sqrt2)))
    if _functional_gelu_form(getattr(act, "act", None)) == "none" or _bound_to(act, "_gelu_python"):
        return "none"
    return None


def _hf_gelu_tanh(act: nn.Module) -> str | None:
    # GELUTanh / PytorchGELUTanh: self.act is partial(F.gelu, approximate="tanh") or its own
    # _gelu_tanh_python; older releases call F.gelu(x, approximate="tanh") in forward directly.
    if not hasattr(act, "act"):
        return "tanh"
    if _functional_gelu_form(act.act) == "tanh" or _bound_to(act, "_gelu_tanh_python"):
        return "tanh"
    return None


def _hf_gelu_accurate(act: nn.Module) -> str | None:
    constant = getattr(act, "precomputed_constant", None)
    return "tanh" if constant == math.sqrt(2 / math.pi) else None


_HF_GELU_FORMS = {
    "GELUActivation": _hf_gelu_erf,
    "GELUTanh": _hf_gelu_tanh,
    "PytorchGELUTanh": _hf_gelu_tanh,
    "NewGELUActivation": lambda act: "tanh",
    "AccurateGELUActivation": _hf_gelu_accurate,
    # 0.5x(1 + tanh(0.7978845608 x (1 + 0.044715 x^2))): the tanh form with sqrt(2/pi) to 10
    # digits (relative difference 4e-12, the same constant in float32; the kernels run float32).
    "FastGELUActivation": lambda act: "tanh",
    # forward: input * torch.sigmoid(1.702 * input), nothing configurable
    "QuickGELUActivation": lambda act: "quick_gelu",
}


def form_arguments(form: str) -> dict[str, str]:
    """The ``approximate`` / ``activation`` keywords of our functions and modules that select a
    form ``gelu_form`` returned."""
    if form == "quick_gelu":  # approximate stays at each one's default
        return {"activation": "quick_gelu"}
    return {"approximate": form}


def forced_form(form: str, approximate: str | None) -> str:
    """The form a block is fused with when ``patch(approximate=...)`` forces a GELU form: quick
    GELU is another function, not a GELU form to force, so it keeps its own."""
    return form if approximate is None or form == "quick_gelu" else approximate


# ---- what is a Dropout ------------------------------------------------------------------------


def dropout_p(mod: object) -> float | None:
    """``p`` of a plain ``nn.Dropout`` (0.0 for ``nn.Identity``), else None."""
    if not isinstance(mod, nn.Module) or has_hooks(mod) or "forward" in vars(mod) \
            or has_state(mod):
        return None
    cls = type(mod)
    if isinstance(mod, nn.Dropout) and cls.forward is nn.Dropout.forward and 0.0 <= mod.p < 1.0:
        return float(mod.p)
    if isinstance(mod, nn.Identity) and cls.forward is nn.Identity.forward:
        return 0.0
    return None


# ---- what is a Linear ------------------------------------------------------------------------


def linear_kind(mod: object) -> str | None:
    """``"linear"`` for a plain ``nn.Linear``, ``"conv1d"`` for transformers' ``Conv1D``."""
    if not isinstance(mod, nn.Module) or "forward" in vars(mod):
        return None
    if (has_hooks(mod) or has_dtensor_parameters(mod)) and parallel_style(mod) is None:
        # Hooks we do not know, or DTensor parameters no tensor-parallel style put there (FSDP2's
        # shards: fully_shard re-points the original module's parameters, not ours).
        return None
    if torch.nn.utils.parametrize.is_parametrized(mod) or set(mod._buffers) or mod._modules:
        return None
    weight = mod._parameters.get("weight")
    bias = mod._parameters.get("bias")
    if (
        not isinstance(weight, nn.Parameter)
        or isinstance(weight, nn.parameter.UninitializedParameter)
        or weight.dim() != 2
        or weight.dtype not in FLOAT_DTYPES
        or set(mod._parameters) - {"weight", "bias"}
    ):
        return None
    cls = type(mod)
    if isinstance(mod, nn.Linear) and (cls.forward is nn.Linear.forward
                                       or match_template(cls.forward, _x_wt_plus_b) == {}):
        return "linear"
    if (
        cls.__name__ == "Conv1D"
        and cls.__module__.startswith("transformers.")
        and isinstance(bias, nn.Parameter)
        and weight.shape == (getattr(mod, "nx", None), getattr(mod, "nf", None))
        and bias.shape == (weight.shape[1],)
    ):
        return "conv1d"
    return None


def _x_wt_plus_b(self, input):
    # Falcon's FalconLinear.forward: x @ W^T + b, the two roundings of nn.Linear's own matmul
    # and bias add (a Linear subclass whose forward compiles to exactly this is a Linear).
    hidden_states = input @ self.weight.T
    if self.bias is None:
        return hidden_states
    return hidden_states + self.bias


def _dtensor_class() -> type | None:
    """DTensor, if torch.distributed.tensor was imported (else no DTensor can exist)."""
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else module.DTensor


def has_dtensor_parameters(mod: nn.Module) -> bool:
    dtensor = _dtensor_class()
    return dtensor is not None and any(isinstance(p, dtensor) for p in mod._parameters.values())


def tp_hooks_module():
    """``patch.tp_hooks``, imported only when a module holds DTensor parameters (it imports
    torch.distributed, which ``import triton_gelu`` never does)."""
    from . import tp_hooks

    return tp_hooks


def parallel_style(mod: nn.Module) -> str | None:
    """``"colwise"``, ``"rowwise"`` or ``"sequence"`` when ``mod``'s hooks are exactly those a
    PyTorch tensor-parallel style installed (``tp_hooks.tp_style``), else None."""
    if _dtensor_class() is None:
        return None
    return tp_hooks_module().tp_style(mod)


def parallel_block_style(first: list[nn.Module], last: nn.Module) -> str | None:
    """``"tensor"`` or ``"sequence"`` when PyTorch's tensor-parallel styles on a block's Linears
    (``first`` projections, then ``last``) make a plan the fused block serves
    (``tp_hooks.tp_block_style``), else None."""
    if _dtensor_class() is None:
        return None
    return tp_hooks_module().tp_block_style(first, last)


def has_state(mod: nn.Module) -> bool:
    return bool(mod._parameters) or bool(mod._buffers) or bool(mod._modules)
