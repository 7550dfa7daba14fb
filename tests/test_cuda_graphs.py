"""CUDA graphs on a GPU: a FeedForward training step (forward, backward, optimizer step)
captured and replayed, after warmup(); and a capture that meets untuned problems, which must time
nothing, warn, and still compute the step. Skipped without CUDA (the capture guard itself is
tested on the CPU in test_paths.py, with is_current_stream_capturing faked)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import triton_gelu
from triton_gelu.autotune import policy, warmup

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def _step(model, optimizer, x):
    loss = model(x).float().square().mean()
    loss.backward()
    optimizer.step()
    return loss


def _capture(model, optimizer, static_x):
    """Capture one training step (PyTorch's whole-network recipe): grads set to None first, so
    the backward allocates them from the graph's pool."""
    optimizer.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = _step(model, optimizer, static_x)
    return graph, static_loss


def _eager_steps(model, xs):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for x in xs:
        optimizer.zero_grad(set_to_none=True)
        losses.append(_step(model, optimizer, x).detach())
    return losses


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_feedforward_training_step_captures_and_replays(dtype):
    torch.manual_seed(0)
    model = triton_gelu.FeedForward(256, 1024, dropout=0.0, device="cuda", dtype=dtype)
    reference = copy.deepcopy(model)
    static_x = torch.randn(200, 256, device="cuda", dtype=dtype)
    assert warmup(model, (static_x,)) > 0  # tune outside the capture
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    side = torch.cuda.Stream()  # PyTorch's recipe: warm the rest up on a side stream
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        model(static_x).float().square().mean().backward()
    torch.cuda.current_stream().wait_stream(side)
    with warnings.catch_warnings():
        from triton_gelu.tuning.chooser import UntunedWarning

        warnings.simplefilter("error", UntunedWarning)
        graph, static_loss = _capture(model, optimizer, static_x)

    xs = [torch.randn_like(static_x) for _ in range(3)]
    losses = []
    for x in xs:
        static_x.copy_(x)
        graph.replay()
        losses.append(static_loss.detach().clone())
    want = _eager_steps(reference, xs)
    for got, expected in zip(losses, want):
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-2, atol=1e-3, msg=lambda m: f"{name}: {m}")


def test_capture_of_untuned_problems_times_nothing_and_warns():
    from triton_gelu.tuning import chooser as _chooser
    from triton_gelu.tuning.chooser import UntunedWarning
    from triton_gelu.tuning.paths import path_choosers
    from triton_gelu.tuning.tuner import tuners

    torch.manual_seed(1)
    model = triton_gelu.FeedForward(192, 768, dropout=0.0, device="cuda", dtype=torch.bfloat16)
    reference = copy.deepcopy(model)
    static_x = torch.randn(96, 192, device="cuda", dtype=torch.bfloat16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), policy("off"):
        # Compiles the untuned choices (kernels must not compile inside the capture) ...
        model(static_x).float().square().mean().backward()
    torch.cuda.current_stream().wait_stream(side)
    choosers = [*tuners.values(), *path_choosers.values()]
    for chooser in choosers:  # ... then forget them, so the capture meets untuned problems
        chooser.forget()
    tuned_before = _chooser.tuned_seconds
    with pytest.warns(UntunedWarning, match="CUDA-graph capture"):
        graph, static_loss = _capture(model, optimizer, static_x)
    assert _chooser.tuned_seconds == tuned_before, "something was timed during capture"
    x = torch.randn_like(static_x)
    static_x.copy_(x)
    graph.replay()
    (want,) = _eager_steps(reference, [x])
    torch.testing.assert_close(static_loss, want, rtol=1e-2, atol=1e-3)
