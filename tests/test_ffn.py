"""The fused FFN block y = linear2(dropout(gelu(linear1(x)))): outputs and every gradient against
float64, the dropout mask (exact, statistical, reproducible), what the forward keeps for the
backward, both paths (fused, composed), torch.compile, autocast, and bad input.

Shapes stay small (sides < 64) so the Triton interpreter runs the file quickly, and are
multiples of no block size so every masked edge of every kernel runs. The dropout mask of a
call is reproduced in the tests by resetting the generator and drawing the seed again
(``triton_gelu.testing.dropout_seed``), then ``reference.dropout_keep``: the explicit reference.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import weakref

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from fakes import tile_tuners
from helpers import (
    DTYPES, X_LAYOUTS, assert_all_written, assert_finite_differences, assert_nan_where_ref_nan,
    assert_no_worse_than_torch, assert_reproducible_by_seed, launched,
)
from torch import nn

import triton_gelu
from bench.memory import saved_activation_bytes
from triton_gelu import fallback, kernels, ops, reference
from triton_gelu.autotune import clear_plans, force_path
from triton_gelu.kernels import _matmul, ffn, gelu as gelu_kernels
from triton_gelu.testing import count_launches, dropout_seed

FORMS = ["none", "tanh"]
PATHS = ["fused", "composed"]  # the paths that draw the dropout mask
# "torch", eager PyTorch's block, serves p == 0 only: its tests run without dropout.
M, D, HIDDEN = 37, 45, 51  # tokens, d_model, d_ff: multiples of no block size


pytestmark = pytest.mark.usefixtures("ieee_float32")


@contextlib.contextmanager
def path(name: str):
    """Both the forward and the backward of the block by path ``name``."""
    with force_path(ffn_fwd=name, ffn_bwd=name):
        yield


def _operands(x_shape, hidden, dtype, device, bias=True, out_features=None):
    """x ~ N(0, 1), W ~ N(0, 1/fan_in), b ~ N(0, 1): pre-activations of order one."""
    d = x_shape[-1]
    e = d if out_features is None else out_features
    x = torch.randn(x_shape, device=device).to(dtype)
    w1 = (torch.randn(hidden, d, device=device) / d**0.5).to(dtype)
    w2 = (torch.randn(e, hidden, device=device) / hidden**0.5).to(dtype)
    b1 = torch.randn(hidden, device=device).to(dtype) if bias else None
    b2 = torch.randn(e, device=device).to(dtype) if bias else None
    return x, w1, b1, w2, b2


def _keep_of_call(call_seed: int, x_shape, hidden, p, device):
    """The mask feed_forward draws after ``torch.manual_seed(call_seed)``, shaped (..., hidden)."""
    if p == 0.0:
        return None
    torch.manual_seed(call_seed)
    seed = dropout_seed(device)
    rows = math.prod(x_shape[:-1])
    return reference.dropout_keep(seed, rows, hidden, p).view(*x_shape[:-1], hidden)


def _torch_block(x, w1, b1, w2, b2, keep, p, approximate):
    """The same block by PyTorch in the operands' dtype, dropout with the explicit mask."""
    h = F.gelu(F.linear(x, w1, b1), approximate=approximate)
    if keep is not None:
        h = h * (keep.to(h.dtype) / (1.0 - p))
    return F.linear(h, w2, b2)


def _check(operands, approximate="none", p=0.0, recompute=False, what=""):
    """feed_forward's output and gradients against float64 with the call's own mask, no worse
    than PyTorch in the operands' dtype. Returns (y, dx, dW1, db1, dW2, db2)."""
    x = operands[0]
    leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in operands]
    call_seed = int(torch.randint(0, 2**31, ()))
    torch.manual_seed(call_seed)
    y = triton_gelu.feed_forward(*leaves, p=p, approximate=approximate, recompute=recompute)
    dy = torch.randn_like(y)
    y.backward(dy)

    keep = _keep_of_call(call_seed, x.shape, operands[1].shape[0], p, x.device)
    theirs = [None if t is None else t.detach().clone().requires_grad_(True) for t in operands]
    y_torch = _torch_block(*theirs, keep, p, approximate)
    y_torch.backward(dy)
    y64, grads64 = reference.feed_forward64(*operands, keep, p, approximate, dy)

    what = f"{x.dtype} {approximate} p={p} recompute={recompute} x{tuple(x.shape)} {what}"
    assert y.shape == y_torch.shape and y.dtype == x.dtype, what
    assert_no_worse_than_torch(y.detach(), y_torch.detach(), y64, "y " + what)
    names = ("dx", "dw1", "db1", "dw2", "db2")
    for name, ours, torch_leaf, ref in zip(names, leaves, theirs, grads64):
        if ours is None:
            continue
        assert ours.grad.shape == ours.shape, f"{name} {what}: shape {tuple(ours.grad.shape)}"
        # Parameter gradients sum over the tokens: scale the slack to their size.
        assert_no_worse_than_torch(ours.grad, torch_leaf.grad, ref, f"{name} {what}")
    return (y.detach(), *(None if t is None else t.grad for t in leaves))


# ---- p = 0 against float64 ---------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("recompute", [False, True], ids=["saved", "recompute"])
@pytest.mark.parametrize("approximate", FORMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_float64(dtype, approximate, recompute, bias, device):
    _check(_operands((M, D), HIDDEN, dtype, device, bias), approximate, 0.0, recompute)


@pytest.mark.parametrize("approximate", FORMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_composed_path_matches_float64(dtype, approximate, device):
    with path("composed"):
        _check(_operands((M, D), HIDDEN, dtype, device), approximate, 0.0, what="composed")
        _check(_operands((M, D), HIDDEN, dtype, device, bias=False), approximate, 0.0,
               recompute=True, what="composed")


@pytest.mark.parametrize("approximate", FORMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_torch_path_matches_float64(dtype, approximate, device):
    """PyTorch's own block, eager's numerics and saved tensors (recompute does not apply):
    no kernel runs."""
    with path("torch"):
        ran = launched(lambda: _check(_operands((M, D), HIDDEN, dtype, device), approximate,
                                       0.0, what="torch"))
        assert ran == {}, ran
        ran = launched(lambda: _check(_operands((M, D), HIDDEN, dtype, device, bias=False),
                                       approximate, 0.0, recompute=True, what="torch"))
        assert ran == {}, ran


def test_torch_path_does_not_apply_with_dropout(device, monkeypatch):
    # PyTorch's dropout cannot draw the kernels' mask (which the backward regenerates): forced
    # at p > 0, the torch path warns and the op chooses as usual (the fused kernels here).
    for paths in (ffn._forward_paths, ffn._backward_paths):
        monkeypatch.setattr(paths, "_forced_warned", set())  # each warns once per process
    operands = _operands((M, D), HIDDEN, torch.float32, device)
    with path("torch"), pytest.warns(UserWarning, match="does not apply to this problem"):
        ran = launched(lambda: _check(operands, "tanh", p=0.3, what="forced torch"))
    assert ran == {"ffn_fwd_gelu_dropout": 1, "ffn_bwd_dz": 1}, ran


@pytest.mark.parametrize("path_name", PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_recompute_gives_identical_gradients(dtype, path_name, device):
    # The recomputed z is bitwise the saved one (the same kernel; under the interpreter the same
    # tile, on a GPU when the tuner picks the same tile for both), so every gradient is too.
    operands = _operands((M, D), HIDDEN, dtype, device)
    with path(path_name):
        torch.manual_seed(0)
        saved = _check(operands, "tanh", p=0.3, recompute=False)
        torch.manual_seed(0)
        recomputed = _check(operands, "tanh", p=0.3, recompute=True)
    for name, a, b in zip(("y", "dx", "dw1", "db1", "dw2", "db2"), saved, recomputed):
        if path_name == "fused":
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{name} differs with recompute")
        else:  # composed: z by cuBLAS in the forward, by our kernel when recomputed
            torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("layout", X_LAYOUTS.keys())
def test_input_layouts(layout, device):
    # N-D, non-contiguous and empty inputs, with dropout: the mask follows the flattened rows.
    x = X_LAYOUTS[layout](D, device).to(torch.bfloat16)
    _, w1, b1, w2, b2 = _operands((D,), HIDDEN, torch.bfloat16, device)
    y, dx, *grads = _check((x, w1, b1, w2, b2), "tanh", p=0.2, what=layout)
    assert y.shape == (*x.shape[:-1], D) and dx.shape == x.shape
    if x.numel() == 0:  # no tokens: zero parameter gradients (sums over nothing)
        assert all(g is not None and not g.any() for g in grads)


def test_odd_shapes_and_transposed_weights(device):
    # E != D, sides of 1, and weights given as transposed views (Conv1D's layout): read through
    # their strides.
    for d, hidden, e in ((1, 1, 1), (3, 1, 2), (1, 7, 5), (45, 51, 13)):
        x, w1, b1, w2, b2 = _operands((9, d), hidden, torch.float32, device, out_features=e)
        w1_t = w1.t().contiguous().t()
        w2_t = w2.t().contiguous().t()
        assert not w1_t.is_contiguous() or min(w1.shape) == 1
        for path_name, p in (("fused", 0.25), ("composed", 0.25), ("torch", 0.0)):
            with path(path_name):
                _check((x, w1_t, b1, w2_t, b2), "none", p=p, what=f"{d}->{hidden}->{e}")


@pytest.mark.parametrize("path_name", PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_poisoned_buffers_fully_written(dtype, path_name, device, poison_outputs):
    x, w1, b1, w2, b2 = _operands((M, D), HIDDEN, dtype, device)
    dy = torch.randn(M, D, device=device).to(dtype)
    seed = dropout_seed(device)
    with path(path_name):
        y, preact = kernels.ffn_forward(x, w1, b1, w2, b2, seed, 0.4, "gelu", True)
        grads = kernels.ffn_backward(dy, x, w1, w2, preact, seed, 0.4, "gelu", [True] * 5)
    keep = reference.dropout_keep(seed, M, HIDDEN, 0.4)
    y64, grads64 = reference.feed_forward64(x, w1, b1, w2, b2, keep, 0.4, "none", dy)
    assert_all_written(y, y64, "y")
    assert_all_written(preact, F.linear(x.double(), w1.double(), b1.double()), "preact")
    for name, grad, ref in zip(("dx", "dw1", "db1", "dw2", "db2"), grads, grads64):
        assert_all_written(grad, ref, name)


@pytest.mark.parametrize("approximate", FORMS)
def test_nan_in_nan_out(approximate, device):
    x, w1, b1, w2, b2 = _operands((M, D), HIDDEN, torch.float32, device)
    x[3, 7] = float("nan")  # row 3 of y and dx; all of dW1, db1, dW2 (not db2)
    leaves = [t.requires_grad_(True) for t in (x, w1, b1, w2, b2)]
    y = triton_gelu.feed_forward(*leaves, p=0.5, approximate=approximate)
    dy = torch.randn_like(y)
    y.backward(dy)
    # Dropped elements stay NaN, as through nn.Dropout (input * mask / (1 - p)).
    ref64, grads64 = reference.feed_forward64(x, w1, b1, w2, b2, None, 0.0, approximate, dy)
    assert_nan_where_ref_nan(y.detach(), ref64, "y")
    for name, leaf, ref in zip(("dx", "dw1", "db1", "dw2", "db2"), leaves, grads64):
        assert_nan_where_ref_nan(leaf.grad, ref, name)


# ---- p > 0: the mask ---------------------------------------------------------------------------


@pytest.mark.parametrize("path_name", PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dropout_matches_explicit_mask_reference(dtype, path_name, device):
    # The call's mask, regenerated from its seed by the PyTorch Philox: outputs and all
    # gradients match the block computed with that mask, so the backward used the forward's.
    with path(path_name):
        for approximate, p in (("none", 0.1), ("tanh", 0.5)):
            _check(_operands((3, 13, D), HIDDEN, dtype, device), approximate, p)


@pytest.mark.parametrize("path_name", PATHS)
def test_finite_differences_with_the_seed_reset(path_name, device):
    # For a fixed seed the block is a deterministic function of its inputs: central differences
    # of <y, dy>, the generator reset before every forward, match the analytic gradients.
    operands = [t.requires_grad_(True) for t in _operands((5, 7), 9, torch.float32, device,
                                                          out_features=6)]
    dy = torch.randn(5, 6, device=device)

    def loss(*tensors):
        torch.manual_seed(1234)
        y = triton_gelu.feed_forward(*tensors, p=0.5, approximate="tanh")
        return (y * dy).sum()

    with path(path_name):
        assert_finite_differences(loss, operands, ("x", "w1", "b1", "w2", "b2"))


def _elementwise_mask(seed: torch.Tensor, p: float, rows: int, cols: int) -> torch.Tensor:
    """The mask the composed path's elementwise kernel draws, read off h = dropout(gelu(1))."""
    z = torch.ones(rows, cols, device=seed.device)
    h = gelu_kernels.gelu_dropout_forward(z, seed, p, "gelu", torch.empty_like(z))
    return h != 0


def test_kernel_mask_is_the_reference_mask(device):
    # The kernel draws exactly the PyTorch copy of its generator, element for element, at any p.
    seed = dropout_seed(device)
    for p in (0.1, 0.37, 0.999):
        keep = _elementwise_mask(seed, p, 64, 129)
        want = reference.dropout_keep(seed, 64, 129, p)
        assert torch.equal(keep.cpu(), want.cpu()), f"p={p}: {int((keep != want).sum())} differ"


def test_keep_fraction_within_four_sigma(device):
    # One kernel launch over 102800 elements at p = 0.5; since its mask is the reference's bit
    # for bit (checked here over all of them), the other p are counted on the reference's words.
    rows, cols = 400, 257
    seed = dropout_seed(device)
    with count_launches() as launched:
        keep = _elementwise_mask(seed, 0.5, rows, cols)
    assert launched == {"gelu_dropout_fwd": 1}, launched  # the Triton kernel drew it
    top31 = reference.dropout_words(seed, rows, cols) >> 1
    assert torch.equal(keep.cpu(), (top31 >= 2**30).cpu())
    for p, kept in ((0.5, keep), (0.1, None), (0.999, None)):
        if kept is None:
            kept = top31 >= reference.dropout_constants(p)[0]
        fraction, sigma = kept.double().mean().item(), math.sqrt(p * (1 - p) / kept.numel())
        assert abs(fraction - (1 - p)) <= 4 * sigma, (
            f"p={p}: kept {fraction:.5f}, want {1 - p} +- 4 x {sigma:.1e}")


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return (a @ b / (a.norm() * b.norm())).item()


def test_no_correlation_between_rows_columns_or_calls(device):
    rows, cols, p = 200, 129, 0.5
    first = _elementwise_mask(dropout_seed(device), p, rows, cols)
    second = _elementwise_mask(dropout_seed(device), p, rows, cols)
    bound = 4 / math.sqrt(first.numel())  # 4 sigma of the sample correlation of independent bits
    pairs = {
        "neighbouring rows": (first[1:], first[:-1]),
        "neighbouring columns": (first[:, 1:], first[:, :-1]),
        "rows 64 apart": (first[64:], first[:-64]),
        "two calls": (first, second),
    }
    for name, (a, b) in pairs.items():
        corr = _correlation(a, b)
        assert abs(corr) <= bound, f"{name}: correlation {corr:.4f} > {bound:.4f}"


@pytest.mark.parametrize("path_name", PATHS)
def test_same_seed_same_output_other_seed_other_output(path_name, device):
    module = triton_gelu.FeedForward(D, HIDDEN, dropout=0.3, device=device).train()
    x = torch.randn(M, D, device=device)
    with path(path_name):
        assert_reproducible_by_seed(lambda: module(x))


def test_fused_epilogue_draws_the_same_mask_as_the_elementwise_kernel(device):
    # Tiles of the matmul and blocks of the elementwise kernel differ; the mask does not.
    x, w1, b1, w2, b2 = _operands((M, D), HIDDEN, torch.float32, device)
    seed = dropout_seed(device)
    outputs = {}
    for path_name in PATHS:
        with path(path_name):
            outputs[path_name] = kernels.ffn_forward(x, w1, b1, w2, b2, seed, 0.5, "gelu_tanh", True)
    # Same mask, so the same y to rounding (z by our kernel vs cuBLAS).
    torch.testing.assert_close(outputs["fused"][0], outputs["composed"][0], rtol=1e-5, atol=1e-5)
    # Any tile shape draws the same mask: launch the epilogue with other tiles than the tuner's.
    want = reference.dropout_keep(seed, M, HIDDEN, 0.5).cpu()
    for tile, tuner in tile_tuners(ffn.linear_gelu_fwd_kernel, "test_tile"):
        h = torch.empty(M, HIDDEN, device=device)
        ffn.launch_forward(tuner, x, w1, b1, h, None, "gelu_tanh", seed, 0.5)
        assert torch.equal((h != 0).cpu(), want), f"tile {tile}"


@pytest.mark.parametrize("col_offset", [0, 13])
def test_the_dz_epilogue_in_parts_matches_the_elementwise_kernel(col_offset, device, monkeypatch):
    # The dz kernel's epilogue runs on column halves (quarters from 8K-element tiles): at a
    # tile of each kind, with dropout on a shard starting on a group of 4 columns and inside
    # one, dz, h and the db1 partial sums are the composed path's (same mask, same math).
    x, w1, _, w2, _ = _operands((M, D), HIDDEN, torch.float32, device)
    cols = slice(col_offset, HIDDEN)
    w1, w2 = w1[cols], w2[:, cols].contiguous()
    z, dy, seed = x @ w1.t(), torch.randn(M, D, device=device), dropout_seed(device)
    needs = [True] * 5
    with path("composed"):
        want = kernels.ffn_backward(dy, x, w1, w2, z, seed, 0.5, "gelu_tanh", needs, col_offset, HIDDEN)
    for tile, tuner in tile_tuners(ffn._ffn_bwd_dz_kernel, "test_dz_parts",
                                   tiles=((16, 64), (128, 64))):
        monkeypatch.setattr(ffn, "_dz_tuner", tuner)
        with path("fused"):
            got = kernels.ffn_backward(dy, x, w1, w2, z, seed, 0.5, "gelu_tanh", needs, col_offset,
                                       HIDDEN)
        for name, ours, theirs in zip(("dx", "dW1", "db1", "dW2", "db2"), got, want):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5,
                                       msg=f"{name}, tile {tile}")


# Tensor parallel: a rank's hidden columns start at col_offset of the whole hidden layer; on a
# group of 4 columns (8), inside one (13: the fused epilogue's per-element branch), or at 0.
SHARD_OFFSETS = [0, 8, 13]


@pytest.mark.parametrize("col_offset", SHARD_OFFSETS)
def test_a_shard_draws_its_columns_of_the_whole_mask(col_offset, device):
    # The reference, the elementwise kernel and the fused epilogue (three tile shapes) draw, for
    # columns col_offset .. of the whole (M, HIDDEN) activation, exactly the whole one's mask.
    cols, seed = 21, dropout_seed(device)
    want = reference.dropout_keep(seed, M, HIDDEN, 0.5)[:, col_offset:col_offset + cols].cpu()
    got = {"reference": reference.dropout_keep(seed, M, cols, 0.5, col_offset, HIDDEN)}
    ones = torch.ones(M, cols, device=device)
    got["elementwise kernel"] = gelu_kernels.gelu_dropout_forward(
        ones, seed, 0.5, "gelu", torch.empty_like(ones), col_offset, HIDDEN) != 0
    x, w1, b1, _, _ = _operands((M, D), cols, torch.float32, device)
    for tile, tuner in tile_tuners(ffn.linear_gelu_fwd_kernel, "test_shard_tile"):
        h = torch.empty(M, cols, device=device)
        ffn.launch_forward(tuner, x, w1, b1, h, None, "gelu_tanh", seed, 0.5, col_offset, HIDDEN)
        got[f"fused epilogue, tile {tile}"] = h != 0
    for name, keep in got.items():
        assert torch.equal(keep.cpu(), want), f"{name}: {int((keep.cpu() != want).sum())} differ"


@pytest.mark.parametrize("launchers", ["kernels fused", "kernels composed", "fallback"])
def test_shards_of_the_hidden_layer_make_the_whole_block(launchers, device):
    # Split the hidden layer at column 13 as tensor parallel does (linear1's rows, linear2's
    # columns; b2 added by one shard): the shards' outputs sum to the whole block's, their dW1,
    # db1, dW2 are the whole one's rows and columns, and their dx sum to the whole dx, dropout
    # included (each shard draws its columns of the whole mask).
    x, w1, b1, w2, b2 = _operands((M, D), HIDDEN, torch.float32, device)
    dy, seed, cut = torch.randn(M, D, device=device), dropout_seed(device), 13
    backend = fallback if launchers == "fallback" else kernels
    with path(launchers.split()[-1]) if backend is kernels else contextlib.nullcontext():
        y, z = backend.ffn_forward(x, w1, b1, w2, b2, seed, 0.5, "gelu_tanh", True)
        grads = backend.ffn_backward(dy, x, w1, w2, z, seed, 0.5, "gelu_tanh", [True] * 5)
        shards = []
        for cols, bias2 in ((slice(0, cut), b2), (slice(cut, HIDDEN), None)):
            y_i, z_i = backend.ffn_forward(x, w1[cols], b1[cols], w2[:, cols], bias2, seed, 0.5,
                                           "gelu_tanh", True, cols.start, HIDDEN)
            g_i = backend.ffn_backward(dy, x, w1[cols], w2[:, cols], z_i, seed, 0.5, "gelu_tanh",
                                       [True] * 5, cols.start, HIDDEN)
            shards.append((y_i, g_i))
    (y0, g0), (y1, g1) = shards
    close = functools.partial(torch.testing.assert_close, rtol=1e-5, atol=1e-5)
    close(y0 + y1, y, msg="y")
    close(g0[0] + g1[0], grads[0], msg="dx")
    for i, name, dim in ((1, "dW1", 0), (2, "db1", 0), (3, "dW2", 1)):
        close(torch.cat([g0[i], g1[i]], dim), grads[i], msg=name)
    close(g0[4], grads[4], msg="db2")


def test_ops_reject_bad_hidden_columns(device):
    # The custom ops validate (compiled graphs and tensor parallel call them); the launchers
    # below them trust their callers. A column argument of the wrong type is refused by the
    # op's schema (int), in the dispatcher's words.
    x, w1, b1, w2, b2 = _operands((4, D), HIDDEN, torch.float32, device)
    seed = dropout_seed(device)
    with count_launches() as launched:
        for columns, error, match in (
                ((-1, None), ValueError, "at col_offset -1 do not fit in .* n_cols 51"),
                ((1, HIDDEN), ValueError, f"the {HIDDEN} hidden columns at col_offset 1 do not"),
                ((0, 50), ValueError, "of n_cols 50 columns"),
                ((0.0, None), (TypeError, RuntimeError), None)):
            with pytest.raises(error, match=match):
                torch.ops.triton_gelu.ffn_fwd(x, w1, b1, w2, b2, seed, 0.2, "gelu", True,
                                              *columns)
    assert not launched, launched


@triton.jit
def _randint4x_kernel(seed_ptr, out_ptr, base, BLOCK: tl.constexpr):
    counter = base + tl.arange(0, BLOCK).to(tl.int64)
    words = tl.randint4x(tl.load(seed_ptr), counter)
    for i in tl.static_range(4):
        tl.store(out_ptr + i * BLOCK + tl.arange(0, BLOCK), words[i].to(tl.int64))


def test_reference_philox_is_triton_randint4x_bit_for_bit(device):
    # Counters past 2**32 (activations of more than 16 G elements) use the high word; seeds use
    # all 64 bits.
    for seed_value in (0, 12345, 2**62 - 1):
        seed = torch.tensor([seed_value], dtype=torch.int64, device=device)
        for base in (0, 2**32 - 64, 5 * 2**40 + 3):
            out = torch.empty(4, 128, dtype=torch.int64, device=device)
            _randint4x_kernel[(1,)](seed, out, base, BLOCK=128)
            counter = torch.arange(base, base + 128, dtype=torch.int64, device=device)
            want = torch.stack(reference.philox4(seed, counter))
            assert torch.equal(out & 0xFFFFFFFF, want), (seed_value, base)


def test_high_p_and_tiny_tensors(device):
    for shape, hidden in (((1, 1), 1), ((2, 3), 2), ((1, 5), 7)):
        operands = _operands(shape, hidden, torch.float32, device)
        for path_name in PATHS:
            with path(path_name):
                y, *grads = _check(operands, "none", p=0.999, what=f"p=0.999 {shape}")
                assert torch.isfinite(y).all()


def test_eval_and_p0_draw_no_seed(device):
    # eval() (or p == 0) compiles dropout out: nothing is drawn from the generator.
    module = triton_gelu.FeedForward(D, HIDDEN, dropout=0.3, device=device)
    x = torch.randn(M, D, device=device)
    state = torch.get_rng_state()
    eval_out = module.eval()(x)
    p0_out = triton_gelu.feed_forward(x, module.linear1.weight, module.linear1.bias,
                                      module.linear2.weight, module.linear2.bias, p=0.0)
    assert torch.equal(torch.get_rng_state(), state)
    torch.testing.assert_close(eval_out, p0_out, rtol=0, atol=0)
    module.train()
    assert not torch.equal(module(x), eval_out)


# ---- what the forward keeps for the backward ---------------------------------------------------


def _eager_block(p: float) -> nn.Module:
    return nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Dropout(p), nn.Linear(256, 64))


@pytest.mark.parametrize("p, recompute, bound", [
    (0.0, False, 0.56), (0.1, False, 0.40), (0.0, True, 0.12), (0.1, True, 0.12),
])
def test_saved_bytes_against_eager(p, recompute, bound, device):
    # The (128, 64) -> 256 block in float32: eager keeps x, z, GELU's output (and at
    # p > 0 the mask and the dropout output); ours keeps x and z (recompute: x), and the seed.
    eager = _eager_block(p).to(device).train()
    ours = triton_gelu.FeedForward(64, 256, dropout=p, recompute=recompute, device=device)
    x = torch.randn(128, 64, device=device, requires_grad=True)
    eager_bytes = saved_activation_bytes(lambda: eager(x), exclude=list(eager.parameters()))
    ours_bytes = saved_activation_bytes(lambda: ours(x), exclude=list(ours.parameters()))
    want = x.nbytes + (0 if recompute else 128 * 256 * 4) + (8 if p > 0 else 0)
    assert ours_bytes == want, f"ours keeps {ours_bytes} bytes, want {want}"
    ratio = ours_bytes / eager_bytes
    assert ratio <= bound, f"saved bytes {ours_bytes} / eager {eager_bytes} = {ratio:.3f}"


def test_transient_buffers_are_not_kept(device):
    # Every buffer our launchers allocate (h, z, dz, the partial sums of db1) is freed once the
    # backward has run: the graph kept x, z and the seed only until then.
    module = triton_gelu.FeedForward(D, HIDDEN, dropout=0.2, device=device)
    x = torch.randn(M, D, device=device, requires_grad=True)
    buffers = []
    real = _matmul.new_output

    def spy(shape, like, dtype=None):
        out = real(shape, like, dtype)
        buffers.append((tuple(shape), weakref.ref(out)))
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_matmul, "new_output", spy)
        y = module(x)
        y.sum().backward()
        del y
    assert len(buffers) == 5  # h, z; dz, h, db1's partial sums
    alive = [shape for shape, ref in buffers if ref() is not None]
    assert not alive, f"buffers still alive after the backward: {alive}"


# ---- which kernels run, and what is computed --------------------------------------------------


def _launch_deltas(fn, names):
    with count_launches() as launched:
        fn()
    return [launched[n] for n in names]


def test_kernel_paths_taken(device):
    names = ["ffn_fwd_gelu_dropout", "ffn_bwd_dz", "linear_preact", "gelu_dropout_fwd",
             "gelu_dropout_bwd"]
    x, w1, b1, w2, b2 = (t.requires_grad_(True)
                         for t in _operands((M, D), HIDDEN, torch.float32, device))

    def step(recompute=False, frozen=False):
        params = [t.detach() if frozen else t for t in (w1, b1, w2, b2)]
        return lambda: triton_gelu.feed_forward(x, *params[:2], *params[2:], p=0.1,
                                                recompute=recompute).sum().backward()

    assert _launch_deltas(step(), names) == [1, 1, 0, 0, 0]
    assert _launch_deltas(step(recompute=True), names) == [1, 1, 1, 0, 0]
    assert _launch_deltas(step(frozen=True), names) == [1, 1, 0, 0, 0]
    with path("composed"):
        assert _launch_deltas(step(), names) == [0, 0, 0, 1, 1]


@pytest.mark.parametrize("path_name", [*PATHS, "torch"])
@pytest.mark.parametrize("needs", [
    (True, False, False, False, False), (False, True, True, False, False),
    (False, False, False, True, True), (False, False, True, True, False),
], ids=str)
def test_backward_computes_only_what_is_needed(needs, path_name, device, poison_outputs):
    x, w1, b1, w2, b2 = _operands((M, D), HIDDEN, torch.float32, device)
    dy = torch.randn(M, D, device=device)
    seed = dropout_seed(device)
    p = 0.0 if path_name == "torch" else 0.3
    with path(path_name):
        _, preact = kernels.ffn_forward(x, w1, b1, w2, b2, seed, p, "gelu_tanh", True)
        grads = kernels.ffn_backward(dy, x, w1, w2, preact, seed, p, "gelu_tanh", needs)
    keep = reference.dropout_keep(seed, M, HIDDEN, p) if p else None
    _, refs = reference.feed_forward64(x, w1, b1, w2, b2, keep, p, "tanh", dy)
    for name, wanted, grad, ref in zip(("dx", "dw1", "db1", "dw2", "db2"), needs, grads, refs):
        assert (grad is not None) == wanted, f"{name}: returned {grad is not None}, need {wanted}"
        if wanted:
            torch.testing.assert_close(grad.double(), ref, rtol=1e-4, atol=1e-4, msg=name)


def test_inference_keeps_nothing(device, monkeypatch):
    calls = []

    def save_preact(*args, **kwargs) -> bool:
        return kwargs["save_preact"] if "save_preact" in kwargs else args[8]

    def spy(*args, **kwargs):
        calls.append(save_preact(*args, **kwargs))
        return ffn.ffn_forward(*args, **kwargs)

    def spy_bound(*args, **kwargs):  # a plan's later calls
        bound = ffn.ffn_forward_launch(*args, **kwargs)

        def run(*operands):
            calls.append(save_preact(*args, **kwargs))
            return bound(*operands)
        return run

    monkeypatch.setattr(kernels, "ffn_forward", spy)
    monkeypatch.setattr(kernels, "ffn_forward_launch", spy_bound)
    module = triton_gelu.FeedForward(D, HIDDEN, dropout=0.2, device=device)
    x = torch.randn(M, D, device=device)
    with torch.no_grad():
        assert module(x).grad_fn is None
    with torch.inference_mode():
        module(x)
    assert module(x).grad_fn is not None
    module.linear1.recompute = True
    module(x)
    assert calls == [False, False, True, False]


def test_second_backward_is_unchanged(device):
    leaves = [t.requires_grad_(True) for t in _operands((M, D), HIDDEN, torch.float32, device)]
    snapshot = [t.detach().clone() for t in leaves]
    for recompute in (False, True):
        for t in leaves:
            t.grad = None
        y = triton_gelu.feed_forward(*leaves, p=0.3, approximate="tanh", recompute=recompute)
        dy = torch.randn_like(y)
        y.backward(dy, retain_graph=True)
        first = [t.grad.clone() for t in leaves]
        y.backward(dy)
        for t, g in zip(leaves, first):
            torch.testing.assert_close(t.grad, 2 * g, rtol=0, atol=0)
    for t, before in zip(leaves, snapshot):
        torch.testing.assert_close(t.detach(), before, rtol=0, atol=0)


def test_cpu_fallback_dropout_is_pytorchs(monkeypatch):
    # Without the interpreter, CPU tensors take the PyTorch fallback: eager PyTorch's own block,
    # its dropout included (PyTorch's mask from PyTorch's generator, as fast as eager), so under
    # one torch.manual_seed it is eager's block bit for bit, gradients too, and no kernel runs.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    clear_plans()  # the environment is read when a problem is planned
    operands = _operands((M, D), HIDDEN, torch.float32, "cpu")
    with count_launches() as launched:
        results = []
        for block in (lambda *t: triton_gelu.feed_forward(*t, p=0.4, approximate="tanh"),
                      lambda x, w1, b1, w2, b2: F.linear(F.dropout(
                          F.gelu(F.linear(x, w1, b1), approximate="tanh"), 0.4), w2, b2)):
            leaves = [t.detach().clone().requires_grad_(True) for t in operands]
            torch.manual_seed(3)
            y = block(*leaves)
            y.backward(torch.ones_like(y))
            results.append((y.detach(), *(t.grad for t in leaves)))
    assert not launched, launched
    for ours, eager in zip(*results):
        assert torch.equal(ours, eager)
    # A tensor-parallel shard's launcher still draws the kernels' mask (so the shards of one
    # layer drop what a single process drops): the PyTorch copy of their generator.
    seed = dropout_seed("cpu")
    y, _ = fallback.ffn_forward(*operands, seed, 0.4, "gelu_tanh", False)
    torch.testing.assert_close(y, kernels.ffn_forward(*operands, seed, 0.4, "gelu_tanh", False)[0],
                               rtol=1e-5, atol=1e-5)


# ---- the module, autocast, torch.compile --------------------------------------------------------


def test_feed_forward_module(device):
    ff = triton_gelu.FeedForward(24, 40, dropout=0.25, approximate="tanh", recompute=True,
                                 device=device)
    assert isinstance(ff.linear1, triton_gelu.LinearGELU) and isinstance(ff.linear2, nn.Linear)
    assert ff.linear1.recompute and ff.linear1.approximate == "tanh" and ff.dropout.p == 0.25
    assert list(ff.state_dict()) == ["linear1.weight", "linear1.bias", "linear2.weight",
                                     "linear2.bias"]
    x = torch.randn(2, 9, 24, device=device)
    torch.manual_seed(11)
    y = ff(x)
    keep = _keep_of_call(11, x.shape, 40, 0.25, device)
    with torch.no_grad():
        want = _torch_block(x, ff.linear1.weight, ff.linear1.bias, ff.linear2.weight,
                            ff.linear2.bias, keep, 0.25, "tanh")
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    # The dropout's p and the parameters are read at each call.
    ff.dropout.p = 0.0
    with torch.no_grad():
        ff.linear2.weight.mul_(2)
        torch.testing.assert_close(
            ff(x), _torch_block(x, ff.linear1.weight, ff.linear1.bias, ff.linear2.weight,
                                ff.linear2.bias, None, 0.0, "tanh"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("approximate", FORMS)
def test_autocast_bf16(approximate, device):
    """Under autocast x and the four parameters are cast like nn.Linear's operands; gradients
    come back in the leaves' float32."""
    operands = _operands((4, 9, D), HIDDEN, torch.float32, device)
    ours = [t.clone().requires_grad_(True) for t in operands]
    theirs = [t.clone().requires_grad_(True) for t in operands]
    with torch.autocast(device, dtype=torch.bfloat16):
        y = triton_gelu.feed_forward(*ours, approximate=approximate)
        y_torch = _torch_block(*theirs, None, 0.0, approximate)
    assert y.dtype == y_torch.dtype == torch.bfloat16
    dy = torch.randn_like(y)
    y.backward(dy)
    y_torch.backward(dy)
    low = [t.to(torch.bfloat16) for t in operands]  # what autocast multiplies
    y64, grads64 = reference.feed_forward64(*low, None, 0.0, approximate, dy)
    assert_no_worse_than_torch(y.detach(), y_torch.detach(), y64, f"autocast y {approximate}")
    for name, a, b, ref in zip(("dx", "dw1", "db1", "dw2", "db2"), ours, theirs, grads64):
        assert a.grad.dtype == torch.float32, name
        assert_no_worse_than_torch(a.grad, b.grad, ref, f"autocast {name}", atol=1e-2)


def _graph_ops(gm: torch.fx.GraphModule) -> set[str]:
    return {node.target.__name__.split(".")[0] for node in gm.graph.nodes
            if node.op == "call_function" and "triton_gelu" in str(node.target)}


def test_compile_fullgraph_with_dropout(device):
    """torch.compile(fullgraph=True) of FeedForward in training (dropout on): forward and
    backward trace through the custom ops and equal eager for the same generator state."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    seen = {"fw": set(), "bw": set()}

    def recorder(which):
        def compiler(gm, inputs):
            seen[which] |= _graph_ops(gm)
            return make_boxed_func(gm.forward)
        return compiler

    backend = aot_autograd(fw_compiler=recorder("fw"), bw_compiler=recorder("bw"))
    torch._dynamo.reset()
    model = triton_gelu.FeedForward(D, HIDDEN, dropout=0.3, device=device).train()
    compiled = torch.compile(copy.deepcopy(model), backend=backend, fullgraph=True)
    x = torch.randn(2, 7, D, device=device)
    results = []
    for m in (compiled, model):
        torch.manual_seed(21)
        xi = x.clone().requires_grad_(True)
        y = m(xi)
        y.backward(torch.linspace(-1, 1, y.numel(), device=device).view(y.shape))
        results.append([y.detach(), xi.grad, *(p.grad for p in m.parameters())])
    torch._dynamo.reset()
    assert seen["fw"] >= {"ffn_fwd"} and seen["bw"] >= {"ffn_bwd"}, seen
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("save_preact", [True, False])
def test_opcheck(save_preact, device):
    """torch.library.opcheck of the FFN ops: schema, fakes, autograd registration, dispatch."""
    x, w1, b1, w2, b2 = (t.requires_grad_(True)
                         for t in _operands((5, 8), 6, torch.float32, device, out_features=7))
    seed = dropout_seed(device)
    z = torch.randn(5, 6, device=device)
    dy = torch.randn(5, 7, device=device)
    cases = [
        (ops.ffn_fwd, (x, w1, b1, w2, b2, seed, 0.3, "gelu_tanh", save_preact)),
        (ops.ffn_fwd, (x, w1, None, w2, None, None, 0.0, "gelu", save_preact)),
        (ops.ffn_bwd, (dy, x.detach(), w1.detach(), w2.detach(), z, seed, 0.3, "gelu",
                       [True, True, save_preact, True, False])),
        # a tensor-parallel shard: hidden columns 3 .. 9 of 10
        (ops.ffn_fwd, (x, w1, b1, w2, b2, seed, 0.3, "gelu_tanh", save_preact, 3, 10)),
        (ops.ffn_bwd, (dy, x.detach(), w1.detach(), w2.detach(), z, seed, 0.3, "gelu",
                       [True] * 5, 3, 10)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


# ---- bad input -----------------------------------------------------------------------------------


def _bad_inputs(device):
    f32 = dict(device=device)
    x, w1, b1 = torch.randn(4, D, **f32), torch.randn(HIDDEN, D, **f32), torch.randn(HIDDEN, **f32)
    w2, b2 = torch.randn(D, HIDDEN, **f32), torch.randn(D, **f32)
    good = (x, w1, b1, w2, b2)

    def with_(**changes):
        args = dict(zip(("x", "w1", "b1", "w2", "b2"), good))
        args.update(changes)
        return tuple(args.values()), {}

    return {
        "p negative": (good, {"p": -0.1}, ValueError, r"p must be in \[0, 1\), got -0.1"),
        "p one": (good, {"p": 1.0}, ValueError, r"p must be in \[0, 1\), got 1.0"),
        "p nan": (good, {"p": float("nan")}, ValueError, r"p must be in \[0, 1\), got nan"),
        "p string": (good, {"p": "0.1"}, TypeError, r"p must be a float in \[0, 1\)"),
        "linear2 in_features": (*with_(w2=torch.randn(D, HIDDEN + 1, **f32)), ValueError,
                                rf"linear2 in_features mismatch: w1 has shape \({HIDDEN}, {D}\)"
                                rf".*w2 has shape \({D}, {HIDDEN + 1}\)"),
        "linear1 in_features": (*with_(x=torch.randn(4, D + 1, **f32)), ValueError,
                                r"in_features mismatch: x has shape"),
        "b2 length": (*with_(b2=torch.randn(D + 2, **f32)), ValueError,
                      rf"b2 has shape \({D + 2},\)"),
        "b1 length": (*with_(b1=torch.randn(3, **f32)), ValueError, r"b1 has shape \(3,\)"),
        "w2 1-D": (*with_(w2=torch.randn(D, **f32)), ValueError, "w2 must be 2-D"),
        "mixed dtype": (*with_(w2=w2.half()), TypeError,
                        "w2 has dtype torch.float16 but x has dtype torch.float32"),
        "b2 dtype": (*with_(b2=b2.bfloat16()), TypeError, "b2 has dtype torch.bfloat16"),
        "devices": (*with_(w2=w2.to("meta")), ValueError, f"w2 is on meta but x is on {device}"),
        "w1 devices": (*with_(w1=w1.to("meta")), ValueError, "w1 is on meta"),
        "int x": (*with_(x=x.int()), TypeError, "x must be float32, float16 or bfloat16"),
        "float64": (tuple(t.double() for t in good), {}, TypeError, "got torch.float64"),
        "approximate": (good, {"approximate": "exact"}, ValueError, "approximate must be one of"),
    }


@pytest.mark.parametrize("case", _bad_inputs("cpu").keys())
def test_rejects_bad_inputs_before_any_launch(case, device):
    args, kwargs, error, match = _bad_inputs(device)[case]
    with count_launches() as launched:
        with pytest.raises(error, match=match):
            triton_gelu.feed_forward(*args, **{"p": 0.2, **kwargs})
    assert not launched, launched


def test_ops_reject_bad_dropout_arguments(device):
    x, w1, b1, w2, b2 = _operands((4, D), HIDDEN, torch.float32, device)
    z, dy = torch.randn(4, HIDDEN, device=device), torch.randn(4, D, device=device)
    seed = dropout_seed(device)
    with count_launches() as launched:
        with pytest.raises(ValueError, match=r"seed must be a 1-element int64 tensor when p > 0"):
            torch.ops.triton_gelu.ffn_fwd(x, w1, b1, w2, b2, None, 0.2, "gelu", True)
        with pytest.raises(ValueError, match="seed must be a 1-element int64 tensor"):
            torch.ops.triton_gelu.ffn_fwd(x, w1, b1, w2, b2, seed.int(), 0.2, "gelu", True)
        with pytest.raises(ValueError, match=r"p must be in \[0, 1\)"):
            torch.ops.triton_gelu.ffn_bwd(dy, x, w1, w2, z, seed, 1.5, "gelu", [True] * 5)
        with pytest.raises(ValueError, match=r"preact must have shape \(4, 51\)"):
            torch.ops.triton_gelu.ffn_bwd(dy, x, w1, w2, z[:, 1:], seed, 0.2, "gelu", [True] * 5)
        with pytest.raises(ValueError, match=r"dy must have shape \(4, 45\)"):
            torch.ops.triton_gelu.ffn_bwd(dy[:, 1:], x, w1, w2, z, seed, 0.2, "gelu", [True] * 5)
        with pytest.raises(ValueError, match="five booleans, got 3"):
            torch.ops.triton_gelu.ffn_bwd(dy, x, w1, w2, z, seed, 0.2, "gelu", [True] * 3)
    assert not launched, launched


def test_module_with_dropout_one_refuses_at_call(device):
    ff = triton_gelu.FeedForward(8, 16, dropout=1.0, device=device)  # nn.Dropout accepts 1.0
    with count_launches() as launched:
        with pytest.raises(ValueError, match=r"p must be in \[0, 1\), got 1.0"):
            ff(torch.randn(3, 8, device=device))
    assert not launched, launched


def test_feed_forward_module_with_hooks_applies_its_submodules(device):
    # A tensor-parallel plan hooks linear1 and linear2 (and shards their parameters): then the
    # block applies its submodules so the hooks run (LinearGELU's fusion, dropout, linear2).
    ff = triton_gelu.FeedForward(D, HIDDEN, dropout=0.0, device=device)
    seen = []
    ff.linear2.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape))
    x = torch.randn(M, D, device=device)
    names = ["linear_gelu_fwd", "ffn_fwd_gelu_dropout"]
    assert _launch_deltas(lambda: ff(x), names) == [1, 0] and seen == [(M, HIDDEN)]
    want = _torch_block(x, ff.linear1.weight, ff.linear1.bias, ff.linear2.weight,
                        ff.linear2.bias, None, 0.0, "none")
    torch.testing.assert_close(ff(x), want, rtol=1e-5, atol=1e-5)
    plain = triton_gelu.FeedForward(D, HIDDEN, dropout=0.0, device=device)
    assert _launch_deltas(lambda: plain(x), names) == [0, 1]
