"""triton_gelu.patch: which Linear + GELU pairs it swaps, and that the patched model is the same
model (outputs, gradients, parameters, state dict), in eval mode, compared with an unpatched
deep copy and a float64 copy as the reference."""

from __future__ import annotations

import copy
import functools
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import triton_gelu
from triton_gelu import FeedForward, LinearGELU, reference
from triton_gelu.patch import (
    Conv1DGELU, FeedForwardOutput, FusedFeedForward, call_chain, gelu_form,
)

from helpers import assert_no_worse_than_torch, load_random_state


# What patch() puts in a Linear's slot: a pair, or a whole FFN block (tests/test_patch_ffn.py).
FUSED = (LinearGELU, Conv1DGELU, FusedFeedForward)

# Patched vs unpatched float32 where no float64 copy is at hand: a few float32 roundings of
# values of order one (check_patched does the exact "no worse than PyTorch" comparison).
CLOSE = dict(rtol=1e-4, atol=1e-5)


# ---- models ------------------------------------------------------------------------------------


class TorchFeedForward(nn.Module):
    """The usual PyTorch transformer FFN, written as nested calls."""

    def __init__(self, d_model=16, d_ff=32, activation=None):
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_ff)
        self.activation = nn.GELU() if activation is None else activation
        self.dropout = nn.Dropout(0.1)
        self.linear2 = nn.Linear(d_ff, d_model)

    def forward(self, x):
        return self.linear2(self.dropout(self.activation(self.linear1(x))))


class StepwiseFeedForward(TorchFeedForward):
    """The same FFN, one statement per layer."""

    def forward(self, x):
        h = self.linear1(x)
        h = self.activation(h)
        h = self.dropout(h)
        return self.linear2(h)


class Residual(TorchFeedForward):
    """x + FFN(x): not a plain chain, so it is not patched (only whole chains are proven)."""

    def forward(self, x):
        return x + self.linear2(self.activation(self.linear1(x)))


class GELUFirst(TorchFeedForward):
    def forward(self, x):
        return self.linear2(self.linear1(self.activation(x)))


class LinearTwice(nn.Module):
    """fc is used twice: swapping it for fc+GELU would change its second use."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.act = nn.GELU()

    def forward(self, x):
        return self.fc(self.act(self.fc(x)))


def _sequential(approximate="none"):
    return nn.Sequential(
        nn.Linear(16, 32), nn.GELU(approximate), nn.Dropout(0.1),
        nn.Linear(32, 16), nn.GELU("tanh"), nn.Linear(16, 8),
    )


def _tokens(batch=2, seq=5, d_model=16):
    return torch.randn(batch, seq, d_model)


# ---- the comparison ----------------------------------------------------------------------------


def _run(model, inputs, output=lambda out: out, grad=True):
    model.zero_grad(set_to_none=True)
    out = output(model(**inputs))
    if grad:
        # A fixed, non-uniform upstream gradient (same values for every copy).
        g = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).reshape(out.shape)
        out.backward(g.to(out.dtype))
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads


def _as64(inputs):
    return {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}


def check_patched(model, inputs, expected, output=lambda out: out, approximate=None):
    """Patch ``model`` (eval mode) and compare outputs and parameter gradients with an unpatched
    copy (same dtype) and a float64 copy; check parameters and state dict are kept."""
    model.eval()
    unpatched = copy.deepcopy(model)
    ref64 = copy.deepcopy(model).double()
    params = dict(model.named_parameters())
    keys = list(model.state_dict())

    count = triton_gelu.patch(model, approximate=approximate)
    assert count == expected, f"patch replaced {count} pairs, expected {expected}:\n{model}"
    assert sum(isinstance(m, FUSED) for m in model.modules()) == expected
    for name, p in model.named_parameters():
        assert p is params[name], f"parameter {name} is not the original tensor"
    assert list(model.state_dict()) == keys, "state dict keys changed"

    out, grads = _run(model, inputs, output)
    out_torch, grads_torch = _run(unpatched, inputs, output)
    out64, grads64 = _run(ref64, _as64(inputs), output)
    assert_no_worse_than_torch(out, out_torch, out64, "output")
    assert grads.keys() == grads_torch.keys() and grads, "different parameters got gradients"
    for name in grads:
        # Parameter gradients sum over the tokens: allow rounding relative to their size.
        atol = 1e-6 * max(1.0, grads64[name].abs().max().item())
        assert_no_worse_than_torch(grads[name], grads_torch[name], grads64[name], name, atol=atol)
    return unpatched


# ---- nn.Sequential and PyTorch FFN shapes ------------------------------------------------------


def test_sequential():
    model = _sequential()
    check_patched(model, {"input": _tokens()}, expected=2)
    # model[3] is the Linear of the second GELU, so the first block fuses as a pair and
    # Linear -> GELU -> Linear from model[3] as a whole FFN block.
    assert isinstance(model[0], LinearGELU) and model[0].approximate == "none"
    assert isinstance(model[3], FusedFeedForward) and model[3].approximate == "tanh"
    assert isinstance(model[1], nn.Identity) and isinstance(model[4], nn.Identity)
    assert isinstance(model[2], nn.Dropout) and isinstance(model[5], FeedForwardOutput)


def test_sequential_nested_and_no_bias():
    model = nn.Sequential(
        nn.Sequential(nn.Linear(16, 24, bias=False), nn.GELU()), nn.Linear(24, 16), nn.ReLU()
    )
    check_patched(model, {"input": _tokens()}, expected=1)
    assert model[0][0].bias is None


@pytest.mark.parametrize("cls", [TorchFeedForward, StepwiseFeedForward])
@pytest.mark.parametrize("activation", [
    nn.GELU(), nn.GELU("tanh"), F.gelu, functools.partial(F.gelu, approximate="tanh"),
], ids=["nn.GELU", "nn.GELU-tanh", "F.gelu", "partial-tanh"])
def test_torch_feedforward(cls, activation):
    model = cls(activation=activation)
    form = gelu_form(activation)
    check_patched(model, {"x": _tokens()}, expected=1)
    assert isinstance(model.linear1, FusedFeedForward) and model.linear1.approximate == form
    assert isinstance(model.activation, nn.Identity)


def test_triton_gelu_activation():
    # This package's own GELU after a Linear is fused too (it has no float64 copy to compare with).
    model = TorchFeedForward(activation=triton_gelu.GELU("tanh")).eval()
    unpatched = copy.deepcopy(model)
    assert triton_gelu.patch(model) == 1 and model.linear1.approximate == "tanh"
    x = _tokens()
    torch.testing.assert_close(model(x), unpatched(x), **CLOSE)


def test_transformer_encoder_layer():
    layer = nn.TransformerEncoderLayer(
        d_model=16, nhead=2, dim_feedforward=32, dropout=0.0, activation="gelu", batch_first=True
    )
    unpatched = check_patched(layer, {"src": _tokens()}, expected=1)
    # Eval + no_grad takes PyTorch's fused fast path, which reads linear1's parameters directly.
    x = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), unpatched(x), **CLOSE)


def test_approximate_override():
    model = _sequential("none")
    want = copy.deepcopy(model)
    want[1] = nn.GELU("tanh")
    assert triton_gelu.patch(model, approximate="tanh") == 2
    assert all(m.approximate == "tanh" for m in model.modules() if isinstance(m, FUSED))
    model.eval(), want.eval()
    x = _tokens()
    torch.testing.assert_close(model(x), want(x), **CLOSE)

    layer = nn.TransformerEncoderLayer(16, 2, 32, 0.0, "gelu", batch_first=True)
    assert triton_gelu.patch(layer, approximate="tanh") == 1
    assert layer.activation_relu_or_gelu == 0  # the fast path could only compute the erf form
    with pytest.raises(ValueError, match="approximate"):
        triton_gelu.patch(_sequential(), approximate="sigmoid")


@pytest.mark.parametrize("make", [
    lambda: nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16)),
    lambda: Residual(),
    lambda: GELUFirst(),
    lambda: LinearTwice(),
    lambda: TorchFeedForward(activation=nn.SiLU()),
    lambda: TorchFeedForward(activation=lambda x: F.gelu(x)),  # an opaque lambda is not proof
    lambda: _sequential().double(),  # float64: the kernels do not take it
    lambda: FeedForward(16, 32),  # already fused
    lambda: nn.TransformerEncoderLayer(16, 2, 32, 0.0, "relu"),
], ids=["relu", "residual", "gelu-first", "linear-twice", "silu", "lambda", "float64",
        "feedforward", "encoder-relu"])
def test_not_patched(make):
    model = make()
    before = repr(model)
    assert triton_gelu.patch(model) == 0
    assert repr(model) == before


def test_hooks_and_overrides_not_patched():
    hooked = _sequential()
    hooked[0].register_forward_hook(lambda mod, inp, out: None)
    assert triton_gelu.patch(hooked) == 1  # only the second block; the hooked Linear stays
    assert isinstance(hooked[0], nn.Linear) and isinstance(hooked[3], FusedFeedForward)

    replaced = TorchFeedForward()
    replaced.forward = lambda x: replaced.linear1(x)
    assert triton_gelu.patch(replaced) == 0

    weight_normed = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(8, 8)), nn.GELU())
    assert triton_gelu.patch(weight_normed) == 0


def test_patch_twice_is_a_noop():
    model = _sequential()
    assert triton_gelu.patch(model) == 2
    assert triton_gelu.patch(model) == 0


def test_state_dict_round_trip():
    model = _sequential()
    unpatched = copy.deepcopy(model)
    triton_gelu.patch(model)
    # Load new values into both: the patched model computes with the loaded values.
    load_random_state(model, unpatched)
    model.eval(), unpatched.eval()
    x = _tokens()
    torch.testing.assert_close(model(x), unpatched(x), **CLOSE)
    # And back: the patched model's state dict loads into an unpatched one (strict).
    fresh = _sequential()
    fresh.load_state_dict(model.state_dict())
    fresh.eval()
    torch.testing.assert_close(fresh(x), unpatched(x), **CLOSE)


def test_no_grad_and_inference_mode():
    model = _sequential().eval()
    unpatched = copy.deepcopy(model)
    triton_gelu.patch(model)
    x = _tokens()
    with torch.no_grad():
        out, want = model(x), unpatched(x)
    assert not out.requires_grad
    torch.testing.assert_close(out, want, **CLOSE)
    with torch.inference_mode():
        out = model(x)
    assert out.is_inference() and not out.requires_grad
    torch.testing.assert_close(out, want, **CLOSE)


def test_autocast():
    # Under autocast the fused Linear is cast as nn.Linear is: output in the autocast dtype.
    device_type, dtype = "cpu", torch.bfloat16
    model = _sequential().eval()
    unpatched = copy.deepcopy(model)
    ref64 = copy.deepcopy(model).double()
    triton_gelu.patch(model)
    x = _tokens()
    with torch.autocast(device_type, dtype=dtype):
        out, want = model(x), unpatched(x)
    assert out.dtype == want.dtype == dtype
    assert_no_worse_than_torch(out, want, ref64(x.double()), "autocast output")


def test_autocast_grads():
    model = _sequential().eval()
    unpatched = copy.deepcopy(model)
    triton_gelu.patch(model)
    x = _tokens()
    for m in (model, unpatched):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            m(x).float().sum().backward()
    for (name, p), q in zip(model.named_parameters(), unpatched.parameters()):
        assert p.grad.dtype == q.grad.dtype == torch.float32, name
        torch.testing.assert_close(p.grad, q.grad, rtol=2e-2, atol=2e-2, msg=name)


# ---- GELU forms --------------------------------------------------------------------------------


def test_call_chain():
    assert call_chain(TorchFeedForward.forward) == ["linear1", "activation", "dropout", "linear2"]
    assert call_chain(StepwiseFeedForward.forward) == [
        "linear1", "activation", "dropout", "linear2"
    ]
    assert call_chain(nn.TransformerEncoderLayer._ff_block) == [
        "linear1", "activation", "dropout", "linear2", "dropout2"
    ]
    assert call_chain(GELUFirst.forward) == ["activation", "linear1", "linear2"]  # no pair
    for refused in (Residual.forward, nn.Linear.forward, nn.GELU.forward):
        assert call_chain(refused) is None, refused


# ---- Hugging Face transformers -----------------------------------------------------------------


def _hf_models():
    """(name, builder, inputs, expected count) for tiny models built from configs: no download."""
    transformers = pytest.importorskip("transformers")
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=48)
    text = dict(vocab_size=64, max_position_embeddings=32, pad_token_id=0)
    ids = {"input_ids": torch.randint(1, 64, (2, 7))}
    return {
        "bert": (lambda: transformers.BertModel(transformers.BertConfig(**common, **text)), ids),
        "bert-gelu_new": (lambda: transformers.BertModel(
            transformers.BertConfig(**common, **text, hidden_act="gelu_new")), ids),
        "roberta": (lambda: transformers.RobertaModel(
            transformers.RobertaConfig(**common, **text)), ids),
        "vit": (lambda: transformers.ViTModel(
            transformers.ViTConfig(**common, image_size=16, patch_size=8),
            add_pooling_layer=False), {"pixel_values": torch.randn(2, 3, 16, 16)}),
        "gpt2": (lambda: transformers.GPT2Model(transformers.GPT2Config(
            n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32,
            bos_token_id=0, eos_token_id=0)), ids),
        "gpt2-pytorch_tanh": (lambda: transformers.GPT2Model(transformers.GPT2Config(
            n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32,
            bos_token_id=0, eos_token_id=0, activation_function="gelu_pytorch_tanh")), ids),
    }


HF_MODELS = ["bert", "bert-gelu_new", "roberta", "vit", "gpt2", "gpt2-pytorch_tanh"]


@pytest.mark.parametrize("name", HF_MODELS)
def test_transformers_model(name):
    build, inputs = _hf_models()[name]
    model = build()
    check_patched(model, inputs, expected=2, output=lambda out: out.last_hidden_state)
    fused = [m for m in model.modules() if isinstance(m, FUSED)]
    # GPT-2's MLP (c_fc -> act -> c_proj) and ViT's (fc1 -> act -> fc2 since transformers 5)
    # are whole FFN blocks; BERT/RoBERTa split theirs over Intermediate and Output: a pair.
    whole = name.startswith("gpt2") or any(type(m).__name__ == "ViTMLP" for m in model.modules())
    assert {type(m) for m in fused} == ({FusedFeedForward} if whole else {LinearGELU})
    assert {m.approximate for m in fused} == ({"none"} if name in ("bert", "roberta", "vit")
                                              else {"tanh"})


def test_transformers_state_dict_and_autocast():
    build, inputs = _hf_models()["gpt2"]
    model = build().eval()
    unpatched = copy.deepcopy(model)
    ref64 = copy.deepcopy(model).double()
    assert triton_gelu.patch(model) == 2
    # GPT-2's Conv1D weight keeps its (in, out) shape and name: the checkpoint format is unchanged.
    state = model.state_dict()
    assert state["h.0.mlp.c_fc.weight"].shape == (32, 128)
    fresh = build()
    fresh.load_state_dict(state)
    model.load_state_dict(unpatched.state_dict())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**inputs).last_hidden_state
        want = unpatched(**inputs).last_hidden_state
    assert out.dtype == want.dtype
    assert_no_worse_than_torch(out, want, ref64(**inputs).last_hidden_state, "gpt2 autocast")


@pytest.mark.parametrize("act, form", [
    ("gelu", "none"), ("gelu_python", "none"), ("gelu_new", "tanh"),
    ("gelu_pytorch_tanh", "tanh"), ("gelu_python_tanh", "tanh"), ("gelu_fast", "tanh"),
    ("gelu_accurate", "tanh"), ("quick_gelu", "quick_gelu"), ("gelu_10", None), ("relu", None),
    ("silu", None),
])
def test_transformers_activation_forms(act, form):
    activations = pytest.importorskip("transformers.activations")
    if act not in activations.ACT2CLS:
        pytest.skip(f"{act!r} is not in this transformers release")
    module = activations.ACT2FN[act]
    assert gelu_form(module) == form
    if form is not None:  # what we call GELU of a form is that function, to float32 rounding
        x = torch.linspace(-6, 6, 101, dtype=torch.float64)
        torch.testing.assert_close(module(x), reference.act64(x, form), rtol=1e-7, atol=1e-9)


def test_patch_imports_neither_transformers_nor_the_dtensor_rules():
    code = (
        "import sys, torch, triton_gelu\n"
        "m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.GELU())\n"
        "assert triton_gelu.patch(m) == 1\n"
        "assert 'transformers' not in sys.modules, 'transformers was imported'\n"
        "m(torch.randn(2, 4)).sum().backward()\n"
        "assert not {'triton_gelu.parallel', 'triton_gelu._dtensor',\n"
        "            'triton_gelu.patch.tp_hooks'} & set(sys.modules), 'DTensor code was imported'\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "0")}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", code], cwd=root, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_bert_for_masked_lm_count_of_the_readme():
    """The README's worked example: BertForMaskedLM(BertConfig()) fuses 13 pairs, one per layer
    and the masked-LM head's transform.dense -> GELU (here at 12 tiny layers)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=12, num_attention_heads=2,
                                     intermediate_size=48, vocab_size=64,
                                     max_position_embeddings=32)
    assert transformers.BertConfig().num_hidden_layers == 12
    model = transformers.BertForMaskedLM(config)
    assert triton_gelu.patch(model) == 13
    fused = [name for name, module in model.named_modules()
             if isinstance(module, triton_gelu.LinearGELU)]
    assert "cls.predictions.transform.dense" in fused and len(fused) == 13, fused
