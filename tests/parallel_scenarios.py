"""Distributed scenarios that tests/test_parallel.py runs on spawned CPU ranks (tests/spawn_ranks.py).

Each scenario ``name(rank, world_size)`` builds a small model the same way on every rank (the
seed is reset before each), runs it distributed, and compares its output and every gradient
(DTensors gathered with ``full_tensor()``) with the single-process unpatched model: no worse
than that model in the same dtype against a float64 copy (``helpers.assert_no_worse_than_torch``).
With dropout, the single-process model is ours (no PyTorch model draws our mask) run after the
same ``torch.manual_seed``, and the float64 copy applies the mask ``reference.dropout_keep``
draws for that seed: tensor-parallel dropout is the single-process one.
The kernel launches are checked by the test, from each rank's report.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel, RowwiseParallel, SequenceParallel, parallelize_module,
)

import triton_gelu
from triton_gelu import LinearGELU, reference
from triton_gelu import parallel as tgp
from triton_gelu.patch import FusedFeedForward, GatedGELUBlock
from triton_gelu.testing import count_launches, dropout_seed

from helpers import ATOL, assert_no_worse_than_torch

D_MODEL, D_FF, BATCH, SEQ = 8, 16, 2, 4  # every size a multiple of the 2 or 4 ranks
# A hidden width whose 2-rank split starts rank 1 inside a group of 4 columns (column 9): the
# dropout epilogue's per-element branch; D_FF's splits start on groups (8; 4, 8, 12).
D_FF_ODD = 18


# ---- models ----------------------------------------------------------------------------------


class TorchFeedForward(nn.Module):
    """The usual PyTorch FFN: linear1 -> GELU -> dropout -> linear2 (patch fuses it whole)."""

    def __init__(self, approximate: str = "none", p: float = 0.0, d_ff: int = D_FF) -> None:
        super().__init__()
        self.linear1 = nn.Linear(D_MODEL, d_ff)
        self.activation = nn.GELU(approximate)
        self.dropout = nn.Dropout(p)
        self.linear2 = nn.Linear(d_ff, D_MODEL)

    def forward(self, x):
        return self.linear2(self.dropout(self.activation(self.linear1(x))))


class MaskedFeedForward(TorchFeedForward):
    """TorchFeedForward with the explicit dropout mask ``keep`` ((..., d_ff) booleans) in place
    of its random one: the ground truth of our dropout (run in float64)."""

    def __init__(self, state: dict, approximate: str, keep: torch.Tensor, p: float) -> None:
        super().__init__(approximate, d_ff=keep.shape[-1])
        self.load_state_dict(state)
        self.keep, self.p = keep, p

    def forward(self, x):
        h = self.activation(self.linear1(x)) * (self.keep.to(x.dtype) / (1 - self.p))
        return self.linear2(h)


class GemmaLikeMLP(nn.Module):
    """Hugging Face GemmaMLP's code (patch recognises it by its bytecode): a gated GELU block."""

    def __init__(self, bias: bool = False, d_ff: int = D_FF) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(D_MODEL, d_ff, bias=bias)
        self.up_proj = nn.Linear(D_MODEL, d_ff, bias=bias)
        self.down_proj = nn.Linear(d_ff, D_MODEL, bias=bias)
        self.act_fn = nn.GELU("tanh")

    def forward(self, x):
        down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        return down_proj


class MaskedGatedMLP(GemmaLikeMLP):
    """The gated block with the explicit dropout mask ``keep`` ((..., d_ff) booleans) on its
    hidden activation: the ground truth of the gated block's dropout (run in float64)."""

    def __init__(self, state: dict, keep: torch.Tensor, p: float) -> None:
        super().__init__(bias="down_proj.bias" in state, d_ff=keep.shape[-1])
        self.load_state_dict(state)
        self.keep, self.p = keep, p

    def forward(self, x):
        h = self.act_fn(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(h * (self.keep.to(x.dtype) / (1 - self.p)))


class TorchGeGLU(nn.Module):
    """gelu(gate_proj(x)) * up_proj(x) in PyTorch, with GeGLU's parameter names."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(D_MODEL, D_FF)
        self.up_proj = nn.Linear(D_MODEL, D_FF)

    def forward(self, x):
        return F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x)


class Holder(nn.Module):
    """A parent for a block patch() swaps whole (a gated block passed as the model is left)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x):
        return self.block(x)


class PairFeedForward(nn.Module):
    """The same FFN with linear1 -> GELU in a child of its own (``up``, as Hugging Face BERT's
    Intermediate): patch() fuses only that pair, never the whole block, so the patched model
    still holds a LinearGELU for a tensor-parallel plan (a FusedFeedForward takes none yet)."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Sequential()
        self.up.add_module("linear1", nn.Linear(D_MODEL, D_FF))
        self.up.add_module("activation", nn.GELU())
        self.dropout = nn.Dropout(0.0)
        self.linear2 = nn.Linear(D_FF, D_MODEL)

    def forward(self, x):
        return self.linear2(self.dropout(self.up(x)))


class Block(nn.Module):
    """A pre-norm transformer MLP block: x + ffn(norm(x))."""

    def __init__(self, ffn: Callable[[], nn.Module] = TorchFeedForward) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(D_MODEL)
        self.ffn = ffn()

    def forward(self, x):
        return x + self.ffn(self.norm(x))


class Stack(nn.Module):
    def __init__(self, depth: int = 2, ffn: Callable[[], nn.Module] = TorchFeedForward) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(ffn) for _ in range(depth))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


# ---- running and comparing -------------------------------------------------------------------


def _gathered(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _run(model: nn.Module, x: torch.Tensor, dy: torch.Tensor, loss_scale: float = 1.0,
         params: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Forward, backward of sum(out * dy) * loss_scale; the output (gathered if a DTensor), x's
    gradient and every parameter's gradient (gathered), by name."""
    x = x.detach().requires_grad_()
    out = model(x)
    local = out.to_local() if isinstance(out, DTensor) else out
    ((local * dy).sum() * loss_scale).backward()
    results = {"out": _gathered(out).detach(), "x.grad": x.grad}
    for name, p in (params or model).named_parameters():
        results[name + ".grad"] = None if p.grad is None else _gathered(p.grad)
    return results


def _references(model: nn.Module, x: torch.Tensor, dy: torch.Tensor,
                dtype: torch.dtype = torch.float32):
    """The single-process unpatched model in ``dtype`` and in float64, on the whole batch."""
    same = _run(copy.deepcopy(model).to(dtype), x.to(dtype), dy.to(dtype))
    ref = _run(copy.deepcopy(model).double(), x.double(), dy.double())
    return same, ref


def _check(ours: dict, same: dict, ref: dict, chunk=lambda t: t, atol: float | None = None,
           grad_scale: float = 1.0) -> None:
    """Every result no worse than the unpatched single-process model's (``chunk`` selects this
    rank's part of the whole-batch output and x gradient)."""
    assert ours.keys() == same.keys(), f"gradients of {sorted(ours)} != {sorted(same)}"
    for key in same:
        o, s, r = ours[key], same[key], ref[key]
        if s is None:  # a parameter the forward does not use (BERT's word embeddings here)
            assert o is None, f"{key}: a gradient where the unpatched model has none"
            continue
        if key in ("out", "x.grad"):
            s, r = chunk(s), chunk(r)
        if key == "x.grad":
            o = o / grad_scale
        dtype = torch.promote_types(o.dtype, s.dtype)
        assert_no_worse_than_torch(o.to(dtype), s.to(dtype), r, key, atol=atol)


def _data(batch: int = BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(batch, SEQ, D_MODEL), torch.randn(batch, SEQ, D_MODEL)


DROPOUT_SEED = 1234  # torch.manual_seed before each run of a block with dropout


# Kernel launches of the single-process references (which run our kernels), taken out of the
# rank's report by spawn_ranks: the report's launches are the distributed model's own.
UNCOUNTED: collections.Counter = collections.Counter()


@contextlib.contextmanager
def _not_counted():
    """Kernel launches inside are not reported (they go to UNCOUNTED)."""
    with count_launches() as inside:
        yield
    UNCOUNTED.update(inside)


def _dropout_references(single: nn.Module, x: torch.Tensor, dy: torch.Tensor, p: float,
                        approximate: str = "none"):
    """The references of an FFN block (or, with ``gate_proj``, a gated block) with dropout
    ``p``: ``single`` (ours, on one process) run after torch.manual_seed(DROPOUT_SEED), and in
    float64 the same block with the mask ``reference.dropout_keep`` draws for the seed that run
    draws."""
    torch.manual_seed(DROPOUT_SEED)
    with _not_counted():
        same = _run(copy.deepcopy(single), x, dy)
    torch.manual_seed(DROPOUT_SEED)
    state = single.state_dict()
    gated = "gate_proj.weight" in state
    hidden = state["gate_proj.weight" if gated else "linear1.weight"].shape[0]
    keep = reference.dropout_keep(dropout_seed("cpu"), BATCH * SEQ, hidden, p)
    keep = keep.view(BATCH, SEQ, hidden)
    masked = (MaskedGatedMLP(state, keep, p) if gated
              else MaskedFeedForward(state, approximate, keep, p))
    return same, _run(masked.double(), x.double(), dy.double())


def _run_seeded(model: nn.Module, x: torch.Tensor, dy: torch.Tensor, **kwargs) -> dict:
    """``_run`` after torch.manual_seed(DROPOUT_SEED): its dropout draws the references' seed."""
    torch.manual_seed(DROPOUT_SEED)
    return _run(model, x, dy, **kwargs)


def _sequence_chunk(rank: int, world_size: int):
    rows = slice(rank * SEQ // world_size, (rank + 1) * SEQ // world_size)
    return lambda t: t[:, rows]


def _tp_mesh(world_size: int):
    return init_device_mesh("cpu", (world_size,))


def _tp_plan(colwise=tgp.ColwiseParallel, rowwise=RowwiseParallel,
             linear1: str = "linear1") -> dict:
    return {linear1: colwise(), "linear2": rowwise()}


# The plan of a patched PairFeedForward: its LinearGELU column-parallel, linear2 row-parallel.
PAIR_PLAN = {"linear1": "up.linear1"}


# ---- tensor parallel (2 ranks) ----------------------------------------------------------------


def tp_feedforward_module(rank: int, world_size: int) -> None:
    """Order 1, built with the fused modules: FeedForward with linear1 (LinearGELU)
    column-parallel and linear2 row-parallel."""
    ref = TorchFeedForward("tanh")
    ours = triton_gelu.FeedForward(D_MODEL, D_FF, dropout=0.0, approximate="tanh")
    ours.load_state_dict(ref.state_dict())
    parallelize_module(ours, _tp_mesh(world_size), _tp_plan())
    assert ours.linear1.weight.placements == (Shard(0),)
    x, dy = _data()
    _check(_run(ours, x, dy), *_references(ref, x, dy))


def tp_patch_then_parallelize(rank: int, world_size: int) -> None:
    """Order 1 on a patched model (its Linear -> GELU pair fused), with recompute (the
    backward's linear_preact rule)."""
    ref = PairFeedForward()
    ours = copy.deepcopy(ref)
    assert triton_gelu.patch(ours, recompute=True) == 1
    assert isinstance(ours.up.linear1, LinearGELU) and ours.up.linear1.recompute
    parallelize_module(ours, _tp_mesh(world_size), _tp_plan(**PAIR_PLAN))
    x, dy = _data()
    _check(_run(ours, x, dy), *_references(ref, x, dy))


def tp_parallelize_then_patch(rank: int, world_size: int) -> None:
    """Order 2: PyTorch's own plan on the unpatched model (linear1 column-parallel, linear2
    row-parallel), then patch() fuses the whole block, dropout included: linear1's input hook and
    linear2's output hook move onto the FusedFeedForward, which keeps the DTensor parameters.
    Its dropout is the single-process block's, mask for mask."""
    p = 0.25
    ref = TorchFeedForward(p=p)
    single = copy.deepcopy(ref)
    assert triton_gelu.patch(single) == 1
    ours = copy.deepcopy(ref)
    parallelize_module(ours, _tp_mesh(world_size), _tp_plan(colwise=ColwiseParallel))
    weight = ours.linear1.weight
    assert triton_gelu.patch(ours) == 1
    fused = ours.linear1
    assert isinstance(fused, FusedFeedForward) and fused.weight is weight
    assert len(fused._forward_pre_hooks) == len(fused._forward_hooks) == 1
    assert isinstance(ours.activation, nn.Identity)
    x, dy = _data()
    _check(_run_seeded(ours, x, dy), *_dropout_references(single, x, dy, p))


def tp_bert_parallelize_then_patch(rank: int, world_size: int) -> None:
    """Order 2 on a Hugging Face BERT: each layer's intermediate.dense column-parallel and
    output.dense row-parallel (PyTorch's styles), then patch() fuses every intermediate."""
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=32, hidden_size=D_MODEL, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=D_FF, max_position_embeddings=SEQ, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, hidden_act="gelu",
    )
    ref = BertModel(config, add_pooling_layer=False).eval()
    ours = copy.deepcopy(ref)
    plan = {}
    for i in range(config.num_hidden_layers):
        plan[f"encoder.layer.{i}.intermediate.dense"] = ColwiseParallel()
        plan[f"encoder.layer.{i}.output.dense"] = RowwiseParallel()
    parallelize_module(ours, _tp_mesh(world_size), plan)
    assert triton_gelu.patch(ours) == config.num_hidden_layers

    class Embedded(nn.Module):  # the encoder on embeddings, so x has a gradient to compare
        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, x):
            return self.bert(inputs_embeds=x).last_hidden_state

    x, dy = _data()
    ours_results = _run(Embedded(ours), x, dy)
    _check(ours_results, *_references(Embedded(ref), x, dy))


def tp_sequence_parallel(rank: int, world_size: int) -> None:
    """SequenceParallel on both Linears: parameters replicated, x sharded on the sequence
    dimension: the fused kernels run on each rank's rows, no communication in the forward."""
    ref = TorchFeedForward()
    ours = triton_gelu.FeedForward(D_MODEL, D_FF, dropout=0.0)
    ours.load_state_dict(ref.state_dict())
    # SequenceParallel replicates the parameters of one module (not of its children): one per Linear.
    parallelize_module(ours, _tp_mesh(world_size),
                       {"linear1": SequenceParallel(), "linear2": SequenceParallel()})
    x, dy = _data()
    chunk = _sequence_chunk(rank, world_size)
    ours_results = _run(ours, chunk(x), chunk(dy))
    assert ours_results["out"].shape == x.shape  # gathered from Shard(1)
    ours_results["out"] = chunk(ours_results["out"])
    _check(ours_results, *_references(ref, x, dy), chunk=chunk)


def tp_megatron_sequence_parallel(rank: int, world_size: int) -> None:
    """Megatron-style sequence parallelism: x arrives sharded on the sequence dimension, linear1's
    style all-gathers it (then the column split runs fused), linear2 reduce-scatters back onto
    the sequence dimension."""
    ref = TorchFeedForward()
    ours = triton_gelu.FeedForward(D_MODEL, D_FF, dropout=0.0)
    ours.load_state_dict(ref.state_dict())
    parallelize_module(ours, _tp_mesh(world_size), {
        "linear1": tgp.ColwiseParallel(input_layouts=Shard(1)),
        "linear2": RowwiseParallel(output_layouts=Shard(1)),
    })
    x, dy = _data()
    chunk = _sequence_chunk(rank, world_size)
    _check(_run(ours, chunk(x), chunk(dy)), *_references(ref, x, dy), chunk=chunk)


def tp_rowwise_linear1_unfused(rank: int, world_size: int) -> None:
    """linear1 row-parallel: z is a partial sum, GELU needs the whole one. Built that way it runs
    unfused with a warning; patch() leaves such a pair unfused with a warning. Both correct."""
    ref = TorchFeedForward()
    ours = triton_gelu.FeedForward(D_MODEL, D_FF, dropout=0.0)
    ours.load_state_dict(ref.state_dict())
    mesh = _tp_mesh(world_size)
    parallelize_module(ours, mesh, {
        "linear1": tgp.RowwiseParallel(input_layouts=Replicate()),
        "linear2": ColwiseParallel(output_layouts=Replicate()),
    })
    x, dy = _data()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours_results = _run(ours, x, dy)
    assert any(issubclass(w.category, tgp.UnfusedFallbackWarning) for w in caught), caught
    _check(ours_results, *_references(ref, x, dy))

    unpatched = copy.deepcopy(ref)
    parallelize_module(unpatched, mesh, {"linear1": RowwiseParallel()})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert triton_gelu.patch(unpatched) == 0
    assert any(issubclass(w.category, tgp.UnfusedFallbackWarning) for w in caught), caught


def tp_compiled(rank: int, world_size: int) -> None:
    """torch.compile (aot_eager, fullgraph: no graph break) of the column/row-parallel
    FeedForward: Dynamo traces the DTensor program and the style hooks, the custom ops' sharding
    rules place the local kernels."""
    ref = TorchFeedForward()
    ours = triton_gelu.FeedForward(D_MODEL, D_FF, dropout=0.0)
    ours.load_state_dict(ref.state_dict())
    parallelize_module(ours, _tp_mesh(world_size), _tp_plan())
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    x, dy = _data()
    _check(_run(compiled, x, dy, params=ours), *_references(ref, x, dy))


# ---- the whole block under tensor parallel (2 ranks) ------------------------------------------


def tp_block_feedforward(rank: int, world_size: int) -> None:
    """Order 1, built with FeedForward: FeedForwardParallel runs the whole block fused on each
    rank's shards, dropout and recompute included. d_ff 18: rank 1's columns start at 9, inside
    a group of 4 (the dropout epilogue's per-element branch), and its dropout is still the
    single-process one."""
    p = 0.25
    single = triton_gelu.FeedForward(D_MODEL, D_FF_ODD, dropout=p, recompute=True)
    ours = copy.deepcopy(single)
    parallelize_module(ours, _tp_mesh(world_size), tgp.FeedForwardParallel())
    assert ours.linear1.weight.placements == (Shard(0),)
    assert ours.linear2.weight.placements == (Shard(1),)
    x, dy = _data()
    _check(_run_seeded(ours, x, dy), *_dropout_references(single, x, dy, p))


def tp_block_patch_then_parallelize(rank: int, world_size: int) -> None:
    """Order 1 on a model patch() fused whole: FeedForwardParallel on linear1's slot (the
    FusedFeedForward), with Megatron-style sequence parallelism around it (x arrives sharded on
    the sequence dimension and is all-gathered; the output is reduce-scattered back)."""
    ref = TorchFeedForward()
    ours = copy.deepcopy(ref)
    assert triton_gelu.patch(ours) == 1
    parallelize_module(ours, _tp_mesh(world_size), {"linear1": tgp.FeedForwardParallel(
        input_layouts=Shard(1), output_layouts=Shard(1))})
    assert ours.linear2.weight.placements == (Shard(1),)  # the FeedForwardOutput's
    x, dy = _data()
    chunk = _sequence_chunk(rank, world_size)
    _check(_run(ours, chunk(x), chunk(dy)), *_references(ref, x, dy), chunk=chunk)


def tp_block_sequence_parallel(rank: int, world_size: int) -> None:
    """Order 2 with SequenceParallel on both Linears (parameters replicated, x sharded on the
    sequence dimension): patch() fuses the whole block, which runs on each rank's rows."""
    ref = TorchFeedForward()
    ours = copy.deepcopy(ref)
    parallelize_module(ours, _tp_mesh(world_size),
                       {"linear1": SequenceParallel(), "linear2": SequenceParallel()})
    assert triton_gelu.patch(ours) == 1 and isinstance(ours.linear1, FusedFeedForward)
    x, dy = _data()
    chunk = _sequence_chunk(rank, world_size)
    ours_results = _run(ours, chunk(x), chunk(dy))
    ours_results["out"] = chunk(ours_results["out"])  # gathered from Shard(1)
    _check(ours_results, *_references(ref, x, dy), chunk=chunk)


class OnMesh(nn.Module):
    """``block`` with its parameters laid out by hand (no plan): it takes x as a replicated
    DTensor, and its output is gathered."""

    def __init__(self, block: nn.Module, mesh, placements: dict) -> None:
        super().__init__()
        self.block, self.mesh = block, mesh
        for name, placement in placements.items():
            owner, _, leaf = name.rpartition(".")
            param = block.get_parameter(name)
            block.get_submodule(owner).register_parameter(
                leaf, nn.Parameter(distribute_tensor(param.detach(), mesh, [placement])))

    def forward(self, x):
        return self.block(DTensor.from_local(x, self.mesh, [Replicate()])).full_tensor()


def tp_block_unservable_falls_back(rank: int, world_size: int) -> None:
    """A layout the fused block cannot serve (linear1 column-parallel, linear2 replicated): one
    UnfusedFallbackWarning, and linear_gelu's column split plus PyTorch's linear on the
    DTensors, whose communication DTensor inserts; the single-process results."""
    ref = TorchFeedForward()
    block = triton_gelu.FeedForward(D_MODEL, D_FF, dropout=0.0)
    block.load_state_dict(ref.state_dict())
    ours = OnMesh(block, _tp_mesh(world_size), {
        "linear1.weight": Shard(0), "linear1.bias": Shard(0), "linear2.weight": Replicate(),
        "linear2.bias": Replicate()})
    x, dy = _data()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with count_launches() as launched:
            results = _run(ours, x, dy)
    fallbacks = [w for w in caught if issubclass(w.category, tgp.UnfusedFallbackWarning)]
    assert len(fallbacks) == 1 and "FFN block" in str(fallbacks[0].message), caught
    assert not any(name.startswith("ffn") for name in launched), launched
    results = {key.replace("block.", "", 1): value for key, value in results.items()}
    _check(results, *_references(ref, x, dy))


def tp_block_compiled(rank: int, world_size: int) -> None:
    """torch.compile (aot_eager, fullgraph) of a FeedForward under FeedForwardParallel with
    dropout: the seed is drawn in the graph, the local call traced; the single-process dropout."""
    p = 0.25
    single = triton_gelu.FeedForward(D_MODEL, D_FF, dropout=p)
    ours = copy.deepcopy(single)
    parallelize_module(ours, _tp_mesh(world_size), tgp.FeedForwardParallel())
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    x, dy = _data()
    _check(_run_seeded(compiled, x, dy, params=ours), *_dropout_references(single, x, dy, p))


def tp_gpt2_patch_then_parallelize(rank: int, world_size: int) -> None:
    """GPT-2's MLP, whose Conv1D PyTorch's styles refuse: patch() fuses it whole (the weights
    kept (in, out)), then FeedForwardParallel on c_fc's slot splits them on their output and
    input features (Shard(1) and Shard(0) of the stored layouts)."""
    from transformers import GPT2Config
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

    ref = GPT2MLP(D_FF, GPT2Config(n_embd=D_MODEL, n_layer=1, n_head=2, resid_pdrop=0.0))
    ours = copy.deepcopy(ref)
    assert triton_gelu.patch(ours) == 1
    parallelize_module(ours, _tp_mesh(world_size), {"c_fc": tgp.FeedForwardParallel()})
    assert ours.c_fc.weight.placements == (Shard(1),)
    assert ours.c_proj.weight.placements == (Shard(0),)
    x, dy = _data()
    _check(_run(ours, x, dy), *_references(ref, x, dy))


# ---- GeGLU and the gated block under tensor parallel (2 ranks) ---------------------------------


def tp_geglu_colwise(rank: int, world_size: int) -> None:
    """GeGLU column-parallel (triton_gelu.parallel.ColwiseParallel: gate_proj and up_proj both
    Shard(0), so each rank gates its own columns in one kernel), output gathered."""
    ref = TorchGeGLU()
    ours = triton_gelu.GeGLU(D_MODEL, D_FF, bias=True)
    ours.load_state_dict(ref.state_dict())
    parallelize_module(ours, _tp_mesh(world_size),
                       tgp.ColwiseParallel(output_layouts=Replicate()))
    assert ours.up_proj.weight.placements == (Shard(0),)
    x, dy = _data()
    dy = torch.randn(BATCH, SEQ, D_FF)
    _check(_run(ours, x, dy), *_references(ref, x, dy))


def tp_gated_block_style(rank: int, world_size: int) -> None:
    """Order 1, built with GatedFeedForward: FeedForwardParallel (gate_proj and up_proj
    column-parallel, down_proj row-parallel, its bias added once) runs the fused gated block on
    each rank's shards."""
    ref = GemmaLikeMLP(bias=True)
    ours = triton_gelu.GatedFeedForward(D_MODEL, D_FF, bias=True)
    ours.load_state_dict(ref.state_dict())
    parallelize_module(ours, _tp_mesh(world_size), tgp.FeedForwardParallel())
    assert ours.down_proj.bias.placements == (Replicate(),)
    x, dy = _data()
    _check(_run(ours, x, dy), *_references(ref, x, dy))


def tp_gated_block_dropout(rank: int, world_size: int) -> None:
    """The gated block with dropout under FeedForwardParallel: each rank draws the mask of its
    columns of the whole hidden layer (d_ff 18: rank 1's start inside a group of 4), so the
    ranks together drop what the single-process block drops, mask for mask; with recompute."""
    p = 0.3
    single = triton_gelu.GatedFeedForward(D_MODEL, D_FF_ODD, dropout=p, bias=True,
                                          recompute=True)
    ours = copy.deepcopy(single)
    parallelize_module(ours, _tp_mesh(world_size), tgp.FeedForwardParallel())
    x, dy = _data()
    _check(_run_seeded(ours, x, dy), *_dropout_references(single, x, dy, p))


def tp_gemma_parallelize_then_patch(rank: int, world_size: int) -> None:
    """Order 2 on a Gemma MLP: PyTorch's styles on gate_proj, up_proj (column) and down_proj
    (row), then patch() swaps the block for a GatedGELUBlock, moving gate_proj's input hook and
    down_proj's output hook onto it."""
    ref = Holder(GemmaLikeMLP())
    ours = copy.deepcopy(ref)
    parallelize_module(ours, _tp_mesh(world_size), {
        "block.gate_proj": ColwiseParallel(), "block.up_proj": ColwiseParallel(),
        "block.down_proj": RowwiseParallel()})
    assert triton_gelu.patch(ours) == 1 and isinstance(ours.block, GatedGELUBlock)
    assert not ours.block.gate_proj._forward_pre_hooks and ours.block._forward_pre_hooks
    x, dy = _data()
    _check(_run(ours, x, dy), *_references(ref, x, dy))


# ---- data parallel (2 ranks) ------------------------------------------------------------------


def _batch_chunk(rank: int, world_size: int):
    rows = slice(rank * BATCH // world_size, (rank + 1) * BATCH // world_size)
    return lambda t: t[rows]


def ddp_patched(rank: int, world_size: int) -> None:
    """DistributedDataParallel around a patched 2-block model: each rank its part of the batch;
    the averaged gradients equal the whole batch's."""
    ref = Stack()
    ours = copy.deepcopy(ref)
    assert triton_gelu.patch(ours) == 2
    ddp = nn.parallel.DistributedDataParallel(ours)
    x, dy = _data()
    chunk = _batch_chunk(rank, world_size)
    # DDP averages over ranks: scale each rank's loss so the average is the whole batch's sum.
    results = _run(ddp, chunk(x), chunk(dy), loss_scale=world_size, params=ours)
    _check(results, *_references(ref, x, dy), chunk=chunk, grad_scale=world_size)


def _fsdp2_bf16(model: nn.Module, mesh) -> nn.Module:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    return fully_shard(model, mesh=mesh, mp_policy=policy)


def fsdp2_bf16_per_block(rank: int, world_size: int) -> None:
    """FSDP2 fully_shard per block of a patched model with a bf16 MixedPrecisionPolicy: compared
    with the unpatched model in bf16, against float64."""
    ref = Stack()
    ours = copy.deepcopy(ref)
    assert triton_gelu.patch(ours) == 2
    _fsdp2_bf16(ours, init_device_mesh("cpu", (world_size,)))
    x, dy = _data()
    chunk = _batch_chunk(rank, world_size)
    results = _run(ours, chunk(x), chunk(dy), loss_scale=world_size)
    assert results["out"].dtype == torch.bfloat16
    _check(results, *_references(ref, x, dy, torch.bfloat16), chunk=chunk,
           atol=ATOL[torch.bfloat16], grad_scale=world_size)


def fsdp2_compiled(rank: int, world_size: int) -> None:
    """torch.compile (aot_eager) of an FSDP2-wrapped patched model (per-block sharding, fp32)."""
    from torch.distributed.fsdp import fully_shard

    ref = Stack()
    ours = copy.deepcopy(ref)
    assert triton_gelu.patch(ours) == 2
    mesh = init_device_mesh("cpu", (world_size,))
    for block in ours.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(ours, mesh=mesh)
    compiled = torch.compile(ours, backend="aot_eager")
    x, dy = _data()
    chunk = _batch_chunk(rank, world_size)
    results = _run(compiled, chunk(x), chunk(dy), loss_scale=world_size, params=ours)
    _check(results, *_references(ref, x, dy), chunk=chunk, grad_scale=world_size)


# ---- tensor parallel + FSDP2 on a 2-D mesh (4 ranks) -----------------------------------------


def _tp_fsdp2_2d(world_size: int, ffn: Callable[[], nn.Module], plan: Callable[[], dict]) -> None:
    """Each block's FFN parallelized by ``plan()`` on the "tp" mesh dimension, each block and
    the model fully_shard on "dp" (bf16 parameters): the recipe of the README's "Scaling out",
    on blocks patched first."""
    ref = Stack(ffn=ffn)
    ours = copy.deepcopy(ref)
    assert triton_gelu.patch(ours) == 2
    mesh = init_device_mesh("cpu", (2, world_size // 2), mesh_dim_names=("dp", "tp"))
    for block in ours.blocks:
        parallelize_module(block.ffn, mesh["tp"], plan())
    _fsdp2_bf16(ours, mesh["dp"])
    x, dy = _data()
    dp_rank, dp_size = mesh.get_local_rank("dp"), mesh.size(0)
    chunk = _batch_chunk(dp_rank, dp_size)
    results = _run(ours, chunk(x), chunk(dy), loss_scale=dp_size)
    _check(results, *_references(ref, x, dy, torch.bfloat16), chunk=chunk,
           atol=ATOL[torch.bfloat16], grad_scale=dp_size)


def tp_fsdp2_2d_mesh(rank: int, world_size: int) -> None:
    """TP + FSDP2 on blocks whose patch fuses the Linear -> GELU pair (PairFeedForward): its
    LinearGELU column-parallel, linear2 row-parallel."""
    _tp_fsdp2_2d(world_size, PairFeedForward, lambda: _tp_plan(**PAIR_PLAN))


def tp_fsdp2_2d_block(rank: int, world_size: int) -> None:
    """TP + FSDP2 on blocks patch() fused whole: FeedForwardParallel on each FusedFeedForward."""
    _tp_fsdp2_2d(world_size, TorchFeedForward, lambda: {"linear1": tgp.FeedForwardParallel()})
