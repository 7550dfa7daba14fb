"""Tensor parallel (DTensor): the fused kernels run on each rank's local shards, through PyTorch's
own machinery.

Imported on first need (a DTensor reaching ``functional.py``, ``patch()`` meeting a parallelized
Linear, or a user importing the styles below): ``import triton_gelu`` never imports
``torch.distributed``.

**Sharding rules.** Each custom op of ``ops.py`` has a DTensor sharding rule
(``torch.distributed.tensor.experimental.register_sharding``): DTensor calls the op on the local
shards (so our kernels run on every rank), states the output placements, and redistributes inputs
itself where they match no rule. For y = gelu(x @ W^T + b), on each mesh dimension:

- column split, x Replicate, W and b Shard(0): y (and z) Shard(-1), no communication (GELU is
  elementwise, so it commutes with a split of z's columns); backward dW, db Shard(0), and
  dx = dz @ W is a sum over all columns: Partial, reduced where the plan says (ColwiseParallel's
  input hook);
- row split, x Shard(d) on a leading dimension (batch or sequence: SequenceParallel layouts),
  W and b Replicate: y Shard(d), no communication; backward dx Shard(d), and dW = dz^T x, db sum
  over all rows: Partial;
- everything Replicate: Replicate.

GELU itself: y and dx are split like x (any Shard, or Replicate). A Partial x (a sum not yet
reduced) is reduced first by DTensor: gelu of a partial sum is not the sum of the gelus.

**What the kernels cannot serve** falls back to the unfused ``F.gelu(F.linear(...))`` on the
DTensors, with a ``UnfusedFallbackWarning`` once per layout: a row-parallel linear1 (x Shard(-1),
W Shard(1): z is a partial sum, and GELU needs the whole sum), a Partial x, W split on its
columns together with x split on its rows on the same mesh dimension. DTensor then inserts the
reduction before the GELU, as it does for ``nn.Linear`` + ``nn.GELU``: never a wrong result.

**Plans.** ``ColwiseParallel`` / ``RowwiseParallel`` here are PyTorch's styles that also accept a
``LinearGELU`` (PyTorch's refuse any module but ``nn.Linear`` / ``nn.Embedding``), with the same
parameter sharding and the same input/output hooks. ``LinearGELU`` does not subclass
``nn.Linear`` on purpose: tools that find Linears by ``isinstance`` (LoRA adapters, quantizers
swapping Linears) would silently compute a different function on a Linear that applies GELU.

**Patching a parallelized model.** ``tp_style(module)`` recognises the hooks a PyTorch style
installed (through ``distribute_module``), so ``patch()`` can fuse a column-parallel Linear and
carry its hooks over to the fused module, while still refusing user hooks.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_module
from torch.distributed.tensor.experimental import register_sharding
from torch.distributed.tensor.parallel import style as _style
from torch.distributed.tensor.placement_types import Placement

from . import ops
from .modules import LinearGELU

__all__ = [
    "ColwiseParallel", "RowwiseParallel", "UnfusedFallbackWarning", "tp_style", "fusable_layout",
]

_R = Replicate()
_custom_ops = torch.ops.triton_gelu  # filled by ops.py, imported below


# ---- sharding rules of the custom ops ---------------------------------------------------------


class _LinearLayout(NamedTuple):
    """One way to run y = gelu(x @ W^T + b) on one mesh dimension with no communication: the
    placements of the forward's operands and result, and of the backward's gradients."""

    x: Placement
    weight: Placement
    bias: Placement
    y: Placement  # also z, the pre-activation, and dy
    dx: Placement
    dweight: Placement
    dbias: Placement


def _linear_layouts(ndim: int) -> list[_LinearLayout]:
    """The layouts the fused linear ops serve, for x of ``ndim`` dimensions (..., K)."""
    last = ndim - 1
    replicated = _LinearLayout(_R, _R, _R, _R, _R, _R, _R)
    # Column split: rank i holds W's rows (output features) i: y[:, cols_i] = gelu(x W_i^T + b_i).
    # dx = dz @ W = sum_i dz[:, cols_i] @ W_i: a partial sum on each rank.
    column = _LinearLayout(
        x=_R, weight=Shard(0), bias=Shard(0), y=Shard(last),
        dx=Partial(), dweight=Shard(0), dbias=Shard(0),
    )
    # Row split (batch or sequence): rank i holds rows i of x and computes rows i of y.
    # dW = dz^T x and db = sum over rows of dz: partial sums on each rank.
    rows = [
        _LinearLayout(
            x=Shard(d), weight=_R, bias=_R, y=Shard(d),
            dx=Shard(d), dweight=Partial(), dbias=Partial(),
        )
        for d in range(last)
    ]
    return [replicated, column, *rows]


def _elementwise_layouts(ndim: int) -> list[Placement]:
    """GELU is elementwise: y and dx are split as x is (any Shard, or Replicate)."""
    return [_R, *(Shard(d) for d in range(ndim))]


def _if_present(tensor: object, placement: Placement) -> Placement | None:
    return None if tensor is None else placement


def _key_on_flags(op: torch._ops.OpOverload) -> None:
    """Make DTensor's sharding cache tell apart calls that differ only in a bool flag.

    ``register_sharding`` keys its cache on the tensors' specs and on int arguments only, but our
    flags (``save_preact``, ``need_dx``...) decide whether an output is an empty tensor: without
    this, a call with ``save_preact=False`` after one with ``True`` reuses the first one's output
    specs and builds a DTensor whose global shape is not its local one's (tested). Every argument
    from the first non-tensor one on becomes part of the key. ``op_to_schema_info`` is DTensor's
    own table of these keys (the one ``register_sharding`` writes); tests/test_parallel.py fails
    if a torch release changes it.
    """
    first_flag = next(
        (i for i, arg in enumerate(op._schema.arguments)
         if not isinstance(arg.type, (torch.TensorType, torch.OptionalType))),
        None,
    )
    if first_flag is None:
        return
    table = DTensor._op_dispatcher.sharding_propagator.op_to_schema_info
    table[op] = dataclasses.replace(
        table[op], static_argnum=min(table[op].static_argnum, first_flag)
    )


def _sharding_rule(op: torch._ops.OpOverload):
    """``register_sharding(op)``, with the cache keyed on op's flags too (``_key_on_flags``).
    Every custom op needs one: DTensor refuses an op it has no rule for."""
    def register(rule):
        register_sharding(op)(rule)
        _key_on_flags(op)
        return rule
    return register


@_sharding_rule(_custom_ops.gelu_fwd.default)
def _gelu_fwd_rule(x, approximate_tanh):
    return [([p], [p, None]) for p in _elementwise_layouts(x.ndim)]


@_sharding_rule(_custom_ops.gelu_bwd.default)
def _gelu_bwd_rule(dy, x, approximate_tanh):
    return [([p], [p, p, None]) for p in _elementwise_layouts(x.ndim)]


@_sharding_rule(_custom_ops.linear_gelu_fwd.default)
def _linear_gelu_fwd_rule(x, weight, bias, approximate_tanh, save_preact):
    # outputs (y, z | empty); an output not asked for is an empty tensor, Replicate.
    return [
        ([lay.y, lay.y if save_preact else _R],
         [lay.x, lay.weight, _if_present(bias, lay.bias), None, None])
        for lay in _linear_layouts(x.ndim)
    ]


@_sharding_rule(_custom_ops.linear_preact.default)
def _linear_preact_rule(x, weight, bias):
    return [
        ([lay.y], [lay.x, lay.weight, _if_present(bias, lay.bias)])
        for lay in _linear_layouts(x.ndim)
    ]


@_sharding_rule(_custom_ops.linear_gelu_bwd.default)
def _linear_gelu_bwd_rule(dy, x, weight, preact, approximate_tanh, need_dx, need_dw, need_db):
    return [
        ([lay.dx if need_dx else _R, lay.dweight if need_dw else _R, lay.dbias if need_db else _R],
         [lay.y, lay.x, lay.weight, lay.y, None, None, None, None])
        for lay in _linear_layouts(x.ndim)
    ]


# ---- the functional entry points for DTensor operands -----------------------------------------


class UnfusedFallbackWarning(UserWarning):
    """Given once per layout when DTensor operands are laid out in a way the fused kernels cannot
    serve, and the unfused PyTorch ops (with DTensor's own communication) run instead."""


_warned_layouts: set[str] = set()


def fusable_layout(x: DTensor, weight: DTensor, bias: DTensor | None) -> bool:
    """Whether the fused linear ops serve these DTensors as laid out, with no communication."""
    layouts = {(lay.x, lay.weight, lay.bias) for lay in _linear_layouts(x.ndim)}
    bias_placements = bias.placements if bias is not None else (None,) * len(x.placements)
    for px, pw, pb in zip(x.placements, weight.placements, bias_placements):
        if not any(px == lx and pw == lw and (pb is None or pb == lb) for lx, lw, lb in layouts):
            return False
    return True


def _require_dtensors(**named: torch.Tensor | None) -> None:
    plain = [name for name, t in named.items() if t is not None and not isinstance(t, DTensor)]
    if plain:
        dist = [name for name, t in named.items() if isinstance(t, DTensor)]
        raise TypeError(
            f"{', '.join(dist)} {'is a DTensor' if len(dist) == 1 else 'are DTensors'} but "
            f"{', '.join(plain)} {'is' if len(plain) == 1 else 'are'} a plain torch.Tensor: make "
            "every operand a DTensor (DTensor.from_local, or a parallel style's input hook)"
        )


def gelu(x: DTensor, approximate_tanh: bool) -> torch.Tensor:
    """``functional.gelu`` of a DTensor: the custom op on the local shard."""
    return ops.gelu_fwd(x, approximate_tanh)


def linear_gelu(
    x: DTensor, weight: DTensor, bias: DTensor | None, approximate_tanh: bool, recompute: bool
) -> torch.Tensor:
    """``functional.linear_gelu`` of DTensors (already validated and cast for autocast): the custom
    ops on the local shards where their layout allows, else the unfused ops, with a warning."""
    _require_dtensors(x=x, weight=weight, bias=bias)
    if fusable_layout(x, weight, bias):
        return ops.linear_gelu(x, weight, bias, approximate_tanh, recompute)
    layout = (
        f"x {tuple(x.placements)}, weight {tuple(weight.placements)}, "
        f"bias {None if bias is None else tuple(bias.placements)}"
    )
    if layout not in _warned_layouts:
        _warned_layouts.add(layout)
        warnings.warn(
            f"triton_gelu: the fused Linear+GELU kernels cannot serve DTensors laid out as "
            f"{layout} (GELU needs the whole pre-activation, not a partial sum or a mismatched "
            "split); running the unfused F.linear + F.gelu, which DTensor reduces before the GELU. "
            "Make linear1 column-parallel (triton_gelu.parallel.ColwiseParallel) to fuse.",
            UnfusedFallbackWarning, stacklevel=4,
        )
    preact = F.linear(x, weight, bias)
    return F.gelu(preact, approximate="tanh" if approximate_tanh else "none")


# ---- parallel styles that accept our modules --------------------------------------------------


def _distribute(
    style: _style.ColwiseParallel | _style.RowwiseParallel, module: nn.Module, device_mesh
) -> nn.Module:
    """What PyTorch's Colwise/RowwiseParallel do to an nn.Linear (their own partition function and
    hooks, so the result is the same as for an nn.Linear), for a module they refuse."""
    return distribute_module(
        module, device_mesh, style._partition_linear_fn,
        functools.partial(style._prepare_input_fn, style.input_layouts,
                          style.desired_input_layouts),
        functools.partial(style._prepare_output_fn, style.output_layouts,
                          style.use_local_output),
    )


class ColwiseParallel(_style.ColwiseParallel):
    """``torch.distributed.tensor.parallel.ColwiseParallel`` that also accepts a ``LinearGELU``
    (weight and bias Shard(0), input made Replicate, output Shard(-1)), so the fused kernel runs on
    each rank's columns. Same arguments; any other module is handed to PyTorch's style."""

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        if isinstance(module, LinearGELU):
            return _distribute(self, module, device_mesh)
        return super()._apply(module, device_mesh)


class RowwiseParallel(_style.RowwiseParallel):
    """``torch.distributed.tensor.parallel.RowwiseParallel`` that also accepts a ``LinearGELU``
    (weight Shard(1), bias Replicate). Its pre-activation is then a partial sum, which the fused
    kernel cannot take the GELU of: it runs unfused, with an ``UnfusedFallbackWarning``. Use it
    for a LinearGELU only where a plan must; linear2 (an nn.Linear) is the usual row-parallel one."""

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        if isinstance(module, LinearGELU):
            self.desired_input_layouts = (Shard(-1),)  # as PyTorch's style sets for nn.Linear
            return _distribute(self, module, device_mesh)
        return super()._apply(module, device_mesh)


# ---- recognising the hooks a parallel style installed (for patch) -----------------------------

# The functions PyTorch's styles hand to distribute_module as input_fn / output_fn (our styles
# hand the same ones).
_STYLE_FUNCTIONS = {
    _style.ColwiseParallel._prepare_input_fn: "colwise",
    _style.ColwiseParallel._prepare_output_fn: "colwise",
    _style.RowwiseParallel._prepare_input_fn: "rowwise",
    _style.RowwiseParallel._prepare_output_fn: "rowwise",
    _style.SequenceParallel._prepare_input_fn: "sequence",
    _style.SequenceParallel._prepare_output_fn: "sequence",
}


def _hook_style(hook: object) -> str | None:
    """The style whose input/output function ``hook`` applies: the function itself (a partial of
    it), or distribute_module's wrapper around it (a closure holding that partial)."""
    candidates = [hook]
    if getattr(hook, "__qualname__", "").startswith("distribute_module."):
        candidates += [cell.cell_contents for cell in getattr(hook, "__closure__", None) or ()]
    for fn in candidates:
        if isinstance(fn, functools.partial) and fn.func in _STYLE_FUNCTIONS:
            return _STYLE_FUNCTIONS[fn.func]
    return None


def tp_style(module: nn.Module) -> str | None:
    """``"colwise"``, ``"rowwise"`` or ``"sequence"`` when ``module``'s hooks are exactly the
    input and output hooks one PyTorch tensor-parallel style installed on it; None when it has
    any other hook (a user's, a backward hook, a hook taking kwargs), or none."""
    pre, post = module._forward_pre_hooks, module._forward_hooks
    if module._backward_hooks or module._backward_pre_hooks or len(pre) != 1 or len(post) != 1:
        return None
    special = (module._forward_pre_hooks_with_kwargs, module._forward_hooks_with_kwargs,
               getattr(module, "_forward_hooks_always_called", {}))
    if any(key in table for table in special for key in (*pre, *post)):
        return None
    styles = {_hook_style(hook) for hook in (*pre.values(), *post.values())}
    return styles.pop() if len(styles) == 1 and None not in styles else None


def copy_tp_hooks(source: nn.Module, target: nn.Module) -> None:
    """Register ``source``'s style hooks (checked by ``tp_style``) on ``target``, in order."""
    for hook in source._forward_pre_hooks.values():
        target.register_forward_pre_hook(hook)
    for hook in source._forward_hooks.values():
        target.register_forward_hook(hook)
    setattr(target, "_distribute_module_applied", True)  # noqa: B010 (as distribute_module marks)
