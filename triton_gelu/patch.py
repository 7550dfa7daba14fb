"""Model patching: swap every Linear followed by GELU that is provably such a pair for the fused
kernel, in place.

``patch(model)`` looks at every submodule and finds the order in which it applies its children:

- ``nn.Sequential`` (and subclasses that keep its ``forward``): its children, in order;
- any other module whose ``forward`` is a plain chain ``x = self.a(x); x = self.b(x); ...;
  return x`` (or the nested ``self.b(self.a(x))``, or a mix): the chain is read off the bytecode of
  ``forward`` and only accepted when it is nothing else. This covers the common PyTorch
  FeedForward (``linear1 -> activation -> dropout -> linear2``) and the Hugging Face transformers
  FFN blocks: ``BertIntermediate`` / ``RobertaIntermediate`` / ``ViTIntermediate`` (``dense ->
  intermediate_act_fn``), ``ViTMLP`` / ``CLIPMLP``-style (``fc1 -> activation_fn -> fc2``) and
  ``GPT2MLP`` (``c_fc -> act -> c_proj -> dropout``);
- ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer``: the chain of ``_ff_block``.

Where the chain holds a Linear directly followed by a GELU, and each is used once in it, the
Linear becomes a ``LinearGELU`` holding the very same parameters (same names in the state dict)
and the GELU becomes ``nn.Identity()``. GPT-2's ``Conv1D`` (weight stored as (in, out)) becomes a
``Conv1DGELU`` that keeps that parameter and passes its transposed view to the kernel, which
takes strides.

What counts as a Linear: ``nn.Linear`` with its own ``forward``, no hooks, no parametrization,
a float32/float16/bfloat16 weight; transformers' ``Conv1D``. What counts as GELU: ``nn.GELU``,
``F.gelu`` (also via ``functools.partial`` with ``approximate=``), this package's ``GELU`` /
``gelu``, and from ``transformers.activations``: ``GELUActivation`` (erf), ``GELUTanh`` /
``PytorchGELUTanh``, ``NewGELUActivation`` (``gelu_new``), ``AccurateGELUActivation`` and
``FastGELUActivation`` (``gelu_fast``: sqrt(2/pi) written to 10 digits, the same float32 constant)
in the tanh form. ``quick_gelu``, clipped GELU (``gelu_10``) and anything else are left alone.

transformers is never imported here: its classes are recognised by module path and name.
"""

from __future__ import annotations

import dis
import functools
import inspect
import math
import sys

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import FLOAT_DTYPES, check_approximate
from .functional import gelu as _tg_gelu
from .functional import linear_gelu
from .modules import GELU, LinearGELU

__all__ = ["patch", "gelu_form", "Conv1DGELU"]


def patch(model: nn.Module, approximate: str | None = None) -> int:
    """Replace, in place, every Linear followed by GELU in ``model`` that provably is such a pair
    by the fused ``LinearGELU``; return how many pairs were replaced.

    ``approximate=None`` keeps each block's own GELU form; ``"none"`` or ``"tanh"`` forces one.
    Parameters are kept (the same ``nn.Parameter`` objects under the same state-dict names), so
    optimizers, tied weights and ``state_dict`` save/load keep working. Patching twice is a no-op.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if approximate is not None:
        check_approximate(approximate)
    count = 0
    seen: set[int] = set()
    for module in list(model.modules()):  # a snapshot: the new modules are not visited
        if id(module) in seen:
            continue
        seen.add(id(module))
        chain = _application_chain(module)
        if chain is None:
            continue
        for linear_name, act_name in zip(chain, chain[1:]):
            if chain.count(linear_name) != 1 or chain.count(act_name) != 1:
                continue  # a child used twice: swapping it would change the other use
            count += _fuse_pair(module, linear_name, act_name, approximate)
    return count


# ---- what is a GELU --------------------------------------------------------------------------


def gelu_form(act: object) -> str | None:
    """``"none"`` or ``"tanh"`` when ``act`` provably computes GELU in that form, else None."""
    if isinstance(act, nn.Module):
        if _has_hooks(act) or "forward" in vars(act) or _has_state(act):
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
    return method is not None and getattr(fn, "__func__", None) is method and fn.__self__ is act


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
}


# ---- what is a Linear ------------------------------------------------------------------------


def _linear_kind(mod: object) -> str | None:
    """``"linear"`` for a plain ``nn.Linear``, ``"conv1d"`` for transformers' ``Conv1D``."""
    if not isinstance(mod, nn.Module) or _has_hooks(mod) or "forward" in vars(mod):
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
    if isinstance(mod, nn.Linear) and cls.forward is nn.Linear.forward:
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


class Conv1DGELU(nn.Module):
    """GPT-2's ``Conv1D`` followed by GELU, fused. Keeps ``Conv1D``'s parameters as they are,
    ``weight`` (in_features, out_features) and ``bias`` (out_features,), so state dicts load."""

    def __init__(self, conv: nn.Module, approximate: str = "none") -> None:
        super().__init__()
        check_approximate(approximate)
        self.nf, self.nx = conv.nf, conv.nx
        self.weight = conv.weight  # (nx, nf): the transpose of nn.Linear's (out, in)
        self.bias = conv.bias
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_gelu(x, self.weight.t(), self.bias, approximate=self.approximate)

    def extra_repr(self) -> str:
        return f"nf={self.nf}, nx={self.nx}, approximate={self.approximate!r}"


# ---- the swap --------------------------------------------------------------------------------


def _fuse_pair(parent: nn.Module, linear_name: str, act_name: str, approximate: str | None) -> int:
    linear = _child(parent, linear_name)
    act = _child(parent, act_name)
    kind = _linear_kind(linear)
    form = gelu_form(act)
    if kind is None or form is None:
        return 0
    new_form = form if approximate is None else approximate
    if kind == "linear":
        fused = LinearGELU.from_linear(linear, approximate=new_form)
    else:
        fused = Conv1DGELU(linear, approximate=new_form)
    fused.train(linear.training)
    identity = nn.Identity().train(act.training if isinstance(act, nn.Module) else parent.training)
    setattr(parent, linear_name, fused)
    setattr(parent, act_name, identity)
    if isinstance(parent, nn.TransformerEncoderLayer) and new_form != form and new_form == "tanh":
        # The eval/no-grad fast path (torch._transformer_encoder_layer_fwd) applies the erf form
        # from linear1's weights whatever the module; turn it off when the form is forced to tanh.
        parent.activation_relu_or_gelu = 0
    return 1


def _child(parent: nn.Module, name: str) -> object:
    """The child module or plain attribute (a function activation) ``name``, else None."""
    if name in parent._modules:
        return parent._modules[name]
    if name in vars(parent) and name not in ("forward", "training"):
        return vars(parent)[name]
    return None  # a property, a class attribute, a parameter: not something we swap


def _has_hooks(mod: nn.Module) -> bool:
    return any(
        getattr(mod, hooks, None)
        for hooks in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                      "_backward_pre_hooks")
    )


def _has_state(mod: nn.Module) -> bool:
    return bool(mod._parameters) or bool(mod._buffers) or bool(mod._modules)


# ---- which children a module applies, in which order -----------------------------------------


def _application_chain(module: nn.Module) -> list[str] | None:
    """Names of the children ``module`` applies to its input one after the other, or None when
    its forward is not (provably) such a chain."""
    if "forward" in vars(module):  # a forward replaced on the instance: we cannot read it
        return None
    cls = type(module)
    if isinstance(module, nn.Sequential) and cls.forward is nn.Sequential.forward:
        return [name for name, child in module._modules.items() if child is not None]
    if cls in (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer):
        # forward applies linear1/activation only through _ff_block (its fast path reads
        # linear1's parameters, which LinearGELU keeps).
        return None if "_ff_block" in vars(module) else call_chain(cls._ff_block)
    return call_chain(cls.forward)


class _Value:
    """A symbolic value of the bytecode walk: self, the input, NULL, self.<name>, a call."""

    def __init__(self, kind: str, name: str | None = None, arg: _Value | None = None) -> None:
        self.kind, self.name, self.arg = kind, name, arg


_SELF, _INPUT, _NULL = _Value("self"), _Value("input"), _Value("null")
_SKIP = {"RESUME", "NOP", "PRECALL", "CACHE", "EXTENDED_ARG", "NOT_TAKEN"}
_LOAD_FAST = {"LOAD_FAST", "LOAD_FAST_CHECK", "LOAD_FAST_BORROW"}
_LOAD_FAST_2 = {"LOAD_FAST_LOAD_FAST", "LOAD_FAST_BORROW_LOAD_FAST_BORROW"}
_CALL_2 = {"CALL", "CALL_METHOD"}  # callable + NULL (either order) below the arguments
_NOT_PLAIN = (
    inspect.CO_GENERATOR | inspect.CO_COROUTINE | inspect.CO_ITERABLE_COROUTINE
    | inspect.CO_ASYNC_GENERATOR
)


def call_chain(fn: object) -> list[str] | None:
    """If ``fn(self, x)`` is exactly ``return self.aN(...self.a1(self.a0(x)))`` (as nested calls,
    one ``x = self.ai(x)`` per line, or a mix), return ``[a0, ..., aN]``; else None.

    Read from the bytecode with a small symbolic stack machine: any instruction outside the few
    that such a chain compiles to (on Python 3.10 to 3.13) makes the answer None, so a forward
    that does anything else (arithmetic, a residual, keyword arguments, a branch) is refused.
    """
    code = getattr(fn, "__code__", None)
    if code is None or code.co_argcount < 2 or code.co_cellvars or code.co_freevars:
        return None
    if code.co_flags & _NOT_PLAIN:
        return None
    env = {code.co_varnames[0]: _SELF, code.co_varnames[1]: _INPUT}
    stack: list[_Value] = []
    try:
        for ins in dis.get_instructions(code):
            op = ins.opname
            if op in _SKIP:
                continue
            if op in _LOAD_FAST:
                stack.append(env[ins.argval])
            elif op in _LOAD_FAST_2:
                stack.extend(env[name] for name in ins.argval)
            elif op == "STORE_FAST":
                env[ins.argval] = stack.pop()
            elif op == "STORE_FAST_LOAD_FAST":
                store, load = ins.argval
                env[store] = stack.pop()
                stack.append(env[load])
            elif op in ("LOAD_ATTR", "LOAD_METHOD"):
                if stack.pop() is not _SELF:
                    return None
                is_method = op == "LOAD_METHOD" or (sys.version_info >= (3, 12) and ins.arg & 1)
                stack.extend([_NULL, _Value("attr", ins.argval)] if is_method
                             else [_Value("attr", ins.argval)])
            elif op == "PUSH_NULL":
                stack.append(_NULL)
            elif op in _CALL_2 or op == "CALL_FUNCTION":
                if ins.arg != 1:
                    return None
                arg = stack.pop()
                below = [stack.pop(), stack.pop()] if op in _CALL_2 else [_NULL, stack.pop()]
                attrs = [v for v in below if v.kind == "attr"]
                if arg.kind not in ("input", "call") or len(attrs) != 1 or _NULL not in below:
                    return None
                stack.append(_Value("call", attrs[0].name, arg))
            elif op == "RETURN_VALUE":
                result = stack.pop()
                break
            else:
                return None
        else:
            return None
    except (KeyError, IndexError):  # an unknown local, a stack underflow: not a chain
        return None
    if stack:
        return None
    chain: list[str] = []
    while result.kind == "call":
        chain.append(result.name)
        result = result.arg
    return chain[::-1] if result is _INPUT and chain else None
