"""Per-problem plans: a problem is validated and routed on its first call, a repeated call is a
look-up and the call (``triton_gelu/_plans.py``); whatever changes the problem or the route
(shape, dtype, a bad operand, a forced path, autocast, grad mode) is planned or routed anew,
never served by a stale plan."""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_like_torch

import triton_gelu
from triton_gelu import _plans
from triton_gelu.autotune import clear_plans, force_path
from triton_gelu.ops import linear_gelu as linear_gelu_op
from triton_gelu.testing import count_launches, count_paths


@pytest.fixture
def checks(monkeypatch) -> list[int]:
    """Counts the validations of ``linear_gelu``'s operands (its declaration's check)."""
    seen = []
    check = linear_gelu_op.check_linear

    def counting(*args, **kwargs):
        seen.append(1)
        return check(*args, **kwargs)

    monkeypatch.setattr(linear_gelu_op, "check_linear", counting)
    return seen


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _operands(m=5, k=12, n=7, dtype=torch.float32):
    return tuple(torch.randn(*shape, device=DEVICE).to(dtype) for shape in ((m, k), (n, k), (n,)))


def test_a_problem_is_validated_once_and_planned_once(checks):
    x, w, b = _operands()
    planned = _plans.counts["planned"]
    for _ in range(3):
        y = triton_gelu.linear_gelu(x, w, b)
    assert len(checks) == 1 and _plans.counts["planned"] == planned + 1
    torch.testing.assert_close(y, F.gelu(F.linear(x, w, b)), rtol=1e-5, atol=1e-5)
    # New operands of the same problem reuse the plan; another shape or dtype plans anew.
    triton_gelu.linear_gelu(*_operands())
    assert len(checks) == 1
    triton_gelu.linear_gelu(*_operands(m=6))
    triton_gelu.linear_gelu(*_operands(dtype=torch.bfloat16))
    assert len(checks) == 3 and _plans.counts["planned"] == planned + 3
    clear_plans()
    triton_gelu.linear_gelu(x, w, b)
    assert len(checks) == 4


def test_a_bad_problem_after_a_good_one_is_refused():
    x, w, b = _operands()
    triton_gelu.linear_gelu(x, w, b)
    with pytest.raises(ValueError, match="in_features mismatch"):
        triton_gelu.linear_gelu(torch.randn(5, 13, device=DEVICE), w, b)
    with pytest.raises(ValueError, match="bias has shape"):
        triton_gelu.linear_gelu(x, w, torch.randn(8, device=DEVICE))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        triton_gelu.linear_gelu(x.tolist(), w, b)
    with pytest.raises(ValueError, match="approximate must be one of"):
        triton_gelu.linear_gelu(x, w, b, approximate="erf")
    with pytest.raises(TypeError, match="dropout probability p must be a float"):
        triton_gelu.feed_forward(x, w, b, w.t(), None, p=[0.1])  # unhashable: no key at all


def test_grad_mode_and_requires_grad_route_each_call():
    x, w, b = _operands()
    with torch.no_grad():
        y = triton_gelu.linear_gelu(x, w, b)
    assert y.grad_fn is None
    w.requires_grad_(True)  # same problem (shapes, dtypes, devices): a graph now
    y = triton_gelu.linear_gelu(x, w, b)
    y.sum().backward()
    expected = torch.autograd.grad(F.gelu(F.linear(x, w, b)).sum(), w)[0]
    torch.testing.assert_close(w.grad, expected, rtol=1e-4, atol=1e-5)


def test_a_forced_path_applies_to_a_planned_problem():
    x, w, b = _operands()
    triton_gelu.linear_gelu(x, w, b)
    with count_launches() as launched, count_paths() as ran, \
            force_path(linear_gelu_fwd="torch", linear_gelu_bwd="torch"):
        y = triton_gelu.linear_gelu(x, w, b)
    assert not launched, f"a kernel ran on the forced torch path: {launched}"
    assert ran[("linear_gelu_fwd", "torch")] == 1, ran
    torch.testing.assert_close(y, F.gelu(F.linear(x, w, b)), rtol=1e-5, atol=1e-5)
    with count_launches() as launched:
        triton_gelu.linear_gelu(x, w, b)  # outside the block: the kernels again
    assert launched, "no kernel ran after the forced block"


def test_autocast_casts_a_planned_problem():
    x, w, b = _operands()
    dtype = torch.bfloat16 if DEVICE == "cpu" else torch.float16
    assert triton_gelu.linear_gelu(x, w, b).dtype == torch.float32
    assert triton_gelu.feed_forward(x, w, b, w.t(), None).dtype == torch.float32
    with torch.autocast(DEVICE, dtype=dtype):
        y = triton_gelu.linear_gelu(x, w, b)
        assert y.dtype == dtype
        assert_like_torch(lambda x, w, b: triton_gelu.feed_forward(x, w, b, w.t(), None),
                          lambda x, w, b: F.linear(F.gelu(F.linear(x, w, b)), w.t()),
                          [x, w, b], "feed_forward under autocast")
    assert triton_gelu.linear_gelu(x, w, b).dtype == torch.float32


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors under the interpreter")
def test_the_environment_is_read_once_and_again_after_clear_plans(monkeypatch):
    x = torch.randn(3, 5)
    triton_gelu.gelu(x)  # reads the environment (the conftest cleared it before the test)
    monkeypatch.setenv("TRITON_GELU_TUNE", "fastest")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with count_launches() as launched:
        triton_gelu.gelu(torch.randn(7, 2))  # a new problem, the environment as first read
    assert launched == {"gelu_fwd": 1}, f"the interpreter's kernel did not run: {launched}"
    clear_plans()
    with count_launches() as launched:
        with pytest.raises(ValueError, match=r"TRITON_GELU_TUNE .* got 'fastest'"):
            triton_gelu.gelu(x)
        monkeypatch.delenv("TRITON_GELU_TUNE")
        clear_plans()
        assert_like_torch(triton_gelu.gelu, F.gelu, [x], "gelu on the fallback")
    assert not launched, f"a kernel ran on the fallback: {launched}"
