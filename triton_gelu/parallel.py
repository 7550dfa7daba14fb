"""Tensor parallel (DTensor): the fused kernels run on each rank's local shards, through PyTorch's
own machinery.

Imported on first need (a DTensor reaching ``functional.py``, ``patch()`` meeting a parallelized
Linear, or a user importing the styles below): ``import triton_gelu`` never imports
``torch.distributed``.

**One projection** (``gelu``, ``linear_gelu``, ``geglu``): each custom op has a DTensor sharding
rule (``_dtensor_rules.py``): column split (W, b Shard(0), x Replicate), row split (x Shard on a
leading dimension: batch, or sequence as SequenceParallel lays it out), or Replicate; DTensor
runs the op on the local shards and places the outputs.

**A block** (``feed_forward``'s FFN block, ``gated_feed_forward``'s gated block: first
projection(s), then a last projection) runs whole on each rank's shards (``run_block``): with the
first projection(s) column-parallel and the last row-parallel (tensor parallel), on the rows, or
replicated. The tensor-parallel layout takes two things a sharding rule cannot give, so this
module calls the block on the local tensors itself (``DTensor.to_local`` with the gradients'
placements, ``DTensor.from_local`` for the output; both differentiable):

- dropout draws the single-process mask: the rank's hidden columns are columns
  ``col_offset`` .. of the whole hidden layer, and the kernels key the mask on that position;
- the last bias is added once: y is the Partial sum of the ranks' outputs, so only the rank at
  coordinate 0 of the tensor-parallel mesh dimensions adds it (the others add zeros whose
  gradient is the bias's), and every rank's bias gradient is the whole, Replicate, sum of dy.

Its output is Partial (DTensor reduces it where the plan says: ``FeedForwardParallel``'s output
hook, no hand-written all-reduce); the input's gradient is Partial too, reduced by the plan's
input hook.

**What the kernels cannot serve** falls back to the unfused ops on the DTensors, with an
``UnfusedFallbackWarning`` once per layout: a row-parallel linear1 (GELU of a partial sum), a
Partial x, W split on its columns with x on its rows, a block whose projections are split
otherwise, or dropout in a block split on its rows (the mask would be keyed on each rank's local
rows). DTensor then inserts the communication, as for ``nn.Linear`` + ``nn.GELU``: never a wrong
result.

**Plans.** ``ColwiseParallel`` / ``RowwiseParallel`` here are PyTorch's styles that also accept a
``LinearGELU`` (and ``ColwiseParallel`` a ``GeGLU``: both projections Shard(0)), with the same
parameter sharding and input/output hooks. ``LinearGELU`` does not subclass ``nn.Linear`` on
purpose: tools that find Linears by ``isinstance`` (LoRA adapters, quantizers swapping Linears)
would silently compute a different function on a Linear that applies GELU.
``FeedForwardParallel`` parallelizes a whole block (``FeedForward``, ``GatedFeedForward``, and
patch's ``FusedFeedForward`` and ``GatedGELUBlock``): first projection(s) column-parallel, last
row-parallel, and the hooks on the block itself.

**Patching a parallelized model.** ``tp_style(module)`` recognises the hooks a PyTorch style
installed (through ``distribute_module``), so ``patch()`` can fuse a column-parallel Linear and
carry its hooks over to the fused module, and ``tp_block_style`` a whole block parallelized with
PyTorch's styles on its Linears (column then row, or sequence-parallel), whose first input hook and
last output hook ``move_tp_block_hooks`` moves onto the fused block; user hooks are still refused.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import (
    DTensor, Replicate, Shard, distribute_module, distribute_tensor,
)
from torch.distributed.tensor.parallel import style as _style
from torch.distributed.tensor.parallel.style import ParallelStyle
from torch.distributed.tensor.placement_types import Placement

from . import _dtensor_rules as rules
from .activations import torch_activation
from . import ops
from .modules import GeGLU, LinearGELU

__all__ = [
    "ColwiseParallel", "RowwiseParallel", "FeedForwardParallel", "UnfusedFallbackWarning",
    "tp_style", "tp_block_style", "fusable_layout",
]

Tensor = torch.Tensor
Projection = tuple[DTensor, DTensor | None]  # (weight, bias)


# ---- the fallback -----------------------------------------------------------------------------


class UnfusedFallbackWarning(UserWarning):
    """Given once per layout when DTensor operands are laid out in a way the fused kernels cannot
    serve, and the unfused PyTorch ops (with DTensor's own communication) run instead."""


_warned_layouts: set[str] = set()


def _warn_unfused(what: str, layout: str, why: str, fix: str) -> None:
    if layout in _warned_layouts:
        return
    _warned_layouts.add(layout)
    warnings.warn(
        f"triton_gelu: the fused {what} cannot serve DTensors laid out as {layout} ({why}); "
        f"running the unfused PyTorch ops, with DTensor's own communication. {fix}",
        UnfusedFallbackWarning, stacklevel=5,
    )


def _placements(**named: DTensor | None) -> str:
    return ", ".join(f"{name} {None if t is None else tuple(t.placements)}"
                     for name, t in named.items())


def _require_dtensors(**named: Tensor | None) -> None:
    plain = [name for name, t in named.items() if t is not None and not isinstance(t, DTensor)]
    if plain:
        dist = [name for name, t in named.items() if isinstance(t, DTensor)]
        raise TypeError(
            f"{', '.join(dist)} {'is a DTensor' if len(dist) == 1 else 'are DTensors'} but "
            f"{', '.join(plain)} {'is' if len(plain) == 1 else 'are'} a plain torch.Tensor: make "
            "every operand a DTensor (DTensor.from_local, or a parallel style's input hook)"
        )


# ---- one projection: the custom ops' sharding rules run them on the shards --------------------


def fusable_layout(x: DTensor, weight: DTensor, bias: DTensor | None,
                   *more: Projection) -> bool:
    """Whether the fused projection ops serve these DTensors as laid out, with no communication:
    on every mesh dimension one layout (``_dtensor_rules.linear_layouts``) fits x and every
    (weight, bias), the first and each of ``more`` (GeGLU's up projection: split like the gate)."""
    projections = [(weight, bias), *more]
    for i, px in enumerate(x.placements):
        if not any(px == lay.x and all(
                w.placements[i] == lay.weight and (b is None or b.placements[i] == lay.bias)
                for w, b in projections) for lay in rules.linear_layouts(x.ndim)):
            return False
    return True


# torch 2.11's DTensor refuses to flatten leading dimensions when one after the first is sharded
# (its view rule will not redistribute), and F.linear of a 3-D x flattens (batch, sequence): there
# F.linear of a sequence-sharded x raises; torch 2.12 runs it.
_LINEAR_FLATTENS_SHARDED = torch.__version__ >= "2.12"


def linear(x: DTensor, weight: DTensor, bias: DTensor | None) -> Tensor:
    """``F.linear`` of DTensors, for the unfused fallbacks. On torch 2.11, x sharded on one leading
    dimension other than the first has that dimension swapped with the first for the matmul and
    back (the same result and placements, with no communication)."""
    if _LINEAR_FLATTENS_SHARDED:
        return F.linear(x, weight, bias)
    sharded = {p.dim % x.ndim for p in x.placements if isinstance(p, Shard)}
    middle = [d for d in sharded if 0 < d < x.ndim - 1]
    if len(middle) != 1 or 0 in sharded:
        return F.linear(x, weight, bias)
    return F.linear(x.transpose(0, middle[0]), weight, bias).transpose(0, middle[0])


def gelu(x: DTensor, activation: str) -> Tensor:
    """``functional.gelu`` of a DTensor: the custom op on the local shard."""
    return ops.gelu_fwd(x, activation)


def linear_gelu(
    x: DTensor, weight: DTensor, bias: DTensor | None, activation: str, recompute: bool
) -> Tensor:
    """``functional.linear_gelu`` of DTensors (already validated and cast for autocast): the custom
    ops on the local shards where their layout allows, else the unfused ops, with a warning."""
    _require_dtensors(x=x, weight=weight, bias=bias)
    if fusable_layout(x, weight, bias):
        return ops.linear_gelu(x, weight, bias, activation, recompute)
    _warn_unfused(
        "Linear+GELU kernels", _placements(x=x, weight=weight, bias=bias),
        "GELU needs the whole pre-activation, not a partial sum or a mismatched split",
        "Make linear1 column-parallel (triton_gelu.parallel.ColwiseParallel) to fuse.",
    )
    return torch_activation(linear(x, weight, bias), activation)


def geglu(
    x: DTensor, w_gate: DTensor, w_up: DTensor, b_gate: DTensor | None, b_up: DTensor | None,
    activation: str, recompute: bool,
) -> Tensor:
    """``functional.geglu`` of DTensors (validated, autocast): the GeGLU ops on the local shards
    where both projections are split alike in a layout they serve, else the unfused ops."""
    _require_dtensors(x=x, w_gate=w_gate, w_up=w_up, b_gate=b_gate, b_up=b_up)
    if fusable_layout(x, w_gate, b_gate, (w_up, b_up)):
        return ops.geglu(x, w_gate, w_up, b_gate, b_up, activation, recompute)
    _warn_unfused(
        "GeGLU kernel", _placements(x=x, w_gate=w_gate, w_up=w_up, b_gate=b_gate, b_up=b_up),
        "gelu(g) * u needs whole g and u, and the gate and up columns of one rank must match",
        "Make gate_proj and up_proj both column-parallel (Shard(0)) to fuse.",
    )
    gate = torch_activation(linear(x, w_gate, b_gate), activation)
    return gate * linear(x, w_up, b_up)


# ---- a block: run whole on each rank's local tensors ------------------------------------------


class _ZerosWithBiasGrad(torch.autograd.Function):
    """The last bias on a rank that must not add it (y is a Partial sum: one rank adds it):
    zeros forward; backward, the bias's whole gradient sum(dy), as on the rank that adds it, so
    every rank's bias gradient is the same Replicate tensor."""

    @staticmethod
    def forward(ctx, bias: Tensor) -> Tensor:
        return torch.zeros_like(bias)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


def _block_layouts(x: DTensor, first: Sequence[Projection], last: Projection,
                   dropout: bool) -> list[rules.BlockLayout] | None:
    """The block's layout on each mesh dimension (``_dtensor_rules.BlockLayout``), or None when
    some dimension has none, the operands are on different meshes, or dropout meets a row
    split (its mask would be keyed on each rank's local rows)."""
    params = [t for w, b in (*first, last) for t in (w, b) if t is not None]
    if any(t.device_mesh != x.device_mesh for t in params):
        return None
    layouts = []
    for i, px in enumerate(x.placements):
        def fits(lay: rules.BlockLayout) -> bool:
            return px == lay.first.x and all(
                (w.placements[i], None if b is None else b.placements[i]) in
                ((lay.first.weight, lay.first.bias), (lay.first.weight, None))
                for w, b in first
            ) and last[0].placements[i] == lay.last.weight and (
                last[1] is None or last[1].placements[i] == lay.last.bias)
        layout = next((lay for lay in rules.block_layouts(x.ndim) if fits(lay)), None)
        if layout is None or (dropout and layout.first.x != Replicate()):
            return None
        layouts.append(layout)
    return layouts


def chunk_start(size: int, splits: Sequence[tuple[int, int]]) -> int:
    """Where one rank's chunk of ``size`` elements starts, split on each (num_chunks, rank) in
    turn as DTensor splits a dimension (as ``torch.chunk``: ceil(n / k) elements per rank, the
    last ranks' chunks short or empty)."""
    start = 0
    for num_chunks, rank in splits:
        chunk = -(-size // num_chunks)
        offset = min(chunk * rank, size)
        size, start = min(size - offset, chunk), start + offset
    return start


def _shard_start(t: DTensor, dim: int) -> int:
    """Where this rank's shard of ``t`` starts on dimension ``dim`` of the whole tensor.
    DTensor's own ``compute_local_shape_and_global_offset`` does not trace under torch 2.11's
    torch.compile (Dynamo cannot call ``Shard._local_shard_size_and_offset``); this does."""
    mesh = t.device_mesh
    coordinate = mesh.get_coordinate() or [0] * mesh.ndim
    return chunk_start(t.shape[dim], [
        (mesh.size(i), coordinate[i]) for i, placement in enumerate(t.placements)
        if isinstance(placement, Shard) and placement.dim == dim
    ])


def _local(t: DTensor | None, grad_placements: list) -> Tensor | None:
    return None if t is None else t.to_local(grad_placements=grad_placements)


BlockCall = Callable[[Tensor, list, Tensor, "Tensor | None", int, int], Tensor]


def run_block(
    x: DTensor, first: Sequence[Projection], last: Projection, dropout: bool, fused: BlockCall,
    unfused: Callable[[], Tensor], what: str,
) -> Tensor:
    """Run a block first projection(s) -> (elementwise) -> last projection on DTensors: whole, on
    each rank's local tensors where its layout allows (see the module docstring), else
    ``unfused()`` (the composition of ops DTensor can shard) with a warning.

    ``first``: the first projections' (weight, bias), split alike (the FFN's linear1; the gated
    block's gate and up); ``last``: the last projection's. ``fused(x, [(w, b), ...], w_last,
    b_last, col_offset, n_cols)`` computes the block on plain local tensors, the rank's hidden
    columns being columns ``col_offset`` .. of ``n_cols``; ``dropout``: whether it drops any.
    """
    _require_dtensors(x=x, **{f"{kind}{i}": t for i, (w, b) in enumerate((*first, last))
                              for kind, t in (("weight", w), ("bias", b))})
    layouts = _block_layouts(x, first, last, dropout)
    if layouts is None:
        named = {"x": x, **{f"first{i}": w for i, (w, _) in enumerate(first)}, "last": last[0]}
        _warn_unfused(
            what, _placements(**named) + f", dropout {dropout}",
            "it runs with its first projections column-parallel and its last row-parallel, on "
            "the rows (without dropout), or replicated",
            "Parallelize the block with triton_gelu.parallel.FeedForwardParallel to fuse it.",
        )
        return unfused()
    # Local tensors whose gradients come back with the placements the layout gives them.
    x_local = x.to_local(grad_placements=[lay.first.dx for lay in layouts])
    dweight, dbias = [lay.first.dweight for lay in layouts], [lay.first.dbias for lay in layouts]
    first_local = [(_local(w, dweight), _local(b, dbias)) for w, b in first]
    w_last = last[0].to_local(grad_placements=[lay.last.dweight for lay in layouts])
    b_last = _local(last[1], [lay.last.dbias for lay in layouts])
    mesh = x.device_mesh
    coordinate = mesh.get_coordinate() or ()
    if b_last is not None and any(lay.tensor_parallel and c != 0
                                  for lay, c in zip(layouts, coordinate)):
        b_last = _ZerosWithBiasGrad.apply(b_last)
    w_first = first[0][0]
    offset = _shard_start(w_first, 0)
    y_local = fused(x_local, first_local, w_last, b_last, offset, w_first.shape[0])
    shape = (*x.shape[:-1], last[0].shape[0])
    return DTensor.from_local(
        y_local, mesh, [lay.last.y for lay in layouts], run_check=False,
        shape=torch.Size(shape), stride=torch.empty(shape, device="meta").stride(),
    )


# ---- parallel styles that accept our modules --------------------------------------------------


def _distribute(
    style: _style.ColwiseParallel | _style.RowwiseParallel, module: nn.Module, device_mesh,
    partition_fn=None,
) -> nn.Module:
    """What PyTorch's Colwise/RowwiseParallel do to an nn.Linear (their own partition function and
    hooks, so the result is the same as for an nn.Linear), for a module they refuse."""
    return distribute_module(
        module, device_mesh, partition_fn or style._partition_linear_fn,
        functools.partial(style._prepare_input_fn, style.input_layouts,
                          style.desired_input_layouts),
        functools.partial(style._prepare_output_fn, style.output_layouts,
                          style.use_local_output),
    )


def _shard_parameters(style: ParallelStyle, module: nn.Module, weight_dim: int, device_mesh,
                      bias: Shard | Replicate | None = None) -> None:
    """Replace ``module``'s weight by its DTensor split on ``weight_dim`` and its bias by its
    DTensor split as ``bias`` (default: Shard(0), as the weight's output features)."""
    for name, placement in (("weight", Shard(weight_dim)), ("bias", bias or Shard(0))):
        param = module._parameters.get(name)
        if param is not None and not isinstance(param, DTensor):
            module.register_parameter(name, nn.Parameter(
                distribute_tensor(param, device_mesh, [placement],
                                  src_data_rank=style.src_data_rank),
                requires_grad=param.requires_grad))


class ColwiseParallel(_style.ColwiseParallel):
    """``torch.distributed.tensor.parallel.ColwiseParallel`` that also accepts a ``LinearGELU``
    (weight and bias Shard(0), input made Replicate, output Shard(-1)) and a ``GeGLU`` (both
    projections so), so the fused kernels run on each rank's columns. Same arguments; any other
    module is handed to PyTorch's style."""

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        if isinstance(module, LinearGELU):
            return _distribute(self, module, device_mesh)
        if isinstance(module, GeGLU):
            def partition(name, submodule, mesh):
                if submodule is module:
                    for linear in (module.gate_proj, module.up_proj):
                        _shard_parameters(self, linear, 0, mesh)
            return _distribute(self, module, device_mesh, partition)
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


class _Held(NamedTuple):
    """A projection of a block: the module holding its weight and bias, and whether the weight
    is stored (in, out) (GPT-2's Conv1D, kept so by patch's FusedFeedForward)."""

    module: nn.Module
    transposed: bool = False


def _block_projections(block: nn.Module) -> tuple[list[_Held], _Held]:
    """The first projection(s) and the last one of a block ``FeedForwardParallel`` accepts."""
    from .modules import FeedForward, GatedFeedForward
    from .patch.ffn import FusedFeedForward
    from .patch.gated import GatedGELUBlock

    if isinstance(block, FeedForward):
        return [_Held(block.linear1)], _Held(block.linear2)
    if isinstance(block, FusedFeedForward):
        return [_Held(block, block.transposed)], _Held(block.output, block.output.transposed)
    if isinstance(block, GatedFeedForward):
        return [_Held(block.gate_proj), _Held(block.up_proj)], _Held(block.down_proj)
    if isinstance(block, GatedGELUBlock):
        gate, up, down = block.projections()
        return [_Held(gate), _Held(up)], _Held(down)
    raise NotImplementedError(
        f"FeedForwardParallel parallelizes a whole FFN block (triton_gelu.FeedForward, "
        f"GatedFeedForward, or a block patch() fused: FusedFeedForward, GatedGELUBlock), got "
        f"{type(block).__name__}; use ColwiseParallel / RowwiseParallel on single Linears"
    )


class FeedForwardParallel(ParallelStyle):
    """Tensor parallel for a whole FFN block, fused: its first projection(s) column-parallel
    (weights and biases Shard(0): ``linear1``; ``gate_proj`` and ``up_proj``), its last
    row-parallel (weight Shard(1), bias Replicate, added once: ``linear2``, ``down_proj``), as
    ``ColwiseParallel`` on the first and ``RowwiseParallel`` on the last would, and the block runs
    as one fused op on each rank's shards (``run_block``), dropout included (the single-process
    mask).

    Accepts ``FeedForward``, ``GatedFeedForward``, and the blocks ``patch()`` fuses:
    ``FusedFeedForward`` (name the slot of the block's first Linear in the plan) and
    ``GatedGELUBlock`` (Gemma's MLP, T5's DenseGatedActDense). The hooks go on the block:
    ``input_layouts`` (default Replicate; ``Shard(1)`` for a sequence-sharded input, all-gathered
    first) and ``output_layouts`` (default Replicate: the output's partial sums all-reduced;
    ``Shard(1)``: reduce-scattered onto the sequence dimension), as those of PyTorch's two styles.
    """

    def __init__(self, *, input_layouts: Placement | None = None,
                 output_layouts: Placement | None = None, use_local_output: bool = True) -> None:
        super().__init__()
        self.input_layouts = (input_layouts or Replicate(),)
        self.output_layouts = (output_layouts or Replicate(),)
        self.desired_input_layouts = (Replicate(),)
        self.use_local_output = use_local_output

    def _partition(self, name: str, module: nn.Module, device_mesh) -> None:
        if name:  # only the block itself: it knows its projections
            return
        first, last = _block_projections(module)
        for held in first:  # column-parallel: output features, stored (in, out) by a Conv1D
            _shard_parameters(self, held.module, 1 if held.transposed else 0, device_mesh)
        _shard_parameters(self, last.module, 0 if last.transposed else 1, device_mesh,
                          bias=Replicate())

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        _block_projections(module)  # refuse what is not a block before touching anything
        return distribute_module(
            module, device_mesh, self._partition,
            functools.partial(_style.ColwiseParallel._prepare_input_fn, self.input_layouts,
                              self.desired_input_layouts),
            functools.partial(_style.RowwiseParallel._prepare_output_fn, self.output_layouts,
                              self.use_local_output),
        )

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(input_layouts={self.input_layouts}, output_layouts="
                f"{self.output_layouts}, use_local_output={self.use_local_output})")


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


def _style_partial(hook: object) -> functools.partial | None:
    """The style function ``hook`` applies, with its layouts bound: the function itself (a
    partial of it), or distribute_module's wrapper around it (a closure holding that partial)."""
    candidates = [hook]
    if getattr(hook, "__qualname__", "").startswith("distribute_module."):
        candidates += [cell.cell_contents for cell in getattr(hook, "__closure__", None) or ()]
    for fn in candidates:
        if isinstance(fn, functools.partial) and fn.func in _STYLE_FUNCTIONS:
            return fn
    return None


def _style_hooks(module: nn.Module) -> tuple[functools.partial, functools.partial] | None:
    """The (input, output) style functions of ``module``'s hooks when they are exactly the two
    hooks one PyTorch tensor-parallel style installed on it; None when it has any other hook
    (a user's, a backward hook, a hook taking kwargs), or none."""
    pre, post = module._forward_pre_hooks, module._forward_hooks
    if module._backward_hooks or module._backward_pre_hooks or len(pre) != 1 or len(post) != 1:
        return None
    special = (module._forward_pre_hooks_with_kwargs, module._forward_hooks_with_kwargs,
               getattr(module, "_forward_hooks_always_called", {}))
    if any(key in table for table in special for key in (*pre, *post)):
        return None
    fns = (_style_partial(next(iter(pre.values()))), _style_partial(next(iter(post.values()))))
    if fns[0] is None or fns[1] is None or \
            _STYLE_FUNCTIONS[fns[0].func] != _STYLE_FUNCTIONS[fns[1].func]:
        return None
    return fns[0], fns[1]


def tp_style(module: nn.Module) -> str | None:
    """``"colwise"``, ``"rowwise"`` or ``"sequence"`` when ``module``'s hooks are exactly the
    input and output hooks one PyTorch tensor-parallel style installed on it; None when it has
    any other hook (a user's, a backward hook, a hook taking kwargs), or none."""
    fns = _style_hooks(module)
    return None if fns is None else _STYLE_FUNCTIONS[fns[0].func]


def copy_tp_hooks(source: nn.Module, target: nn.Module) -> None:
    """Register ``source``'s style hooks (checked by ``tp_style``) on ``target``, in order."""
    for hook in source._forward_pre_hooks.values():
        target.register_forward_pre_hook(hook)
    for hook in source._forward_hooks.values():
        target.register_forward_hook(hook)
    setattr(target, "_distribute_module_applied", True)  # noqa: B010 (as distribute_module marks)


def _mesh_of(module: nn.Module) -> object:
    meshes = {p.device_mesh for p in module.parameters(recurse=False) if isinstance(p, DTensor)}
    return meshes.pop() if len(meshes) == 1 else None


def tp_block_style(first: Sequence[nn.Module], last: nn.Module) -> str | None:
    """How PyTorch's styles parallelized a block's Linears, when it is a way the fused block
    serves: ``"tensor"`` when each of ``first`` is column-parallel (output Shard(-1), all taking
    the same input layouts) and ``last`` row-parallel (input Shard(-1)): between them the hidden
    activation is each rank's columns, which the fused block keeps; ``"sequence"`` when all are
    sequence-parallel on one sequence dimension. All on one mesh; None otherwise."""
    found = [_style_hooks(m) for m in (*first, last)]
    hooks = [h for h in found if h is not None]
    if len(hooks) != len(found) or len({_mesh_of(m) for m in (*first, last)}) != 1 \
            or _mesh_of(last) is None:
        return None
    kinds = [_STYLE_FUNCTIONS[h[0].func] for h in hooks]
    first_inputs = {h[0].args for h in hooks[:-1]}
    if len(first_inputs) != 1:
        return None
    if kinds == ["colwise"] * len(first) + ["rowwise"]:
        hidden_out = {h[1].args[0] for h in hooks[:-1]}  # the first ones' output layouts
        return "tensor" if hidden_out == {(Shard(-1),)} and \
            hooks[-1][0].args[0] == (Shard(-1),) else None  # the last one's input layouts
    if kinds == ["sequence"] * (len(first) + 1):
        return "sequence" if len({h[0].args for h in hooks}) == 1 else None
    return None


def move_tp_block_hooks(first: Sequence[nn.Module], last: nn.Module, block: nn.Module) -> None:
    """For a block ``tp_block_style`` accepts: register the input hook of ``first[0]`` and the
    output hook of ``last`` on ``block`` (the hidden activation's hooks between them are no-ops
    for the fused block, which keeps each rank's hidden columns or rows), and remove the style
    hooks from every one of them (they stay the block's children, applied by it)."""
    block.register_forward_pre_hook(next(iter(first[0]._forward_pre_hooks.values())))
    block.register_forward_hook(next(iter(last._forward_hooks.values())))
    for module in (*first, last):
        module._forward_pre_hooks.clear()
        module._forward_hooks.clear()
    setattr(block, "_distribute_module_applied", True)  # noqa: B010 (as distribute_module marks)
