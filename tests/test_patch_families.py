"""triton_gelu.patch on Hugging Face FFN modules proven by their code (patch/families.py):
StarCoder2's MLP, ESM's intermediate, DistilBERT's chunked FFN and Falcon's MLP (FalconLinear), built tiny from configs (nothing downloaded), match
their unpatched selves in outputs, every gradient and state dict; look-alikes that differ (another
activation, an overriding forward, another module-level gelu) are left alone. LongT5 and T5Gemma
(gated) are in test_patch_gated.py."""

from __future__ import annotations

import copy

import pytest
import torch
from test_patch import check_patched

import triton_gelu
from triton_gelu.patch import EsmFusedIntermediate, FusedFeedForward

transformers = pytest.importorskip("transformers")

VOCAB = 64
_TOKENS = torch.Generator().manual_seed(0)
IDS = {"input_ids": torch.randint(2, VOCAB, (2, 7), generator=_TOKENS)}


def _hidden(out):
    return out.last_hidden_state


def _starcoder2(act="gelu_pytorch_tanh"):
    return transformers.Starcoder2Model(transformers.Starcoder2Config(
        hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=VOCAB, max_position_embeddings=32, hidden_act=act,
        residual_dropout=0.1, bos_token_id=0, eos_token_id=0))


def _esm():
    return transformers.EsmModel(transformers.EsmConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
        vocab_size=VOCAB, max_position_embeddings=40, pad_token_id=1),
        add_pooling_layer=False)


def _distilbert(act="gelu"):
    return transformers.DistilBertModel(transformers.DistilBertConfig(
        dim=32, hidden_dim=48, n_layers=1, n_heads=2, vocab_size=VOCAB,
        max_position_embeddings=32, activation=act))


def _falcon(act="gelu"):
    return transformers.FalconModel(transformers.FalconConfig(
        hidden_size=32, ffn_hidden_size=48, num_hidden_layers=1, num_attention_heads=2,
        vocab_size=VOCAB, bias=True, new_decoder_architecture=False, activation=act))


def test_distilbert():
    model = _distilbert()
    check_patched(model, IDS, expected=1, output=_hidden)
    assert isinstance(model.transformer.layer[0].ffn.lin1, FusedFeedForward)
    # chunked along the sequence (chunk_size_feed_forward): the same per-token block
    unchunked = model.transformer.layer[0].ffn
    x = torch.randn(2, 6, 32)
    want = unchunked(x)
    unchunked.chunk_size_feed_forward = 2
    torch.testing.assert_close(unchunked(x), want)


def test_falcon():
    model = _falcon()
    check_patched(model, IDS, expected=1, output=_hidden)
    assert isinstance(model.h[0].mlp.dense_h_to_4h, FusedFeedForward)


def test_starcoder2():
    model = _starcoder2()
    check_patched(model, IDS, expected=1, output=_hidden)
    mlp = model.layers[0].mlp
    assert isinstance(mlp.c_fc, FusedFeedForward) and mlp.c_fc.approximate == "tanh"
    # The trailing F.dropout(p=residual_dropout) is the block's own code: it still draws in
    # training (outputs differ from eval) and not in eval.
    x = torch.randn(2, 5, 32)
    mlp.eval()
    assert torch.equal(mlp(x), mlp(x))
    mlp.train()
    assert not torch.equal(mlp(x), mlp.eval()(x))


def test_esm():
    model = _esm()
    check_patched(model, IDS, expected=1, output=_hidden)
    block = model.encoder.layer[0].intermediate
    assert isinstance(block, EsmFusedIntermediate) and block.dense.approximate == "none"
    assert triton_gelu.patch(model) == 0, "patching twice must be a no-op"
    fresh = _esm().eval()
    fresh.load_state_dict(model.state_dict())  # strict: the same keys


def _esm_overriding_forward():
    from transformers.models.esm.modeling_esm import EsmIntermediate

    class Scaled(EsmIntermediate):
        def forward(self, hidden_states):
            return 2 * super().forward(hidden_states)

    model = _esm()
    layer = model.encoder.layer[0]
    scaled = Scaled(model.config)
    scaled.load_state_dict(layer.intermediate.state_dict())
    layer.intermediate = scaled
    return model


def _falcon_scaled_linear():
    from transformers.models.falcon.modeling_falcon import FalconLinear

    class Scaled(FalconLinear):  # looks alike, computes 2 x W^T + b
        def forward(self, input):
            hidden_states = 2 * input @ self.weight.T
            if self.bias is None:
                return hidden_states
            return hidden_states + self.bias

    model = _falcon()
    mlp = model.h[0].mlp
    scaled = Scaled(32, 48)
    scaled.load_state_dict(mlp.dense_h_to_4h.state_dict())
    mlp.dense_h_to_4h = scaled
    return model


def _distilbert_residual_chunk():
    from transformers.models.distilbert.modeling_distilbert import FFN

    class Residual(FFN):
        def ff_chunk(self, input):
            return self.dropout(self.lin2(self.activation(self.lin1(input)))) + input

    model = _distilbert()
    layer = model.transformer.layer[0]
    residual = Residual(model.config)
    residual.load_state_dict(layer.ffn.state_dict())
    layer.ffn = residual
    return model


@pytest.mark.parametrize("make", [
    lambda: _starcoder2("silu"),
    lambda: _starcoder2("relu"),
    lambda: _starcoder2("gelu_10"),  # clipped GELU
    _esm_overriding_forward,
    lambda: _distilbert("relu"),
    _distilbert_residual_chunk,
    lambda: _falcon("relu"),
    _falcon_scaled_linear,
], ids=["starcoder2-silu", "starcoder2-relu", "starcoder2-gelu10", "esm-subclass",
        "distilbert-relu", "distilbert-residual-chunk", "falcon-relu", "falcon-scaled-linear"])
def test_look_alikes_not_patched(make):
    model = make()
    before = repr(model)
    assert triton_gelu.patch(model) == 0
    assert repr(model) == before


def test_esm_with_another_gelu_function_not_patched(monkeypatch):
    """The module-level gelu() is proven by its code: a different one (tanh form) is refused."""
    from transformers.models.esm import modeling_esm

    monkeypatch.setattr(modeling_esm, "gelu", lambda x: torch.nn.functional.gelu(x, "tanh"))
    assert triton_gelu.patch(_esm()) == 0


def test_quick_gelu_families():
    """ImageGPT's and OWL-ViT's MLPs (quick_gelu, as CLIP's): one fused block each."""
    imagegpt = transformers.ImageGPTModel(transformers.ImageGPTConfig(
        n_embd=32, n_layer=1, n_head=2, vocab_size=VOCAB, n_positions=32))
    check_patched(imagegpt, IDS, expected=1, output=_hidden)
    assert imagegpt.h[0].mlp.c_fc.activation == "quick_gelu"
    owlvit = transformers.OwlViTVisionModel(transformers.OwlViTVisionConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
        image_size=32, patch_size=16))
    pixels = {"pixel_values": torch.randn(1, 3, 32, 32, generator=_TOKENS)}
    check_patched(owlvit, pixels, expected=1, output=_hidden)


def _modernbert(act="gelu"):
    return transformers.ModernBertModel(transformers.ModernBertConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
        vocab_size=VOCAB, max_position_embeddings=32, hidden_activation=act, mlp_bias=True,
        pad_token_id=0, bos_token_id=0, eos_token_id=0, cls_token_id=0, sep_token_id=0))


def test_modernbert_packed_gate_and_up():
    """ModernBERT's MLP (Wi packs input and gate): one gated kernel on Wi's two row halves;
    outputs, every gradient (Wi's whole weight and bias included) and the state dict as before."""
    from helpers import assert_no_worse_than_torch
    from test_patch import _as64, _run

    from triton_gelu.patch import PackedGatedGELUBlock
    from triton_gelu.testing import count_launches

    model = _modernbert().eval()
    unpatched, ref64 = copy.deepcopy(model), copy.deepcopy(model).double()
    params, keys = dict(model.named_parameters()), list(model.state_dict())
    assert triton_gelu.patch(model) == 1
    assert isinstance(model.layers[0].mlp, PackedGatedGELUBlock)
    assert all(p is params[n] for n, p in model.named_parameters())
    assert list(model.state_dict()) == keys
    with count_launches() as launched:
        out, grads = _run(model, IDS, _hidden)
    assert launched["geglu_fwd"] == 1
    out_t, grads_t = _run(unpatched, IDS, _hidden)
    out64, grads64 = _run(ref64, _as64(IDS), _hidden)
    assert_no_worse_than_torch(out, out_t, out64, "output")
    assert grads.keys() == grads_t.keys() and "layers.0.mlp.Wi.weight" in grads
    for name in grads:
        atol = 1e-6 * max(1.0, grads64[name].abs().max().item())
        assert_no_worse_than_torch(grads[name], grads_t[name], grads64[name], name, atol=atol)
    assert triton_gelu.patch(model) == 0, "patching twice must be a no-op"


@pytest.mark.parametrize("act", ["silu", "gelu_10"])
def test_modernbert_other_activations_not_patched(act):
    model = _modernbert(act)
    before = repr(model)
    assert triton_gelu.patch(model) == 0 and repr(model) == before
