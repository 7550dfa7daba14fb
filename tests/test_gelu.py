"""Standalone GELU forward and backward against float64 PyTorch, every dtype x form."""

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    DTYPES, assert_all_written, assert_nan_where_ref_nan, assert_no_worse_than_torch,
)

import triton_gelu
from triton_gelu import reference
from triton_gelu.autotune import force_path
from triton_gelu.testing import count_launches, count_paths

FORMS = ["none", "tanh"]
PATHS = ["triton", "torch"]  # every path of gelu_fwd and gelu_bwd (tuning.paths.Paths)


@pytest.fixture(params=PATHS)
def gelu_path(request):
    """Run the test with one path forced for the forward and the backward; check it ran."""
    name = request.param
    with count_paths() as ran, force_path(gelu_fwd=name, gelu_bwd=name):
        yield name
    assert ran[("gelu_fwd", name)] and ran[("gelu_bwd", name)], f"path {name} did not run: {ran}"
# Multiples of no block size, ranks 0 to 5.
SHAPES = [(), (1,), (7,), (37, 53), (3, 5, 7, 11), (2, 1, 3, 4, 5)]


def _check_fwd_bwd(x: torch.Tensor, approximate: str, dy: torch.Tensor | None = None) -> None:
    """Forward and dx of triton_gelu.gelu against float64, no worse than torch in x's dtype."""
    x = x.detach().requires_grad_(True)
    y = triton_gelu.gelu(x, approximate=approximate)
    dy = torch.randn_like(y) if dy is None else dy
    y.backward(dy)

    x_torch = x.detach().clone().requires_grad_(True)
    y_torch = F.gelu(x_torch, approximate=approximate)
    y_torch.backward(dy)

    what = f"{x.dtype} {approximate} shape {tuple(x.shape)}"
    assert_no_worse_than_torch(y, y_torch, reference.gelu64(x, approximate), "forward " + what)
    assert_no_worse_than_torch(
        x.grad, x_torch.grad, reference.gelu_grad64(x, dy, approximate), "backward " + what
    )


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("approximate", FORMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_float64(shape, approximate, dtype, device, gelu_path):
    x = (3 * torch.randn(shape, device=device)).to(dtype)
    _check_fwd_bwd(x, approximate)


@pytest.mark.parametrize("approximate", FORMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_poisoned_outputs_fully_written(approximate, dtype, device, poison_outputs):
    x = (4 * torch.randn(5, 301, device=device)).to(dtype)  # 1505 = one full block + a tail
    dy = torch.randn_like(x)
    leaf = x.clone().requires_grad_(True)
    with count_launches() as launched, force_path(gelu_fwd="triton", gelu_bwd="triton"):
        y = triton_gelu.gelu(leaf, approximate)
        (dx,) = torch.autograd.grad(y, leaf, dy)  # the launcher's own buffer, not a copy
    assert launched == {"gelu_fwd": 1, "gelu_bwd": 1}, launched
    assert_all_written(y, reference.gelu64(x, approximate), "forward")
    assert_all_written(dx, reference.gelu_grad64(x, dy, approximate), "backward")


NON_CONTIGUOUS = {
    "column slice": lambda t: t[:, 3:40],
    "row step": lambda t: t[::2],
    "transposed": lambda t: t.t(),
    "strided vector": lambda t: t[:, 5],
    "expanded": lambda t: t[:1].expand(4, -1),
    "3-D permuted": lambda t: t.reshape(6, 7, 11)[:, 1:6].permute(1, 0, 2),
}


@pytest.mark.parametrize("view", NON_CONTIGUOUS.keys())
@pytest.mark.parametrize("approximate", FORMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_input_and_grad(view, approximate, dtype, device, gelu_path):
    base = (3 * torch.randn(42, 11, device=device)).to(dtype)
    x = NON_CONTIGUOUS[view](base.reshape(42, 11) if view != "transposed" else base)
    assert not x.is_contiguous()
    # A non-contiguous incoming gradient too: a column slice of a wider tensor.
    dy = torch.randn(*x.shape[:-1], x.shape[-1] + 3, device=device, dtype=dtype)[..., 2:-1]
    _check_fwd_bwd(x, approximate, dy)


@pytest.mark.parametrize("shape", [(0,), (3, 0, 5), (0, 7)], ids=str)
@pytest.mark.parametrize("approximate", FORMS)
def test_empty(shape, approximate, device):
    x = torch.empty(shape, device=device, requires_grad=True)
    y = triton_gelu.gelu(x, approximate)
    y.sum().backward()
    assert y.shape == x.shape and y.dtype == x.dtype
    assert x.grad.shape == x.shape


def _extremes(dtype):
    info = torch.finfo(dtype)
    values = [info.max, -info.max, info.tiny, -info.tiny, info.eps, 0.0, -0.0,
              1e4, -1e4, 300.0, -300.0, 30.0, -30.0, 10.0, -10.0, 5.5, -5.5]
    return torch.tensor(values, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("approximate", FORMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_extreme_finite_values_stay_finite_and_accurate(approximate, dtype, device, gelu_path):
    x = _extremes(dtype).to(device)
    dy = torch.ones_like(x)
    x_req = x.clone().requires_grad_(True)
    y = triton_gelu.gelu(x_req, approximate)
    y.backward(dy)
    if gelu_path == "torch":
        # PyTorch's own op, bit for bit: its tanh-form gradient is NaN at float32's limit
        # (x^3 overflows), which our kernels avoid; the README says which path serves what.
        x_torch = x.clone().requires_grad_(True)
        F.gelu(x_torch, approximate=approximate).backward(dy)
        torch.testing.assert_close(y, F.gelu(x, approximate=approximate), rtol=0, atol=0)
        torch.testing.assert_close(x_req.grad, x_torch.grad, rtol=0, atol=0, equal_nan=True)
        return
    assert torch.isfinite(y).all(), f"non-finite forward for finite input: {y}"
    assert torch.isfinite(x_req.grad).all(), f"non-finite gradient for finite input: {x_req.grad}"
    # float64 is exact enough here; our float32 math must round to within atol + 1 ulp-ish.
    ref = reference.gelu64(x, approximate)
    ref_grad = reference.gelu_grad64(x, dy, approximate)
    rtol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(y.double().cpu(), ref.cpu(), rtol=rtol, atol=1e-6)
    torch.testing.assert_close(x_req.grad.double().cpu(), ref_grad.cpu(), rtol=rtol, atol=1e-5)


@pytest.mark.parametrize("approximate", FORMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_in_nan_out(approximate, dtype, device, gelu_path):
    x = torch.randn(300, device=device).to(dtype)
    x[[0, 17, 299]] = float("nan")
    x.requires_grad_(True)
    y = triton_gelu.gelu(x, approximate)
    dy = torch.randn_like(y)
    dy[5] = float("nan")  # a NaN gradient must propagate too
    y.backward(dy)
    assert_nan_where_ref_nan(y.detach(), reference.gelu64(x, approximate), "forward")
    assert_nan_where_ref_nan(x.grad, reference.gelu_grad64(x, dy, approximate), "backward")
    assert x.grad[[0, 5, 17, 299]].isnan().all()


def test_kernel_path_taken(device):
    """The result comes from the Triton kernels, not a PyTorch fallback (the interpreter's
    default path is the Triton one)."""
    x = torch.randn(33, device=device, requires_grad=True)
    with count_launches() as launched:
        triton_gelu.gelu(x).sum().backward()
    assert launched == {"gelu_fwd": 1, "gelu_bwd": 1}, launched


def test_outputs_are_new_contiguous_tensors_on_every_path(device, gelu_path):
    x = (3 * torch.randn(11, 13, device=device)).t()  # dense, not contiguous
    dy = torch.randn(13, 11, device=device)
    before = x.clone()
    # The custom ops (what compiled graphs call) on every path must return what their fakes
    # promise: new contiguous tensors.
    y, dx = torch.ops.triton_gelu.gelu_fwd(x, "gelu"), torch.ops.triton_gelu.gelu_bwd(dy, x, "gelu")
    assert y.is_contiguous() and dx.is_contiguous(), "the custom ops' fakes promise it"
    assert y.data_ptr() != x.data_ptr() and dx.data_ptr() not in (x.data_ptr(), dy.data_ptr())
    torch.testing.assert_close(x, before, rtol=0, atol=0)


def test_cpu_fallback_without_interpreter(monkeypatch):
    """CPU tensors without TRITON_INTERPRET take the PyTorch fallback, with the same numerics."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with count_launches() as launched:
        for approximate in FORMS:
            x = (3 * torch.randn(40, 9)).requires_grad_(True)
            _check_fwd_bwd(x, approximate)
    assert launched == {}, launched


def test_second_backward_is_unchanged(device, gelu_path):
    x = torch.randn(64, 17, device=device, requires_grad=True)
    x_before = x.detach().clone()
    y = triton_gelu.gelu(x, "tanh")
    dy = torch.randn_like(y)
    y.backward(dy, retain_graph=True)
    first = x.grad.clone()
    y.backward(dy)
    torch.testing.assert_close(x.grad, 2 * first, rtol=0, atol=0)
    torch.testing.assert_close(x.detach(), x_before, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.float64])
def test_rejects_unsupported_dtype(dtype, device):
    x = torch.ones(4, device=device).to(dtype)
    with count_launches() as launched, \
            pytest.raises(TypeError, match=r"x must be float32, float16 or bfloat16, got torch\."):
        triton_gelu.gelu(x)
    assert launched == {}, launched


@pytest.mark.parametrize("approximate", ["exact", "Tanh", "", None, 1])
def test_rejects_unknown_approximate(approximate, device):
    with pytest.raises(ValueError, match="approximate must be one of"):
        triton_gelu.gelu(torch.randn(4, device=device), approximate=approximate)
    with pytest.raises(ValueError, match="approximate must be one of"):
        triton_gelu.GELU(approximate=approximate)


def test_rejects_non_tensor():
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        triton_gelu.gelu([1.0, 2.0])
