"""The layouts the custom ops of ``ops/`` serve on DTensors, and the registration of their
sharding rules.

Imported by ``_dtensor.py`` (so never by ``import triton_gelu``). Each custom op has a rule
(``torch.distributed.tensor.experimental.register_sharding``), declared in its op's module
(``sharding_rules(layouts)``, given this module; ``_declared.py`` collects them) and
registered here: DTensor calls the op on
the local shards (so our kernels run on every rank), states the output placements, and
redistributes inputs itself where they match no rule. DTensor refuses an op it has no rule for.

**One projection** y = act(x @ W^T + b) (``linear_gelu``; GeGLU's gate and up projections, whose
two weights, and biases, must be split alike: a rule never pairs a split W_gate with a whole
W_up), on each mesh dimension (``LinearLayout``):

- column split, x Replicate, W and b Shard(0): y Shard(-1), no communication (GELU and the gate
  are elementwise, so they commute with a split of the columns); backward dW, db Shard(0), and
  dx = dz @ W is a sum over all columns: Partial, reduced where the plan says;
- row split, x Shard(d) on a leading dimension (batch or sequence: SequenceParallel layouts),
  W and b Replicate: y Shard(d), no communication; backward dx Shard(d), and dW = dz^T x, db sum
  over all rows: Partial;
- everything Replicate: Replicate.

GELU itself: y and dx are split like x (any Shard, or Replicate). A Partial x (a sum not yet
reduced) is reduced first by DTensor: gelu of a partial sum is not the sum of the gelus.

**A block** (the FFN block, the gated block: first projection(s), then a last projection),
``BlockLayout``: the first projection's layout and the last one's, the hidden activation between
them split as the first leaves it and the second takes it. Column-then-row (tensor parallel: the
last projection's W Shard(1), its input Shard(-1), its output y Partial), rows, or replicated.
The blocks' ops (``ffn_fwd``, ``ffn_bwd``, ``gated_ffn_fwd``) have rules for the replicated and
row layouts only, and the row layout only without dropout: the tensor-parallel layout needs
arguments that differ per rank (where the rank's hidden columns sit, for the dropout mask; the
last bias added on one rank only), which a rule cannot give. ``_dtensor.py`` runs that layout by
calling the ops on the local tensors itself.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import NamedTuple

import torch
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor.experimental import register_sharding
from torch.distributed.tensor.placement_types import Placement

from . import _declared as declared

R = Replicate()


class LinearLayout(NamedTuple):
    """One way to run y = act(x @ W^T + b) on one mesh dimension with no communication: the
    placements of the forward's operands and result, and of the backward's gradients."""

    x: Placement
    weight: Placement
    bias: Placement
    y: Placement  # also the pre-activation (or g and u), and dy
    dx: Placement
    dweight: Placement
    dbias: Placement


REPLICATED = LinearLayout(R, R, R, R, R, R, R)


def column_layout(ndim: int) -> LinearLayout:
    """Rank i holds W's rows (output features) i: y[:, cols_i] = act(x W_i^T + b_i).
    dx = dz @ W = sum_i dz[:, cols_i] @ W_i: a partial sum on each rank."""
    return LinearLayout(x=R, weight=Shard(0), bias=Shard(0), y=Shard(ndim - 1),
                        dx=Partial(), dweight=Shard(0), dbias=Shard(0))


def row_layout(dim: int) -> LinearLayout:
    """Rank i holds rows i of x (dimension ``dim``, a leading one) and computes rows i of y.
    dW = dz^T x and db = sum over rows of dz: partial sums on each rank."""
    return LinearLayout(x=Shard(dim), weight=R, bias=R, y=Shard(dim),
                        dx=Shard(dim), dweight=Partial(), dbias=Partial())


def linear_layouts(ndim: int) -> list[LinearLayout]:
    """The layouts the fused projection ops serve, for x of ``ndim`` dimensions (..., K)."""
    return [REPLICATED, column_layout(ndim), *(row_layout(d) for d in range(ndim - 1))]


class BlockLayout(NamedTuple):
    """One way to run a block first -> (elementwise) -> last on one mesh dimension: the first
    projection's layout and the last's, whose x is the hidden activation."""

    first: LinearLayout
    last: LinearLayout
    tensor_parallel: bool  # column then row: y is a Partial sum of the ranks' outputs


def block_layouts(ndim: int) -> list[BlockLayout]:
    """The layouts a block serves with no communication, for x of ``ndim`` dimensions."""
    last = ndim - 1
    # Row-parallel last projection: rank i holds the hidden columns i and W_last's columns i;
    # y = sum_i h_i W_i^T, a partial sum; b_last is added once (_dtensor.py); dh = dy @ W_i.
    row_parallel = LinearLayout(x=Shard(last), weight=Shard(1), bias=R, y=Partial(),
                                dx=Shard(last), dweight=Shard(1), dbias=R)
    return [BlockLayout(REPLICATED, REPLICATED, False),
            BlockLayout(column_layout(ndim), row_parallel, True),
            *(BlockLayout(row_layout(d), row_layout(d), False) for d in range(last))]


def elementwise_layouts(ndim: int) -> list[Placement]:
    """GELU is elementwise: y and dx are split as x is (any Shard, or Replicate)."""
    return [R, *(Shard(d) for d in range(ndim))]


def if_present(tensor: object, placement: Placement) -> Placement | None:
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
    """``register_sharding(op)``, with the cache keyed on op's flags too (``_key_on_flags``)."""
    def register(rule):
        register_sharding(op)(rule)
        _key_on_flags(op)
        return rule
    return register


def wanted(placement: Placement, wanted: bool) -> Placement:
    """An output that was not asked for is an empty tensor: Replicate."""
    return placement if wanted else R


def rule_block_layouts(ndim: int, dropout: bool) -> list[BlockLayout]:
    """The block layouts a rule may serve: not tensor parallel (see the module docstring), and
    with dropout not split on the rows either (each rank would draw the mask of rows 0.. of its
    own shard, not of its rows' positions in the whole batch)."""
    return [lay for lay in block_layouts(ndim)
            if not lay.tensor_parallel and not (dropout and lay.first.x != R)]


# ---- every op's rules, from its declaration --------------------------------------------------
# The custom ops are registered by then: importing any module of the package first imports
# triton_gelu, whose functions import their ops (``ops/``).

def _register_every_op() -> None:
    this = sys.modules[__name__]
    for rules in declared.sharding_rules:
        for op, rule in rules(this).items():
            _sharding_rule(op)(rule)


_register_every_op()
