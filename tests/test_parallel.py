"""Tensor parallel (DTensor), FSDP2 and DDP: the fused kernels run on every rank's local shards
and give the single-process unpatched model's outputs and gradients.

Two kinds of test:
- in this process, on a fake 2-rank process group (no communication: rank 0's shards are real
  tensors, collectives do nothing): the sharding rules themselves, the fallback, the styles and
  the hook recognition patch() relies on;
- on spawned CPU ranks over gloo (tests/spawn_ranks.py runs tests/parallel_scenarios.py): whole
  models, tensor parallel in both orders, sequence parallel, DDP, FSDP2 (bf16), torch.compile,
  and TP + FSDP2 on a 2-D mesh. One job per rank count runs all its scenarios (start-up and
  imports paid once); each test reads its scenario's report from every rank.
"""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import os
import pkgutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

if not torch.distributed.is_available():
    pytest.skip("this torch build has no torch.distributed", allow_module_level=True)

import torch.distributed as dist  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard  # noqa: E402
from torch.distributed.tensor.parallel import (  # noqa: E402
    ColwiseParallel, RowwiseParallel, SequenceParallel, parallelize_module,
)

import triton_gelu  # noqa: E402
from triton_gelu import _dtensor as tg_dtensor  # noqa: E402
from triton_gelu import ops  # noqa: E402
from triton_gelu import parallel as tgp  # noqa: E402
from triton_gelu.modules import LinearGELU, has_hooks  # noqa: E402
from triton_gelu.patch import FusedFeedForward, GatedGELUBlock  # noqa: E402
from triton_gelu.testing import count_launches  # noqa: E402

from helpers import assert_no_worse_than_torch  # noqa: E402
from parallel_scenarios import GemmaLikeMLP, Holder  # noqa: E402
from spawn_ranks import once_per_test_run, run_scenarios  # noqa: E402

FUSED = ("linear_gelu_fwd", "linear_gelu_bwd_dz")
# A whole FFN block (FeedForward, FusedFeedForward): the fused forward and the backward's dz matmul.
FFN_BLOCK = ("ffn_fwd_gelu_dropout", "ffn_bwd_dz")
# GeGLU, and the gated block: the dual-matmul forward and the backward's elementwise kernel.
GEGLU = ("geglu_fwd", "geglu_bwd_act")


# ---- the sharding rules, in this process on a fake 2-rank group -------------------------------


@pytest.fixture(scope="module")
def mesh():
    """A 2-rank mesh of a fake process group: this process is rank 0 of 2 (its shards are real
    tensors, collectives are no-ops), enough to check placements, local shapes and values."""
    fake_pg = pytest.importorskip("torch.testing._internal.distributed.fake_pg")
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group("fake", store=fake_pg.FakeStore(), rank=0, world_size=2)
    try:
        yield init_device_mesh("cpu", (2,))
    finally:
        dist.destroy_process_group()


def _dtensor(local: torch.Tensor, mesh, placement, requires_grad: bool = True,
             shape: tuple[int, ...] | None = None) -> DTensor:
    """Rank 0's ``local`` shard of a DTensor (of global ``shape`` when the split is uneven)."""
    kwargs = {} if shape is None else {
        "shape": torch.Size(shape), "stride": torch.empty(shape).stride()}
    t = DTensor.from_local(local.detach(), mesh, [placement], run_check=False, **kwargs)
    return t.requires_grad_(requires_grad)


def _torch_local(x, w, b, approximate="none", dtype=torch.float32):
    """F.gelu(F.linear) on rank 0's shards, in ``dtype``, with their gradients for dy = 1."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (x, w, b)]
    y = F.gelu(F.linear(*leaves), approximate=approximate)
    y.backward(torch.ones_like(y))
    return y.detach(), *(t.grad for t in leaves)


def _check_against_torch(ours, x, w, b, approximate="none"):
    same = _torch_local(x, w, b, approximate)
    ref = _torch_local(x, w, b, approximate, torch.float64)
    for what, o, s, r in zip(("y", "dx", "dw", "db"), ours, same, ref):
        assert_no_worse_than_torch(o, s, r, what)


def test_column_split_runs_fused_with_no_communication(mesh):
    """x Replicate, W and b Shard(0): y Shard(-1) is gelu of rank 0's columns; backward dx is a
    partial sum, dW and db rank 0's rows. 9 features on 2 ranks: an uneven split (5 + 4)."""
    x, w, b = torch.randn(3, 5, 8), torch.randn(9, 8), torch.randn(9)
    dx = _dtensor(x, mesh, Replicate())
    dw = _dtensor(w[:5], mesh, Shard(0), shape=(9, 8))
    db = _dtensor(b[:5], mesh, Shard(0), shape=(9,))
    with count_launches() as launched:
        y = triton_gelu.linear_gelu(dx, dw, db, approximate="tanh")
        assert y.placements == (Shard(2),) and y.shape == (3, 5, 9)
        assert y.to_local().shape == (3, 5, 5)
        y.backward(torch.ones_like(y))
        assert (dx.grad.placements, dw.grad.placements, db.grad.placements) == \
            ((Partial(),), (Shard(0),), (Shard(0),))
    assert all(launched[k] == 1 for k in FUSED), launched
    ours = (y.to_local(), dx.grad.to_local(), dw.grad.to_local(), db.grad.to_local())
    _check_against_torch(ours, x, w[:5], b[:5], "tanh")


@pytest.mark.parametrize("dim", [0, 1])
def test_row_split_runs_fused_with_no_communication(mesh, dim):
    """x Shard on a leading dimension (batch; sequence, as SequenceParallel lays it out), W and b
    Replicate: y split like x; backward dx split like x, dW and db partial sums. With recompute,
    the backward's linear_preact runs on the shard too."""
    x, w, b = torch.randn(4, 6, 8), torch.randn(10, 8), torch.randn(10)
    rows = x.narrow(dim, 0, x.shape[dim] // 2)
    dx, dw, db = _dtensor(rows, mesh, Shard(dim)), _dtensor(w, mesh, Replicate()), \
        _dtensor(b, mesh, Replicate())
    with count_launches() as launched:
        y = triton_gelu.linear_gelu(dx, dw, db, recompute=True)
        assert y.placements == (Shard(dim),) and y.shape == (4, 6, 10)
        y.backward(torch.ones_like(y))
        assert (dx.grad.placements, dw.grad.placements, db.grad.placements) == \
            ((Shard(dim),), (Partial(),), (Partial(),))
    assert launched["linear_preact"] == 1, launched
    ours = (y.to_local(), dx.grad.to_local(), dw.grad.to_local(), db.grad.to_local())
    _check_against_torch(ours, rows, w, b)


# Ops that have no sharding rule yet: none. A new custom op (ops/) needs a rule in its module's
# sharding_rules, else DTensor refuses it under tensor parallel; list it here only until it
# has one.
WITHOUT_SHARDING_RULE: tuple[str, ...] = ()


def test_every_custom_op_has_a_sharding_rule():
    propagator = DTensor._op_dispatcher.sharding_propagator
    modules = [importlib.import_module(f"triton_gelu.ops.{info.name}")
               for info in pkgutil.iter_modules(ops.__path__) if not info.name.startswith("_")]
    custom = {v._opoverload for module in modules for v in vars(module).values()
              if getattr(getattr(v, "_opoverload", None), "namespace", None) == "triton_gelu"}
    assert len(custom) >= 10, custom
    missing = [str(op) for op in custom
               if op not in propagator.op_strategy_funcs and op.name() not in WITHOUT_SHARDING_RULE]
    assert not missing, ("custom ops with no DTensor sharding rule (their module's "
                         f"sharding_rules): {missing}")


def test_bool_flags_are_part_of_dtensors_sharding_cache(mesh):
    """register_sharding alone keys DTensor's cache on tensor specs and ints: a save_preact=False
    call after a True one would reuse the True call's output specs (a (0,)-sized local preact
    wrapped as a (3, 10) DTensor). parallel._key_on_flags adds the bools to the key."""
    x, w = _dtensor(torch.randn(3, 8), mesh, Replicate()), _dtensor(torch.randn(5, 8), mesh,
                                                                     Shard(0))
    for save_preact in (True, False, True):
        y, preact = ops.linear_gelu_fwd(x, w, None, "gelu", save_preact)
        assert preact.to_local().shape == ((3, 5) if save_preact else (0,))
        assert preact.shape == ((3, 10) if save_preact else (0,)), (save_preact, preact.shape)
    dy = _dtensor(torch.randn(3, 5), mesh, Shard(1))
    for need_dx in (True, False, True):
        dx, dw, _ = ops.linear_gelu_bwd(dy, x, w, dy, "gelu", need_dx, True, False)
        assert dx.shape == ((3, 8) if need_dx else (0,)), (need_dx, dx.shape)
        assert dw.shape == (10, 8) and dw.to_local().shape == (5, 8)


@pytest.mark.parametrize("placement", [Shard(0), Shard(1), Replicate()])
def test_gelu_keeps_the_split_of_x(mesh, placement):
    x = torch.randn(4, 6)
    local = x.narrow(placement.dim, 0, x.shape[placement.dim] // 2) \
        if isinstance(placement, Shard) else x
    dx = _dtensor(local, mesh, placement)
    with count_launches() as launched:
        y = triton_gelu.gelu(dx)
        assert y.placements == (placement,)
        y.backward(torch.ones_like(y))
        assert dx.grad.placements == (placement,)
    assert launched["gelu_fwd"] == 1 and launched["gelu_bwd"] == 1
    leaf = local.clone().requires_grad_()
    F.gelu(leaf).sum().backward()
    torch.testing.assert_close(y.to_local(), F.gelu(local), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dx.grad.to_local(), leaf.grad, rtol=1e-6, atol=1e-6)


def test_gelu_of_a_partial_sum_is_reduced_first(mesh):
    """gelu(a + b) != gelu(a) + gelu(b): DTensor reduces a Partial x before the kernel."""
    y = triton_gelu.gelu(_dtensor(torch.randn(4, 6), mesh, Partial(), requires_grad=False))
    assert not any(p.is_partial() for p in y.placements), y.placements


def test_row_parallel_linear_falls_back_unfused_with_one_warning(mesh):
    """x Shard(-1), W Shard(1) (row-parallel linear1): z is a partial sum; the unfused ops run,
    DTensor reduces z before the GELU; one warning per layout."""
    x, w, b = torch.randn(3, 8), torch.randn(10, 8), torch.randn(10)
    args = (_dtensor(x[:, :4], mesh, Shard(1)), _dtensor(w[:, :4], mesh, Shard(1)),
            _dtensor(b, mesh, Replicate()))
    assert not tgp.fusable_layout(*args)
    with count_launches() as launched:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y = triton_gelu.linear_gelu(*args)
            triton_gelu.linear_gelu(*args)
        fallbacks = [w for w in caught if issubclass(w.category, tgp.UnfusedFallbackWarning)]
        assert len(fallbacks) == 1 and "Shard(dim=1)" in str(fallbacks[0].message), caught
        assert y.placements == (Replicate(),)
    assert not any(k.startswith("linear") for k in launched), launched


def test_plain_tensor_with_dtensor_weight_is_refused_by_name(mesh):
    w = _dtensor(torch.randn(5, 8), mesh, Shard(0))
    with pytest.raises(TypeError, match="weight is a DTensor but x is a plain torch.Tensor"):
        triton_gelu.linear_gelu(torch.randn(3, 8), w)


# ---- styles and the hooks patch() recognises --------------------------------------------------


def test_colwise_style_accepts_linear_gelu(mesh):
    """PyTorch's ColwiseParallel refuses a LinearGELU (it is deliberately not an nn.Linear);
    triton_gelu.parallel.ColwiseParallel shards it as PyTorch shards an nn.Linear."""
    with pytest.raises(NotImplementedError):
        parallelize_module(LinearGELU(8, 10), mesh, ColwiseParallel())
    layer = parallelize_module(LinearGELU(8, 10), mesh, tgp.ColwiseParallel())
    assert layer.weight.placements == (Shard(0),) and layer.bias.placements == (Shard(0),)
    assert tgp.tp_style(layer) == "colwise"
    linear = parallelize_module(nn.Linear(8, 10), mesh, tgp.ColwiseParallel())
    assert tgp.tp_style(linear) == "colwise"  # nn.Linear: PyTorch's own style, unchanged
    row = parallelize_module(LinearGELU(8, 10), mesh, tgp.RowwiseParallel())
    assert row.weight.placements == (Shard(1),) and row.bias.placements == (Replicate(),)


@pytest.mark.parametrize("style, name", [
    (ColwiseParallel, "colwise"), (RowwiseParallel, "rowwise"), (SequenceParallel, "sequence"),
])
def test_tp_style_recognises_the_hooks_of_pytorchs_styles(mesh, style, name):
    linear = parallelize_module(nn.Linear(8, 10), mesh, style())
    assert tgp.tp_style(linear) == name
    linear.register_forward_hook(lambda *args: None)  # a user's hook besides the style's
    assert tgp.tp_style(linear) is None


def _parallel_ffn(mesh, plan):
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
    return parallelize_module(model, mesh, plan)


def test_patch_fuses_a_column_parallel_pair_and_carries_the_hooks(mesh):
    # linear2 unplanned: no whole block (see test_patch_fuses_a_parallelized_block_whole)
    model = _parallel_ffn(mesh, {"0": ColwiseParallel()})
    linear = model[0]
    hooks = [*linear._forward_pre_hooks.values(), *linear._forward_hooks.values()]
    assert triton_gelu.patch(model) == 1
    fused = model[0]
    assert isinstance(fused, LinearGELU) and fused.weight is linear.weight
    assert [*fused._forward_pre_hooks.values(), *fused._forward_hooks.values()] == hooks
    assert isinstance(model[1], nn.Identity)


def test_patch_refuses_user_hooks_row_parallel_and_unstyled_dtensors(mesh):
    hooked = _parallel_ffn(mesh, {"0": ColwiseParallel()})
    hooked[0].register_forward_pre_hook(lambda *args: None)
    assert triton_gelu.patch(hooked) == 0
    row = _parallel_ffn(mesh, {"0": RowwiseParallel()})
    with pytest.warns(tgp.UnfusedFallbackWarning, match="row-parallel"):
        assert triton_gelu.patch(row) == 0
    # DTensor parameters no style put there (as fully_shard leaves them): not ours to move.
    unstyled = nn.Sequential(nn.Linear(8, 16), nn.GELU())
    unstyled[0].weight = nn.Parameter(DTensor.from_local(torch.randn(8, 8), mesh, [Shard(0)]))
    assert triton_gelu.patch(unstyled) == 0


# ---- GeGLU: both projections split alike ------------------------------------------------------


def _torch_geglu_local(x, wg, wu, bg, bu, dtype=torch.float32):
    """gelu(g) * u by PyTorch on rank 0's shards, in ``dtype``, with its gradients for dh = 1."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (x, wg, wu, bg, bu)]
    h = F.gelu(F.linear(leaves[0], leaves[1], leaves[3]), approximate="tanh") * \
        F.linear(leaves[0], leaves[2], leaves[4])
    h.backward(torch.ones_like(h))
    return h.detach(), *(t.grad for t in leaves)


def test_geglu_column_split_gates_each_ranks_columns(mesh):
    """gate_proj and up_proj both Shard(0), x Replicate: h Shard(-1) from one kernel on rank 0's
    columns, no communication; dx Partial, the weights' and biases' gradients Shard(0)."""
    x, wg, wu, bg, bu = (torch.randn(2, 5, 8), torch.randn(9, 8), torch.randn(9, 8),
                         torch.randn(9), torch.randn(9))
    args = [_dtensor(x, mesh, Replicate())] + [
        _dtensor(t[:5], mesh, Shard(0), shape=tuple(t.shape)) for t in (wg, wu, bg, bu)]
    with count_launches() as launched:
        h = triton_gelu.geglu(*args)
        assert h.placements == (Shard(2),) and h.shape == (2, 5, 9) and h.to_local().shape[-1] == 5
        h.backward(torch.ones_like(h))
        assert [t.grad.placements for t in args] == [(Partial(),)] + [(Shard(0),)] * 4
    assert launched["geglu_fwd"] == 1 and launched["geglu_bwd_act"] == 1
    ours = (h.to_local(), *(t.grad.to_local() for t in args))
    local = (x, wg[:5], wu[:5], bg[:5], bu[:5])
    names = ("h", "dx", "dw_gate", "dw_up", "db_gate", "db_up")
    for what, o, same, ref in zip(names, ours, _torch_geglu_local(*local),
                                  _torch_geglu_local(*local, dtype=torch.float64)):
        assert_no_worse_than_torch(o, same, ref, what)


@pytest.mark.parametrize("dim", [0, 1])
def test_geglu_row_split_keeps_x_unflattened(mesh, dim):
    """x Shard on a leading dimension (batch; sequence, which a flattening (B*S, K) view could
    not keep sharded), the weights Replicate: h split like x; with recompute the backward's
    geglu_gate_up runs on the shard too (its rule)."""
    x, wg, wu = torch.randn(4, 6, 8), torch.randn(10, 8), torch.randn(10, 8)
    rows = x.narrow(dim, 0, x.shape[dim] // 2)
    args = [_dtensor(rows, mesh, Shard(dim)), _dtensor(wg, mesh, Replicate()),
            _dtensor(wu, mesh, Replicate())]
    with count_launches() as launched:
        h = triton_gelu.geglu(*args, recompute=True)
        assert h.placements == (Shard(dim),) and h.shape == (4, 6, 10)
        h.backward(torch.ones_like(h))
        assert [t.grad.placements for t in args] == [(Shard(dim),), (Partial(),), (Partial(),)]
        # the forward, and geglu_gate_up rebuilding g and u (the same kernel)
    assert launched["geglu_fwd"] == 2, launched
    same = _torch_geglu_local(rows, wg, wu, torch.zeros(10), torch.zeros(10))
    torch.testing.assert_close(h.to_local(), same[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(args[1].grad.to_local(), same[2], rtol=1e-5, atol=1e-5)


def test_geglu_projections_split_differently_fall_back_unfused(mesh):
    """W_gate split, W_up whole (or a packed gate_up weight chunked after its Shard(0)): no rule
    pairs a rank's gate columns with other up columns; the unfused ops run, with one warning."""
    x = _dtensor(torch.randn(3, 8), mesh, Replicate())
    wg = _dtensor(torch.randn(5, 8), mesh, Shard(0), shape=(10, 8))
    wu = _dtensor(torch.randn(10, 8), mesh, Replicate())
    assert not tgp.fusable_layout(x, wg, None, (wu, None))
    with count_launches() as launched:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            h = triton_gelu.geglu(x, wg, wu)
        fallbacks = [w for w in caught if issubclass(w.category, tgp.UnfusedFallbackWarning)]
        assert len(fallbacks) == 1 and "GeGLU" in str(fallbacks[0].message), caught
    assert h.shape == (3, 10) and not any(k.startswith("geglu") for k in launched)


# ---- the blocks: whole on the local tensors (run_block), or the blocks' ops' own rules --------


def _block_operands(mesh, hidden: int = 12):
    """An FFN block's operands, linear1 column- and linear2 row-parallel: rank 0's halves."""
    x, w1, b1 = torch.randn(2, 3, 8), torch.randn(hidden, 8), torch.randn(hidden)
    w2, b2 = torch.randn(8, hidden), torch.randn(8)
    half = hidden // 2
    dts = [_dtensor(x, mesh, Replicate()),
           _dtensor(w1[:half], mesh, Shard(0), shape=(hidden, 8)),
           _dtensor(b1[:half], mesh, Shard(0), shape=(hidden,)),
           _dtensor(w2[:, :half], mesh, Shard(1), shape=(8, hidden)),
           _dtensor(b2, mesh, Replicate())]
    return dts, (x, w1[:half], b1[:half], w2[:, :half], b2)


def _torch_block_local(x, w1, b1, w2, b2, dtype=torch.float32):
    leaves = [t.detach().to(dtype).requires_grad_() for t in (x, w1, b1, w2, b2)]
    y = F.linear(F.gelu(F.linear(*leaves[:3])), *leaves[3:])
    y.backward(torch.ones_like(y))
    return y.detach(), *(t.grad for t in leaves)


def test_block_tensor_parallel_runs_whole_on_the_shards(mesh):
    """linear1 column-, linear2 row-parallel: the whole block's kernels on rank 0's shards, y a
    Partial sum (rank 0 adds b2, at coordinate 0), dx Partial; dW1, db1 Shard(0), dW2 Shard(1),
    db2 Replicate (every rank's is the whole sum of dy)."""
    dts, local = _block_operands(mesh)
    with count_launches() as launched:
        y = triton_gelu.feed_forward(*dts, p=0.0)
        assert y.placements == (Partial(),) and y.shape == (2, 3, 8)
        y.to_local().backward(torch.ones(2, 3, 8))
        assert [t.grad.placements for t in dts] == [
            (Partial(),), (Shard(0),), (Shard(0),), (Shard(1),), (Replicate(),)]
    assert launched["ffn_fwd_gelu_dropout"] == 1 and launched["ffn_bwd_dz"] == 1
    ours = (y.to_local(), *(t.grad.to_local() for t in dts))
    names = ("y", "dx", "dw1", "db1", "dw2", "db2")
    for what, o, same, ref in zip(names, ours, _torch_block_local(*local),
                                  _torch_block_local(*local, dtype=torch.float64)):
        assert_no_worse_than_torch(o, same, ref, what)


def test_block_row_split_and_what_falls_back(mesh):
    """x Shard(1) (sequence), everything else Replicate: the block on rank 0's rows, y and dx
    Shard(1), the parameters' gradients Partial. With dropout the row split falls back (its
    mask would be keyed on local rows), and so does a layout no block runs (linear2 whole)."""
    x, w1, w2 = torch.randn(2, 4, 8), torch.randn(12, 8), torch.randn(8, 12)
    dts = [_dtensor(x[:, :2], mesh, Shard(1)), _dtensor(w1, mesh, Replicate()), None,
           _dtensor(w2, mesh, Replicate()), None]
    with count_launches() as launched:
        y = triton_gelu.feed_forward(*dts, p=0.0)
        assert y.placements == (Shard(1),) and y.shape == (2, 4, 8)
        y.backward(torch.ones_like(y))
        assert [dts[i].grad.placements for i in (0, 1, 3)] == [(Shard(1),), (Partial(),),
                                                               (Partial(),)]
    assert launched["ffn_fwd_gelu_dropout"] == 1
    torch.testing.assert_close(y.to_local(), F.linear(F.gelu(F.linear(x[:, :2], w1)), w2),
                               rtol=1e-5, atol=1e-5)
    column, _ = _block_operands(mesh)
    column[3] = _dtensor(torch.randn(8, 12), mesh, Replicate())
    tg_dtensor._warned_layouts.clear()
    for args, p in ((dts, 0.1), (column, 0.0)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with count_launches() as launched:
                triton_gelu.feed_forward(*args, p=p)
            fallbacks = [w for w in caught if issubclass(w.category, tgp.UnfusedFallbackWarning)]
            assert len(fallbacks) == 1 and "FFN block" in str(fallbacks[0].message), caught
        assert not any(k.startswith("ffn") for k in launched), launched


@pytest.mark.parametrize("flattens", [True, False])
def test_unfused_linear_of_a_sequence_split_x(mesh, monkeypatch, flattens):
    """The fallbacks' linear of x Shard(1) (3-D, split on the sequence), W and b Replicate: rank
    0's rows of F.linear, Shard(1), with no communication. flattens=False is the way torch 2.11
    takes (its DTensor refuses F.linear's flatten of a sequence-split x), run on every torch."""
    if flattens and torch.__version__ < "2.12":
        pytest.skip("torch 2.11's DTensor refuses F.linear of a sequence-split 3-D x")
    monkeypatch.setattr(tg_dtensor, "_LINEAR_FLATTENS_SHARDED", flattens)
    x, w, b = torch.randn(2, 4, 8), torch.randn(12, 8), torch.randn(12)
    dts = (_dtensor(x[:, :2], mesh, Shard(1)), _dtensor(w, mesh, Replicate()),
           _dtensor(b, mesh, Replicate()))
    y = tg_dtensor.linear(*dts)
    assert y.placements == (Shard(1),) and y.shape == (2, 4, 12), (y.placements, y.shape)
    torch.testing.assert_close(y.to_local(), F.linear(x[:, :2], w, b))
    y.backward(torch.ones_like(y))
    placements = [t.grad.placements for t in dts]
    assert placements == [(Shard(1),), (Partial(),), (Partial(),)], placements


def test_chunk_start_is_where_dtensor_puts_each_ranks_shard():
    """The block's dropout mask is keyed on the position of the rank's hidden columns: the start
    run_block computes (traceable by every torch's torch.compile) is DTensor's own, for uneven
    sizes and a dimension split on one or two mesh dimensions."""
    for size in range(0, 20):
        for mesh_sizes in ((2,), (3,), (4,), (2, 2), (3, 2)):
            for ranks in itertools.product(*(range(k) for k in mesh_sizes)):
                local, want = size, 0
                for num_chunks, rank in zip(mesh_sizes, ranks):
                    local, offset = Shard.local_shard_size_and_offset(local, num_chunks, rank)
                    want += offset
                got = tg_dtensor.chunk_start(size, list(zip(mesh_sizes, ranks)))
                assert got == want, f"size {size}, mesh {mesh_sizes}, ranks {ranks}: {got}"


def test_block_refuses_plain_tensors_beside_dtensors(mesh):
    dts, local = _block_operands(mesh)
    with pytest.raises(TypeError, match="weight0, bias0, weight1, bias1 are DTensors but x is"):
        triton_gelu.feed_forward(local[0], *dts[1:])


def test_the_blocks_ops_rules_serve_rows_and_replicate(mesh):
    """Called on DTensors themselves, ffn_fwd / ffn_bwd / gated_ffn_fwd run on rows split on
    dimension 0 without dropout, else (a tensor-parallel split; dropout) DTensor replicates
    first: those need the per-rank arguments run_block gives."""
    x = _dtensor(torch.randn(3, 8), mesh, Shard(0), shape=(6, 8))
    w1, w2 = _dtensor(torch.randn(12, 8), mesh, Replicate()), \
        _dtensor(torch.randn(8, 12), mesh, Replicate())
    seed = _dtensor(torch.tensor([7]), mesh, Replicate(), requires_grad=False)
    with count_launches() as launched:
        y, z = ops.ffn_fwd(x, w1, None, w2, None, None, 0.0, "gelu", True)
    assert y.placements == z.placements == (Shard(0),) and launched["ffn_fwd_gelu_dropout"]
    grads = ops.ffn_bwd(y, x, w1, w2, z, None, 0.0, "gelu", [True, True, False, True, False])
    assert [g.placements for g in grads] == [(Shard(0),), (Partial(),), (Replicate(),),
                                            (Partial(),), (Replicate(),)]
    y, _ = ops.ffn_fwd(x, w1, None, w2, None, seed, 0.3, "gelu", False)
    assert y.placements == (Replicate(),)
    y, g, u = ops.gated_ffn_fwd(x, w1, w1, w2, None, None, None, None, 0.0, "gelu_tanh", True)
    assert y.placements == g.placements == u.placements == (Shard(0),)
    y, _, _ = ops.gated_ffn_fwd(x, w1, w1, w2, None, None, None, seed, 0.3, "gelu_tanh", False)
    assert y.placements == (Replicate(),)


# ---- FeedForwardParallel, and the plans patch() fuses whole -----------------------------------


def _placements_of(module: nn.Module) -> dict[str, tuple]:
    return {name: tuple(p.placements) for name, p in module.named_parameters()}


def test_feed_forward_parallel_shards_every_kind_of_block(mesh):
    col, row, rep = (Shard(0),), (Shard(1),), (Replicate(),)
    ff = parallelize_module(triton_gelu.FeedForward(8, 12), mesh, tgp.FeedForwardParallel())
    assert _placements_of(ff) == {"linear1.weight": col, "linear1.bias": col,
                                  "linear2.weight": row, "linear2.bias": rep}
    gated = parallelize_module(triton_gelu.GatedFeedForward(8, 12, bias=True), mesh,
                               tgp.FeedForwardParallel())
    assert _placements_of(gated) == {
        "gate_proj.weight": col, "gate_proj.bias": col, "up_proj.weight": col,
        "up_proj.bias": col, "down_proj.weight": row, "down_proj.bias": rep}
    # patch's FusedFeedForward, named by linear1's slot; its linear2 stays in its own slot
    model = nn.Sequential(nn.Linear(8, 12), nn.GELU(), nn.Linear(12, 8))
    assert triton_gelu.patch(model) == 1
    parallelize_module(model, mesh, {"0": tgp.FeedForwardParallel()})
    assert _placements_of(model) == {"0.weight": col, "0.bias": col, "2.weight": row,
                                     "2.bias": rep}
    for other in (LinearGELU(8, 12), nn.Linear(8, 12)):
        with pytest.raises(NotImplementedError, match="parallelizes a whole FFN block"):
            parallelize_module(other, mesh, tgp.FeedForwardParallel())
    geglu = parallelize_module(triton_gelu.GeGLU(8, 12), mesh, tgp.ColwiseParallel())
    assert _placements_of(geglu) == {"gate_proj.weight": col, "up_proj.weight": col}


def test_tp_block_style_recognises_plans_the_fused_block_serves(mesh):
    def planned(plan):
        return _parallel_ffn(mesh, plan)

    both = planned({"0": ColwiseParallel(), "2": RowwiseParallel()})
    assert tgp.tp_block_style([both[0]], both[2]) == "tensor"
    sequence = planned({"0": SequenceParallel(), "2": SequenceParallel()})
    assert tgp.tp_block_style([sequence[0]], sequence[2]) == "sequence"
    # the hidden activation all-gathered between them, or the roles swapped: not the block
    gathered = planned({"0": ColwiseParallel(output_layouts=Replicate()),
                        "2": RowwiseParallel(input_layouts=Replicate())})
    swapped = planned({"0": RowwiseParallel(), "2": ColwiseParallel()})
    half = planned({"0": ColwiseParallel()})
    for model in (gathered, swapped, half):
        assert tgp.tp_block_style([model[0]], model[2]) is None
    both[2].register_forward_hook(lambda *args: None)  # a user's hook besides the style's
    assert tgp.tp_block_style([both[0]], both[2]) is None


def test_patch_fuses_a_parallelized_block_whole(mesh):
    """Order 2: linear1 ColwiseParallel, linear2 RowwiseParallel (PyTorch's), then patch():
    one FusedFeedForward with linear1's input hook and linear2's output hook; where the plan
    all-gathers the hidden activation between them, only the pair fuses."""
    model = _parallel_ffn(mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
    pre = list(model[0]._forward_pre_hooks.values())
    post = list(model[2]._forward_hooks.values())
    assert triton_gelu.patch(model) == 1
    fused = model[0]
    assert isinstance(fused, FusedFeedForward)
    assert list(fused._forward_pre_hooks.values()) == pre
    assert list(fused._forward_hooks.values()) == post
    assert not has_hooks(model[2]) and isinstance(model[1], nn.Identity)
    gathered = _parallel_ffn(mesh, {"0": ColwiseParallel(output_layouts=Replicate()),
                                    "2": RowwiseParallel(input_layouts=Replicate())})
    assert triton_gelu.patch(gathered) == 1 and isinstance(gathered[0], LinearGELU)


def test_patch_swaps_a_parallelized_gated_block_only_for_a_plan_it_serves(mesh):
    """Order 2 on a Gemma MLP: gate_proj and up_proj column-, down_proj row-parallel: the
    GatedGELUBlock takes gate_proj's input hook and down_proj's output hook, its children keep
    none. Column-parallel projections whose down_proj has no plan: the block is left as it is."""
    plan = {"block.gate_proj": ColwiseParallel(), "block.up_proj": ColwiseParallel(),
            "block.down_proj": RowwiseParallel()}
    model = parallelize_module(Holder(GemmaLikeMLP()), mesh, plan)
    pre = list(model.block.gate_proj._forward_pre_hooks.values())
    post = list(model.block.down_proj._forward_hooks.values())
    assert triton_gelu.patch(model) == 1
    block = model.block
    assert isinstance(block, GatedGELUBlock)
    assert list(block._forward_pre_hooks.values()) == pre
    assert list(block._forward_hooks.values()) == post
    assert not any(has_hooks(m) for m in block.projections())
    del plan["block.down_proj"]
    half = parallelize_module(Holder(GemmaLikeMLP()), mesh, plan)
    assert triton_gelu.patch(half) == 0 and isinstance(half.block, GemmaLikeMLP)


# ---- whole models on spawned ranks ------------------------------------------------------------

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None

# scenario -> the kernels that must have run on every rank (none of ours: the unfused fallback)
TWO_RANKS = {
    "tp_feedforward_module": FUSED,
    "tp_patch_then_parallelize": (*FUSED, "linear_preact"),
    "tp_parallelize_then_patch": FFN_BLOCK,
    "tp_block_feedforward": (*FFN_BLOCK, "linear_preact"),
    "tp_block_patch_then_parallelize": FFN_BLOCK,
    "tp_block_sequence_parallel": FFN_BLOCK,
    "tp_block_unservable_falls_back": FUSED,
    "tp_block_compiled": FFN_BLOCK,
    "tp_gpt2_patch_then_parallelize": FFN_BLOCK,
    "tp_geglu_colwise": GEGLU,
    "tp_gated_block_style": GEGLU,
    "tp_gated_block_dropout": GEGLU,
    "tp_gemma_parallelize_then_patch": GEGLU,
    "tp_bert_parallelize_then_patch": FUSED,
    "tp_sequence_parallel": FUSED,
    "tp_megatron_sequence_parallel": FUSED,
    "tp_rowwise_linear1_unfused": (),
    "tp_compiled": FUSED,
    "ddp_patched": FFN_BLOCK,
    "fsdp2_bf16_per_block": FFN_BLOCK,
    "fsdp2_compiled": FFN_BLOCK,
}
FOUR_RANKS = {"tp_fsdp2_2d_mesh": FUSED, "tp_fsdp2_2d_block": FFN_BLOCK}


# scenario -> (the oldest torch that runs it, why): what an older torch cannot do itself.
NEEDS_TORCH = {
    "tp_sequence_parallel": (
        "2.12", "PyTorch's own nn.Linear (linear2) under SequenceParallel: torch 2.11's DTensor "
        "cannot flatten a 3-D input sharded on the sequence, as F.linear does (it raises)"),
}


def _needs_transformers(scenario: str) -> bool:
    return "bert" in scenario or "gpt2" in scenario


def _too_old(scenario: str) -> str | None:
    """Why this torch cannot run the scenario, or None."""
    if scenario not in NEEDS_TORCH:
        return None
    oldest, why = NEEDS_TORCH[scenario]
    return f"needs torch >= {oldest}: {why}" if torch.__version__ < oldest else None


def _runnable(scenarios: dict) -> list[str]:
    return [name for name in scenarios
            if (HAS_TRANSFORMERS or not _needs_transformers(name)) and not _too_old(name)]


def _job(tmp_path_factory, scenarios: dict, world_size: int) -> list[dict]:
    """Every rank's reports of the scenarios, from one spawned job per pytest run."""
    names = _runnable(scenarios)
    return once_per_test_run(
        tmp_path_factory.getbasetemp().parent, f"parallel_{world_size}_ranks",
        lambda: run_scenarios("parallel_scenarios", names, world_size=world_size),
    )


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return _job(tmp_path_factory, TWO_RANKS, 2)


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    return _job(tmp_path_factory, FOUR_RANKS, 4)


def _assert_ran(reports: list[dict], name: str, kernels: tuple[str, ...]) -> None:
    if _needs_transformers(name) and not HAS_TRANSFORMERS:
        pytest.skip("transformers is not installed")
    if _too_old(name):
        pytest.skip(_too_old(name))
    for rank, report in enumerate(reports):
        result = report[name]
        assert result["error"] is None, f"rank {rank}:\n{result['error']}"
        launches = result["launches"]
        missing = [k for k in kernels if launches.get(k, 0) == 0]
        assert not missing, f"rank {rank}: {missing} did not run (launches {launches})"
        if not kernels:
            assert not any(k.startswith(("linear", "ffn")) for k in launches), \
                f"rank {rank}: {launches}"


@pytest.mark.parametrize("name", TWO_RANKS)
def test_two_ranks(two_ranks, name):
    _assert_ran(two_ranks, name, TWO_RANKS[name])


@pytest.mark.parametrize("name", FOUR_RANKS)
def test_four_ranks(four_ranks, name):
    _assert_ran(four_ranks, name, FOUR_RANKS[name])


_FIRST_DTENSOR_OP = """
import torch, torch.distributed as dist, torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard
from torch.testing._internal.distributed.fake_pg import FakeStore
import triton_gelu
dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
x = torch.randn(4, 6)
y = triton_gelu.gelu(DTensor.from_local(x, init_device_mesh("cpu", (2,)), [Shard(0)]))
torch.testing.assert_close(y.to_local(), F.gelu(x))
print("placements", y.placements)
"""


def test_the_first_dtensor_op_of_a_process_finds_its_sharding_rule():
    """The rules are registered when the package first meets a DTensor (``_dtensor`` imports
    ``_dtensor_rules``): a process whose first DTensor op is ``gelu`` runs it, split as x."""
    pytest.importorskip("torch.testing._internal.distributed.fake_pg")
    run = subprocess.run([sys.executable, "-c", _FIRST_DTENSOR_OP],
                         cwd=Path(__file__).resolve().parents[1],
                         env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "placements (Shard(dim=0),)" in run.stdout, run.stdout
