"""Tuning, for users: the settings, ``warmup``, and ``python -m triton_gelu.autotune``.

In Python (importing this module never imports Triton)::

    triton_gelu.autotune.set_policy("off")            # or TRITON_GELU_TUNE=full|fast|off
    with triton_gelu.autotune.policy("full"): ...
    with triton_gelu.autotune.force_path(linear_gelu_fwd="composed"): ...
    triton_gelu.autotune.warmup(model, (x,))          # tune now, not in the first step
    triton_gelu.autotune.clear_plans()                # re-read the environment (below)

Each problem (entry point, operand shapes, dtypes, devices) is validated and routed on its first
call and the decision kept (``_plans.py``): the environment variables (``TRITON_GELU_PATH``,
``TRITON_GELU_TUNE``) are read then, the Python settings above take effect at once;
``clear_plans()`` makes every problem decide again, after a change of the environment.

On the command line: tune every kernel and path for given shapes and fill the cache. Shapes are
``MxKxN`` (tokens x in_features x out_features), the problem of ``linear_gelu`` on an (M, K)
input with an (N, K) weight (and of ``geglu`` with two such weights); the standalone GELU
kernels are tuned on the (M, N) activation.
Each kernel is tuned by calling the public functions, forward and backward, on random inputs,
so exactly the keys a training run will use get tuned. ::

    python -m triton_gelu.autotune                          # FFN presets + decode, bf16, fp16
    python -m triton_gelu.autotune --shapes 8192x4096x11008 --dtypes bf16
    python -m triton_gelu.autotune --export                 # and write the shipped table
    python -m triton_gelu.autotune --clear                  # forget every tuning

The cache lives in ``$TRITON_GELU_CACHE_DIR``, else ``$XDG_CACHE_HOME/triton_gelu``, else
``~/.cache/triton_gelu`` (see ``tuning/__init__.py``). ``--export`` tunes under the policy in
force (``fast`` by default: about 130 compiles for the bench presets on sm90, where ``full``, every
config, is about 900: ``python -m bench --cold-start``) and merges every choice into ``triton_gelu/tuning/tuned/<arch>.json``
(``tuning/table.py``); a problem the table lists as exported is skipped, so an interrupted
export resumes where it stopped.
"""

from __future__ import annotations

import argparse
import datetime
import math
import sys
import time
from pathlib import Path

import torch

from . import _settings
from ._plans import clear_plans  # noqa: F401 (public)
from ._settings import force_path, policy, set_policy  # noqa: F401 (public)
from ._warmup import warmup  # noqa: F401 (public)

TOKENS = 8192
# (in_features, out_features) of the first FFN layer: K -> N.
PRESETS = {
    "bert-base": (768, 3072),
    "bert-large": (1024, 4096),
    "gpt2-xl": (1600, 6400),
    "llama-7b": (4096, 11008),
}
# Serving one token at a time (and small batches of them): M = 1, 16, 64 at these widths.
DECODE_TOKENS = (1, 16, 64)
DECODE_PRESETS = ("bert-base", "llama-7b")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# The problems `python -m bench.first_contact` times (bf16; GeGLU's in the tanh form): the
# export tunes them first, so the first calls of a GPU lease fill the table where it is read.
FIRST_CONTACT = [((8192, 768, 3072), "none"), ((4096, 4096, 11008), "none"),
                 ((4096, 2048, 16384), "tanh"), ((1, 4096, 11008), "none"),
                 ((16, 4096, 11008), "none")]


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


def decode_shapes(tokens: list[int] | tuple[int, ...] = DECODE_TOKENS,
                  presets: tuple[str, ...] = DECODE_PRESETS) -> list[tuple[int, int, int]]:
    """(M, K, N) of the decode problems: each token count at each preset's widths."""
    return [(m, *PRESETS[name]) for name in presets for m in tokens]


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
    p.add_argument("--decode", default=",".join(map(str, DECODE_TOKENS)),
                   help="comma-separated token counts of the decode shapes, at the widths of "
                        f"{' and '.join(DECODE_PRESETS)} ('' for none); ignored with --shapes")
    p.add_argument("--dtypes", default="bf16,fp16", help="comma-separated: bf16, fp16, fp32")
    p.add_argument("--approximate", default="none,tanh", help="comma-separated: none, tanh")
    p.add_argument("--budget-s", type=float, default=math.inf,
                   help="start no problem after this many seconds; say what remains (exit 3)")
    p.add_argument("--clear", action="store_true", help="delete the cache and exit")
    p.add_argument("--inspect", action="store_true",
                   help="no GPU needed: compile every kernel x config for --arch with Triton's "
                        "ptxas and write its compile facts (triton_gelu/tuning/facts/<arch>.json)")
    p.add_argument("--arch", default="sm90", help="with --inspect: sm90 or sm80")
    p.add_argument("--jobs", type=int, default=2, help="with --inspect: compile processes")
    p.add_argument("--kernels", default="",
                   help="with --inspect: comma-separated kernel cases to remake (others kept)")
    p.add_argument("--export", nargs="?", const="", metavar="PATH",
                   help="tune (under the policy in force: TRITON_GELU_TUNE=full for every "
                        "config) and merge every choice into the shipped table (default "
                        "triton_gelu/tuning/tuned/<arch>.json, or PATH)")
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
    for recompute in (False, True):  # the recompute forward is also the inference one
        y = linear_gelu(x, weight, bias, approximate=approximate, recompute=recompute)
        y.backward(torch.randn_like(y))
    feed_forward = getattr(triton_gelu, "feed_forward", None)
    if feed_forward is not None:
        # The FFN block (d_model K -> d_ff N -> K) in training with dropout, by each of its
        # paths, so whichever the path choice takes is tuned.
        w2 = (torch.randn(k, n, device="cuda", dtype=dtype) / n**0.5).requires_grad_()
        b2 = torch.randn(k, device="cuda", dtype=dtype, requires_grad=True)
        for path in ("fused", "composed"):
            with force_path(ffn_fwd=path, ffn_bwd=path):
                for recompute in (False, True):
                    y = feed_forward(x, weight, bias, w2, b2, p=0.1, approximate=approximate,
                                     recompute=recompute)
                    y.backward(torch.randn_like(y))
    geglu = getattr(triton_gelu, "geglu", None)
    if geglu is None:
        return
    w_up = (torch.randn(n, k, device="cuda", dtype=dtype) / k**0.5).requires_grad_()
    # Every path of the gated GELU, so whichever the path choice takes is tuned.
    for fwd, bwd in (("fused", "once"), ("composed", "once")):
        with force_path(geglu_fwd=fwd, geglu_bwd=bwd):
            h = geglu(x, weight, w_up, approximate=approximate)
            h.backward(torch.randn_like(h))


def _token_counts(text: str) -> list[int]:
    parts = _split(text)
    if not all(part.isdigit() and int(part) > 0 for part in parts):
        raise argparse.ArgumentTypeError(f"--decode takes token counts, like 1,16,64; got {text!r}")
    return [int(part) for part in parts]


def _problems(shapes, dtypes, approximates, first: bool) -> list[tuple]:
    """(shape, dtype, approximate) of every problem; with ``first``, the first-contact problems
    (bf16) lead, once."""
    every = [(s, d, a) for s in shapes for d in dtypes for a in approximates]
    if not first:
        return every
    lead = [(s, torch.bfloat16, a) for s, a in FIRST_CONTACT]
    return list(dict.fromkeys(lead + every))


def _label(shape, dtype, approximate: str) -> str:
    return f"{'x'.join(map(str, shape))} {str(dtype).removeprefix('torch.')} {approximate}"


def _new_choices(before: dict) -> list[str]:
    from .tuning import keys as _keys
    from .tuning import paths as _paths
    from .tuning import tuner as _tuner

    lines = []
    for name, tuner in sorted(_tuner.tuners.items()):
        for slot, choice in tuner.choices.items():
            if slot not in before.get(name, ()):
                lines.append(f"  {name:<24} [{_keys.key_string(slot[1])}]  "
                             f"{_describe(choice)}")
    for op, paths in sorted(_paths.path_choosers.items()):
        for slot, choice in paths.choices.items():
            if slot not in before.get("paths." + op, ()):
                times = ", ".join(f"{n} {'-' if ms is None else f'{ms:.4f}'}"
                                  for n, ms in choice.candidates.items())
                lines.append(f"  {op:<24} [{_keys.key_string(slot[1])}]  path "
                             f"{choice.path} ({choice.source}{'; ' + times if times else ''})")
    return lines


def _snapshot() -> dict:
    from .tuning import paths as _paths
    from .tuning import tuner as _tuner

    seen = {name: set(t.choices) for name, t in _tuner.tuners.items()}
    seen.update({"paths." + op: set(p.choices) for op, p in _paths.path_choosers.items()})
    return seen


def _export_table(path: Path, arch: str, device_index: int, done: list[str]) -> dict:
    """Merge the choices this process made on device ``device_index`` into the table at
    ``path`` (creating it), recording the problems in ``done`` as exported."""
    import triton

    from .tuning import keys as _keys
    from .tuning import paths as _paths
    from .tuning import table as _table
    from .tuning import tuner as _tuner

    def ms(value: float) -> float | None:
        return None if math.isnan(value) or math.isinf(value) else value

    document = _table.read_table(path) or _table.empty_table(arch)
    for name, tuner in _tuner.tuners.items():
        entries = {_keys.key_string(slot[1]): _tuner.config_entry(c.config, ms(c.ms))
                   for slot, c in tuner.choices.items()
                   if slot[0] == device_index and c.source in ("tuned", "cache")}
        if entries:
            _table.merge_section(document, "tuners", name, tuner.source_hash, entries)
    for op, paths in _paths.path_choosers.items():
        entries = {_keys.key_string(slot[1]): {"path": c.path, "ms": ms(c.ms),
                                                    "candidates": c.candidates}
                   for slot, c in paths.choices.items()
                   if slot[0] == device_index and c.source in ("tuned", "cache")
                   and c.path in c.candidates}
        if entries:
            _table.merge_section(document, "paths", op, paths.source_hash, entries)
    document["measured_on"] = {
        "device": _keys.device_of(device_index).name, "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    document["exported"] = list(dict.fromkeys([*document.get("exported", []), *done]))
    _table.write_table(path, document)
    return document


def _inspect(arch: str, jobs: int, kernels: list[str] | None) -> int:
    """``--inspect``: remake the compile facts of ``arch`` (``tuning/facts.py``)."""
    import json
    import os

    from ._runtime import triton_unavailable
    from .tuning import facts

    why = triton_unavailable()
    if why is None and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        why = "TRITON_INTERPRET is set (unset it: --inspect runs Triton's compiler)"
    if why is not None:
        print(f"triton_gelu.autotune --inspect: {why}", file=sys.stderr)
        return 2
    from .tuning import compiled

    if arch not in compiled.ARCHES:
        print(f"triton_gelu.autotune --inspect: --arch must be one of "
              f"{', '.join(compiled.ARCHES)}; got {arch!r}", file=sys.stderr)
        return 2
    unknown = sorted(set(kernels or ()) - set(compiled.kernel_names()))
    if unknown:
        print(f"triton_gelu.autotune --inspect: unknown kernels {unknown}; choose from "
              f"{', '.join(compiled.kernel_names())}", file=sys.stderr)
        return 2
    path = facts.facts_path(arch)
    previous = facts.load_facts(arch) if kernels else None
    start = time.monotonic()
    document = compiled.generate(arch, jobs, kernels, previous,
                                 progress=lambda line: print(line, flush=True))
    document["seconds"] = round(time.monotonic() - start, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1, sort_keys=True) + "\n")
    condemned = sum(facts.condemned(f, arch) for section in document["kernels"].values()
                    for f in section["configs"].values())
    total = sum(len(section["configs"]) for section in document["kernels"].values())
    print(f"wrote {path}: {total} configs, {condemned} condemned (no compile, too much shared "
          f"memory, or spills in the main loop), in {document['seconds']:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from .tuning.cache import cache_dir, clear_cache
    from ._runtime import interpreting, triton_unavailable

    if args.clear:  # needs no Triton
        removed = clear_cache()
        print(f"removed {len(removed)} tuning file(s) from {cache_dir()}")
        return 0
    try:
        _settings.tune_policy()
        decode = _token_counts(args.decode)
        shapes = args.shapes or preset_shapes(_split(args.preset)) + decode_shapes(decode)
        dtypes = [_choose("dtype", name, DTYPES) for name in _split(args.dtypes)]
        approximates = [_choose("approximate", a, ("none", "tanh"))
                        for a in _split(args.approximate)]
    except (argparse.ArgumentTypeError, ValueError) as e:
        print(f"triton_gelu.autotune: {e}", file=sys.stderr)
        return 2

    if args.inspect:
        return _inspect(args.arch, args.jobs, _split(args.kernels) or None)
    why = triton_unavailable()
    if why is None and interpreting():
        why = "TRITON_INTERPRET is set"
    if why is None and not torch.cuda.is_available():
        why = "no CUDA GPU is visible"
    if why is not None:
        print(f"triton_gelu.autotune: {why}; autotuning times the Triton kernels on a GPU, so "
              "there is nothing to tune here.", file=sys.stderr)
        return 2
    from .tuning import chooser as _chooser
    from .tuning import keys as _keys

    device = _keys.device_of(torch.cuda.current_device())
    export = None
    if args.export is not None:
        from .tuning import table as _table

        if device.arch is None or device.arch == "default":
            print(f"triton_gelu.autotune: {device.name} has no architecture table "
                  "(sm90, sm80, sm86, sm89); nothing to export", file=sys.stderr)
            return 2
        arch: str = device.arch
        export = Path(args.export) if args.export else _table.table_path(arch)
        done = set(_table.read_table(export).get("exported", []))
    print(f"tuning on {device.name} ({device.arch}) under the "
          f"{_settings.tune_policy()} policy; cache: {cache_dir()}"
          + (f"; table: {export}" if export else ""))
    problems = _problems(shapes, dtypes, approximates, export is not None and not args.shapes)
    deadline = time.monotonic() + args.budget_s
    remaining = []
    for shape, dtype, approximate in problems:
        label = _label(shape, dtype, approximate)
        if export is not None and label in done:
            print(f"{label}: already in the table")
            continue
        if time.monotonic() >= deadline:
            remaining.append(label)
            continue
        before = _snapshot()
        start = _chooser.tuned_seconds
        _exercise(shape, dtype, approximate)
        torch.cuda.synchronize()
        print(f"{label}: {_chooser.tuned_seconds - start:.1f} s of timing", flush=True)
        for line in _new_choices(before):
            print(line)
        if export is not None:  # after each problem, so a timeout loses only one
            _export_table(export, arch, device.index, [label])
    if export is not None:
        print(f"wrote {export}")
    if remaining:
        print(f"budget reached; {len(remaining)} problem(s) remain: {', '.join(remaining)}; "
              "run the same command again to continue")
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
