"""triton_gelu.patch on gated GELU blocks: Hugging Face Gemma 1/2/3 and T5 v1.1 (gated-gelu)
models built tiny from configs (nothing downloaded) match their unpatched selves in outputs,
gradients and state dicts; SwiGLU and anything not proven is left alone."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_no_worse_than_torch, load_random_state
from test_patch import _as64, _run
from torch import nn

import triton_gelu
from bench.memory import saved_activation_bytes
from triton_gelu.patch import GatedGELUBlock, gated
from triton_gelu.testing import count_launches, dropout_seed

transformers = pytest.importorskip("transformers")

HIDDEN, FFN, LAYERS, VOCAB = 32, 48, 2, 64
_TOKENS = torch.Generator().manual_seed(0)  # the same inputs in every run and worker
IDS = {"input_ids": torch.randint(1, VOCAB, (2, 7), generator=_TOKENS)}
DECODER = {**IDS, "decoder_input_ids": torch.randint(1, VOCAB, (2, 5), generator=_TOKENS)}
COMMON = dict(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
              num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=VOCAB,
              max_position_embeddings=32, pad_token_id=0)


def _t5_config(act=None, config=None, **overrides):
    config = (config or transformers.T5Config)(**{
        "d_model": HIDDEN, "d_ff": FFN, "num_layers": LAYERS, "num_decoder_layers": LAYERS,
        "num_heads": 2, "d_kv": 16, "vocab_size": VOCAB, "feed_forward_proj": "gated-gelu",
        "dropout_rate": 0.0, "decoder_start_token_id": 0, **overrides})
    if act is not None:  # T5Config derives it from feed_forward_proj ("gated-gelu": gelu_new)
        config.dense_act_fn = act
    return config


def _t5gemma_config(act="gelu_pytorch_tanh"):
    half = dict(COMMON, num_hidden_layers=1, dropout_rate=0.0, hidden_activation=act)
    return transformers.T5GemmaConfig(encoder=half, decoder=half, vocab_size=VOCAB,
                                      dropout_rate=0.0)


MODELS = {
    # name: (builder, inputs, gated blocks, their GELU form)
    "gemma": (lambda: transformers.GemmaModel(transformers.GemmaConfig(**COMMON)), IDS,
              LAYERS, "tanh"),
    "gemma2": (lambda: transformers.Gemma2Model(transformers.Gemma2Config(**COMMON)), IDS,
               LAYERS, "tanh"),
    "gemma3": (lambda: transformers.Gemma3TextModel(transformers.Gemma3TextConfig(**COMMON)), IDS,
               LAYERS, "tanh"),
    "t5": (lambda: transformers.T5Model(_t5_config()), DECODER, 2 * LAYERS, "tanh"),
    "t5-erf": (lambda: transformers.T5Model(_t5_config("gelu")), DECODER, 2 * LAYERS, "none"),
    # one layer each: LongT5 (T5's block without the cast), T5Gemma (dropout in Gemma's MLP)
    "longt5": (lambda: transformers.LongT5Model(_t5_config(config=transformers.LongT5Config,
                                                           num_layers=1, num_decoder_layers=1)),
               DECODER, 2, "tanh"),
    "t5gemma": (lambda: transformers.T5GemmaModel(_t5gemma_config()), DECODER, 2, "tanh"),
}


def _hidden(out):
    return out.last_hidden_state


def _patch_and_compare(model, inputs, expected, form):
    """Patch ``model`` (eval) and compare outputs and every parameter gradient with an unpatched
    copy (same dtype) and a float64 copy; parameters and state-dict keys must be kept."""
    model.eval()
    unpatched = copy.deepcopy(model)
    ref64 = copy.deepcopy(model).double()
    params = dict(model.named_parameters())
    keys = list(model.state_dict())

    assert triton_gelu.patch(model) == expected, model
    blocks = [m for m in model.modules() if isinstance(m, GatedGELUBlock)]
    assert len(blocks) == expected and {b.approximate for b in blocks} == {form}
    for name, p in model.named_parameters():
        assert p is params[name], f"parameter {name} is not the original tensor"
    assert list(model.state_dict()) == keys, "state dict keys changed"

    with count_launches() as launched:
        out, grads = _run(model, inputs, _hidden)
    assert launched["geglu_fwd"] == expected, f"the fused kernel did not run: {launched}"
    out_torch, grads_torch = _run(unpatched, inputs, _hidden)
    out64, grads64 = _run(ref64, _as64(inputs), _hidden)
    assert_no_worse_than_torch(out, out_torch, out64, "output")
    assert grads.keys() == grads_torch.keys() and grads
    for name in grads:
        atol = 1e-6 * max(1.0, grads64[name].abs().max().item())
        assert_no_worse_than_torch(grads[name], grads_torch[name], grads64[name], name, atol=atol)
    return unpatched


@pytest.mark.parametrize("name", MODELS.keys())
def test_transformers_gated_models(name):
    build, inputs, expected, form = MODELS[name]
    model = build()
    _patch_and_compare(model, inputs, expected, form)
    block = next(m for m in model.modules() if isinstance(m, GatedGELUBlock))
    if name.startswith("gemma"):
        assert list(block._modules) == ["gate_proj", "up_proj", "down_proj", "act_fn"]
        assert block.config is not None and block.intermediate_size == FFN  # plain attributes
        assert "replaces=transformers.models.gemma" in repr(block)
    elif name == "t5gemma":
        assert list(block._modules) == ["gate_proj", "up_proj", "down_proj", "act_fn", "dropout"]
        assert "T5GemmaMLP" in repr(block)
    else:
        assert list(block._modules) == ["wi_0", "wi_1", "wo", "dropout", "act"]
        assert "T5DenseGatedActDense" in repr(block)


@pytest.mark.parametrize("name", ["gemma", "t5"])
def test_state_dict_round_trip_and_patch_twice(name):
    build, inputs, expected, _ = MODELS[name]
    model = build().eval()
    unpatched = copy.deepcopy(model)
    assert triton_gelu.patch(model) == expected
    assert triton_gelu.patch(model) == 0, "patching twice must be a no-op"
    # New values into both (through torch.save): the patched model computes with them.
    load_random_state(model, unpatched)
    want, ref = _hidden(unpatched(**inputs)), _hidden(copy.deepcopy(unpatched).double()(**inputs))
    assert_no_worse_than_torch(_hidden(model(**inputs)), want, ref, "loaded state dict")
    # And back: the patched model's state dict loads (strict) into an unpatched one.
    fresh = build().eval()
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(_hidden(fresh(**inputs)), want, rtol=0, atol=0)
    # A deep copy (EMA, checkpoint averaging) stays fused and equal.
    copied = copy.deepcopy(model)
    with count_launches() as launched:
        torch.testing.assert_close(_hidden(copied(**inputs)), _hidden(model(**inputs)))
    assert launched["geglu_fwd"] == 2 * expected, launched


def test_patch_recompute_keeps_x_alone_with_the_same_gradients():
    from transformers.models.gemma.modeling_gemma import GemmaMLP

    mlp = GemmaMLP(transformers.GemmaConfig(**COMMON))
    saving, recomputing = nn.Sequential(copy.deepcopy(mlp)), nn.Sequential(copy.deepcopy(mlp))
    assert triton_gelu.patch(saving) == 1 and triton_gelu.patch(recomputing, recompute=True) == 1
    assert not saving[0].recompute and recomputing[0].recompute
    assert "recompute=True" in repr(recomputing[0])
    x = torch.randn(5, HIDDEN, requires_grad=True)
    params = [*saving.parameters(), *recomputing.parameters()]
    kept = [saved_activation_bytes(lambda m=m: m(x), exclude=params)
            for m in (saving, recomputing)]
    assert kept == [5 * (HIDDEN + 2 * FFN) * 4, 5 * HIDDEN * 4], kept  # x, g, u / x
    dy = torch.randn(5, HIDDEN)
    grads = [torch.autograd.grad(m(x), [x, *m.parameters()], dy) for m in (saving, recomputing)]
    for a, b in zip(*grads):  # g and u recomputed bitwise: the same gradients
        torch.testing.assert_close(a, b, rtol=0, atol=0)


class _FixedMask(nn.Module):
    """Dropout with an explicit keep mask (the one the fused block drew), as a module."""

    def __init__(self, keep: torch.Tensor, p: float) -> None:
        super().__init__()
        self.keep, self.p = keep, p

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * (self.keep.to(h.dtype) / (1.0 - self.p))


@pytest.mark.parametrize("kind", ["t5", "t5gemma"])
def test_t5_training_dropout_is_fused(kind):
    """In training the patched T5 (or T5Gemma) block applies its dropout in the GeGLU kernel (the dropout
    module's p and mode read at each call): the FFN block's mask, regenerated by the backward,
    which keeps x, g, u and the seed only. Outputs and gradients match T5's own block computed
    with that mask, in float64; eval mode draws nothing."""
    from triton_gelu import reference

    p = 0.2
    holder = _t5_block() if kind == "t5" else _t5gemma_block()
    holder.block.dropout.p = p
    holder.train()
    unpatched = copy.deepcopy(holder)
    assert triton_gelu.patch(holder) == 1
    x = torch.randn(2, 5, HIDDEN)
    torch.manual_seed(3)
    with count_launches() as launched:
        out, grads = _run(holder, {"x": x})
    assert {k: launched[k] for k in ("geglu_fwd", "geglu_bwd_act")} == \
        {"geglu_fwd": 1, "geglu_bwd_act": 1}, launched
    torch.manual_seed(3)
    keep = reference.dropout_keep(dropout_seed("cpu"), 10, FFN, p).view(2, 5, FFN)
    unpatched.block.dropout = _FixedMask(keep, p)
    out_t, grads_t = _run(unpatched, {"x": x})
    out64, grads64 = _run(copy.deepcopy(unpatched).double(), {"x": x.double()})
    assert_no_worse_than_torch(out, out_t, out64, "t5 dropout output")
    assert grads.keys() == grads_t.keys() and grads
    for name in grads:
        assert_no_worse_than_torch(grads[name], grads_t[name], grads64[name], name, atol=1e-6)
    kept = saved_activation_bytes(lambda: holder(x.requires_grad_(True)),
                                  exclude=list(holder.parameters()))
    assert kept == 10 * (HIDDEN + 2 * FFN) * 4 + 8, kept  # x, g, u and the seed
    state = torch.get_rng_state()
    holder.block.dropout.eval()
    holder(x)
    assert torch.equal(torch.get_rng_state(), state), "eval mode drew a seed"


def test_t5_model_trains_with_fused_dropout(monkeypatch):
    model = transformers.T5Model(_t5_config(dropout_rate=0.2)).train()
    assert triton_gelu.patch(model) == 2 * LAYERS
    fused = _count_fused(monkeypatch)
    out, grads = _run(model, DECODER, _hidden)
    assert len(fused) == 2 * LAYERS and torch.isfinite(out).all()
    assert grads and all(torch.isfinite(g).all() for g in grads.values())


class _Holder(nn.Module):
    """A parent for a lone block (patch swaps blocks in their parents)."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        return self.block(x)


def _t5_block(dtype=torch.float32, wo_dtype=None):
    from transformers.models.t5.modeling_t5 import T5DenseGatedActDense

    block = T5DenseGatedActDense(_t5_config()).to(dtype).eval()
    if wo_dtype is not None:
        block.wo.to(wo_dtype)  # Flan-T5-XXL keeps wo in float32 (_keep_in_fp32_modules)
    return _Holder(block)


def _t5gemma_block():
    from transformers.models.t5gemma.modeling_t5gemma import T5GemmaMLP

    config = transformers.T5GemmaModuleConfig(**dict(COMMON, hidden_activation="gelu_pytorch_tanh",
                                                     dropout_rate=0.0))
    return _Holder(T5GemmaMLP(config).eval())


def _count_fused(monkeypatch) -> list[int]:
    calls = []
    fused = gated.gated_feed_forward

    def counted(*args, **kwargs):
        calls.append(1)
        return fused(*args, **kwargs)

    monkeypatch.setattr(gated, "gated_feed_forward", counted)
    return calls


def test_t5_keeps_its_cast_to_wo_dtype(monkeypatch):
    """bf16 gate and up with a float32 wo: the hidden is cast to float32 for wo, as T5 does
    (the unfused route after the fused GeGLU); under autocast the cast round-trips and the
    fused block serves."""
    holder = _t5_block(torch.bfloat16, wo_dtype=torch.float32)
    unpatched = copy.deepcopy(holder)
    assert triton_gelu.patch(holder) == 1
    fused = _count_fused(monkeypatch)
    x = torch.randn(2, 5, HIDDEN, dtype=torch.bfloat16)
    with count_launches() as launched:
        out, want = holder(x), unpatched(x)
    assert out.dtype == want.dtype == torch.float32 and not fused
    assert launched["geglu_fwd"] == 1, launched
    x64 = x.double()
    ref = copy.deepcopy(unpatched.block).double()
    assert_no_worse_than_torch(out, want, ref(x64), "t5 cast output")

    holder32 = _t5_block()
    unpatched32 = copy.deepcopy(holder32)
    triton_gelu.patch(holder32)
    x = torch.randn(2, 5, HIDDEN)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, want = holder32(x), unpatched32(x)
    assert out.dtype == want.dtype == torch.bfloat16 and len(fused) == 1
    torch.testing.assert_close(out, want, rtol=2e-2, atol=2e-2)


def test_gemma_autocast():
    build, inputs, expected, _ = MODELS["gemma"]
    model = build().eval()
    unpatched = copy.deepcopy(model)
    ref64 = copy.deepcopy(model).double()
    assert triton_gelu.patch(model) == expected
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, want = _hidden(model(**inputs)), _hidden(unpatched(**inputs))
    assert out.dtype == want.dtype
    assert_no_worse_than_torch(out, want, _hidden(ref64(**inputs)).to(out.dtype).double(),
                               "gemma autocast")


def test_approximate_override():
    build, inputs, expected, _ = MODELS["gemma"]
    model = build().eval()
    want = copy.deepcopy(model)
    for layer in want.layers:
        layer.mlp.act_fn = nn.GELU()  # the erf form
    assert triton_gelu.patch(model, approximate="none") == expected
    torch.testing.assert_close(_hidden(model(**inputs)), _hidden(want(**inputs)),
                               rtol=1e-4, atol=1e-5)


def test_hooks_after_patching_run_the_blocks_own_code():
    build, inputs, expected, _ = MODELS["gemma"]
    model = build().eval()
    unpatched = copy.deepcopy(model)
    triton_gelu.patch(model)
    seen = []
    model.layers[0].mlp.up_proj.register_forward_hook(lambda mod, inp, out: seen.append(1))
    with count_launches() as launched:
        torch.testing.assert_close(_hidden(model(**inputs)), _hidden(unpatched(**inputs)),
                                   rtol=1e-4, atol=1e-5)
    assert seen == [1], "the hook must fire: the hooked block runs GemmaMLP.forward"
    assert launched["geglu_fwd"] == expected - 1, launched  # the other layer stays fused


class GemmaLike(nn.Module):
    """A user's own block with Gemma's code: recognised by its code, whatever its name."""

    def __init__(self, act=None, bias=False):
        super().__init__()
        self.gate_proj = nn.Linear(16, 40, bias=bias)
        self.up_proj = nn.Linear(16, 40, bias=bias)
        self.down_proj = nn.Linear(40, 16, bias=bias)
        self.act_fn = nn.GELU("tanh") if act is None else act

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class UpFirst(GemmaLike):
    def forward(self, x):  # the same value, other code: not proven by our templates
        return self.down_proj(self.up_proj(x) * self.act_fn(self.gate_proj(x)))


class Residual(GemmaLike):
    def forward(self, x):
        return x + self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class GateTwice(GemmaLike):
    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.gate_proj(x))


def test_user_block_with_gemma_code_and_biases():
    model = _Holder(GemmaLike(bias=True)).eval()
    unpatched = copy.deepcopy(model)
    ref64 = copy.deepcopy(model).double()
    assert triton_gelu.patch(model) == 1 and isinstance(model.block, GatedGELUBlock)
    x = torch.randn(3, 7, 16)
    out, grads = _run(model, {"x": x})
    out_t, grads_t = _run(unpatched, {"x": x})
    out64, grads64 = _run(ref64, {"x": x.double()})
    assert_no_worse_than_torch(out, out_t, out64, "user block")
    for name in grads64:
        assert_no_worse_than_torch(grads[name], grads_t[name], grads64[name], name, atol=1e-5)


def _llama():
    config = transformers.LlamaConfig(**{k: v for k, v in COMMON.items()})
    return transformers.LlamaModel(config)


@pytest.mark.parametrize("make", [
    _llama,  # SwiGLU
    lambda: transformers.GemmaModel(transformers.GemmaConfig(**COMMON, hidden_act="silu")),
    lambda: transformers.T5Model(_t5_config(feed_forward_proj="gated-silu")),
    lambda: transformers.T5Model(_t5_config(feed_forward_proj="gelu")),  # not gated
    lambda: _Holder(GemmaLike(act=nn.SiLU())),
    lambda: _Holder(GemmaLike(act=nn.GELU("tanh")).double()),  # float64: not for the kernels
    lambda: _Holder(UpFirst()),
    lambda: _Holder(Residual()),
    lambda: _Holder(GateTwice()),
    lambda: GemmaLike(),  # the model itself: it has no parent to be swapped in
    lambda: transformers.LongT5Model(_t5_config(config=transformers.LongT5Config, num_layers=1,
                                                num_decoder_layers=1,
                                                feed_forward_proj="gated-silu")),
    lambda: transformers.T5GemmaModel(_t5gemma_config("gelu_10")),  # clipped GELU
    lambda: _Holder(_LongT5Override(_t5_block().block)),
], ids=["llama-swiglu", "gemma-silu", "t5-gated-silu", "t5-dense", "silu", "float64",
        "up-first", "residual", "gate-twice", "root", "longt5-silu", "t5gemma-gelu10",
        "longt5-subclass-forward"])
def test_not_patched(make):
    model = make()
    before = repr(model)
    assert not any(isinstance(m, GatedGELUBlock) for m in model.modules())
    triton_gelu.patch(model)
    assert not any(isinstance(m, GatedGELUBlock) for m in model.modules())
    assert repr(model) == before


def _LongT5Override(t5_block):
    """A LongT5 block whose subclass overrides forward (a residual added): not the template."""
    from transformers.models.longt5.modeling_longt5 import LongT5DenseGatedActDense

    class Overridden(LongT5DenseGatedActDense):
        def forward(self, hidden_states):
            return super().forward(hidden_states) + hidden_states

    block = Overridden.__new__(Overridden)
    nn.Module.__init__(block)
    for name, mod in t5_block._modules.items():
        block.add_module(name, mod)
    return block


def test_hooked_or_odd_blocks_not_patched():
    hooked = _Holder(GemmaLike())
    hooked.block.register_forward_hook(lambda mod, inp, out: None)
    child_hooked = _Holder(GemmaLike())
    child_hooked.block.down_proj.register_forward_pre_hook(lambda mod, inp: None)
    own_forward = _Holder(GemmaLike())
    own_forward.block.forward = lambda x: x
    mixed_dtype = _Holder(GemmaLike())
    mixed_dtype.block.down_proj.half()  # Gemma's code would fail outside autocast
    wrong_width = _Holder(GemmaLike())
    wrong_width.block.up_proj = nn.Linear(16, 41)
    dropout_one = _t5_block()
    dropout_one.block.dropout.p = 1.0  # as the FFN blocks: p < 1 to be fused
    for model in (hooked, child_hooked, own_forward, mixed_dtype, wrong_width, dropout_one):
        assert triton_gelu.patch(model) == 0, model


def _match(fn, template):
    return gated.match_template(fn, template, gated.ROLES)


def test_template_matching_names_roles_and_refuses_the_rest():
    from transformers.models.gemma.modeling_gemma import GemmaMLP
    from transformers.models.t5.modeling_t5 import T5DenseGatedActDense

    assert _match(GemmaMLP.forward, gated._gemma_mlp) == {
        "down": "down_proj", "act": "act_fn", "gate": "gate_proj", "up": "up_proj"}
    assert _match(T5DenseGatedActDense.forward,
                                gated._t5_dense_gated_act_dense) == {
        "act": "act", "gate": "wi_0", "up": "wi_1", "dropout": "dropout", "down": "wo"}
    assert _match(GemmaLike.forward, gated._gemma_mlp_returned) is not None
    from transformers.models.longt5.modeling_longt5 import LongT5DenseGatedActDense
    from transformers.models.t5gemma.modeling_t5gemma import T5GemmaMLP

    assert _match(LongT5DenseGatedActDense.forward,
                                gated._longt5_dense_gated_act_dense) == {
        "act": "act", "gate": "wi_0", "up": "wi_1", "dropout": "dropout", "down": "wo"}
    assert _match(T5GemmaMLP.forward, gated._t5gemma_mlp) == {
        "down": "down_proj", "act": "act_fn", "gate": "gate_proj", "up": "up_proj",
        "dropout": "dropout"}
    # T5's code (with the cast) is not LongT5's template, nor the reverse
    assert _match(T5DenseGatedActDense.forward,
                                gated._longt5_dense_gated_act_dense) is None
    assert _match(LongT5DenseGatedActDense.forward,
                                gated._t5_dense_gated_act_dense) is None
    for refused in (UpFirst.forward, Residual.forward, GateTwice.forward, F.gelu, None):
        assert all(_match(refused, t) is None for t, _ in gated._TEMPLATES)


def test_patched_block_compiles_fullgraph():
    from test_compile import Recorder

    model = _Holder(GemmaLike(bias=True))
    unpatched = copy.deepcopy(model)
    triton_gelu.patch(model)
    recorder = Recorder("aot_eager")
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, backend=recorder, fullgraph=True)
        x = torch.randn(2, 5, 16)
        out, grads = _run(compiled, {"x": x})
    finally:
        torch._dynamo.reset()
    out_t, grads_t = _run(unpatched, {"x": x})
    torch.testing.assert_close(out, out_t, rtol=1e-4, atol=1e-5)
    grads = {name.removeprefix("_orig_mod."): grad for name, grad in grads.items()}
    assert grads.keys() == grads_t.keys()
    for name, grad in grads_t.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)
    assert "gated_ffn_fwd" in recorder.fw_ops and "geglu_bwd" in recorder.bw_ops
