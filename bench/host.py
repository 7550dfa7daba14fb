"""Host time per call: ``python -m bench --host [--json FILE]``, on any machine.

A decode-sized call (a few tokens) is bound by the time the host spends before its launches: on
a GPU launches are asynchronous, so a wrapper at 2x eager PyTorch's host time is slower than
PyTorch there whatever its kernels do. This measures that time on tiny problems (x 4x64 -> 256,
float32, where host time is everything), for every public function and module, against eager
PyTorch's equivalent **in the same run**, in three modes:

- ``infer``: nothing requires grad; ``fwd``: a training forward (parameters require grad);
  ``fwd+bwd``: the forward and its backward;

and three variants of ours:

- ``eager-path``: every op's path forced to eager PyTorch (``force_path(...="torch")``): the
  same PyTorch ops as eager, so what differs is our wrapper alone;
- ``fused-stubbed``: the fused Triton paths with the kernel launch replaced by a no-op (the
  outputs are allocated, not written): the host work of the real call;
- ``fallback``: the PyTorch fallback, as on a machine without Triton.

Each figure is the best, over interleaved rounds, of the mean time of a batch of calls (ours
and eager alternate round by round, so both see the same machine state). Records:
``{"entry", "mode", "variant", "ours_us", "eager_us", "ratio"}``.

``--host --fallback-throughput`` times the fallback against eager at 2048x768 -> 3072
forward+backward, dropout included (seconds, not microseconds: the throughput of a machine
without Triton).
"""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import triton_gelu
from triton_gelu import _runtime
from triton_gelu.autotune import clear_plans, force_path

from . import op_modules, ops_geglu

MODES = ("infer", "fwd", "fwd+bwd")
VARIANTS = ("eager-path", "fused-stubbed", "fallback")
# Every op's path forced to PyTorch's own ops (or, for fused-stubbed, to our fused kernels).
EAGER_PATHS = {op: "torch" for op in ("gelu_fwd", "gelu_bwd", "linear_gelu_fwd",
                                      "linear_gelu_bwd", "ffn_fwd", "ffn_bwd", "geglu_fwd",
                                      "geglu_bwd")}
EAGER_PATHS["linear_preact"] = "composed"
M, K, N = 4, 64, 256  # tokens, model width, hidden width


def _entries(device: str) -> dict[str, tuple[Callable, Callable, list[torch.Tensor]]]:
    """name -> (ours(x), eager(x), the parameters): every public function and module, as each
    op's bench module declares them (``host_entries``)."""
    g = torch.Generator().manual_seed(0)

    def param(*shape):
        return nn.Parameter(torch.randn(*shape, generator=g).div(shape[-1] ** 0.5).to(device))

    return {name: entry for op in op_modules()
            for name, entry in op.host_entries(param, M, K, N, device).items()}


@contextlib.contextmanager
def _variant(name: str) -> Iterator[None]:
    # Each variant plans its problems afresh (the fallback's route differs), and leaves no plan
    # behind: a plan keeps the launches it bound (the stubs' included).
    clear_plans()
    try:
        with _variant_settings(name):
            yield
    finally:
        clear_plans()


@contextlib.contextmanager
def _variant_settings(name: str) -> Iterator[None]:
    if name == "eager-path":
        with force_path(**EAGER_PATHS):
            yield
    elif name == "fallback":  # as on a machine where Triton does not import
        unavailable = _runtime.triton_unavailable
        _runtime.triton_unavailable = lambda: "measuring the fallback (bench --host)"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", _runtime.TritonUnavailableWarning)
                yield
        finally:
            _runtime.triton_unavailable = unavailable
    else:  # fused-stubbed: the default (fused) paths, every kernel launch a no-op
        tuners = _tuners()
        kernels = [t.kernel for t in tuners]
        for tuner in tuners:
            tuner.kernel = _NO_LAUNCH
        fused = {op: "fused" for op in ("linear_gelu_fwd", "linear_preact", "ffn_fwd",
                                        "ffn_bwd", "geglu_fwd")}
        try:
            with force_path(gelu_fwd="triton", gelu_bwd="triton", linear_gelu_bwd="dz_once",
                            geglu_bwd="once", **fused):
                yield
        finally:
            for tuner, kernel in zip(tuners, kernels):
                tuner.kernel = kernel


class _NoLaunch:
    """Stands for a Triton kernel: ``kernel[grid](**arguments)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


_NO_LAUNCH = _NoLaunch()


def _tuners() -> list:
    """Every kernel tuner of the package (the objects whose ``kernel[grid](...)`` launches),
    from the registry each Tuner joins when its kernel module is imported."""
    from triton_gelu import kernels  # noqa: F401  (imports every kernel module: their tuners)
    from triton_gelu.tuning.tuner import tuners

    return list(tuners.values())


def _call(fn: Callable, x: torch.Tensor, mode: str) -> Callable[[], None]:
    if mode == "fwd+bwd":
        return lambda: fn(x).sum().backward()
    return lambda: fn(x)


def _best_us(fns: list[Callable[[], None]], rounds: int, calls: int) -> list[float]:
    """Best mean microseconds per call of each fn, over ``rounds`` interleaved rounds."""
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            best[i] = min(best[i], (time.perf_counter() - start) / calls * 1e6)
    return best


def measure(device: str = "cpu", rounds: int = 15, calls: int = 200,
            entries: list[str] | None = None) -> list[dict]:
    records = []
    table = _entries(device)
    for entry, (ours, eager, params) in table.items():
        if entries is not None and entry not in entries:
            continue
        for mode in MODES:
            for p in params:
                p.requires_grad_(mode != "infer")
            # GELU alone: x is what needs the gradient (a first layer's x needs none)
            x = torch.randn(M, K, device=device, requires_grad=mode != "infer" and not params)
            for variant in VARIANTS:
                with _variant(variant):
                    steps = [_call(ours, x, mode), _call(eager, x, mode)]
                    for step in steps:  # warm-up: first-call choices, caches
                        step(), step()
                    ours_us, eager_us = _best_us(steps, rounds, calls)
                records.append({"entry": entry, "mode": mode, "variant": variant,
                                "ours_us": round(ours_us, 2), "eager_us": round(eager_us, 2),
                                "ratio": round(ours_us / eager_us, 3)})
                print(f"{entry:>18} {mode:>7} {variant:>13}: ours {ours_us:7.1f} us, eager "
                      f"{eager_us:7.1f} us, {ours_us / eager_us:5.2f}x", flush=True)
    return records


def markdown(records: list[dict]) -> str:
    rows = ["| entry | mode | " + " | ".join(VARIANTS) + " |",
            "| --- | --- | " + " | ".join("---" for _ in VARIANTS) + " |"]
    by = {(r["entry"], r["mode"], r["variant"]): r for r in records}
    for entry in dict.fromkeys(r["entry"] for r in records):
        for mode in MODES:
            cells = [by.get((entry, mode, v)) for v in VARIANTS]
            rows.append(f"| {entry} | {mode} | " + " | ".join(
                "" if c is None else f"{c['ratio']:.2f}x ({c['ours_us']:.0f} / "
                f"{c['eager_us']:.0f} us)" for c in cells) + " |")
    return "\n".join(rows)


def fallback_throughput(rounds: int = 5) -> list[dict]:
    """Seconds per forward+backward at 2048x768 -> 3072 (float32, CPU), the fallback against
    eager PyTorch, per op (the FFN block with and without dropout)."""
    tokens, d, hidden = 2048, 768, 3072
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, d, generator=g)
    w1, wu = (torch.randn(hidden, d, generator=g) / d**0.5 for _ in "12")
    b1 = torch.randn(hidden, generator=g)
    w2, b2 = torch.randn(d, hidden, generator=g) / hidden**0.5, torch.randn(d, generator=g)
    params = [t.requires_grad_(True) for t in (w1, wu, b1, w2, b2)]
    eager_geglu = ops_geglu.eager_geglu("tanh")
    cases = {
        "linear_gelu": (lambda: triton_gelu.linear_gelu(x, w1, b1),
                        lambda: F.gelu(F.linear(x, w1, b1))),
        "feed_forward p=0": (lambda: triton_gelu.feed_forward(x, w1, b1, w2, b2),
                             lambda: F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)),
        "feed_forward p=0.1": (lambda: triton_gelu.feed_forward(x, w1, b1, w2, b2, p=0.1),
                               lambda: F.linear(F.dropout(F.gelu(F.linear(x, w1, b1)), 0.1),
                                                w2, b2)),
        "geglu": (lambda: triton_gelu.geglu(x, w1, wu), lambda: eager_geglu(x, w1, wu)),
        "gated_feed_forward p=0.1": (
            lambda: triton_gelu.gated_feed_forward(x, w1, wu, w2, dropout=0.1, training=True),
            lambda: F.linear(F.dropout(eager_geglu(x, w1, wu), 0.1), w2)),
    }
    records = []
    with _variant("fallback"):
        for name, (ours, eager) in cases.items():
            steps = [lambda fn=fn: fn().sum().backward() for fn in (ours, eager)]
            for step in steps:
                step()
            ours_s, eager_s = (t / 1e6 for t in _best_us(steps, rounds, 1))
            for p in params:
                p.grad = None
            records.append({"entry": name, "mode": "fwd+bwd", "variant": "fallback-throughput",
                            "ours_s": round(ours_s, 4), "eager_s": round(eager_s, 4),
                            "ratio": round(ours_s / eager_s, 3)})
            print(f"{name:>26}: ours {ours_s * 1e3:7.1f} ms, eager {eager_s * 1e3:7.1f} ms, "
                  f"{ours_s / eager_s:5.2f}x", flush=True)
    return records


def main(json_path: Path | None, throughput: bool, entries: list[str] | None = None) -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    records = measure(device, entries=entries)
    print(markdown(records))
    if throughput:
        records += fallback_throughput()
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({"device": device, "torch": torch.__version__,
                                         "records": records}, indent=1) + "\n")
        print(f"wrote {json_path}")
    return 0
