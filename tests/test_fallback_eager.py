"""Without dropout, the PyTorch fallback (no Triton kernel can run for the tensor) is eager
PyTorch's own ops under PyTorch's autograd: bit for bit eager's results and gradients, eager's
saved tensors, and no launcher of ours in between (its host time and throughput are eager's:
``python -m bench --host``). With dropout it keeps the kernels' mask (test_ffn, test_geglu)."""

import pytest
import torch
import torch.nn.functional as F

import triton_gelu
from bench.memory import saved_activation_bytes
from triton_gelu import activations
from triton_gelu.autotune import clear_plans
from triton_gelu.testing import count_launches

QUICK = "quick_gelu"


@pytest.fixture
def no_triton(monkeypatch):
    """No Triton kernel can run for the CPU tensors here: without TRITON_INTERPRET they take
    the fallback, as on a machine where Triton does not import (tests/no_triton.py runs the
    fallback in a process where it does not)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    clear_plans()  # the environment is read when first needed


def _cases():
    x = torch.randn(3, 5, 12)
    w1, wu, b1, bu = torch.randn(20, 12), torch.randn(20, 12), torch.randn(20), torch.randn(20)
    w2, b2 = torch.randn(12, 20), torch.randn(12)

    def act(t, form):
        return activations.torch_activation(t, form)

    return [
        ("gelu", lambda x, f: triton_gelu.gelu(x, activation=f), lambda x, f: act(x, f), [x]),
        ("linear_gelu", lambda x, w, b, f: triton_gelu.linear_gelu(x, w, b, activation=f),
         lambda x, w, b, f: act(F.linear(x, w, b), f), [x, w1, b1]),
        ("feed_forward",
         lambda x, w1, b1, w2, b2, f: triton_gelu.feed_forward(x, w1, b1, w2, b2, p=0.2,
                                                               training=False, activation=f),
         lambda x, w1, b1, w2, b2, f: F.linear(act(F.linear(x, w1, b1), f), w2, b2),
         [x, w1, b1, w2, b2]),
        ("geglu", lambda x, wg, wu, f: triton_gelu.geglu(x, wg, wu, activation=f),
         lambda x, wg, wu, f: act(F.linear(x, wg), f) * F.linear(x, wu), [x, w1, wu]),
        ("gated_feed_forward",
         lambda x, wg, wu, bg, bu, wd, f: triton_gelu.gated_feed_forward(
             x, wg, wu, wd, bg, bu, activation=f),
         lambda x, wg, wu, bg, bu, wd, f: F.linear(
             act(F.linear(x, wg, bg), f) * F.linear(x, wu, bu), wd),
         [x, w1, wu, b1, bu, w2]),
    ]


def _run_cases(form: str) -> list:
    """For each case: (name, [(output, gradients, saved bytes) of ours, of eager's])."""
    out = []
    for name, ours, eager, tensors in _cases():
        results = []
        for fn in (ours, eager):
            leaves = [t.clone().requires_grad_(True) for t in tensors]
            y = fn(*leaves, form)
            y.backward(torch.ones_like(y))
            saved = saved_activation_bytes(lambda: fn(*leaves, form), exclude=leaves[1:])
            results.append((y.detach(), [t.grad for t in leaves], saved))
        out.append((name, results))
    return out


@pytest.mark.parametrize("form", ["gelu", "gelu_tanh", QUICK])
def test_fallback_is_eager_pytorch_bit_for_bit(no_triton, form):
    with count_launches() as launched:
        results_by_case = _run_cases(form)
    assert not launched, f"a kernel launched on the fallback: {launched}"
    for name, ((y, grads, saved), (y_eager, grads_eager, saved_eager)) in results_by_case:
        assert torch.equal(y, y_eager), f"{name} {form}: output differs from eager's"
        for i, (g, g_eager) in enumerate(zip(grads, grads_eager)):
            assert torch.equal(g, g_eager), f"{name} {form}: gradient {i} differs from eager's"
        assert saved == saved_eager, f"{name} {form}: saves {saved} B, eager {saved_eager} B"


def test_bad_policy_still_refused_on_the_fallback(no_triton, monkeypatch):
    monkeypatch.setenv("TRITON_GELU_TUNE", "fastest")
    with pytest.raises(ValueError, match="TRITON_GELU_TUNE"):
        triton_gelu.linear_gelu(torch.randn(2, 4), torch.randn(3, 4))
