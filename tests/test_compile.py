"""torch.compile: the kernels as custom ops (triton_gelu/ops/) trace with no graph break,
forward and backward, match eager, and a new token count does not recompile.

Compiles are slow (Inductor on 2 CPU cores: ~10 s each), so the models are tiny and each
compile is reused for as many checks as possible. On a GPU the backend is the default Inductor;
on the CPU (kernels under the Triton interpreter) also "aot_eager", which runs the fake
implementations and the registered autograd through AOTAutograd and then the ops as they are.
"""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from conftest import DEVICE
from functorch.compile import make_boxed_func
from torch import nn
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.backends.registry import lookup_backend

import triton_gelu
from triton_gelu import ops
from triton_gelu.ops import _core as core

BACKENDS = ["inductor"] if DEVICE == "cuda" else ["aot_eager", "inductor"]
OPS = {"gelu_fwd", "gelu_bwd", "linear_gelu_fwd", "linear_gelu_bwd", "linear_preact"}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _op_names(gm: torch.fx.GraphModule) -> set[str]:
    return {
        node.target.__name__.split(".")[0]
        for node in gm.graph.nodes
        if node.op == "call_function" and "triton_gelu" in str(node.target)
    }


class Recorder:
    """A torch.compile backend that counts Dynamo compiles (one per graph: a graph break or a
    recompile makes another) and records which triton_gelu ops the forward and backward graphs
    call, then compiles with ``backend``."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.frames = 0
        self.fw_ops: set[str] = set()
        self.bw_ops: set[str] = set()

    def __call__(self, gm, example_inputs):
        self.frames += 1
        if self.backend != "aot_eager":
            # Inductor runs AOTAutograd itself; the Dynamo graph shows the forward ops.
            self.fw_ops |= _op_names(gm)
            return lookup_backend(self.backend)(gm, example_inputs)

        def record(ops_seen):
            def compiler(graph, inputs):
                ops_seen.update(_op_names(graph))
                return make_boxed_func(graph.forward)
            return compiler

        return aot_autograd(fw_compiler=record(self.fw_ops), bw_compiler=record(self.bw_ops))(
            gm, example_inputs
        )


def _model() -> nn.Module:
    """GELU, LinearGELU (no bias, recompute) and FeedForward (bias, saved pre-activation)."""
    return nn.Sequential(
        nn.Linear(8, 16), triton_gelu.GELU("tanh"),
        triton_gelu.LinearGELU(16, 24, bias=False, recompute=True),
        triton_gelu.FeedForward(24, 32, dropout=0.0),
    ).to(DEVICE)


def _fwd_bwd(model, x):
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    out = model(x)
    out.backward(torch.linspace(-1, 1, out.numel(), device=out.device).view(out.shape))
    grads = {n.removeprefix("_orig_mod."): p.grad for n, p in model.named_parameters()}
    return out.detach(), x.grad, grads


def _assert_same(got, want, what):
    # Same kernels on both sides; Inductor may reorder the surrounding PyTorch ops' float math.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"{what}: {m}")


def _require_backend(backend: str) -> None:
    if backend == "inductor" and DEVICE == "cpu" and shutil.which("g++") is None:
        pytest.skip("Inductor on the CPU needs a C++ compiler")


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_matches_eager_fullgraph_dynamic(backend):
    """fullgraph=True (a graph break raises), forward and backward equal to eager, and a second
    token count with dynamic=True does not recompile."""
    _require_backend(backend)
    model = _model()
    recorder = Recorder(backend)
    compiled = torch.compile(copy.deepcopy(model), backend=recorder, fullgraph=True, dynamic=True)
    compiles = []
    for tokens in (5, 11):
        x = torch.randn(2, tokens, 8, device=DEVICE)
        out, dx, grads = _fwd_bwd(compiled, x)
        compiles.append(recorder.frames)
        want_out, want_dx, want_grads = _fwd_bwd(model, x)
        _assert_same(out, want_out, f"output, {tokens} tokens")
        _assert_same(dx, want_dx, f"dx, {tokens} tokens")
        for name, grad in grads.items():
            _assert_same(grad, want_grads[name], f"{name}.grad, {tokens} tokens")
    # (Dynamo may call the backend twice for the first compile when it restarts its analysis.)
    assert compiles[0] >= 1 and compiles[1] == compiles[0], f"compiles after each call: {compiles}"
    assert recorder.fw_ops >= {"gelu_fwd", "linear_gelu_fwd"}, recorder.fw_ops
    if backend == "aot_eager":
        assert recorder.bw_ops >= {"gelu_bwd", "linear_gelu_bwd", "linear_preact"}, recorder.bw_ops


def test_automatic_dynamic_does_not_recompile_per_size():
    # Default dynamic=None: the second size recompiles once with a symbolic token count; no more.
    recorder = Recorder("aot_eager")
    model = _model()
    compiled = torch.compile(model, backend=recorder, fullgraph=True)
    compiles = []
    for tokens in (3, 4, 6, 9):
        compiled(torch.randn(1, tokens, 8, device=DEVICE)).sum().backward()
        compiles.append(recorder.frames)
    assert compiles[1] > compiles[0] and compiles[3] == compiles[2] == compiles[1], (
        f"compiles after each of four token counts: {compiles}"
    )


def test_compile_no_grad_and_inference_mode():
    model = _model().eval()
    recorder = Recorder("aot_eager")
    compiled = torch.compile(model, backend=recorder, fullgraph=True)
    x = torch.randn(2, 5, 8, device=DEVICE)
    with torch.no_grad():
        out, want = compiled(x), model(x)
    assert not out.requires_grad
    _assert_same(out, want, "no_grad output")
    with torch.inference_mode():
        out = compiled(x)
    assert out.is_inference()
    _assert_same(out, want, "inference_mode output")
    assert recorder.bw_ops == set()


@pytest.mark.parametrize("availability", ["torch", "by_name"])
def test_compile_autocast(monkeypatch, availability):
    """Under autocast the compiled model casts like the eager one (outside the ops). Whether
    autocast serves a device type is torch's answer, or on torch 2.11 (whose Dynamo cannot trace
    torch.amp.is_autocast_available) the set of device types the ops asked at import
    ("by_name"): both agree, and both trace with fullgraph=True."""
    if availability == "torch":
        if torch.__version__ < "2.12":
            pytest.skip("torch 2.11's Dynamo cannot trace torch.amp.is_autocast_available")
        monkeypatch.setattr(core, "autocast_available", torch.amp.is_autocast_available)
    else:
        for name in ("cpu", "cuda", "meta", "lazy", "xpu", "mps", "privateuseone"):
            assert core.autocast_available_by_name(name) == \
                torch.amp.is_autocast_available(name), name
        monkeypatch.setattr(core, "autocast_available", core.autocast_available_by_name)
    dtype = torch.bfloat16 if DEVICE == "cpu" else torch.float16
    model = _model()
    compiled = torch.compile(copy.deepcopy(model), backend=Recorder("aot_eager"), fullgraph=True)
    x = torch.randn(2, 5, 8, device=DEVICE)
    with torch.autocast(DEVICE, dtype=dtype):
        out, want = compiled(x), model(x)
    assert out.dtype == want.dtype == dtype
    torch.testing.assert_close(out, want, rtol=2e-2, atol=2e-2)
    with torch.autocast(DEVICE, dtype=dtype):
        compiled(x).float().sum().backward()
    for name, p in compiled.named_parameters():
        assert p.grad is not None and p.grad.dtype == p.dtype, name


def test_patched_gpt2_mlp_compiles():
    """A patched transformers GPT-2 MLP (Conv1D: the weight passed transposed) compiles too."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

    config = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0)
    mlp = GPT2MLP(32, config).to(DEVICE)
    patched = copy.deepcopy(mlp)
    assert triton_gelu.patch(patched) == 1
    recorder = Recorder("aot_eager")
    compiled = torch.compile(patched, backend=recorder, fullgraph=True)
    x = torch.randn(2, 5, 16, device=DEVICE)
    out, dx, grads = _fwd_bwd(compiled, x)
    want_out, want_dx, want_grads = _fwd_bwd(mlp, x)
    torch.testing.assert_close(out, want_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dx, want_dx, rtol=1e-4, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, want_grads[name], rtol=1e-4, atol=1e-5, msg=name)
    assert "ffn_bwd" in recorder.bw_ops


def test_eager_stays_on_autograd_function():
    # Eager calls do not pay the custom-op dispatch: the graph node is the autograd.Function's.
    x = torch.randn(4, 8, device=DEVICE, requires_grad=True)
    w = torch.randn(6, 8, device=DEVICE, requires_grad=True)
    assert type(triton_gelu.gelu(x).grad_fn).__name__ == "GELUFunctionBackward"
    assert type(triton_gelu.linear_gelu(x, w).grad_fn).__name__ == "LinearGELUFunctionBackward"


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "quick_gelu"])
def test_opcheck(activation):
    """torch.library.opcheck: schema, fake tensors (shapes, dtypes, strides), autograd registration
    and AOT dispatch (static and dynamic) of every op against its real implementation."""
    x = torch.randn(5, 8, device=DEVICE, requires_grad=True)
    w = torch.randn(6, 8, device=DEVICE, requires_grad=True)
    b = torch.randn(6, device=DEVICE, requires_grad=True)
    dy = torch.randn(5, 6, device=DEVICE)
    z = torch.randn(5, 6, device=DEVICE)
    x0, w0 = x.detach(), w.detach()
    x3 = torch.randn(2, 3, 8, device=DEVICE, requires_grad=True)
    dy3, z3 = torch.randn(2, 3, 6, device=DEVICE), torch.randn(2, 3, 6, device=DEVICE)
    cases = [
        (ops.gelu_fwd, (x, activation)),
        (ops.gelu_fwd, (x.detach().t(), activation)),  # non-contiguous in, contiguous out
        (ops.gelu_bwd, (dy, z, activation)),
        (ops.linear_gelu_fwd, (x, w, b, activation, True)),
        (ops.linear_gelu_fwd, (x, w, None, activation, False)),
        (ops.linear_gelu_fwd, (x, w0.t().contiguous().t(), b, activation, True)),  # W^T
        # N-D x: the ops flatten the leading dimensions themselves (DTensor shards them).
        (ops.linear_gelu_fwd, (x3, w, b, activation, True)),
        (ops.linear_gelu_fwd, (x3.transpose(0, 1), w, b, activation, False)),  # a copy
        (ops.linear_preact_op, (x3.detach(), w0, None)),
        (ops.linear_gelu_bwd, (dy3, x3.detach(), w0, z3, activation, True, True, True)),
        # The backward ops run in the backward only: no autograd of their own.
        (ops.linear_preact_op, (x0, w0, b.detach())),
        (ops.linear_gelu_bwd, (dy, x0, w0, z, activation, True, True, True)),
        (ops.linear_gelu_bwd, (dy, x0, w0, z, activation, False, True, False)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)
