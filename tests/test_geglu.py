"""Gated GELU (GeGLU) and the gated FFN block against float64 PyTorch: values and every gradient
(x, both weights, both biases, the down projection), every path, layout and dtype, the gated
block's dropout (the kernels' mask, exact; the backward's mask the forward's), what the backward
keeps, and bad inputs.

Shapes stay small (M, N, K < 64) so the Triton interpreter runs the file quickly, and are
multiples of no block size so every masked edge of every kernel is exercised.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from fakes import tile_tuners
from helpers import (
    DTYPES, X_LAYOUTS, assert_all_written, assert_finite_differences, assert_nan_where_ref_nan,
    assert_no_worse_than_torch, assert_reproducible_by_seed, launched, tf32,
)
from torch import nn

import triton_gelu
from bench.memory import saved_activation_bytes
from triton_gelu import kernels, reference
from triton_gelu.autotune import clear_plans, force_path
from triton_gelu.testing import count_launches, dropout_seed

# The kernels' module; ``triton_gelu.geglu`` itself is the public function.
gk = importlib.import_module("triton_gelu.kernels.geglu")

FORMS = ["none", "tanh"]
M, K, N = 37, 45, 51  # multiples of no block size
D = 29  # the gated block's output width (down projection)
NAMES = ("dx", "dw_gate", "dw_up", "db_gate", "db_up")


pytestmark = pytest.mark.usefixtures("ieee_float32")


def _operands(x_shape, n, dtype, device, bias=True):
    """x ~ N(0, 1), W_gate and W_up ~ N(0, 1/K), biases ~ N(0, 1): g and u are O(1)."""
    k = x_shape[-1]
    x = torch.randn(x_shape, device=device).to(dtype)
    w_gate, w_up = ((torch.randn(n, k, device=device) / k**0.5).to(dtype) for _ in "gu")
    b_gate, b_up = ((torch.randn(n, device=device).to(dtype) for _ in "gu") if bias
                    else (None, None))
    return x, w_gate, w_up, b_gate, b_up


def eager_geglu(x, w_gate, w_up, b_gate=None, b_up=None, approximate="tanh"):
    return F.gelu(F.linear(x, w_gate, b_gate), approximate=approximate) * F.linear(x, w_up, b_up)


def _leaves(tensors):
    # Detached, not copied: the kernels see the caller's storage and strides.
    return [t.detach().requires_grad_(True) if t is not None else None for t in tensors]


def _compare_grads(ours, theirs, refs, names, what):
    for name, a, b, ref in zip(names, ours, theirs, refs):
        if a is None:
            continue
        assert a.grad.shape == a.shape, f"{name} {what}: shape {tuple(a.grad.shape)}"
        assert_no_worse_than_torch(a.grad, b.grad, ref, f"{name} {what}")


def _check(operands, approximate, recompute=False, what=""):
    """geglu's forward and every gradient against float64, no worse than torch in x's dtype.
    Returns our (h, dx, dw_gate, dw_up, db_gate, db_up)."""
    x = operands[0]
    ours = _leaves(operands)
    h = triton_gelu.geglu(*ours, approximate=approximate, recompute=recompute)
    dh = torch.randn_like(h)
    h.backward(dh)
    theirs = _leaves(operands)
    h_torch = eager_geglu(*theirs, approximate=approximate)
    h_torch.backward(dh)

    what = f"{x.dtype} {approximate} recompute={recompute} x{tuple(x.shape)} {what}"
    assert h.shape == h_torch.shape and h.dtype == x.dtype, what
    assert_no_worse_than_torch(h, h_torch, reference.geglu64(*operands, approximate), "h " + what)
    refs = reference.grads64(
        lambda *t: reference.geglu64(*t, approximate=approximate), list(operands), dh
    )
    _compare_grads(ours, theirs, refs, NAMES, what)
    return (h, *(t.grad if t is not None else None for t in ours))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("recompute", [False, True], ids=["saved", "recompute"])
@pytest.mark.parametrize("approximate", FORMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_float64(dtype, approximate, recompute, bias, device):
    _check(_operands((M, K), N, dtype, device, bias), approximate, recompute)


# Each forward path (fused, composed, torch) and each backward path (once, torch) at least
# once; the defaults (fused, once) are every case of test_matches_float64.
PATHS = [("fused", "once"), ("composed", "once"), ("torch", "torch")]


@pytest.mark.parametrize("approximate", FORMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_composed_forward_matches_float64(dtype, approximate, device):
    with force_path(geglu_fwd="composed", geglu_bwd="once"):
        ran = launched(lambda: _check(_operands((M, K), N, dtype, device), approximate,
                                       what="composed/once"))
    # cuBLAS g and u, then the elementwise gate; dg and du once by the elementwise kernel.
    assert ran == {"geglu_act": 1, "geglu_bwd_act": 1}, ran


@pytest.mark.parametrize("approximate", FORMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_torch_paths_match_float64_and_launch_no_kernel(dtype, approximate, device):
    """PyTorch's own computation, forward and backward: eager's numerics, no Triton kernel."""
    with force_path(geglu_fwd="torch", geglu_bwd="torch"):
        for recompute in (False, True):
            ran = launched(lambda: _check(_operands((M, K), N, dtype, device), approximate,
                                           recompute, what="torch/torch"))
            assert ran == {}, ran


@pytest.mark.parametrize("fwd, bwd", PATHS, ids=[f"{f}-{b}" for f, b in PATHS])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_recompute_gives_identical_gradients(dtype, fwd, bwd, device):
    # The recomputed g and u are bitwise the saved ones (same path, kernel and config).
    operands = _operands((M, K), N, dtype, device)
    results = []
    with force_path(geglu_fwd=fwd, geglu_bwd=bwd):
        for recompute in (False, True):
            torch.manual_seed(0)  # the same dh for both
            results.append(_check(operands, "tanh", recompute))
    for name, a, b in zip(("h", *NAMES), *results):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{name} differs with recompute")


@pytest.mark.parametrize("layout", X_LAYOUTS.keys())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_input_layouts(layout, dtype, device, monkeypatch):
    x = X_LAYOUTS[layout](K, device).to(dtype)
    _, *params = _operands((K,), N, dtype, device)
    seen = []

    def spy(x2d, *args, **kwargs):
        seen.append(x2d)
        return gk.geglu_forward(x2d, *args, **kwargs)

    monkeypatch.setattr(kernels, "geglu_forward", spy)
    h, dx, *_ = _check((x, *params), "tanh", what=layout)
    assert h.shape == (*x.shape[:-1], N) and dx.shape == x.shape
    # Collapsible leading dimensions reach the kernel as a strided view of x, not a copy.
    if x.numel():
        copied = seen[0].data_ptr() != x.data_ptr()
        assert copied == (layout == "3-D permuted"), f"{layout}: copied={copied}"


def test_strided_weights_biases_and_upstream_gradient(device):
    # Weights as transposed (K, N) tensors, strided biases, an expanded dh (from .sum()): read
    # through strides (or copied where a kernel needs rows), never wrong.
    x, _, _, _, _ = _operands((M, K), N, torch.float32, device)
    w_gate, w_up = ((torch.randn(K, N, device=device) / K**0.5).t() for _ in "gu")
    b_gate, b_up = (torch.randn(2 * N, device=device)[::2] for _ in "gu")
    assert not w_gate.is_contiguous() and not b_up.is_contiguous()
    for fwd, bwd in PATHS:
        with force_path(geglu_fwd=fwd, geglu_bwd=bwd):
            _check((x, w_gate, w_up, b_gate, b_up), "none", what=f"{fwd}/{bwd}")
            leaves = _leaves((x, w_gate, w_up, b_gate, b_up))
            triton_gelu.geglu(*leaves).sum().backward()  # dh expanded: strides (0, 0)
            theirs = _leaves((x, w_gate, w_up, b_gate, b_up))
            eager_geglu(*theirs).sum().backward()
            refs = reference.grads64(lambda *t: reference.geglu64(*t), [x, w_gate, w_up,
                                     b_gate, b_up], torch.ones(M, N, device=device))
            _compare_grads(leaves, theirs, refs, NAMES, f"expanded dh {fwd}/{bwd}")


@pytest.mark.parametrize("shape", [(M, 0, N), (M, K, 0)], ids=["K=0", "N=0"])
def test_empty_projections(shape, device):
    m, k, n = shape
    for fwd, bwd in PATHS:
        with force_path(geglu_fwd=fwd, geglu_bwd=bwd):
            _check(_operands((m, k), n, torch.float32, device), "tanh", what=f"{shape}")


def test_tf32_allowed_float32(device):
    # With TF32 (10-bit mantissa products) the result is within ~1e-3 relative of float64; on
    # the CPU interpreter tl.dot is exact float32, which passes too.
    operands = _operands((M, K), N, torch.float32, device)
    with tf32(True):
        h = triton_gelu.geglu(*operands)
    ref = reference.geglu64(*operands)
    err = (h.double().cpu() - ref.cpu()).abs().max().item()
    assert err <= 1e-3 * ref.abs().max().item(), f"tf32 forward: max error {err:.3e}"


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_poisoned_outputs_fully_written(dtype, bias, device, poison_outputs):
    operands = _operands((M, K), N, dtype, device, bias)
    x, w_gate, w_up, b_gate, b_up = operands
    dh = torch.randn(M, N, device=device).to(dtype)
    h64 = reference.geglu64(*operands)
    refs = reference.grads64(lambda *t: reference.geglu64(*t), list(operands), dh)
    for fwd, bwd in PATHS:
        with force_path(geglu_fwd=fwd, geglu_bwd=bwd):
            h, gate, up = gk.geglu_forward(*operands, "gelu_tanh", True)
            gate2, up2 = gk.geglu_gate_up(*operands, "gelu_tanh")
            grads = gk.geglu_backward(dh, x, w_gate, w_up, gate, up, "gelu_tanh", [True] * 5, True)
        what = f"{fwd}/{bwd}"
        assert_all_written(h, h64, f"h {what}")
        assert not gate.isnan().any() and not up.isnan().any(), what
        torch.testing.assert_close(gate2, gate, rtol=0, atol=0, msg=f"recomputed g {what}")
        torch.testing.assert_close(up2, up, rtol=0, atol=0, msg=f"recomputed u {what}")
        torch.testing.assert_close(grads[5], h, rtol=0, atol=0, msg=f"regenerated h {what}")
        for name, grad, ref in zip(NAMES, grads, refs):
            if ref is not None:
                assert_all_written(grad, ref, f"{name} {what}")


NEEDS = [(True, False, False, False, False), (False, True, False, False, False),
         (False, False, False, True, True), (False, True, True, False, True)]


@pytest.mark.parametrize("bwd", ["once", "torch"])
@pytest.mark.parametrize("needs", NEEDS, ids=str)
def test_backward_computes_only_what_is_needed(needs, bwd, device, poison_outputs):
    operands = _operands((M, K), N, torch.float32, device)
    x, w_gate, w_up, _, _ = operands
    dh = torch.randn(M, N, device=device)
    _, gate, up = gk.geglu_forward(*operands, "gelu", True)
    with count_launches() as ran, force_path(geglu_bwd=bwd):
        grads = gk.geglu_backward(dh, x, w_gate, w_up, gate, up, "gelu", needs)
    refs = reference.grads64(lambda *t: reference.geglu64(*t, approximate="none"),
                             list(operands), dh)
    assert grads[5] is None, "h was not asked for"
    for name, wanted, grad, ref in zip(NAMES, needs, grads, refs):
        assert (grad is not None) == wanted, f"{name}: returned {grad is not None}, need {wanted}"
        if wanted:
            torch.testing.assert_close(grad.double(), ref, rtol=1e-5, atol=1e-5, msg=name)
    # dg and du once, by one elementwise launch, whatever is needed; none on eager's path
    assert ran.get("geglu_bwd_act", 0) == (bwd == "once"), ran


@pytest.mark.parametrize("approximate", FORMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_in_nan_out(dtype, approximate, device):
    operands = _operands((M, K), N, dtype, device)
    operands[0][3, 7] = float("nan")  # row 3 of h and dx, all of every weight and bias gradient
    leaves = _leaves(operands)
    h = triton_gelu.geglu(*leaves, approximate=approximate)
    dh = torch.randn_like(h)
    h.backward(dh)
    assert_nan_where_ref_nan(h.detach(), reference.geglu64(*operands, approximate), "h")
    refs = reference.grads64(lambda *t: reference.geglu64(*t, approximate=approximate),
                             list(operands), dh)
    for name, leaf, ref in zip(NAMES, leaves, refs):
        assert_nan_where_ref_nan(leaf.grad, ref, name)
    assert h[3].isnan().all() and not h[:3].isnan().any()


def test_kernel_path_taken(device):
    """The default forward is one kernel launch, its backward one elementwise kernel (plus
    cuBLAS); recompute launches the forward kernel again; frozen weights change nothing here."""
    x, w_gate, w_up, b_gate, b_up = (t.requires_grad_(True) for t in
                                     _operands((M, K), N, torch.float32, device))

    def run(**kwargs):
        return lambda: triton_gelu.geglu(x, w_gate, w_up, b_gate, b_up, **kwargs).sum().backward()

    assert launched(run()) == {"geglu_fwd": 1, "geglu_bwd_act": 1}
    assert launched(run(recompute=True)) == {"geglu_fwd": 2, "geglu_bwd_act": 1}
    with torch.no_grad():
        assert launched(lambda: triton_gelu.geglu(x, w_gate, w_up)) == {"geglu_fwd": 1}


def test_inference_writes_only_h(device, monkeypatch):
    """g and u are neither saved nor written unless a gradient can be asked for."""
    calls = []

    def spy(x2d, w_gate, w_up, b_gate, b_up, activation, save_gate_up, *dropout):
        calls.append(save_gate_up)
        return gk.geglu_forward(x2d, w_gate, w_up, b_gate, b_up, activation, save_gate_up,
                                *dropout)

    def spy_bound(*args):  # a plan's later calls
        bound = gk.geglu_forward_launch(*args)

        def run(*operands):
            calls.append(args[6])
            return bound(*operands)
        return run

    monkeypatch.setattr(kernels, "geglu_forward", spy)
    monkeypatch.setattr(kernels, "geglu_forward_launch", spy_bound)
    x, w_gate, w_up, b_gate, b_up = _operands((M, K), N, torch.float32, device)
    w_gate.requires_grad_(True)
    with torch.no_grad():
        h = triton_gelu.geglu(x, w_gate, w_up, b_gate, b_up)
    assert h.grad_fn is None and calls == [False]
    with torch.inference_mode():
        triton_gelu.geglu(x, w_gate, w_up, b_gate, b_up)
    triton_gelu.geglu(x, w_gate.detach(), w_up, b_gate, b_up)  # nothing requires grad
    assert calls == [False, False, False]
    assert triton_gelu.geglu(x, w_gate, w_up, b_gate, b_up).grad_fn is not None
    assert triton_gelu.geglu(x, w_gate, w_up, recompute=True).grad_fn is not None
    assert calls == [False, False, False, True, False]
    # And the launcher itself writes no g or u when not asked to.
    assert gk.geglu_forward(x, w_gate.detach(), w_up, b_gate, b_up, "gelu", False)[1:] == \
        (None, None)


def test_second_backward_is_unchanged(device):
    tensors = [t.requires_grad_(True) for t in _operands((M, K), N, torch.float32, device)]
    snapshot = [t.detach().clone() for t in tensors]
    for recompute in (False, True):
        for t in tensors:
            t.grad = None
        h = triton_gelu.geglu(*tensors, recompute=recompute)
        dh = torch.randn_like(h)
        h.backward(dh, retain_graph=True)
        first = [t.grad.clone() for t in tensors]
        h.backward(dh)
        for name, t, g in zip(NAMES, tensors, first):
            torch.testing.assert_close(t.grad, 2 * g, rtol=0, atol=0, msg=f"second {name}")
    for t, before in zip(tensors, snapshot):
        torch.testing.assert_close(t.detach(), before, rtol=0, atol=0)


@pytest.mark.parametrize("approximate", FORMS)
def test_autocast_bf16(approximate, device):
    """Under autocast the operands are cast to the autocast dtype as for F.linear; gradients
    come back in the leaves' float32."""
    operands = _operands((4, 9, K), N, torch.float32, device)
    ours, theirs = _leaves(operands), _leaves(operands)
    with torch.autocast(device, dtype=torch.bfloat16):
        h = triton_gelu.geglu(*ours, approximate=approximate)
        h_torch = eager_geglu(*theirs, approximate=approximate)
    assert h.dtype == h_torch.dtype == torch.bfloat16
    dh = torch.randn_like(h)
    h.backward(dh)
    h_torch.backward(dh)
    low = [t.to(torch.bfloat16) for t in operands]  # what autocast multiplies
    assert_no_worse_than_torch(h, h_torch, reference.geglu64(*low, approximate), "autocast h")
    refs = reference.grads64(lambda *t: reference.geglu64(*t, approximate=approximate), low, dh)
    for name, a, b, ref in zip(NAMES, ours, theirs, refs):
        assert a.grad.dtype == torch.float32
        # Both gradients went through bf16; compare at bf16's slack.
        assert_no_worse_than_torch(a.grad, b.grad, ref, f"autocast {name}", atol=1e-2)


def test_cpu_fallback_without_interpreter(monkeypatch):
    """CPU tensors without TRITON_INTERPRET take the PyTorch fallback: the same numerics, no
    launch, and the gated block's dropout is PyTorch's own (eager's block bit for bit under one
    torch.manual_seed, gradients too)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    clear_plans()  # the environment is read when a problem is planned
    with count_launches() as launched:
        for dtype in DTYPES:
            for recompute in (False, True):
                _check(_operands((M, K), N, dtype, "cpu"), "tanh", recompute)
            _check_block(_block("cpu", dtype, bias=True), torch.randn(M, K).to(dtype), "cpu")
        operands = _block_operands((M, K), N, torch.float32, "cpu")
        results = []
        for block in (lambda x, wg, wu, wd, bg, bu, bd: triton_gelu.gated_feed_forward(
                          x, wg, wu, wd, bg, bu, bd, dropout=0.4, training=True),
                      lambda x, wg, wu, wd, bg, bu, bd: F.linear(F.dropout(
                          F.gelu(F.linear(x, wg, bg), approximate="tanh") * F.linear(x, wu, bu),
                          0.4), wd, bd)):
            leaves = _leaves(operands)
            torch.manual_seed(3)
            y = block(*leaves)
            y.backward(torch.ones_like(y))
            results.append((y.detach(), *(None if t is None else t.grad for t in leaves)))
    assert not launched, launched
    for ours, eager in zip(*results):
        assert (ours is None and eager is None) or torch.equal(ours, eager)


# ---- bad inputs ---------------------------------------------------------------------------------


def _bad_inputs(device):
    f32 = dict(device=device)
    x, w, b = torch.randn(4, K, **f32), torch.randn(N, K, **f32), torch.randn(N, **f32)
    return {
        "in_features": ((torch.randn(4, K + 1, **f32), w, w, b, b), ValueError,
                        rf"in_features mismatch: x has shape \(4, {K + 1}\).*w_gate"),
        "up in_features": ((x, w, torch.randn(N, K + 2, **f32), b, b), ValueError,
                           rf"in_features mismatch.*w_up has shape \({N}, {K + 2}\)"),
        "weights disagree": ((x, w, torch.randn(N + 3, K, **f32), b, None), ValueError,
                             rf"w_up has shape \({N + 3}, {K}\) but w_gate has shape "
                             rf"\({N}, {K}\)"),
        "b_gate length": ((x, w, w, torch.randn(N - 1, **f32), b), ValueError,
                          rf"b_gate has shape \({N - 1},\) but w_gate has shape \({N}, {K}\)"),
        "b_up length": ((x, w, w, b, torch.randn(N + 1, **f32)), ValueError,
                        rf"b_up has shape \({N + 1},\) but w_up"),
        "b_up 2-D": ((x, w, w, None, b[None]), ValueError, "b_up must be 1-D"),
        "w_gate 1-D": ((x, torch.randn(K, **f32), w, b, b), ValueError,
                       rf"w_gate must be 2-D .*got shape \({K},\)"),
        "w_up 3-D": ((x, w, w[None], b, b), ValueError, "w_up must be 2-D"),
        "x 0-D": ((torch.tensor(1.0, **f32), w, w, b, b), ValueError, "at least 1 dimension"),
        "w_up dtype": ((x, w, w.half(), b, b), TypeError,
                       "w_up has dtype torch.float16 but x has dtype torch.float32"),
        "b_gate dtype": ((x, w, w, b.bfloat16(), b), TypeError, "b_gate has dtype torch.bfloat16"),
        "devices": ((x, w, w.to("meta"), b, b), ValueError, f"w_up is on meta but x is on {device}"),
        "int x": ((x.int(), w, w, b, b), TypeError,
                  "x must be float32, float16 or bfloat16, got torch.int32"),
        "float64": ((x.double(), w.double(), w.double(), None, None), TypeError,
                    "got torch.float64"),
        "w_up list": ((x, w, [[1.0] * K] * N, b, b), TypeError, "w_up must be a torch.Tensor"),
    }


@pytest.mark.parametrize("case", _bad_inputs("cpu").keys())
def test_rejects_bad_inputs_before_any_launch(case, device):
    args, error, match = _bad_inputs(device)[case]
    with count_launches() as launched:
        with pytest.raises(error, match=match):
            triton_gelu.geglu(*args)
        # The block checks the same operands, and the custom ops too (compiled graphs call them);
        # an operand that is not a tensor the dispatcher refuses by the op's schema, in its words.
        # (A meta operand sends an op's call to its fake implementation, which runs nothing.)
        w_down = torch.randn(D, N, device=device)
        with pytest.raises(error, match=match):
            triton_gelu.gated_feed_forward(args[0], args[1], args[2], w_down, *args[3:])
        tensors = all(a is None or isinstance(a, torch.Tensor) for a in args)
        if not any(isinstance(a, torch.Tensor) and a.is_meta for a in args):
            for op, extra in ((torch.ops.triton_gelu.geglu_fwd, ("gelu", True)),
                              (torch.ops.triton_gelu.geglu_gate_up, (0.0, "gelu"))):
                with pytest.raises(error if tensors else (TypeError, RuntimeError),
                                   match=match if tensors else None):
                    op(*args, *extra)
    assert not launched, launched


def test_rejects_bad_block_and_backward_inputs(device):
    x, w_gate, w_up, b_gate, b_up = _operands((4, K), N, torch.float32, device)
    with count_launches() as launched:
        cases = [
            (dict(w_down=torch.randn(D, N + 1, device=device)), ValueError,
             rf"w_down must be 2-D \(out_features, hidden_features = {N}\).*got shape"),
            (dict(w_down=torch.randn(D, N, device=device).half()), TypeError,
             "w_down has dtype torch.float16 but w_gate has dtype torch.float32"),
            (dict(b_down=torch.randn(D + 1, device=device)), ValueError,
             rf"b_down has shape \({D + 1},\) but w_down has shape \({D}, {N}\)"),
            # The dropout probability is checked as the FFN block's p is: in [0, 1).
            (dict(dropout=1.5), ValueError, r"dropout probability p must be in \[0, 1\), got 1.5"),
            (dict(dropout=1.0), ValueError, r"dropout probability p must be in \[0, 1\), got 1.0"),
            (dict(dropout=-0.1), ValueError, r"p must be in \[0, 1\), got -0.1"),
            (dict(dropout="0.1"), TypeError, r"p must be a float in \[0, 1\)"),
            (dict(approximate="erf"), ValueError, "approximate must be one of"),
        ]
        for change, error, match in cases:
            kwargs = dict(w_down=torch.randn(D, N, device=device), b_down=None, dropout=0.0,
                          approximate="tanh")
            kwargs.update(change)
            with pytest.raises(error, match=match):
                triton_gelu.gated_feed_forward(x, w_gate, w_up, b_gate=b_gate, b_up=b_up, **kwargs)
        block = triton_gelu.GatedFeedForward(K, N, dropout=1.0, device=device)  # nn.Dropout takes 1
        for mode in (True, False):  # refused at the call, in either mode, as FeedForward does
            with pytest.raises(ValueError, match=r"p must be in \[0, 1\), got 1.0"):
                block.train(mode)(x)
        # The custom ops (what compiled graphs and tensor parallel call) check theirs.
        ops, good, seed = torch.ops.triton_gelu, torch.randn(4, N, device=device), dropout_seed(device)
        w_down = torch.randn(D, N, device=device)
        with pytest.raises(ValueError, match=rf"dh must have shape \(M, N\) = \(4, {N}\)"):
            ops.geglu_bwd(good[:, 1:], x, w_gate, w_up, good, good, None, 0.0, "gelu", [True] * 5,
                          False)
        with pytest.raises(ValueError, match="up must have shape"):
            ops.geglu_bwd(good, x, w_gate, w_up, good, good[1:], None, 0.0, "gelu", [True] * 5,
                          False)
        with pytest.raises(ValueError, match="needs must hold 5 flags"):
            ops.geglu_bwd(good, x, w_gate, w_up, good, good, None, 0.0, "gelu", [True] * 3, False)
        with pytest.raises(ValueError, match="seed must be a 1-element int64 tensor when p > 0"):
            ops.gated_ffn_fwd(x, w_gate, w_up, w_down, b_gate, b_up, None, None, 0.2, "gelu", True)
        with pytest.raises(ValueError, match=r"w_down must be 2-D \(out_features, hidden_features"):
            ops.gated_ffn_fwd(x, w_gate, w_up, w_down[:, 1:], b_gate, b_up, None, None, 0.0, "gelu",
                              True)
        with pytest.raises(ValueError, match=r"p must be in \[0, 1\), got 1.0"):
            ops.geglu_bwd(good, x, w_gate, w_up, good, good, seed, 1.0, "gelu", [True] * 5, False)
        with pytest.raises(ValueError, match="seed must be a 1-element int64 tensor"):
            ops.geglu_bwd(good, x, w_gate, w_up, good, good, seed.int(), 0.2, "gelu", [True] * 5,
                          False)
        with pytest.raises(ValueError, match=r"p must be in \[0, 1\), got -0.5"):
            ops.geglu_gate_up(x, w_gate, w_up, b_gate, b_up, -0.5, "gelu")
        with pytest.raises(ValueError, match="activation must be one of"):
            ops.geglu_gate_up(x, w_gate, w_up, b_gate, b_up, 0.0, "erf")
        for bad in ("exact", None):
            with pytest.raises(ValueError, match="approximate must be one of"):
                triton_gelu.geglu(x, w_gate, w_up, approximate=bad)
            with pytest.raises(ValueError, match="approximate must be one of"):
                triton_gelu.GeGLU(K, N, approximate=bad)
    assert not launched, launched


# ---- the gated block -------------------------------------------------------------------------


class EagerGatedBlock(nn.Module):
    """The PyTorch block GatedFeedForward replaces, with Gemma's names (and a dropout)."""

    def __init__(self, d_model, d_ff, approximate="tanh", bias=False, dropout=0.0, **factory):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=bias, **factory)
        self.up_proj = nn.Linear(d_model, d_ff, bias=bias, **factory)
        self.dropout = nn.Dropout(dropout)
        self.down_proj = nn.Linear(d_ff, d_model, bias=bias, **factory)
        self.approximate = approximate

    def forward(self, x):
        gated = F.gelu(self.gate_proj(x), approximate=self.approximate) * self.up_proj(x)
        return self.down_proj(self.dropout(gated))


def _block(device, dtype=torch.float32, approximate="tanh", bias=False, recompute=False,
           dropout=0.0, d_model=K, d_ff=N):
    """(ours, eager) with the same parameters."""
    ours = triton_gelu.GatedFeedForward(d_model, d_ff, dropout=dropout, approximate=approximate,
                                        bias=bias, recompute=recompute, device=device,
                                        dtype=dtype)
    eager = EagerGatedBlock(d_model, d_ff, approximate, bias, dropout, device=device, dtype=dtype)
    eager.load_state_dict(ours.state_dict())  # strict: the same names and shapes
    return ours, eager


def _run_module(module, x, dy=None):
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = module(x)
    dy = torch.randn_like(y) if dy is None else dy
    y.backward(dy)
    return y.detach(), x.grad, {n: p.grad for n, p in module.named_parameters()}, dy


def _check_block(blocks, x, device):
    """GatedFeedForward's output, dx and every parameter gradient against float64."""
    ours, eager = blocks
    y, dx, grads, dy = _run_module(ours, x)
    y_t, dx_t, grads_t, _ = _run_module(eager, x, dy)
    ref = copy.deepcopy(eager).double()
    y64, dx64, grads64, _ = _run_module(ref, x.double(), dy.double())
    what = f"block {x.dtype} {ours.approximate}"
    assert_no_worse_than_torch(y, y_t, y64, f"y {what}")
    assert_no_worse_than_torch(dx, dx_t, dx64, f"dx {what}")
    assert grads.keys() == grads_t.keys()
    for name in grads:
        assert_no_worse_than_torch(grads[name], grads_t[name], grads64[name], f"d{name} {what}")
    return y, dx, grads


@pytest.mark.parametrize("approximate", FORMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gated_block_matches_float64(dtype, approximate, device):
    x = torch.randn(3, 13, K, device=device).to(dtype)
    _check_block(_block(device, dtype, approximate, bias=dtype == torch.float32), x, device)


@pytest.mark.parametrize("fwd, bwd", PATHS, ids=[f"{f}-{b}" for f, b in PATHS])
def test_gated_block_recompute_gives_identical_gradients(fwd, bwd, device):
    x = torch.randn(M, K, device=device).to(torch.bfloat16)
    results = []
    with force_path(geglu_fwd=fwd, geglu_bwd=bwd):
        for recompute in (False, True):
            torch.manual_seed(0)  # the same parameters and dy for both
            results.append(_check_block(_block(device, torch.bfloat16, bias=True,
                                               recompute=recompute), x, device))
    (y, dx, grads), (y2, dx2, grads2) = results
    torch.testing.assert_close(y2, y, rtol=0, atol=0)
    torch.testing.assert_close(dx2, dx, rtol=0, atol=0)
    for name in grads:
        torch.testing.assert_close(grads2[name], grads[name], rtol=0, atol=0, msg=name)


def test_gated_block_launches_and_regenerates_h(device):
    ours, _ = _block(device)
    x = torch.randn(M, K, device=device, requires_grad=True)
    # h is regenerated by the backward's elementwise kernel (write_h), not saved.
    assert launched(lambda: ours(x).sum().backward()) == {"geglu_fwd": 1, "geglu_bwd_act": 1}


# ---- the gated block's dropout ------------------------------------------------------------------
# The call's mask is reproduced by resetting the generator, drawing the seed again
# (``testing.dropout_seed``) and running the PyTorch copy of the kernels' Philox
# (``reference.dropout_keep``): the explicit reference, as for the FFN block.

BLOCK_NAMES = ("dx", "dw_gate", "dw_up", "dw_down", "db_gate", "db_up", "db_down")


def _block_operands(x_shape, n, dtype, device, bias=True, d=D):
    """(x, w_gate, w_up, w_down, b_gate, b_up, b_down): gated_feed_forward's argument order."""
    x, w_gate, w_up, b_gate, b_up = _operands(x_shape, n, dtype, device, bias)
    w_down = (torch.randn(d, n, device=device) / n**0.5).to(dtype)
    b_down = torch.randn(d, device=device).to(dtype) if bias else None
    return x, w_gate, w_up, w_down, b_gate, b_up, b_down


def _call_keep(call_seed: int, x_shape, n: int, p: float, device):
    """The mask gated_feed_forward draws after ``torch.manual_seed(call_seed)``, (..., n)."""
    torch.manual_seed(call_seed)
    rows = math.prod(x_shape[:-1])
    return reference.dropout_keep(dropout_seed(device), rows, n, p).view(*x_shape[:-1], n)


def _explicit_mask_block(x, w_gate, w_up, w_down, b_gate, b_up, b_down, keep, p, approximate):
    """The gated block by PyTorch in the operands' dtype, dropout with the explicit mask."""
    h = eager_geglu(x, w_gate, w_up, b_gate, b_up, approximate)
    return F.linear(h * (keep.to(h.dtype) / (1.0 - p)), w_down, b_down)


def _check_dropout_block(operands, p, approximate="tanh", recompute=False, what=""):
    """gated_feed_forward in training with dropout ``p``: its output and all seven gradients
    against the block computed with the call's own mask, in float64 (no worse than PyTorch in
    the operands' dtype). Returns (y, dx, dW_gate, dW_up, dW_down, db_gate, db_up, db_down)."""
    x, n = operands[0], operands[1].shape[0]
    leaves = _leaves(operands)
    call_seed = int(torch.randint(0, 2**31, ()))
    torch.manual_seed(call_seed)
    y = triton_gelu.gated_feed_forward(*leaves, approximate=approximate, dropout=p,
                                       training=True, recompute=recompute)
    dy = torch.randn_like(y)
    y.backward(dy)

    keep = _call_keep(call_seed, x.shape, n, p, x.device)
    theirs = _leaves(operands)
    y_torch = _explicit_mask_block(*theirs, keep, p, approximate)
    y_torch.backward(dy)

    def block64(*tensors):
        return reference.gated_feed_forward64(*tensors, approximate=approximate, keep=keep, p=p)

    with torch.no_grad():
        y64 = block64(*operands)
    what = f"{x.dtype} {approximate} p={p} recompute={recompute} {what}"
    assert_no_worse_than_torch(y.detach(), y_torch.detach(), y64, "y " + what)
    _compare_grads(leaves, theirs, reference.grads64(block64, list(operands), dy), BLOCK_NAMES,
                   what)
    return (y.detach(), *(t.grad if t is not None else None for t in leaves))


@pytest.mark.parametrize("fwd", ["fused", "composed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gated_block_dropout_matches_explicit_mask_reference(dtype, fwd, device):
    # The forward's mask, regenerated from its seed by the PyTorch Philox: output and every
    # gradient match the block computed with that mask, so the backward used the forward's.
    with force_path(geglu_fwd=fwd):
        ran = launched(lambda: _check_dropout_block(
            _block_operands((3, 13, K), N, dtype, device), 0.1, "none", what=fwd))
        _check_dropout_block(_block_operands((M, K), N, dtype, device, bias=False), 0.5,
                             "tanh", recompute=True, what=fwd)
    # One GeGLU launch each way (its epilogue or elementwise kernel drops), no other dropout.
    assert ran == ({"geglu_fwd": 1, "geglu_bwd_act": 1} if fwd == "fused" else
                   {"geglu_act": 1, "geglu_bwd_act": 1}), ran


def test_kernel_masks_are_the_reference_mask(device):
    # The fused epilogue (any tile shape), the composed path's elementwise kernel and the
    # backward's regenerated mask are the PyTorch copy of the generator, element for element.
    operands = _operands((M, K), N, torch.float32, device)
    x, w_gate, w_up, b_gate, b_up = operands
    seed = dropout_seed(device)
    ones = torch.ones(M, N, device=device)
    for p in (0.1, 0.5, 0.999):
        want = reference.dropout_keep(seed, M, N, p)
        for fwd in ("fused", "composed"):
            with force_path(geglu_fwd=fwd):
                h0 = gk.geglu_forward(*operands, "gelu", False)[0]
                h, gate, up = gk.geglu_forward(*operands, "gelu", True, seed, p)
            assert h0.ne(0).all()  # so h's zeros are the dropped elements
            keep = h != 0
            assert torch.equal(keep.cpu(), want.cpu()), \
                f"{fwd} p={p}: {int((keep != want).sum())} elements differ"
            torch.testing.assert_close(h[keep], h0[keep] / (1.0 - p), rtol=1e-5, atol=0)
            # The backward regenerates it: the h it writes for the down projection is bitwise
            # the forward's, and its gradients follow the mask's float32 formulas.
            dx, _, _, dbg, dbu, h_again = gk.geglu_backward(
                ones, x, w_gate, w_up, gate, up, "gelu", [True] * 5, True, seed, p)
            torch.testing.assert_close(h_again, h, rtol=0, atol=0, msg=f"{fwd} p={p}")
            want_dx, _, _, want_dbg, want_dbu = reference.geglu_backward_fp32(
                ones, x, w_gate, w_up, gate, up, "gelu", want, 1.0 / (1.0 - p))
            for name, got, ref in (("dx", dx, want_dx), ("db_gate", dbg, want_dbg),
                                   ("db_up", dbu, want_dbu)):
                torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5,
                                           msg=f"{name} {fwd} p={p}")
    want = reference.dropout_keep(seed, M, N, 0.5).cpu()
    h_default, _, _ = gk._forward_fused(x, w_gate, w_up, b_gate, b_up, "gelu", True, False,
                                        seed, 0.5, 0, N)
    # 128 x 64: the epilogue in quarters (8K elements), the others in halves
    for tile, tuner in tile_tuners(gk._geglu_fwd_kernel, "test_geglu_tile",
                                   tiles=((16, 16), (16, 64), (64, 32), (128, 64))):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(gk, "_fwd_tuner", tuner)
            h, _, _ = gk._forward_fused(x, w_gate, w_up, b_gate, b_up, "gelu", True, False,
                                        seed, 0.5, 0, N)
        assert torch.equal((h != 0).cpu(), want), f"tile {tile}"
        torch.testing.assert_close(h, h_default, rtol=1e-5, atol=1e-5, msg=f"tile {tile}")


@pytest.mark.parametrize("col_offset", [8, 13])
def test_a_shard_draws_its_columns_of_the_whole_mask(col_offset, device):
    # Tensor parallel: a rank's 21 hidden columns are columns col_offset .. of the whole (M, N)
    # layer (13: a shard starting inside a group of 4). Every forward path, and the backward's
    # regenerated dropout(h), apply exactly the whole layer's mask there.
    cols, seed = 21, dropout_seed(device)
    want = reference.dropout_keep(seed, M, N, 0.5)[:, col_offset:col_offset + cols].cpu()
    operands = _operands((M, K), cols, torch.float32, device)
    ones = torch.ones(M, cols, device=device)
    for fwd in ("fused", "composed"):
        with force_path(geglu_fwd=fwd):
            h, gate, up = gk.geglu_forward(*operands, "gelu", True, seed, 0.5, col_offset, N)
        assert torch.equal((h != 0).cpu(), want), f"{fwd}: {int(((h != 0).cpu() != want).sum())}"
        h_again = gk.geglu_backward(ones, operands[0], *operands[1:3], gate, up, "gelu",
                                    [True] * 5, True, seed, 0.5, col_offset, N)[-1]
        torch.testing.assert_close(h_again, h, rtol=0, atol=0, msg=fwd)
    with pytest.raises(ValueError, match="col_offset"):  # refused by the op (tensor parallel's)
        x, w_gate, w_up, b_gate, b_up = operands
        torch.ops.triton_gelu.gated_ffn_fwd(x, w_gate, w_up, torch.randn(D, cols), b_gate, b_up,
                                            None, seed, 0.5, "gelu", False, N - cols + 1, N)


def test_gated_block_finite_differences_with_the_seed_reset(device):
    # For a fixed seed the block is a deterministic function of its inputs: central differences
    # of <y, dy>, the generator reset before every forward, match the analytic gradients.
    operands = [t.requires_grad_(True)
                for t in _block_operands((5, 7), 9, torch.float32, device, d=6)]
    dy = torch.randn(5, 6, device=device)

    def loss(*tensors):
        torch.manual_seed(1234)
        y = triton_gelu.gated_feed_forward(*tensors, approximate="tanh", dropout=0.5,
                                           training=True)
        return (y * dy).sum()

    assert_finite_differences(loss, operands, BLOCK_NAMES, samples=3)


def test_gated_block_same_seed_same_output_eval_and_p0_draw_no_seed(device):
    block = triton_gelu.GatedFeedForward(K, N, dropout=0.3, device=device).train()
    x = torch.randn(M, K, device=device)
    a = assert_reproducible_by_seed(lambda: block(x))
    # eval() (or p == 0) compiles dropout out: nothing is drawn from the generator.
    state = torch.get_rng_state()
    eval_out = block.eval()(x)
    block.train().dropout.p = 0.0
    p0_out = block(x)
    assert torch.equal(torch.get_rng_state(), state)
    torch.testing.assert_close(eval_out, p0_out, rtol=0, atol=0)
    assert not torch.equal(a, eval_out)


def test_eager_paths_do_not_apply_with_dropout(device, monkeypatch):
    """PyTorch's ops cannot draw the kernels' mask: at p > 0 a forced torch forward and torch
    backward warn and the op chooses as usual (fused forward, once backward); at p = 0 the
    forced paths run."""
    for paths in (gk._forward_paths, gk._backward_paths):
        monkeypatch.setattr(paths, "_forced_warned", set())  # each warns once per process
    operands = _block_operands((M, K), N, torch.float32, device)
    for bwd in ("torch",):
        with force_path(geglu_fwd="torch", geglu_bwd=bwd):
            with pytest.warns(UserWarning, match="does not apply to this problem"):
                ran = launched(lambda: _check_dropout_block(operands, 0.4, what=bwd))
            assert ran == {"geglu_fwd": 1, "geglu_bwd_act": 1}, ran
            ran = launched(lambda: _check_dropout_block(operands, 0.0, what=bwd))
            assert ran == {}, ran


# ---- what the backward keeps ---------------------------------------------------------------------


def _saved(fn, params) -> int:
    return saved_activation_bytes(fn, exclude=params)


def test_saved_bytes_of_the_op_and_the_block(device):
    """Exact byte counts: the GeGLU op keeps x, g and u (eager: x, g, gelu(g), u); the gated
    block also drops h (eager keeps it for the down projection); recompute keeps x only."""
    m, k, n = 24, 16, 64  # d_ff = 4 d_model, a typical FFN ratio
    x = torch.randn(m, k, device=device, requires_grad=True)
    ours, eager = _block(device, d_model=k, d_ff=n)
    params = [*ours.parameters(), *eager.parameters()]
    w = (ours.gate_proj.weight, ours.up_proj.weight)
    item = x.element_size()

    op_eager = _saved(lambda: eager_geglu(x, *w), params)
    op_ours = _saved(lambda: triton_gelu.geglu(x, *w), params)
    op_recompute = _saved(lambda: triton_gelu.geglu(x, *w, recompute=True), params)
    assert (op_eager, op_ours, op_recompute) == ((m * k + 3 * m * n) * item,
                                                 (m * k + 2 * m * n) * item, m * k * item)
    assert op_ours / op_eager <= 0.70, op_ours / op_eager

    block_eager = _saved(lambda: eager.eval()(x), params)  # Gemma's MLP has no dropout
    block_ours = _saved(lambda: ours(x), params)
    ours.recompute = True
    block_recompute = _saved(lambda: ours(x), params)
    assert (block_eager, block_ours, block_recompute) == (
        (m * k + 4 * m * n) * item, (m * k + 2 * m * n) * item, m * k * item)
    assert block_ours / block_eager <= 0.55, block_ours / block_eager


def test_saved_bytes_of_the_block_with_dropout(device):
    """Exact byte counts in training at p > 0: ours keeps x, g, u and the 8-byte seed (recompute:
    x and the seed); eager's block with nn.Dropout keeps x, g, gelu(g), u, the dropout mask (in
    x's dtype on the CPU, one byte per element on a GPU) and the dropout output (for the down
    projection; h itself is then not kept)."""
    m, k, n = 24, 16, 64
    x = torch.randn(m, k, device=device, requires_grad=True)
    ours, eager = (block.train() for block in _block(device, d_model=k, d_ff=n, dropout=0.1))
    params = [*ours.parameters(), *eager.parameters()]
    item, mask_item = x.element_size(), 1 if x.is_cuda else x.element_size()

    block_eager = _saved(lambda: eager(x), params)
    block_ours = _saved(lambda: ours(x), params)
    ours.recompute = True
    block_recompute = _saved(lambda: ours(x), params)
    assert (block_eager, block_ours, block_recompute) == (
        (m * k + 4 * m * n) * item + m * n * mask_item, (m * k + 2 * m * n) * item + 8,
        m * k * item + 8)
    # Dropout costs eager a mask and an output, ours 8 bytes: a smaller ratio than at p = 0.
    assert block_ours / block_eager < (k + 2 * n) / (k + 4 * n), block_ours / block_eager


# ---- modules -------------------------------------------------------------------------------------


def test_geglu_module_names_init_and_from_linears(device):
    torch.manual_seed(1)
    ours = triton_gelu.GeGLU(K, N, bias=True, device=device)
    torch.manual_seed(1)
    gate, up = nn.Linear(K, N, device=device), nn.Linear(K, N, device=device)
    assert list(ours.state_dict()) == ["gate_proj.weight", "gate_proj.bias", "up_proj.weight",
                                       "up_proj.bias"]
    for name, p in (("gate_proj", gate), ("up_proj", up)):  # nn.Linear's draws, in order
        torch.testing.assert_close(getattr(ours, name).weight, p.weight, rtol=0, atol=0)
    assert repr(ours).startswith("GeGLU(\n  approximate='tanh', recompute=False\n  (gate_proj)")
    assert triton_gelu.GeGLU(K, N).gate_proj.bias is None  # bias=False by default, as Gemma

    rng_before = torch.get_rng_state()
    shared = triton_gelu.GeGLU.from_linears(gate, up, approximate="none", recompute=True)
    assert torch.equal(torch.get_rng_state(), rng_before), "from_linears drew random numbers"
    assert shared.gate_proj.weight is gate.weight and shared.up_proj.bias is up.bias
    x = torch.randn(2, 5, K, device=device)
    torch.testing.assert_close(shared(x), eager_geglu(x, gate.weight, up.weight, gate.bias,
                                                      up.bias, "none"), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="same shapes"):
        triton_gelu.GeGLU.from_linears(gate, nn.Linear(K, N + 1))
    with pytest.raises(TypeError, match="up_proj must be an nn.Linear"):
        triton_gelu.GeGLU.from_linears(gate, nn.Identity())


def test_gated_feed_forward_module(device):
    ours, eager = _block(device, bias=True, dropout=0.1)
    assert list(ours.state_dict()) == list(eager.state_dict())
    assert ours.dropout.p == 0.1 and ours.approximate == "tanh" and not ours.recompute
    shared = triton_gelu.GatedFeedForward.from_linears(
        eager.gate_proj, eager.up_proj, eager.down_proj, approximate="tanh")
    assert shared.down_proj.weight is eager.down_proj.weight
    eager.eval()
    x = torch.randn(2, 5, K, device=device)
    torch.testing.assert_close(shared(x), eager(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="down_proj must be an nn.Linear"):
        triton_gelu.GatedFeedForward.from_linears(eager.gate_proj, eager.up_proj,
                                                  nn.Linear(N + 1, K))


# ---- torch.compile -------------------------------------------------------------------------------


@contextlib.contextmanager
def _fresh_dynamo():
    torch._dynamo.reset()
    try:
        yield
    finally:
        torch._dynamo.reset()


def _gated_model(device):
    return nn.Sequential(
        triton_gelu.GeGLU(8, 16, bias=True, recompute=True), nn.Linear(16, 8),
        triton_gelu.GatedFeedForward(8, 24, approximate="none"),
    ).to(device)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_forward_and_backward(backend, device):
    from test_compile import Recorder, _fwd_bwd, _require_backend

    if device == "cuda" and backend == "aot_eager":
        pytest.skip("the GPU runs Inductor only")
    _require_backend(backend)
    model = _gated_model(device)
    recorder = Recorder(backend)
    with _fresh_dynamo():
        compiled = torch.compile(copy.deepcopy(model), backend=recorder, fullgraph=True,
                                 dynamic=True)
        for tokens in (5, 11):
            x = torch.randn(2, tokens, 8, device=device)
            got, want = _fwd_bwd(compiled, x), _fwd_bwd(model, x)
            for what, a, b in (("output", got[0], want[0]), ("dx", got[1], want[1]),
                               *((n, got[2][n], want[2][n]) for n in want[2])):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"{what} {tokens}")
    assert recorder.fw_ops >= {"geglu_fwd", "gated_ffn_fwd"}, recorder.fw_ops
    if backend == "aot_eager":
        assert recorder.bw_ops >= {"geglu_bwd", "geglu_gate_up"}, recorder.bw_ops


@pytest.mark.parametrize("recompute", [False, True], ids=["saved", "recompute"])
def test_compile_fullgraph_with_dropout(recompute, device):
    """torch.compile(fullgraph=True) of GatedFeedForward in training with dropout: the seed is
    drawn in the graph, forward and backward trace through the custom ops, and both equal eager
    for the same generator state."""
    from test_compile import Recorder

    model = triton_gelu.GatedFeedForward(8, 24, dropout=0.3, bias=True, recompute=recompute,
                                         device=device).train()
    recorder = Recorder("aot_eager")
    with _fresh_dynamo():
        compiled = torch.compile(copy.deepcopy(model), backend=recorder, fullgraph=True)
        x = torch.randn(2, 7, 8, device=device)
        results = []
        for m in (compiled, model):
            torch.manual_seed(21)
            dy = torch.linspace(-1, 1, 2 * 7 * 8, device=device).view(2, 7, 8)
            results.append(_run_module(m, x, dy))
    assert recorder.frames == 1
    assert "gated_ffn_fwd" in recorder.fw_ops and "geglu_bwd" in recorder.bw_ops, recorder
    assert ("geglu_gate_up" in recorder.bw_ops) == recompute
    (y, dx, grads, _), (y_eager, dx_eager, grads_eager, _) = results
    torch.testing.assert_close(y, y_eager, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dx, dx_eager, rtol=1e-6, atol=1e-6)
    grads = {name.removeprefix("_orig_mod."): grad for name, grad in grads.items()}
    assert grads.keys() == grads_eager.keys()
    for name, grad in grads_eager.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-6, atol=1e-6, msg=name)


def test_compile_no_grad_and_autocast(device):
    from test_compile import Recorder

    model = _gated_model(device).eval()
    with _fresh_dynamo():
        compiled = torch.compile(model, backend=Recorder("aot_eager"), fullgraph=True)
        x = torch.randn(2, 5, 8, device=device)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
        with torch.autocast(device, dtype=torch.bfloat16):
            out, want = compiled(x), model(x)
        assert out.dtype == want.dtype == torch.bfloat16
        torch.testing.assert_close(out, want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "quick_gelu"])
def test_opcheck(activation, device):
    """torch.library.opcheck: schema, fakes, autograd registration and AOT dispatch of every
    GeGLU op against its real implementation."""
    from triton_gelu import ops

    x = torch.randn(5, 8, device=device, requires_grad=True)
    wg, wu = (torch.randn(6, 8, device=device, requires_grad=True) for _ in "gu")
    bg, bu = (torch.randn(6, device=device, requires_grad=True) for _ in "gu")
    wd = torch.randn(3, 6, device=device, requires_grad=True)
    bd = torch.randn(3, device=device, requires_grad=True)
    dh, g, u = (torch.randn(5, 6, device=device) for _ in range(3))
    x0, wg0, wu0 = x.detach(), wg.detach(), wu.detach()
    tanh, seed = activation, dropout_seed(device)  # the activation name
    cases = [
        (ops.geglu_fwd, (x, wg, wu, bg, bu, tanh, True)),
        (ops.geglu_fwd, (x, wg, wu, None, bu, tanh, False)),
        (ops.geglu_fwd, (x, wg0.t().contiguous().t(), wu, bg, None, tanh, True)),  # W^T
        (ops.gated_ffn_fwd, (x, wg, wu, wd, bg, bu, bd, None, 0.0, tanh, True)),
        (ops.gated_ffn_fwd, (x, wg, wu, wd, None, None, None, None, 0.0, tanh, False)),
        (ops.gated_ffn_fwd, (x, wg, wu, wd, bg, None, bd, seed, 0.3, tanh, True)),  # dropout
        (ops.gated_ffn_fwd, (x, wg, wu, wd, None, bu, None, seed, 0.3, tanh, False)),
        # The backward ops run in the backward only: no autograd of their own.
        (ops.geglu_gate_up_op, (x0, wg0, wu0, bg.detach(), None, 0.0, tanh)),
        (ops.geglu_gate_up_op, (x0, wg0, wu0, None, None, 0.3, tanh)),
        (ops.geglu_bwd, (dh, x0, wg0, wu0, g, u, None, 0.0, tanh, [True] * 5, True)),
        (ops.geglu_bwd, (dh, x0, wg0, wu0, g, u, None, 0.0, tanh,
                         [False, True, False, False, True], False)),
        (ops.geglu_bwd, (dh, x0, wg0, wu0, g, u, seed, 0.3, tanh, [True] * 5, True)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)
