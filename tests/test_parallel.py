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

import importlib.util
import warnings

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
from triton_gelu import _runtime, ops  # noqa: E402
from triton_gelu import parallel as tgp  # noqa: E402
from triton_gelu.modules import LinearGELU  # noqa: E402

from helpers import assert_no_worse_than_torch  # noqa: E402
from spawn_ranks import once_per_test_run, run_scenarios  # noqa: E402

FUSED = ("linear_gelu_fwd", "linear_gelu_bwd_dx", "linear_gelu_bwd_dw")
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
    _runtime.launches.clear()
    y = triton_gelu.linear_gelu(dx, dw, db, approximate="tanh")
    assert y.placements == (Shard(2),) and y.shape == (3, 5, 9)
    assert y.to_local().shape == (3, 5, 5)
    y.backward(torch.ones_like(y))
    assert (dx.grad.placements, dw.grad.placements, db.grad.placements) == \
        ((Partial(),), (Shard(0),), (Shard(0),))
    assert all(_runtime.launches[k] == 1 for k in FUSED), dict(_runtime.launches)
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
    _runtime.launches.clear()
    y = triton_gelu.linear_gelu(dx, dw, db, recompute=True)
    assert y.placements == (Shard(dim),) and y.shape == (4, 6, 10)
    y.backward(torch.ones_like(y))
    assert (dx.grad.placements, dw.grad.placements, db.grad.placements) == \
        ((Shard(dim),), (Partial(),), (Partial(),))
    assert _runtime.launches["linear_preact"] == 1, dict(_runtime.launches)
    ours = (y.to_local(), dx.grad.to_local(), dw.grad.to_local(), db.grad.to_local())
    _check_against_torch(ours, rows, w, b)


# Ops that have no sharding rule yet: none. A new custom op (ops.py) needs a rule in parallel.py,
# else DTensor refuses it under tensor parallel; list it here only until it has one.
# GeGLU ops: their rules come with the tensor-parallel cover of GeGLU (not merged yet).
WITHOUT_SHARDING_RULE: tuple[str, ...] = (
    "triton_gelu::geglu_fwd", "triton_gelu::geglu_gate_up", "triton_gelu::geglu_bwd",
    "triton_gelu::gated_ffn_fwd", "triton_gelu::ffn_fwd", "triton_gelu::ffn_bwd",
)


def test_every_custom_op_has_a_sharding_rule():
    propagator = DTensor._op_dispatcher.sharding_propagator
    custom = [v._opoverload for v in vars(ops).values()
              if getattr(getattr(v, "_opoverload", None), "namespace", None) == "triton_gelu"]
    assert len(custom) >= 5, custom
    missing = [str(op) for op in custom
               if op not in propagator.op_strategy_funcs and op.name() not in WITHOUT_SHARDING_RULE]
    assert not missing, f"custom ops with no DTensor sharding rule in parallel.py: {missing}"


def test_bool_flags_are_part_of_dtensors_sharding_cache(mesh):
    """register_sharding alone keys DTensor's cache on tensor specs and ints: a save_preact=False
    call after a True one would reuse the True call's output specs (a (0,)-sized local preact
    wrapped as a (3, 10) DTensor). parallel._key_on_flags adds the bools to the key."""
    x, w = _dtensor(torch.randn(3, 8), mesh, Replicate()), _dtensor(torch.randn(5, 8), mesh,
                                                                     Shard(0))
    for save_preact in (True, False, True):
        y, preact = ops.linear_gelu_fwd(x, w, None, False, save_preact)
        assert preact.to_local().shape == ((3, 5) if save_preact else (0,))
        assert preact.shape == ((3, 10) if save_preact else (0,)), (save_preact, preact.shape)
    dy = _dtensor(torch.randn(3, 5), mesh, Shard(1))
    for need_dx in (True, False, True):
        dx, dw, _ = ops.linear_gelu_bwd(dy, x, w, dy, False, need_dx, True, False)
        assert dx.shape == ((3, 8) if need_dx else (0,)), (need_dx, dx.shape)
        assert dw.shape == (10, 8) and dw.to_local().shape == (5, 8)


@pytest.mark.parametrize("placement", [Shard(0), Shard(1), Replicate()])
def test_gelu_keeps_the_split_of_x(mesh, placement):
    x = torch.randn(4, 6)
    local = x.narrow(placement.dim, 0, x.shape[placement.dim] // 2) \
        if isinstance(placement, Shard) else x
    dx = _dtensor(local, mesh, placement)
    _runtime.launches.clear()
    y = triton_gelu.gelu(dx)
    assert y.placements == (placement,)
    y.backward(torch.ones_like(y))
    assert dx.grad.placements == (placement,)
    assert _runtime.launches["gelu_fwd"] == 1 and _runtime.launches["gelu_bwd"] == 1
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
    _runtime.launches.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = triton_gelu.linear_gelu(*args)
        triton_gelu.linear_gelu(*args)
    fallbacks = [w for w in caught if issubclass(w.category, tgp.UnfusedFallbackWarning)]
    assert len(fallbacks) == 1 and "Shard(dim=1)" in str(fallbacks[0].message), caught
    assert y.placements == (Replicate(),)
    assert not any(k.startswith("linear") for k in _runtime.launches), dict(_runtime.launches)


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
    model = _parallel_ffn(mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
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
    "tp_geglu_colwise": GEGLU,
    "tp_gated_block_style": GEGLU,
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


def _runnable(scenarios: dict) -> list[str]:
    return [name for name in scenarios if HAS_TRANSFORMERS or "bert" not in name]


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
    if "bert" in name and not HAS_TRANSFORMERS:
        pytest.skip("transformers is not installed")
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
