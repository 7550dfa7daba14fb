"""DTensor sharding rules of every custom op of ``ops/``, and the layouts they serve.

Imported by ``_dtensor.py`` (so never by ``import triton_gelu``). Each custom op has a rule
(``torch.distributed.tensor.experimental.register_sharding``): DTensor calls the op on the local
shards (so our kernels run on every rank), states the output placements, and redistributes inputs
itself where they match no rule. DTensor refuses an op it has no rule for.

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
from typing import NamedTuple

import torch
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor.experimental import register_sharding
from torch.distributed.tensor.placement_types import Placement

# The custom ops this module writes rules for are registered by then: importing any module of
# the package first imports triton_gelu, whose functions import their ops (``ops/``).

R = Replicate()
_custom_ops = torch.ops.triton_gelu


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


def _elementwise_layouts(ndim: int) -> list[Placement]:
    """GELU is elementwise: y and dx are split as x is (any Shard, or Replicate)."""
    return [R, *(Shard(d) for d in range(ndim))]


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
    """``register_sharding(op)``, with the cache keyed on op's flags too (``_key_on_flags``)."""
    def register(rule):
        register_sharding(op)(rule)
        _key_on_flags(op)
        return rule
    return register


def _wanted(placement: Placement, wanted: bool) -> Placement:
    """An output that was not asked for is an empty tensor: Replicate."""
    return placement if wanted else R


# ---- GELU and Linear + GELU ---------------------------------------------------------------------


@_sharding_rule(_custom_ops.gelu_fwd.default)
def _gelu_fwd_rule(x, activation):
    return [([p], [p, None]) for p in _elementwise_layouts(x.ndim)]


@_sharding_rule(_custom_ops.gelu_bwd.default)
def _gelu_bwd_rule(dy, x, activation):
    return [([p], [p, p, None]) for p in _elementwise_layouts(x.ndim)]


@_sharding_rule(_custom_ops.linear_gelu_fwd.default)
def _linear_gelu_fwd_rule(x, weight, bias, activation, save_preact):
    # outputs (y, z | empty)
    return [
        ([lay.y, _wanted(lay.y, save_preact)],
         [lay.x, lay.weight, _if_present(bias, lay.bias), None, None])
        for lay in linear_layouts(x.ndim)
    ]


@_sharding_rule(_custom_ops.linear_preact.default)
def _linear_preact_rule(x, weight, bias):
    return [
        ([lay.y], [lay.x, lay.weight, _if_present(bias, lay.bias)])
        for lay in linear_layouts(x.ndim)
    ]


@_sharding_rule(_custom_ops.linear_gelu_bwd.default)
def _linear_gelu_bwd_rule(dy, x, weight, preact, activation, need_dx, need_dw, need_db):
    return [
        ([_wanted(lay.dx, need_dx), _wanted(lay.dweight, need_dw), _wanted(lay.dbias, need_db)],
         [lay.y, lay.x, lay.weight, lay.y, None, None, None, None])
        for lay in linear_layouts(x.ndim)
    ]


# ---- GeGLU: both projections split alike ------------------------------------------------------


@_sharding_rule(_custom_ops.geglu_fwd.default)
def _geglu_fwd_rule(x, w_gate, w_up, b_gate, b_up, activation, save_gate_up):
    # outputs (h, g | empty, u | empty)
    return [
        ([lay.y, _wanted(lay.y, save_gate_up), _wanted(lay.y, save_gate_up)],
         [lay.x, lay.weight, lay.weight, _if_present(b_gate, lay.bias),
          _if_present(b_up, lay.bias), None, None])
        for lay in linear_layouts(x.ndim)
    ]


@_sharding_rule(_custom_ops.geglu_gate_up.default)
def _geglu_gate_up_rule(x, w_gate, w_up, b_gate, b_up, p, activation):
    return [
        ([lay.y, lay.y],
         [lay.x, lay.weight, lay.weight, _if_present(b_gate, lay.bias),
          _if_present(b_up, lay.bias), None, None])
        for lay in linear_layouts(x.ndim)
    ]


@_sharding_rule(_custom_ops.geglu_bwd.default)
def _geglu_bwd_rule(dh, x, w_gate, w_up, gate, up, seed, p, activation, needs, write_h,
                    col_offset=0, n_cols=None):
    # outputs (dx, dW_gate, dW_up, db_gate, db_up, h), each empty unless asked for. With dropout
    # (the gated block's backward) replicated only: a split would key each rank's mask on its
    # local rows or columns (tensor parallel passes the columns' position: _dtensor.py).
    return [
        ([_wanted(placement, wanted) for placement, wanted in zip(
            (lay.dx, lay.dweight, lay.dweight, lay.dbias, lay.dbias, lay.y), (*needs, write_h))],
         [lay.y, lay.x, lay.weight, lay.weight, lay.y, lay.y, _if_present(seed, R), None, None,
          None, None, None, None])
        for lay in linear_layouts(x.ndim) if p == 0.0 or lay == REPLICATED
    ]


# ---- the blocks: replicated, or split on the rows without dropout -----------------------------


def _rule_block_layouts(ndim: int, dropout: bool) -> list[BlockLayout]:
    """The block layouts a rule may serve: not tensor parallel (see the module docstring), and
    with dropout not split on the rows either (each rank would draw the mask of rows 0.. of its
    own shard, not of its rows' positions in the whole batch)."""
    return [lay for lay in block_layouts(ndim)
            if not lay.tensor_parallel and not (dropout and lay.first.x != R)]


@_sharding_rule(_custom_ops.ffn_fwd.default)
def _ffn_fwd_rule(x, w1, b1, w2, b2, seed, p, activation, save_preact, col_offset=0,
                  n_cols=None):
    # outputs (y, z | empty)
    return [
        ([lay.last.y, _wanted(lay.first.y, save_preact)],
         [lay.first.x, lay.first.weight, _if_present(b1, lay.first.bias), lay.last.weight,
          _if_present(b2, lay.last.bias), _if_present(seed, R), None, None, None, None, None])
        for lay in _rule_block_layouts(x.ndim, p > 0.0)
    ]


@_sharding_rule(_custom_ops.ffn_bwd.default)
def _ffn_bwd_rule(dy, x, w1, w2, preact, seed, p, activation, needs, col_offset=0,
                  n_cols=None):
    # outputs (dx, dW1, db1, dW2, db2), each empty unless asked for
    return [
        ([_wanted(placement, wanted) for placement, wanted in zip(
            (lay.first.dx, lay.first.dweight, lay.first.dbias, lay.last.dweight,
             lay.last.dbias), needs)],
         [lay.last.y, lay.first.x, lay.first.weight, lay.last.weight, lay.first.y,
          _if_present(seed, R), None, None, None, None, None])
        for lay in _rule_block_layouts(x.ndim, p > 0.0)
    ]


@_sharding_rule(_custom_ops.gated_ffn_fwd.default)
def _gated_ffn_fwd_rule(x, w_gate, w_up, w_down, b_gate, b_up, b_down, seed, p,
                        activation, save_gate_up, col_offset=0, n_cols=None):
    # outputs (y, g | empty, u | empty)
    return [
        ([lay.last.y, _wanted(lay.first.y, save_gate_up), _wanted(lay.first.y, save_gate_up)],
         [lay.first.x, lay.first.weight, lay.first.weight, lay.last.weight,
          _if_present(b_gate, lay.first.bias), _if_present(b_up, lay.first.bias),
          _if_present(b_down, lay.last.bias), _if_present(seed, R), None, None, None, None,
          None])
        for lay in _rule_block_layouts(x.ndim, p > 0.0)
    ]
