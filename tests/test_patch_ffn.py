"""triton_gelu.patch on whole FFN chains: which chains become one fused block, and that the
patched model is the same model (outputs, gradients, parameters, state dicts) in eval and, at
p = 0, in training; a chain it cannot prove is left alone."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from test_patch import TorchFeedForward, _tokens, check_patched
from torch import nn

import triton_gelu
from bench.memory import saved_activation_bytes
from triton_gelu import LinearGELU, reference
from triton_gelu.patch import FeedForwardOutput, FusedFeedForward
from triton_gelu.testing import dropout_seed


def _blocks(model: nn.Module) -> list[FusedFeedForward]:
    return [m for m in model.modules() if isinstance(m, FusedFeedForward)]


def check_train_p0(model, inputs, output=lambda out: out):
    """Patched vs unpatched in training mode (every dropout at p = 0): same outputs and
    parameter gradients to float32 rounding."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    model.train()
    unpatched = copy.deepcopy(model)
    assert triton_gelu.patch(model) >= 1
    results = []
    for m in (model, unpatched):
        m.zero_grad(set_to_none=True)
        out = output(m(**inputs))
        out.backward(torch.linspace(-1, 1, out.numel()).view(out.shape))
        results.append((out.detach(), {n: p.grad for n, p in m.named_parameters()}))
    (out, grads), (want, want_grads) = results
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    assert grads.keys() == want_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, want_grads[name], rtol=1e-4, atol=1e-4, msg=name)


def check_round_trip(model, build, inputs, output=lambda out: out):
    """The patched model's state dict loads (strict) into an unpatched one and back, and both
    compute with the loaded values."""
    patched = build()
    triton_gelu.patch(patched)
    fresh = build()
    assert list(patched.state_dict()) == list(fresh.state_dict())
    new_state = {k: torch.randn_like(v) if v.is_floating_point() else v
                 for k, v in fresh.state_dict().items()}
    patched.load_state_dict(new_state)
    fresh.load_state_dict(patched.state_dict())  # and back
    patched.eval(), fresh.eval()
    torch.testing.assert_close(output(patched(**inputs)), output(fresh(**inputs)),
                               rtol=1e-4, atol=1e-4)


# ---- PyTorch chains ------------------------------------------------------------------------------


def _sequential(dropout=True):
    layers = [nn.Linear(16, 32), nn.GELU("tanh")] + ([nn.Dropout(0.1)] if dropout else [])
    return nn.Sequential(*layers, nn.Linear(32, 16), nn.LayerNorm(16))


@pytest.mark.parametrize("dropout", [True, False], ids=["dropout", "no_dropout"])
def test_sequential_block(dropout):
    model = _sequential(dropout)
    check_patched(model, {"input": _tokens()}, expected=1)
    assert isinstance(model[0], FusedFeedForward) and model[0].approximate == "tanh"
    assert model[0].p == (0.1 if dropout else 0.0)
    last = 3 if dropout else 2
    assert isinstance(model[last], FeedForwardOutput) and model[0].output is model[last]
    assert all(isinstance(model[i], nn.Identity) for i in range(1, last))
    assert isinstance(model[last + 1], nn.LayerNorm)
    check_train_p0(_sequential(dropout), {"input": _tokens()})
    check_round_trip(model, lambda: _sequential(dropout), {"input": _tokens()})


def test_parameters_are_the_originals_and_read_at_each_call():
    model = _sequential()
    linear1, linear2 = model[0], model[3]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    triton_gelu.patch(model)
    assert model[0].weight is linear1.weight and model[3].weight is linear2.weight
    assert model[3].bias is linear2.bias
    assert [n for n, _ in model.named_parameters()] == [
        "0.weight", "0.bias", "3.weight", "3.bias", "4.weight", "4.bias"]
    x = _tokens()
    model(x).sum().backward()
    assert linear2.weight.grad is not None  # the block's dW2 reached linear2's Parameter
    before = linear2.weight.detach().clone()
    optimizer.step()
    assert not torch.equal(before, model[3].weight)
    # A new Parameter put in linear2's slot is used from the next call on.
    model.eval()
    with torch.no_grad():
        out = model(x)
        model[3].weight = nn.Parameter(model[3].weight * 2)
        assert not torch.allclose(model(x), out)


def test_deepcopy_and_to_keep_the_block_whole():
    model = _sequential().eval()
    triton_gelu.patch(model)
    clone = copy.deepcopy(model)
    assert clone[0].output is clone[3] and clone[0].output is not model[3]
    x = _tokens()
    torch.testing.assert_close(clone(x), model(x), rtol=0, atol=0)
    low = copy.deepcopy(model).to(torch.bfloat16)  # parameters replaced by their bf16 copies
    assert low[0].output.weight.dtype == torch.bfloat16
    torch.testing.assert_close(low(x.bfloat16()).float(), model(x), rtol=5e-2, atol=5e-2)


def test_torch_feedforward_and_train_mode_dropout():
    model = TorchFeedForward()  # linear1 -> activation -> dropout(0.1) -> linear2
    check_patched(model, {"x": _tokens()}, expected=1)
    assert isinstance(model.linear1, FusedFeedForward) and model.linear1.p == 0.1
    assert isinstance(model.dropout, nn.Identity) and isinstance(model.linear2, FeedForwardOutput)
    # In training the block drops with the module's p: the call's mask, regenerated.
    model.train()
    x = _tokens()
    torch.manual_seed(9)
    out = model(x)
    torch.manual_seed(9)
    keep = reference.dropout_keep(dropout_seed("cpu"), math.prod(x.shape[:-1]), 32, 0.1)
    want, _ = reference.feed_forward64(
        x, model.linear1.weight, model.linear1.bias, model.linear2.weight, model.linear2.bias,
        keep.view(*x.shape[:-1], 32), 0.1, "none")
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    model.eval()
    assert not model.linear1.training


@pytest.mark.parametrize("cls", [nn.TransformerEncoderLayer, nn.TransformerDecoderLayer])
def test_transformer_layers(cls):
    layer = cls(d_model=16, nhead=2, dim_feedforward=32, dropout=0.0, activation="gelu",
                batch_first=True)
    inputs = {"src": _tokens()} if cls is nn.TransformerEncoderLayer else \
        {"tgt": _tokens(), "memory": _tokens(seq=3)}
    unpatched = check_patched(layer, inputs, expected=1)
    assert isinstance(layer.linear1, FusedFeedForward)
    assert isinstance(layer.linear2, FeedForwardOutput) and isinstance(layer.dropout, nn.Identity)
    after = layer.dropout2 if cls is nn.TransformerEncoderLayer else layer.dropout3
    assert isinstance(after, nn.Dropout)  # the dropout after the block stays
    with torch.no_grad():  # the encoder's fast path reads linear1/linear2's parameters
        torch.testing.assert_close(layer(**inputs), unpatched(**inputs), rtol=1e-4, atol=1e-5)
    fresh = cls(16, 2, 32, 0.0, "gelu", batch_first=True)
    check_train_p0(fresh, inputs)


def test_encoder_fast_path_off_when_tanh_forced():
    layer = nn.TransformerEncoderLayer(16, 2, 32, 0.0, "gelu", batch_first=True).eval()
    want = copy.deepcopy(layer)
    want.activation = nn.GELU("tanh")
    want.activation_relu_or_gelu = 0
    assert triton_gelu.patch(layer, approximate="tanh") == 1
    assert layer.activation_relu_or_gelu == 0 and layer.linear1.approximate == "tanh"
    x = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want(x), rtol=1e-4, atol=1e-5)


def test_every_gelu_of_a_deeper_chain_fuses():
    # Linear, GELU, Linear, GELU, Linear: the middle Linear belongs to the second GELU, so the
    # first pair fuses as LinearGELU and the rest as a whole block.
    model = nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 32), nn.GELU(),
                          nn.Linear(32, 8))
    check_patched(model, {"input": _tokens()}, expected=2)
    assert isinstance(model[0], LinearGELU) and isinstance(model[2], FusedFeedForward)
    assert isinstance(model[4], FeedForwardOutput)


def test_recompute_applies_to_blocks_and_pairs():
    model = nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 32), nn.GELU(),
                          nn.Linear(32, 8))
    plain, lean = copy.deepcopy(model), copy.deepcopy(model)
    triton_gelu.patch(plain)
    assert triton_gelu.patch(lean, recompute=True) == 2
    assert lean[0].recompute and lean[2].recompute and not plain[2].recompute
    x = torch.randn(20, 16, requires_grad=True)
    kept = [saved_activation_bytes(lambda m=m: m(x), exclude=list(m.parameters()))
            for m in (model, plain, lean)]
    # eager: x, z1, gelu(z1), z2, gelu(z2); fused: x, z1, gelu(z1) (linear2's input), z2;
    # recompute: x and gelu(z1) only.
    assert kept == [4 * 20 * (16 + 2 * 24 + 2 * 32), 4 * 20 * (16 + 2 * 24 + 32),
                    4 * 20 * (16 + 24)], kept
    torch.testing.assert_close(lean(x), model(x), rtol=1e-4, atol=1e-5)


class _Hooked(TorchFeedForward):
    def __init__(self, where):
        super().__init__()
        getattr(self, where).register_forward_hook(lambda mod, inp, out: None)


class _SharedLinear(nn.Module):
    """linear2 is also applied again after the block: the chain uses it twice."""

    def __init__(self):
        super().__init__()
        self.linear1, self.act, self.linear2 = nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 16)

    def forward(self, x):
        return self.linear2(self.linear2(self.act(self.linear1(x))))


class _ShardLike(nn.Parameter):
    """A Parameter of another tensor type (as DTensor shards from tensor parallel or FSDP2)."""


def _sharded_linear2():
    model = TorchFeedForward()
    model.linear2.weight = _ShardLike(model.linear2.weight.detach())
    return model


@pytest.mark.parametrize("make, expected", [
    (lambda: _Hooked("linear2"), 1),  # the pair linear1 + GELU still fuses
    (lambda: _Hooked("dropout"), 1),
    (lambda: nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Dropout2d(0.1), nn.Linear(32, 16)), 1),
    (lambda: nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Dropout(0.1), nn.ReLU(),
                           nn.Linear(32, 16)), 1),
    (lambda: nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(24, 16)), 1),  # shapes
    (lambda: nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16).bfloat16()), 1),
    (lambda: _SharedLinear(), 1),
    (_sharded_linear2, 1),
], ids=["hooked-linear2", "hooked-dropout", "dropout2d", "relu-between", "in-features",
        "mixed-dtype", "linear2-twice", "sharded-linear2"])
def test_unprovable_blocks_are_left_to_the_pair_fusion(make, expected):
    model = make()
    assert triton_gelu.patch(model) == expected
    assert not _blocks(model), model
    assert sum(isinstance(m, LinearGELU) for m in model.modules()) == expected


# ---- Hugging Face transformers -------------------------------------------------------------------


def _gpt2_mlp(resid_pdrop=0.1):
    transformers = pytest.importorskip("transformers")
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

    config = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, resid_pdrop=resid_pdrop)
    return GPT2MLP(40, config)


def test_gpt2_mlp_conv1d_block():
    mlp = _gpt2_mlp()
    check_patched(mlp, {"hidden_states": _tokens()}, expected=1)
    assert isinstance(mlp.c_fc, FusedFeedForward) and mlp.c_fc.transposed
    assert isinstance(mlp.c_proj, FeedForwardOutput) and mlp.c_proj.weight.shape == (40, 16)
    assert isinstance(mlp.dropout, nn.Dropout)  # the dropout after c_proj stays as it is
    assert mlp.c_fc.p == 0.0 and mlp.c_fc.approximate == "tanh"  # gelu_new
    check_train_p0(_gpt2_mlp(resid_pdrop=0.0), {"hidden_states": _tokens()})
    check_round_trip(mlp, _gpt2_mlp, {"hidden_states": _tokens()})


def _clip_mlp(hidden_act):
    transformers = pytest.importorskip("transformers")
    from transformers.models.clip.modeling_clip import CLIPMLP

    return CLIPMLP(transformers.CLIPVisionConfig(hidden_size=16, intermediate_size=40,
                                                 num_attention_heads=2, hidden_act=hidden_act))


@pytest.mark.parametrize("act", ["gelu", "quick_gelu"])
def test_clip_mlp_block(act):
    """CLIP's MLP with its own quick_gelu (x * sigmoid(1.702 x)) or GELU: one fused block, the
    form kept; a forced GELU form does not turn quick GELU into another function."""
    mlp = _clip_mlp(act)
    check_patched(mlp, {"hidden_states": _tokens()}, expected=1)
    assert isinstance(mlp.fc1, FusedFeedForward) and isinstance(mlp.fc2, FeedForwardOutput)
    assert mlp.fc1.activation == (None if act == "gelu" else "quick_gelu")
    check_train_p0(_clip_mlp(act), {"hidden_states": _tokens()})
    check_round_trip(mlp, lambda: _clip_mlp(act), {"hidden_states": _tokens()})
    forced = _clip_mlp(act)
    assert triton_gelu.patch(forced, approximate="tanh") == 1
    assert (forced.fc1.approximate, forced.fc1.activation) == (
        ("tanh", None) if act == "gelu" else ("none", "quick_gelu"))


def test_bert_keeps_the_pair_fusion_with_recompute():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=24, vocab_size=32,
                                     max_position_embeddings=16)
    model = transformers.BertModel(config)
    assert triton_gelu.patch(model, recompute=True) == 1
    dense = model.encoder.layer[0].intermediate.dense
    assert isinstance(dense, LinearGELU) and dense.recompute and not _blocks(model)
