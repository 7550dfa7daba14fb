"""DTensor execution: the public functions on DTensor operands (tensor parallel), run by the
fused kernels on each rank's local shards through PyTorch's own machinery. Each op's public
function imports it on the first DTensor it meets (so ``import triton_gelu`` never imports
``torch.distributed``);
the public styles that lay parameters out for it are in ``parallel.py``.

**One projection** (``gelu``, ``linear_gelu``, ``geglu``): each custom op has a DTensor sharding
rule (declared in its op's module, registered by ``_dtensor_rules.py``): column split (W, b
Shard(0), x Replicate), row split (x Shard on a leading dimension: batch, or sequence as
SequenceParallel lays it out), or Replicate; DTensor runs the op on the local shards and places
the outputs. Each op's module calls its ops on DTensors where ``fusable_layout`` says a rule
serves them, else the unfused ops (``linear``) with ``warn_unfused``.

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
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Replicate, Shard

from . import _dtensor_rules as rules
from ._runtime import UnfusedFallbackWarning

Tensor = torch.Tensor
Projection = tuple[DTensor, DTensor | None]  # (weight, bias)


# ---- the fallback -----------------------------------------------------------------------------


_warned_layouts: set[str] = set()


def warn_unfused(what: str, layout: str, why: str, fix: str) -> None:
    if layout in _warned_layouts:
        return
    _warned_layouts.add(layout)
    warnings.warn(
        f"triton_gelu: the fused {what} cannot serve DTensors laid out as {layout} ({why}); "
        f"running the unfused PyTorch ops, with DTensor's own communication. {fix}",
        UnfusedFallbackWarning, stacklevel=5,
    )


def placements(**named: DTensor | None) -> str:
    return ", ".join(f"{name} {None if t is None else tuple(t.placements)}"
                     for name, t in named.items())


def require_dtensors(**named: Tensor | None) -> None:
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
    require_dtensors(x=x, **{f"{kind}{i}": t for i, (w, b) in enumerate((*first, last))
                              for kind, t in (("weight", w), ("bias", b))})
    layouts = _block_layouts(x, first, last, dropout)
    if layouts is None:
        named = {"x": x, **{f"first{i}": w for i, (w, _) in enumerate(first)}, "last": last[0]}
        warn_unfused(
            what, placements(**named) + f", dropout {dropout}",
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
