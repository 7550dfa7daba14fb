"""Tensor parallel: the styles that lay our modules' parameters out as DTensors, so the fused
kernels run on each rank's shards (``_dtensor.py`` runs them; ``_dtensor_rules.py`` holds the
custom ops' sharding rules). Imported only by a user (``import triton_gelu`` never imports
``torch.distributed``).

``ColwiseParallel`` / ``RowwiseParallel`` here are PyTorch's styles that also accept a
``LinearGELU`` (and ``ColwiseParallel`` a ``GeGLU``: both projections Shard(0)), with the same
parameter sharding and input/output hooks. ``LinearGELU`` does not subclass ``nn.Linear`` on
purpose: tools that find Linears by ``isinstance`` (LoRA adapters, quantizers swapping Linears)
would silently compute a different function on a Linear that applies GELU.
``FeedForwardParallel`` parallelizes a whole block (``FeedForward``, ``GatedFeedForward``, and
patch's ``FusedFeedForward`` and ``GatedGELUBlock``): first projection(s) column-parallel, last
row-parallel, and the hooks on the block itself. What the kernels cannot serve runs unfused with
an ``UnfusedFallbackWarning``; ``fusable_layout`` says which layouts they serve, and
``tp_style`` / ``tp_block_style`` how PyTorch's own styles parallelized a model's Linears (which
``patch()`` fuses, moving their hooks).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import style as _style
from torch.distributed.tensor.parallel.style import ParallelStyle
from torch.distributed.tensor.placement_types import Placement

from ._dtensor import fusable_layout
from ._runtime import UnfusedFallbackWarning
from .modules import FeedForward, GatedFeedForward, GeGLU, LinearGELU
from .patch.ffn import FusedFeedForward
from .patch.gated import GatedGELUBlock
from .patch.tp_hooks import tp_block_style, tp_style

__all__ = [
    "ColwiseParallel", "RowwiseParallel", "FeedForwardParallel", "UnfusedFallbackWarning",
    "tp_style", "tp_block_style", "fusable_layout",
]


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
