"""triton_gelu.autotune.warmup: one forward and backward that tunes everything a model launches,
and leaves no gradient, graph, buffer change or random-number draw behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import triton_gelu
from triton_gelu.autotune import warmup

REPO = Path(__file__).resolve().parents[1]


def _model() -> nn.Module:
    return nn.Sequential(
        triton_gelu.FeedForward(12, 20, dropout=0.1), nn.BatchNorm1d(12),
        triton_gelu.LinearGELU(12, 9, recompute=True), triton_gelu.GELU("tanh"),
    )


def test_warmup_tunes_every_kernel_and_path_and_leaves_nothing_behind(timed_choosers):
    model = _model().train()
    x = torch.randn(7, 12, requires_grad=True)
    old_grad = torch.full_like(model[0].linear1.weight, 3.0)
    model[0].linear1.weight.grad = old_grad
    buffers = [b.clone() for b in model.buffers()]
    rng = torch.random.get_rng_state()

    chosen = warmup(model, (x,))

    assert chosen >= 10, f"only {chosen} problems chosen"  # 6 kernels + 4 paths at least
    assert timed_choosers.calls > 0
    assert model[0].linear1.weight.grad is old_grad and bool((old_grad == 3.0).all())
    assert all(p.grad is None for n, p in model.named_parameters() if n != "0.linear1.weight")
    assert x.grad is None
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), buffers)), "buffers changed"
    assert torch.equal(torch.random.get_rng_state(), rng), "warmup moved the RNG"

    calls = timed_choosers.calls  # the real first step now times nothing
    model(x).sum().backward()
    assert timed_choosers.calls == calls, "a kernel or path was left untuned"


def test_warmup_without_triton_kernels_does_nothing(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU tensors take the PyTorch fallback
    calls = []

    class Counting(nn.Module):
        def forward(self, x):
            calls.append(x)
            return triton_gelu.gelu(x)

    assert warmup(Counting(), (torch.randn(3),)) == 0
    assert calls == [], "nothing to tune on the fallback: the model is not run"


def test_warmup_wants_a_tuple_of_positional_arguments():
    with pytest.raises(TypeError, match="example_inputs must be a tuple .* got Tensor"):
        warmup(triton_gelu.GELU(), torch.randn(3))


def test_autotune_module_imports_and_warms_up_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import warnings; warnings.simplefilter('ignore')\n"
        "import torch, triton_gelu.autotune as a, triton_gelu\n"
        "m = triton_gelu.FeedForward(8, 16)\n"
        "print(a.warmup(m, (torch.randn(2, 8),)))\n"
        "a.set_policy('off'); a.set_policy(None)\n"
        "assert sys.modules['triton'] is None\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "0", run.stdout + run.stderr
