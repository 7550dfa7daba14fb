"""triton_gelu.patch on Hugging Face FFN modules proven by their code (patch/families.py):
StarCoder2's MLP and ESM's intermediate, built tiny from configs (nothing downloaded), match
their unpatched selves in outputs, every gradient and state dict; look-alikes that differ (another
activation, an overriding forward, another module-level gelu) are left alone. LongT5 and T5Gemma
(gated) are in test_patch_gated.py."""

from __future__ import annotations

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


@pytest.mark.parametrize("make", [
    lambda: _starcoder2("silu"),
    lambda: _starcoder2("relu"),
    lambda: _starcoder2("gelu_10"),  # clipped GELU
    _esm_overriding_forward,
], ids=["starcoder2-silu", "starcoder2-relu", "starcoder2-gelu10", "esm-subclass"])
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
