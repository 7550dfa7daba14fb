"""triton_gelu.compile_backend: GELU feed-forwards written inline (not modules patch() can swap)
fused by torch.compile, outputs and every gradient as the uncompiled model's by the suite's rule,
nothing else rewritten. Inductor compiles the rest, so this needs a C++ compiler on the CPU."""

import copy
import shutil

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_no_worse_than_torch
from torch import nn

import triton_gelu
from triton_gelu import compile_route

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and shutil.which("g++") is None,
    reason="Inductor on the CPU needs a C++ compiler")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # Dynamo makes a float attribute that changed between compiles (dropout's p) a graph input;
    # the backend fuses a dropout only with a constant p, so each test starts afresh.
    torch._dynamo.reset()


class Inline(nn.Module):
    """A layer with its FFN inline, as BART's, Whisper's or ALBERT's forward writes it."""

    def __init__(self, act, p=0.0, escape=False):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(12, 20), nn.Linear(20, 12)
        self.act, self.p, self.escape = act, p, escape

    def forward(self, x):
        z = self.fc1(x)
        h = F.dropout(self.act(z), p=self.p, training=self.training)
        y = x + self.fc2(h)
        return y + z.sum(-1, keepdim=True) if self.escape else y


def _quick(t):
    return t * torch.sigmoid(1.702 * t)


def _compiled_vs_eager(model, x, expected):
    """Compile with the backend; compare outputs and every gradient with the uncompiled model in
    the same dtype and in float64; check what was rewritten."""
    compiled = torch.compile(copy.deepcopy(model), backend=triton_gelu.compile_backend)
    runs = []
    for m, inp in ((compiled, x), (model, x), (copy.deepcopy(model).double(), x.double())):
        leaf = inp.detach().clone().requires_grad_(True)
        y = m(leaf)
        y.backward(torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view(y.shape))
        runs.append((y.detach(), [leaf.grad] + [p.grad for p in m.parameters()]))
    assert compile_route.history[-1] == expected, compile_route.history[-1]
    (y, grads), (y_eager, grads_eager), (y64, grads64) = runs
    assert_no_worse_than_torch(y, y_eager, y64, "output")
    for i, (g, g_eager, g64) in enumerate(zip(grads, grads_eager, grads64)):
        assert_no_worse_than_torch(g, g_eager, g64, f"gradient {i}",
                                   atol=1e-6 * max(1.0, g64.abs().max().item()))


@pytest.mark.parametrize("act, form", [(F.gelu, "gelu"), (nn.GELU("tanh"), "gelu_tanh"),
                                       (_quick, "quick_gelu")])
def test_inline_ffn_is_one_fused_block(act, form):
    x = torch.randn(2, 7, 12)
    _compiled_vs_eager(Inline(act).train(), x, [f"feed_forward({form})"])
    _compiled_vs_eager(Inline(act, p=0.3).eval(), x, [f"feed_forward({form})"])  # eval: no mask


def test_escaping_preactivation_and_non_gelu_are_left():
    x = torch.randn(2, 5, 12)
    _compiled_vs_eager(Inline(F.gelu, escape=True), x, [])  # z has another user
    for act in (F.silu, F.relu, lambda t: t * torch.sigmoid(1.7 * t)):
        _compiled_vs_eager(Inline(act), x, [])


def test_pair_without_second_linear():
    model = nn.Sequential(nn.Linear(12, 20), nn.GELU(), nn.LayerNorm(20))
    _compiled_vs_eager(model, torch.randn(3, 12), ["linear_gelu(gelu)"])


def test_dropout_in_training_draws_a_mask_and_the_backward_uses_it():
    """p = 0.5 in training: about half of the hidden units dropped (within four sigma), and the
    gradient through the block is zero exactly where the forward dropped (W1, W2 identity-like,
    so hidden unit j is output j)."""
    torch.manual_seed(0)
    model = Inline(F.gelu, p=0.5).train()
    with torch.no_grad():  # fc2 reads hidden unit j into output j: dropped units read as 0
        model.fc1.weight.copy_(torch.eye(20, 12) * 4)
        model.fc1.bias.fill_(3.0)  # gelu(z) > 0 everywhere
        model.fc2.weight.copy_(torch.eye(12, 20))
        model.fc2.bias.zero_()
    compiled = torch.compile(model, backend=triton_gelu.compile_backend)
    x = torch.rand(64, 12, requires_grad=True)  # z = 4x + 3 in [3, 7): gelu(z) ~ z, gelu' ~ 1
    block = compiled(x) - x  # the FFN's own output
    assert compile_route.history[-1] == ["feed_forward(gelu)"]
    dropped = (block == 0).float()
    n = dropped.numel()
    assert abs(dropped.mean().item() - 0.5) <= 4 * (0.25 / n) ** 0.5, dropped.mean()
    block.sum().backward()
    # d block_ij / d x_ij = keep_ij * 2 * gelu'(z) * 4 (about 8): zero exactly where dropped
    mismatch = (x.grad == 0) != dropped.bool()  # the residual's 1 cancels in block
    assert not mismatch.any(), (x.grad[mismatch], block[mismatch])


def test_bart_encoder_and_decoder_layers_are_fused():
    transformers = pytest.importorskip("transformers")
    config = transformers.BartConfig(
        vocab_size=40, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=24, decoder_ffn_dim=24,
        max_position_embeddings=32, dropout=0.0, activation_dropout=0.0, attention_dropout=0.0)
    model = transformers.BartModel(config).eval()
    ids = torch.randint(3, 40, (2, 6))
    compiled = torch.compile(copy.deepcopy(model), backend=triton_gelu.compile_backend)
    compile_route.history.clear()
    out = compiled(input_ids=ids).last_hidden_state
    fused = [kind for graph in compile_route.history for kind in graph]
    assert fused == ["feed_forward(gelu)"] * 2, fused  # the encoder's and the decoder's
    want = model(input_ids=ids).last_hidden_state
    want64 = copy.deepcopy(model).double()(input_ids=ids).last_hidden_state
    assert_no_worse_than_torch(out.detach(), want.detach(), want64.detach(), "BART output")
