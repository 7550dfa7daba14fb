"""Every Hugging Face family whose GELU FFN is written inline, through
``triton_gelu.compile_backend``: tiny random models from their configs (no downloads), eval
mode, the compiled output and every parameter gradient against the uncompiled model by the
suite's rule (float64 ground truth), and what the backend fused.

    python tests/compile_families.py [family ...]

The suite runs BART (tests/test_compile_backend.py); this covers the others we have run, about
half a minute per family on a CPU (kernels under the interpreter, Inductor for the rest).
Not here yet: Funnel (its compile did not finish in 4 minutes here), RecurrentGemma and Gemma3n.
"""

import copy
import os
import sys

if __name__ == "__main__" and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "0" if __import__("torch").cuda.is_available() else "1"

import torch  # noqa: E402
import transformers  # noqa: E402
from helpers import assert_no_worse_than_torch  # noqa: E402

import triton_gelu  # noqa: E402
from triton_gelu import compile_route  # noqa: E402

TEXT = dict(vocab_size=64, max_position_embeddings=32)
SEQ2SEQ = dict(d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
               decoder_attention_heads=2, encoder_ffn_dim=24, decoder_ffn_dim=24, dropout=0.0,
               activation_dropout=0.0, attention_dropout=0.0, **TEXT)
FAMILIES = {
    # name: (config class, config kwargs, model class, input name, how many FFNs fuse)
    "bart": ("BartConfig", SEQ2SEQ, "BartModel", "input_ids", 2),
    "mbart": ("MBartConfig", SEQ2SEQ, "MBartModel", "input_ids", 2),
    "marian": ("MarianConfig", {**SEQ2SEQ, "decoder_vocab_size": 64, "activation_function":
                                "gelu", "pad_token_id": 1, "decoder_start_token_id": 1,
                                "eos_token_id": 2}, "MarianModel", "input_ids", 2),
    "pegasus": ("PegasusConfig", {**SEQ2SEQ, "activation_function": "gelu"}, "PegasusModel",
                "input_ids", 2),
    "biogpt": ("BioGptConfig", dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=24, hidden_dropout_prob=0.0,
                                    attention_probs_dropout_prob=0.0, activation_dropout=0.0,
                                    **TEXT), "BioGptModel", "input_ids", 1),
    "xglm": ("XGLMConfig", dict(d_model=16, num_layers=1, attention_heads=2, ffn_dim=24,
                                dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                                **TEXT), "XGLMModel", "input_ids", 1),
    "albert": ("AlbertConfig", dict(embedding_size=8, hidden_size=16, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=24,
                                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                    hidden_act="gelu", **TEXT), "AlbertModel", "input_ids", 1),
    "xlnet": ("XLNetConfig", dict(d_model=16, n_layer=1, n_head=2, d_inner=24, dropout=0.0,
                                  ff_activation="gelu", vocab_size=64), "XLNetModel",
              "input_ids", 1),
    "whisper": ("WhisperConfig", {**{k: v for k, v in SEQ2SEQ.items()
                                     if k != "max_position_embeddings"},
                                  "num_mel_bins": 8, "max_source_positions": 8,
                                  "max_target_positions": 16, "decoder_start_token_id": 1,
                                  "pad_token_id": 0}, "WhisperModel", "input_features", 2),
    "convnext": ("ConvNextConfig", dict(num_channels=3, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1],
                                        image_size=32), "ConvNextModel", "pixel_values", 2),
    "convnextv2": ("ConvNextV2Config", dict(num_channels=3, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1],
                                            image_size=32), "ConvNextV2Model", "pixel_values", 2),
}


def _inputs(name: str, seq2seq: bool) -> dict:
    g = torch.Generator().manual_seed(0)
    if name == "pixel_values":
        return {"pixel_values": torch.randn(2, 3, 32, 32, generator=g)}
    if name == "input_features":  # Whisper: (batch, mel bins, 2 x max_source_positions)
        return {"input_features": torch.randn(2, 8, 16, generator=g),
                "decoder_input_ids": torch.randint(3, 64, (2, 5), generator=g)}
    ids = torch.randint(3, 64, (2, 6), generator=g)
    return {"input_ids": ids, "decoder_input_ids": ids} if seq2seq else {"input_ids": ids}


def _first_output(out) -> torch.Tensor:
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def check(family: str) -> str:
    config_cls, kwargs, model_cls, input_name, expected = FAMILIES[family]
    config = getattr(transformers, config_cls)(**kwargs)
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).eval()
    inputs = _inputs(input_name, "decoder_layers" in kwargs)
    torch._dynamo.reset()
    compile_route.history.clear()
    compiled = torch.compile(copy.deepcopy(model), backend=triton_gelu.compile_backend)
    runs = []
    for m in (compiled, model, copy.deepcopy(model).double()):
        m.zero_grad(set_to_none=True)
        feed = {k: v.double() if v.is_floating_point() and m is not compiled and
                next(m.parameters()).dtype == torch.float64 else v for k, v in inputs.items()}
        double = next(m.parameters()).dtype == torch.float64
        torch.set_default_dtype(torch.float64 if double else torch.float32)  # XGLM's own masks
        try:
            y = _first_output(m(**feed))
        finally:
            torch.set_default_dtype(torch.float32)
        y.backward(torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view(y.shape))
        runs.append((y.detach(), [p.grad for p in m.parameters()]))
    fused = [kind for graph in compile_route.history for kind in graph]
    (y, grads), (y_eager, grads_eager), (y64, grads64) = runs
    assert_no_worse_than_torch(y, y_eager, y64, f"{family} output")
    for i, (g, g_eager, g64) in enumerate(zip(grads, grads_eager, grads64)):
        if g64 is None:
            continue
        assert_no_worse_than_torch(g, g_eager, g64, f"{family} gradient {i}",
                                   atol=1e-6 * max(1.0, g64.abs().max().item()))
    ffns = [k for k in fused if k.startswith("feed_forward") or k.startswith("linear_gelu")]
    assert len(ffns) >= expected, f"{family}: fused {fused}, expected {expected} FFNs"
    return ", ".join(fused)


def main(argv: list[str]) -> int:
    failed = 0
    for family in argv or FAMILIES:
        try:
            print(f"{family:>11}: ok, fused {check(family)}", flush=True)
        except Exception as e:  # noqa: BLE001 - report every family, then exit non-zero
            failed += 1
            print(f"{family:>11}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
