"""Fused Linear + bias + GELU forward and backward against float64 PyTorch.

Shapes stay small (M, N, K < 64) so the Triton interpreter runs the file quickly, and are
multiples of no block size so every masked edge of every kernel is exercised.
"""

import importlib

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    DTYPES, X_LAYOUTS, assert_all_written, assert_nan_where_ref_nan, assert_no_worse_than_torch,
    tf32,
)

import triton_gelu
from triton_gelu import kernels, reference
from triton_gelu.autotune import force_path
from triton_gelu.testing import count_launches, count_paths
from triton_gelu.kernels import _matmul

# The kernels' module; ``triton_gelu.linear_gelu`` itself is the public function.
lg = importlib.import_module("triton_gelu.kernels.linear_gelu")

FORMS = ["none", "tanh"]
M, K, N = 37, 45, 51  # multiples of no block size

# Every path of every op (tuning.paths.Paths), in sets forced together so that the forward
# and linear_preact compute z the same way (the recomputed z stays bitwise the saved one).
# addmm_gelu, which applies only where no z is kept, has its own test below.
PATH_SETS = {
    "fused": {"linear_gelu_fwd": "fused", "linear_preact": "fused",
              "linear_gelu_bwd": "dz_once"},
    "cublas": {"linear_gelu_fwd": "composed", "linear_preact": "composed",
               "linear_gelu_bwd": "dz_once"},
    "torch": {"linear_gelu_fwd": "torch", "linear_preact": "composed",
              "linear_gelu_bwd": "torch"},
}


@pytest.fixture(params=PATH_SETS)
def paths(request):
    """Run the test with one set of paths forced; check that only forced paths ran, and that
    the forward's did (unless nothing ran: empty problems launch nothing)."""
    forced = PATH_SETS[request.param]
    with count_paths() as counted, force_path(**forced):
        yield request.param
    ran = set(counted)
    assert all(forced.get(op, name) == name for op, name in ran), f"unforced paths ran: {ran}"
    assert not ran or ("linear_gelu_fwd", forced["linear_gelu_fwd"]) in ran, ran


def _operands(x_shape, n, dtype, device, bias=True):
    """x ~ N(0, 1) and W ~ N(0, 1/K), b ~ N(0, 1): z is O(1), where GELU bends."""
    k = x_shape[-1]
    x = torch.randn(x_shape, device=device).to(dtype)
    weight = (torch.randn(n, k, device=device) / k**0.5).to(dtype)
    b = torch.randn(n, device=device).to(dtype) if bias else None
    return x, weight, b


def _check(x, weight, bias, approximate, recompute=False, what=""):
    """Forward and every gradient of linear_gelu against float64, no worse than torch in x's
    dtype. Returns our (y, dx, dw, db)."""
    leaves = [t.detach().requires_grad_(True) if t is not None else None for t in (x, weight, bias)]
    y = triton_gelu.linear_gelu(*leaves, approximate=approximate, recompute=recompute)
    dy = torch.randn_like(y)
    y.backward(dy)

    torch_leaves = [t.detach().clone().requires_grad_(True) if t is not None else None
                    for t in (x, weight, bias)]
    y_torch = F.gelu(F.linear(*torch_leaves), approximate=approximate)
    y_torch.backward(dy)

    what = f"{x.dtype} {approximate} recompute={recompute} x{tuple(x.shape)} {what}"
    assert y.shape == y_torch.shape and y.dtype == x.dtype
    assert_no_worse_than_torch(
        y, y_torch, reference.linear_gelu64(x, weight, bias, approximate), "y " + what
    )
    grads64 = reference.linear_gelu_grads64(x, weight, bias, dy, approximate)
    for name, ours, theirs, ref in zip(("dx", "dw", "db"), leaves, torch_leaves, grads64):
        if ours is None:
            continue
        assert ours.grad.shape == ours.shape, f"{name} {what}: shape {tuple(ours.grad.shape)}"
        assert_no_worse_than_torch(ours.grad, theirs.grad, ref, f"{name} {what}")
    return (y, *(t.grad if t is not None else None for t in leaves))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("recompute", [False, True], ids=["saved", "recompute"])
@pytest.mark.parametrize("approximate", FORMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_float64(dtype, approximate, recompute, bias, device, paths):
    with tf32(False):  # float32 in IEEE, as torch's reference
        _check(*_operands((M, K), N, dtype, device, bias), approximate, recompute)


@pytest.mark.parametrize("approximate", FORMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_recompute_gives_identical_gradients(dtype, approximate, device, paths):
    # The recomputed pre-activation is bitwise the saved one (same kernel, same tiles).
    x, weight, bias = _operands((M, K), N, dtype, device)
    torch.manual_seed(0)  # the same dy for both
    saved = _check(x, weight, bias, approximate, recompute=False)
    torch.manual_seed(0)
    recomputed = _check(x, weight, bias, approximate, recompute=True)
    for name, a, b in zip(("y", "dx", "dw", "db"), saved, recomputed):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{name} differs with recompute")


@pytest.mark.parametrize("layout", X_LAYOUTS.keys())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_input_layouts(layout, dtype, device, monkeypatch, paths):
    x = X_LAYOUTS[layout](K, device).to(dtype)
    _, weight, bias = _operands((K,), N, dtype, device)
    seen = []

    def spy(x2d, *args, **kwargs):
        seen.append(x2d)
        return lg.linear_gelu_forward(x2d, *args, **kwargs)

    monkeypatch.setattr(kernels, "linear_gelu_forward", spy)
    with tf32(False):
        y, dx, dw, db = _check(x, weight, bias, "tanh", what=layout)
    assert y.shape == (*x.shape[:-1], N) and dx.shape == x.shape
    if paths == "torch":  # eager PyTorch's own ops serve it: no launcher is called
        assert not seen
        return
    # Collapsible leading dimensions reach the kernel as a strided view of x, not a copy.
    copied = seen[0].data_ptr() != x.data_ptr()
    if x.numel():
        assert copied == (layout == "3-D permuted"), f"{layout}: copied={copied}"


def test_strided_weight_and_bias(device, paths):
    # W as a transposed (K, N) tensor and a strided bias: read through strides, never copied
    # by the caller.
    x, _, _ = _operands((M, K), N, torch.float32, device)
    weight = (torch.randn(K, N, device=device) / K**0.5).t()
    bias = torch.randn(2 * N, device=device)[::2]
    assert not weight.is_contiguous() and not bias.is_contiguous()
    with tf32(False):
        _check(x, weight, bias, "none")


def test_tf32_allowed_float32(device):
    # With TF32 (10-bit mantissa products) the result is within ~1e-3 relative of float64; on
    # the CPU interpreter tl.dot is exact float32, which passes too.
    x, weight, bias = _operands((M, K), N, torch.float32, device)
    with tf32(True):
        assert _matmul.input_precision(torch.float32) == "tf32"
        y = triton_gelu.linear_gelu(x, weight, bias)
    ref = reference.linear_gelu64(x, weight, bias)
    scale = ref.abs().max().item()
    err = (y.double().cpu() - ref.cpu()).abs().max().item()
    assert err <= 1e-3 * scale, f"tf32 forward: max error {err:.3e} > 1e-3 x max|y| {scale:.3g}"
    with tf32(False):
        assert _matmul.input_precision(torch.float32) == "ieee"
    assert _matmul.input_precision(torch.bfloat16) is None  # the backend's default for 16-bit


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_poisoned_outputs_fully_written(dtype, bias, device, poison_outputs, paths):
    # Through the public function: y, and the gradients, which a pre-activation (saved, or
    # recomputed by linear_preact) not fully written would fill with NaN (dz = dy * GELU'(z)).
    x, weight, b = _operands((M, K), N, dtype, device, bias)
    dy = torch.randn(M, N, device=device).to(dtype)
    y64 = reference.linear_gelu64(x, weight, b)
    refs = [r for r in reference.linear_gelu_grads64(x, weight, b, dy) if r is not None]
    results = []
    for recompute in (False, True):
        leaves = [t.clone().requires_grad_(True) for t in (x, weight, b) if t is not None]
        y = triton_gelu.linear_gelu(*leaves, *([] if bias else [None]), recompute=recompute)
        grads = torch.autograd.grad(y, leaves, dy)  # the launchers' own buffers, not copies
        what = f"recompute={recompute}"
        assert_all_written(y, y64, f"y {what}")
        for name, grad, ref in zip(("dx", "dw", "db"), grads, refs):
            assert_all_written(grad, ref, f"{name} {what}")
        results.append((y, *grads))
    for name, saved, recomputed in zip(("y", "dx", "dw", "db"), *results):
        torch.testing.assert_close(recomputed, saved, rtol=0, atol=0,
                                   msg=f"{name}: the recomputed z is not the saved one")


# dz kernel launches per backward path, for needs (dx, dW, db): dz_once computes dz once
# whatever is needed (db alone: the kernel's partial sums, no dz written).
BACKWARD_LAUNCHES = {
    "dz_once": lambda need: (1,),
    "torch": lambda need: (0,),
}


@pytest.mark.parametrize("path", BACKWARD_LAUNCHES)
@pytest.mark.parametrize("need", [(True, False, False), (False, True, False),
                                  (False, False, True), (False, True, True),
                                  (True, True, True)], ids=str)
def test_backward_computes_only_what_is_needed(path, need, device, poison_outputs):
    x, weight, b = _operands((M, K), N, torch.float32, device)
    dy = torch.randn(M, N, device=device)
    _, preact = lg.linear_gelu_forward(x, weight, b, "gelu_tanh", True)
    names = ["linear_gelu_bwd_dz"]
    with count_launches() as counts, force_path(linear_gelu_bwd=path):
        grads = lg.linear_gelu_backward(dy, x, weight, preact, "gelu_tanh", *need)
    refs = reference.linear_gelu_grads64(x, weight, b, dy, "tanh")
    for name, wanted, grad, ref in zip(("dx", "dw", "db"), need, grads, refs):
        assert (grad is not None) == wanted, f"{name}: returned {grad is not None}, need {wanted}"
        if wanted:
            assert_all_written(grad, ref, name)
            torch.testing.assert_close(grad.double(), ref, rtol=1e-5, atol=1e-5)
    launched = tuple(counts[n] for n in names)
    assert launched == BACKWARD_LAUNCHES[path](need), f"{path}: launches {launched}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_addmm_gelu_path_where_it_applies(dtype, device):
    """torch._addmm_activation(use_gelu=True) computes the tanh form on CUDA and the exact form
    on the CPU: its path serves that form, where no z is kept (inference, recompute)."""
    form = "tanh" if device == "cuda" else "none"
    other = "none" if form == "tanh" else "tanh"
    x, weight, bias = _operands((M, K), N, dtype, device)
    with count_paths() as ran, tf32(False), force_path(linear_gelu_fwd="addmm_gelu"):
        _check(x, weight, bias, form, recompute=True)
        with torch.no_grad():
            y = triton_gelu.linear_gelu(x, weight, bias, form)
        torch.testing.assert_close(y, triton_gelu.linear_gelu(x, weight, bias, form,
                                                              recompute=True).detach())
    assert ran[("linear_gelu_fwd", "addmm_gelu")] == 3, ran
    applies = lg._fwd_paths.applicable
    assert "addmm_gelu" in applies((x, weight, bias, reference.form_name(form), False), {})
    for args in ((x, weight, bias, reference.form_name(form), True),  # z kept for the backward
                 (x, weight, bias, reference.form_name(other), False),  # the other form
                 (x, weight, None, reference.form_name(form), False),  # no bias
                 (x[:, :0], weight[:, :0], bias, reference.form_name(form), False)):  # K = 0
        assert "addmm_gelu" not in applies(args, {})


def test_every_path_leaves_its_inputs_alone_and_returns_new_tensors(device):
    x, weight, bias = _operands((M, K), N, torch.bfloat16, device)
    dy = torch.randn(M, N, device=device).to(torch.bfloat16)
    _, preact = lg.linear_gelu_forward(x, weight, bias, "gelu", True)
    inputs = [x, weight, bias, dy, preact]
    snapshot = [t.clone() for t in inputs]
    calls = [(lg._fwd_paths, name, (x, weight, bias, "gelu", save))
             for name in lg._fwd_paths.paths for save in (False, True)]
    calls += [(lg._preact_paths, name, (x, weight, bias)) for name in lg._preact_paths.paths]
    calls += [(lg._bwd_paths, name, (dy, x, weight, preact, "gelu", True, True, True))
              for name in lg._bwd_paths.paths]
    for chooser, name, args in calls:
        if name not in chooser.applicable(args, {}):
            continue
        outputs = chooser.paths[name](*args)
        for out in (outputs if isinstance(outputs, tuple) else (outputs,)):
            if out is not None:
                assert out.is_contiguous(), f"{chooser.op} {name}"
                assert all(out.data_ptr() != t.data_ptr() for t in inputs), f"{chooser.op} {name}"
        for t, before in zip(inputs, snapshot):
            torch.testing.assert_close(t, before, rtol=0, atol=0,
                                       msg=f"{chooser.op} {name} wrote into an input")


@pytest.mark.parametrize("approximate", FORMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_in_nan_out(dtype, approximate, device, paths):
    x, weight, bias = _operands((M, K), N, dtype, device)
    x[3, 7] = float("nan")  # row 3 of y and dx, all of dW and db
    x.requires_grad_(True)
    y = triton_gelu.linear_gelu(x, weight.requires_grad_(True), bias.requires_grad_(True),
                                approximate)
    dy = torch.randn_like(y)
    y.backward(dy)
    assert_nan_where_ref_nan(y.detach(), reference.linear_gelu64(x, weight, bias, approximate), "y")
    refs = reference.linear_gelu_grads64(x, weight, bias, dy, approximate)
    for name, grad, ref in zip(("dx", "dw", "db"), (x.grad, weight.grad, bias.grad), refs):
        assert_nan_where_ref_nan(grad, ref, name)
    assert y[3].isnan().all() and not y[:3].isnan().any()


def test_kernel_path_taken(device):
    """The forward and the backward's dz (computed once, for dx, dW and db together) come from
    the Triton kernels (one launch each), not a fallback."""
    names = ["linear_gelu_fwd", "linear_preact", "linear_gelu_bwd_dz"]
    x, weight, bias = (t.requires_grad_(True) for t in _operands((M, K), N, torch.float32, device))

    with count_launches() as launched:
        triton_gelu.linear_gelu(x, weight, bias).sum().backward()
    assert [launched[n] for n in names] == [1, 0, 1], launched

    with count_launches() as launched:
        triton_gelu.linear_gelu(x, weight, bias, recompute=True).sum().backward()
    assert [launched[n] for n in names] == [1, 1, 1], launched

    # Frozen weight and bias: dz for dx alone, still one launch.
    x.grad = None
    with count_launches() as launched:
        triton_gelu.linear_gelu(x, weight.detach(), bias.detach()).sum().backward()
    assert [launched[n] for n in names] == [1, 0, 1], launched
    assert x.grad is not None


def test_inference_writes_only_y(device, monkeypatch):
    """No pre-activation is saved (or written) unless a gradient can be asked for."""
    calls = []

    def spy(x2d, weight, bias, activation, save_preact):
        calls.append(save_preact)
        return lg.linear_gelu_forward(x2d, weight, bias, activation, save_preact)

    def spy_bound(x2d, weight, bias, activation, save_preact):  # a plan's later calls
        bound = lg.linear_gelu_forward_launch(x2d, weight, bias, activation, save_preact)

        def run(*operands):
            calls.append(save_preact)
            return bound(*operands)
        return run

    monkeypatch.setattr(kernels, "linear_gelu_forward", spy)
    monkeypatch.setattr(kernels, "linear_gelu_forward_launch", spy_bound)
    x, weight, bias = _operands((M, K), N, torch.float32, device)
    weight.requires_grad_(True)
    with torch.no_grad():
        y = triton_gelu.linear_gelu(x, weight, bias)
    assert y.grad_fn is None and calls == [False]
    with torch.inference_mode():
        triton_gelu.linear_gelu(x, weight, bias)
    assert calls == [False, False]
    triton_gelu.linear_gelu(x, weight.detach(), bias)  # nothing requires grad
    assert calls == [False, False, False]
    assert triton_gelu.linear_gelu(x, weight, bias).grad_fn is not None
    assert triton_gelu.linear_gelu(x, weight, bias, recompute=True).grad_fn is not None
    assert calls == [False, False, False, True, False]
    # And the launcher itself writes no pre-activation when not asked to.
    assert lg.linear_gelu_forward(x, weight.detach(), bias, "gelu", False)[1] is None


def test_second_backward_is_unchanged(device, paths):
    x, weight, bias = (t.requires_grad_(True) for t in _operands((M, K), N, torch.float32, device))
    snapshot = [t.detach().clone() for t in (x, weight, bias)]
    for recompute in (False, True):
        for t in (x, weight, bias):
            t.grad = None
        y = triton_gelu.linear_gelu(x, weight, bias, "tanh", recompute)
        dy = torch.randn_like(y)
        y.backward(dy, retain_graph=True)
        first = [t.grad.clone() for t in (x, weight, bias)]
        y.backward(dy)
        for name, t, g in zip(("dx", "dw", "db"), (x, weight, bias), first):
            torch.testing.assert_close(t.grad, 2 * g, rtol=0, atol=0, msg=f"second {name}")
    for t, before in zip((x, weight, bias), snapshot):
        torch.testing.assert_close(t.detach(), before, rtol=0, atol=0)


@pytest.mark.parametrize("approximate", FORMS)
def test_autocast_bf16(approximate, device, paths):
    """Under autocast, x, W and b are cast to the autocast dtype as for F.linear; gradients
    come back in the leaves' float32."""
    x, weight, bias = _operands((4, 9, K), N, torch.float32, device)
    ours = [t.clone().requires_grad_(True) for t in (x, weight, bias)]
    theirs = [t.clone().requires_grad_(True) for t in (x, weight, bias)]
    with torch.autocast(device, dtype=torch.bfloat16):
        y = triton_gelu.linear_gelu(*ours, approximate=approximate)
        y_torch = F.gelu(F.linear(*theirs), approximate=approximate)
    assert y.dtype == y_torch.dtype == torch.bfloat16
    dy = torch.randn_like(y)
    y.backward(dy)
    y_torch.backward(dy)
    low = [t.to(torch.bfloat16) for t in (x, weight, bias)]  # what autocast multiplies
    assert_no_worse_than_torch(
        y, y_torch, reference.linear_gelu64(*low, approximate), f"autocast y {approximate}"
    )
    refs = reference.linear_gelu_grads64(*low, dy, approximate)
    for name, a, b, ref in zip(("dx", "dw", "db"), ours, theirs, refs):
        assert a.grad.dtype == torch.float32
        # Both gradients went through bf16; compare at bf16's slack.
        assert_no_worse_than_torch(a.grad, b.grad, ref, f"autocast {name}", atol=1e-2)


def test_cpu_fallback_without_interpreter(monkeypatch):
    """CPU tensors without TRITON_INTERPRET take the PyTorch fallback, same numerics."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with count_launches() as launched:
        for dtype in DTYPES:
            for recompute in (False, True):
                _check(*_operands((M, K), N, dtype, "cpu"), "tanh", recompute)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the fallback is not re-cast inside
            y = triton_gelu.linear_gelu(*_operands((M, K), N, torch.float32, "cpu"))
        assert y.dtype == torch.bfloat16
    assert not launched, launched


def _bad_inputs(device):
    f32 = dict(device=device)
    x, w, b = torch.randn(4, K, **f32), torch.randn(N, K, **f32), torch.randn(N, **f32)
    return {
        "in_features": ((torch.randn(4, K + 1, **f32), w, b), ValueError,
                        rf"in_features mismatch: x has shape \(4, {K + 1}\).*\({N}, {K}\)"),
        "bias length": ((x, w, torch.randn(N - 1, **f32)), ValueError,
                        rf"bias has shape \({N - 1},\) but weight has shape \({N}, {K}\)"),
        "bias 2-D": ((x, w, b[None]), ValueError, rf"bias must be 1-D .*got shape \(1, {N}\)"),
        "weight 1-D": ((x, torch.randn(K, **f32), b), ValueError,
                       rf"weight must be 2-D .*got shape \({K},\)"),
        "weight 3-D": ((x, w[None], b), ValueError, "weight must be 2-D"),
        "x 0-D": ((torch.tensor(1.0, **f32), w, b), ValueError, "at least 1 dimension"),
        "mixed dtype": ((x, w.half(), b), TypeError,
                        "weight has dtype torch.float16 but x has dtype torch.float32"),
        "bias dtype": ((x, w, b.bfloat16()), TypeError, "bias has dtype torch.bfloat16"),
        "devices": ((x, w.to("meta"), b), ValueError, f"weight is on meta but x is on {device}"),
        "int x": ((x.int(), w, b), TypeError,
                  "x must be float32, float16 or bfloat16, got torch.int32"),
        "int weight": ((x, w.long(), b), TypeError, "weight must be .*got torch.int64"),
        "float64": ((x.double(), w.double(), b.double()), TypeError, "got torch.float64"),
        "not a tensor": (([1.0] * K, w, b), TypeError, "x must be a torch.Tensor, got list"),
        "weight list": ((x, [[1.0] * K] * N, b), TypeError, "weight must be a torch.Tensor"),
    }


@pytest.mark.parametrize("case", _bad_inputs("cpu").keys())
def test_rejects_bad_inputs_before_any_launch(case, device):
    args, error, match = _bad_inputs(device)[case]
    with count_launches() as launched:
        with pytest.raises(error, match=match):
            triton_gelu.linear_gelu(*args)
        # The custom ops refuse too (compiled graphs call them, and they are torch.ops.triton_gelu.*);
        # an operand that is not a tensor the dispatcher refuses by the op's schema, in its words.
        # (A meta operand sends the call to the op's fake implementation, which runs nothing.)
        tensors = all(a is None or isinstance(a, torch.Tensor) for a in args)
        if any(isinstance(a, torch.Tensor) and a.is_meta for a in args):
            return
        for op, extra in ((torch.ops.triton_gelu.linear_gelu_fwd, ("gelu", True)),
                          (torch.ops.triton_gelu.linear_preact, ())):
            with pytest.raises(error if tensors else (TypeError, RuntimeError),
                               match=match if tensors else None):
                op(*args, *extra)
    assert not launched, launched


@pytest.mark.parametrize("approximate", ["exact", "Tanh", "", None])
def test_rejects_unknown_approximate(approximate, device):
    x, w, b = _operands((4, K), N, torch.float32, device)
    with count_launches() as launched:
        with pytest.raises(ValueError, match="approximate must be one of"):
            triton_gelu.linear_gelu(x, w, b, approximate=approximate)
        with pytest.raises(ValueError, match="approximate must be one of"):
            triton_gelu.LinearGELU(K, N, approximate=approximate)
    assert not launched, launched


def test_backward_launcher_rejects_bad_shapes(device):
    x, w, _ = _operands((M, K), N, torch.float32, device)
    good = torch.randn(M, N, device=device)
    with count_launches() as launched:
        bad_dy = torch.randn(M, N + 1, device=device)
        with pytest.raises(ValueError, match=rf"dy must have shape \(M, N\) = \({M}, {N}\)"):
            torch.ops.triton_gelu.linear_gelu_bwd(bad_dy, x, w, good, "gelu", True, True, True)
        with pytest.raises(ValueError, match=r"preact must have shape"):
            torch.ops.triton_gelu.linear_gelu_bwd(good, x, w, good[:-1], "gelu", True, True, True)
    assert not launched, launched
