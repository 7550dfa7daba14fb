"""triton_gelu.patch on three more Hugging Face families, each proven by its code:

- BLOOM's MLP (patch/families.py: ``DropoutAddFeedForward``): the residual and ``dropout_add``
  inside the block, a custom autograd GELU; in eval and in training with dropout; what is not
  proven (another GELU, another ``dropout_add``) is left alone, and pretraining's exact slicing
  (``pretraining_tp > 1`` with ``slow_but_exact``) runs BLOOM's own forward;
- Funnel's ``FunnelPositionwiseFFN``: the chain fused, its trailing dropout and
  ``layer_norm(hidden + h)`` kept;
- RecurrentGemma's ``RecurrentGemmaMlp``: Gemma's gated block written in two statements;
- Gemma3n's ``Gemma3nTextMLP``: fused on its layers without activation sparsity only.

Outputs, every gradient and the state dict as unpatched, by the float64 rule."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_no_worse_than_torch
from test_patch import _as64, _run

import triton_gelu
from triton_gelu.patch import DropoutAddFeedForward
from triton_gelu.testing import count_launches

transformers = pytest.importorskip("transformers")
from transformers.models.bloom import modeling_bloom  # noqa: E402

VOCAB = 64
IDS = {"input_ids": torch.randint(2, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))}


def _run_compared(model, expected_fused, kernel, output=None):
    """Patch ``model`` (eval) and compare it with its unpatched self and a float64 copy."""
    model.eval()
    unpatched, ref64 = copy.deepcopy(model), copy.deepcopy(model).double()
    params, keys = dict(model.named_parameters()), list(model.state_dict())
    assert triton_gelu.patch(model) == expected_fused
    assert all(p is params[n] for n, p in model.named_parameters())
    assert list(model.state_dict()) == keys
    with count_launches() as launched:
        out, grads = _run(model, IDS, _hidden)
    assert launched[kernel] == expected_fused, f"{kernel} did not serve every block: {launched}"
    out_t, grads_t = _run(unpatched, IDS, _hidden)
    out64, grads64 = _run(ref64, _as64(IDS), _hidden)
    assert_no_worse_than_torch(out, out_t, out64, "output")
    assert grads.keys() == grads_t.keys() and grads
    for name in grads:
        atol = 1e-6 * max(1.0, grads64[name].abs().max().item())
        assert_no_worse_than_torch(grads[name], grads_t[name], grads64[name], name, atol=atol)
    assert triton_gelu.patch(model) == 0, "patching twice must be a no-op"
    return model


def _bloom(**overrides):
    torch.manual_seed(0)
    config = dict(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4, hidden_dropout=0.0,
                  attention_dropout=0.0)
    return transformers.BloomModel(transformers.BloomConfig(**{**config, **overrides}))


def _hidden(out):
    return out.last_hidden_state


def _fused_launches(launched) -> int:
    """The fused FFN block's forward launches among ``count_launches()``'s."""
    return sum(n for name, n in launched.items() if name.startswith("ffn_fwd"))


def _compare(model, unpatched, ref64, seeded=False):
    def run(m, inputs):
        if seeded:  # the same dropout masks for every copy (ours draws none of its own at p 0)
            torch.manual_seed(1)
        return _run(m, inputs, _hidden)

    out, grads = run(model, IDS)
    out_t, grads_t = run(unpatched, IDS)
    out64, grads64 = run(ref64, _as64(IDS))
    assert_no_worse_than_torch(out, out_t, out64, "output")
    assert grads.keys() == grads_t.keys() and "h.0.mlp.dense_h_to_4h.weight" in grads
    for name in grads:
        atol = 1e-6 * max(1.0, grads64[name].abs().max().item())
        assert_no_worse_than_torch(grads[name], grads_t[name], grads64[name], name, atol=atol)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train-dropout"])
def test_bloom_mlp_fused_with_its_residual(training):
    model = _bloom(hidden_dropout=0.25 if training else 0.0).train(training)
    unpatched, ref64 = copy.deepcopy(model), copy.deepcopy(model).double()
    params, keys = dict(model.named_parameters()), list(model.state_dict())
    assert triton_gelu.patch(model) == 2
    assert all(isinstance(block.mlp, DropoutAddFeedForward) for block in model.h)
    assert all(p is params[n] for n, p in model.named_parameters())
    assert list(model.state_dict()) == keys
    with count_launches() as launched:
        _compare(model, unpatched, ref64, seeded=training)
    assert _fused_launches(launched) == 2, f"the fused FFN kernel did not serve both blocks: " \
        f"{launched}"
    assert triton_gelu.patch(model) == 0, "patching twice must be a no-op"


def test_pretraining_slices_run_blooms_own_forward():
    model = _bloom(pretraining_tp=2, slow_but_exact=True).eval()
    unpatched = copy.deepcopy(model)
    assert triton_gelu.patch(model) == 2
    with count_launches() as launched:
        out, _ = _run(model, IDS, _hidden)
    assert _fused_launches(launched) == 0, launched
    assert torch.equal(out, _run(unpatched, IDS, _hidden)[0])
    for block in model.h:  # the fast path again, on the same fused blocks
        block.mlp.slow_but_exact = False
    with count_launches() as launched:
        _run(model, IDS, _hidden)
    assert _fused_launches(launched) == 2, launched


def _erf_gelu_literal(x):
    return x * 0.5 * (1.0 + torch.erf(x * 0.70710678))


@pytest.mark.parametrize("name, replacement", [
    ("bloom_gelu_forward", _erf_gelu_literal),  # another GELU inside BloomGelu's Function
    ("dropout_add", lambda x, residual, prob, training: residual + 2 * x),
])
def test_unproven_bloom_not_patched(monkeypatch, name, replacement):
    monkeypatch.setattr(modeling_bloom, name, replacement)
    model = _bloom()
    before = repr(model)
    assert triton_gelu.patch(model) == 0 and repr(model) == before


def test_funnel_positionwise_ffn():
    torch.manual_seed(0)
    model = transformers.FunnelModel(transformers.FunnelConfig(
        vocab_size=VOCAB, block_sizes=[1, 1], d_model=32, n_head=4, d_head=8, d_inner=48,
        num_decoder_layers=1))
    model = _run_compared(model, 3, "ffn_fwd_gelu_dropout")
    ffn = model.encoder.blocks[0][0].ffn
    assert type(ffn).__name__ == "FunnelPositionwiseFFN"  # the block's own code still runs
    assert isinstance(ffn.dropout, torch.nn.Dropout) and isinstance(ffn.activation_dropout,
                                                                     torch.nn.Identity)


@pytest.mark.parametrize("act", ["gelu_pytorch_tanh", "gelu"])
def test_recurrent_gemma_mlp(act):
    torch.manual_seed(0)
    model = transformers.RecurrentGemmaModel(transformers.RecurrentGemmaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, lru_width=32, attention_window_size=8, conv1d_width=2,
        block_types=["recurrent", "attention"], hidden_activation=act))
    _run_compared(model, 2, "geglu_fwd")


def test_recurrent_gemma_with_silu_not_patched():
    model = transformers.RecurrentGemmaModel(transformers.RecurrentGemmaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, lru_width=32, attention_window_size=8, conv1d_width=2,
        block_types=["recurrent", "attention"], hidden_activation="silu"))
    before = repr(model)
    assert triton_gelu.patch(model) == 0 and repr(model) == before


def _gemma3n():
    torch.manual_seed(0)
    return transformers.Gemma3nTextModel(transformers.Gemma3nTextConfig(
        vocab_size=VOCAB, vocab_size_per_layer_input=VOCAB, hidden_size=32,
        hidden_size_per_layer_input=8, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        activation_sparsity_pattern=[0.95, 0.0], layer_types=["sliding_attention",
                                                              "full_attention"],
        sliding_window=8, laurel_rank=4, altup_num_inputs=2, num_kv_shared_layers=0))


def test_gemma3n_fuses_only_its_layers_without_activation_sparsity():
    from triton_gelu.patch import GatedGELUBlock

    model = _run_compared(_gemma3n(), 1, "geglu_fwd")
    sparse, dense = (layer.mlp for layer in model.layers)
    assert type(sparse).__name__ == "Gemma3nTextMLP" and isinstance(dense, GatedGELUBlock)
    dense.activation_sparsity = 0.5  # set after the patch: the block's own code, its top-k cut
    x = torch.randn(2, 7, 32)
    with count_launches() as launched:
        torch.testing.assert_close(dense(x), dense.original_class.forward(dense, x), rtol=0,
                                   atol=0)
    assert launched["geglu_fwd"] == 0, launched
