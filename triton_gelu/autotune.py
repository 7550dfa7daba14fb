"""``python -m triton_gelu.autotune``: tune every kernel for given shapes, fill the cache.

Shapes are ``MxKxN`` (tokens x in_features x out_features), the problem of ``linear_gelu`` on an
(M, K) input with an (N, K) weight; the standalone GELU kernels are tuned on the (M, N)
activation. Each kernel is tuned by calling the public functions, forward and backward, on random
inputs, so exactly the keys a training run will use get tuned. ::

    python -m triton_gelu.autotune                          # the FFN presets, bf16 and fp16
    python -m triton_gelu.autotune --shapes 8192x4096x11008 --dtypes bf16
    python -m triton_gelu.autotune --clear                  # forget every tuning

The cache lives in ``$TRITON_GELU_CACHE_DIR``, else ``$XDG_CACHE_HOME/triton_gelu``, else
``~/.cache/triton_gelu`` (see ``_autotune.py``).
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

from ._settings import force_path  # noqa: F401 (public: triton_gelu.autotune.force_path)

TOKENS = 8192
# (in_features, out_features) of the first FFN layer: K -> N.
PRESETS = {
    "bert-base": (768, 3072),
    "bert-large": (1024, 4096),
    "gpt2-xl": (1600, 6400),
    "llama-7b": (4096, 11008),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_shape(text: str) -> tuple[int, int, int]:
    """``"8192x768x3072"`` -> (M, K, N)."""
    try:
        m, k, n = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must be MxKxN, like 8192x768x3072; got {text!r}")
    if min(m, k, n) < 1:
        raise argparse.ArgumentTypeError(f"shape sides must be positive; got {text!r}")
    return m, k, n


def preset_shapes(names: list[str], tokens: int = TOKENS) -> list[tuple[int, int, int]]:
    """(M, K, N) of named FFN presets at ``tokens`` tokens."""
    return [(tokens, *_choose("preset", name, PRESETS)) for name in names]


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _choose(what: str, name: str, options):
    if name not in options:
        raise argparse.ArgumentTypeError(
            f"unknown {what} {name!r}; choose from {', '.join(options)}")
    return options[name] if isinstance(options, dict) else name


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m triton_gelu.autotune",
        description="Tune the triton_gelu kernels for the given shapes and fill the cache.",
    )
    p.add_argument("--shapes", nargs="+", type=parse_shape, metavar="MxKxN",
                   help="problem shapes, tokens x in_features x out_features")
    p.add_argument("--preset", default=",".join(PRESETS),
                   help=f"comma-separated FFN presets at {TOKENS} tokens (default: all of "
                        f"{', '.join(PRESETS)}); ignored when --shapes is given")
    p.add_argument("--dtypes", default="bf16,fp16", help="comma-separated: bf16, fp16, fp32")
    p.add_argument("--approximate", default="none,tanh", help="comma-separated: none, tanh")
    p.add_argument("--clear", action="store_true", help="delete the cache and exit")
    return p


def _describe(choice) -> str:
    config = choice.config
    meta = " ".join(f"{k}={v}" for k, v in config.kwargs.items())
    ms = "-" if math.isnan(choice.ms) else f"{choice.ms:.4f} ms"
    return f"{meta} num_warps={config.num_warps} num_stages={config.num_stages}  {ms}" \
           f"  ({choice.source})"


def _exercise(shape, dtype, approximate: str) -> None:
    """Run forward and backward of every public kernel path once, so each tuner tunes."""
    import triton_gelu

    m, k, n = shape
    act = torch.randn(m, n, device="cuda", dtype=dtype, requires_grad=True)
    triton_gelu.gelu(act, approximate=approximate).backward(torch.randn_like(act))
    linear_gelu = getattr(triton_gelu, "linear_gelu", None)
    if linear_gelu is None:  # not in this build
        return
    x = torch.randn(m, k, device="cuda", dtype=dtype, requires_grad=True)
    weight = (torch.randn(n, k, device="cuda", dtype=dtype) / k**0.5).requires_grad_()
    bias = torch.randn(n, device="cuda", dtype=dtype, requires_grad=True)
    for recompute in (False, True):
        y = linear_gelu(x, weight, bias, approximate=approximate, recompute=recompute)
        y.backward(torch.randn_like(y))
    feed_forward = getattr(triton_gelu, "feed_forward", None)
    if feed_forward is None:
        return
    # The FFN block (d_model K -> d_ff N -> K) in training: its epilogue matmuls with dropout.
    w2 = (torch.randn(k, n, device="cuda", dtype=dtype) / n**0.5).requires_grad_()
    b2 = torch.randn(k, device="cuda", dtype=dtype, requires_grad=True)
    for recompute in (False, True):
        y = feed_forward(x, weight, bias, w2, b2, p=0.1, approximate=approximate,
                         recompute=recompute)
        y.backward(torch.randn_like(y))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from . import _autotune
    from ._runtime import interpreting

    if args.clear:
        removed = _autotune.clear_cache()
        print(f"removed {len(removed)} tuning file(s) from {_autotune.cache_dir()}")
        return 0
    try:
        shapes = args.shapes or preset_shapes(_split(args.preset))
        dtypes = [_choose("dtype", name, DTYPES) for name in _split(args.dtypes)]
        approximates = [_choose("approximate", a, ("none", "tanh"))
                        for a in _split(args.approximate)]
    except argparse.ArgumentTypeError as e:
        print(f"triton_gelu.autotune: {e}", file=sys.stderr)
        return 2

    if interpreting() or not torch.cuda.is_available():
        why = "TRITON_INTERPRET is set" if interpreting() else "no CUDA GPU is visible"
        print(f"triton_gelu.autotune: {why}; autotuning times kernels on a GPU, so there is "
              "nothing to tune here.", file=sys.stderr)
        return 2
    print(f"tuning on {torch.cuda.get_device_name()}; cache: {_autotune.cache_dir()}")
    for shape in shapes:
        for dtype in dtypes:
            for approximate in approximates:
                before = {name: set(t.choices) for name, t in _autotune.tuners.items()}
                _exercise(shape, dtype, approximate)
                torch.cuda.synchronize()
                print(f"{'x'.join(map(str, shape))} {str(dtype).removeprefix('torch.')} "
                      f"approximate={approximate}")
                for name, tuner in sorted(_autotune.tuners.items()):
                    for slot, choice in tuner.choices.items():
                        if slot not in before.get(name, ()):
                            key = _autotune.key_string(slot[1])
                            print(f"  {name:<24} [{key}]  {_describe(choice)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
