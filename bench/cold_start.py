"""What a first call of a new problem compiles, on any machine: ``python -m bench --cold-start``.

The real Tuners and Paths choose exactly as on a GPU of the architecture asked for (sm90, sm80):
the device they see is that architecture, every timing is a fake (1 ms: the first candidate wins,
the shipped table's or else the cost model's best), and no kernel runs. Each op's forward and
backward run once on ``meta`` tensors of a bench preset's size (no memory, no arithmetic), with
the kernels replaced by recorders, so a "compile" is a distinct (kernel, config) a first call
would hand Triton: the figure that makes a cold first call cost seconds or minutes.

One record per op, problem, architecture and policy::

    {"op", "problem", "arch", "policy", "configs_compiled", "paths_timed",
     "chosen": [{"kernel", "config", "regs", "spills", "spills_in_loop", "smem"}]}

plus ``{"op": "export", "arch", "configs_compiled"}``: what ``python -m triton_gelu.autotune
--export`` (every bench preset, the default policy) compiles. ``regs`` and the rest come from the
compile facts (``triton_gelu/tuning/facts/<arch>.json``; None where a config has none).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU tensors take the kernels' launchers

import torch  # noqa: E402

ARCHES = ("sm90", "sm80")
POLICIES = ("fast", "off", "full")
# Each bench preset's first layer (tokens x d_model -> d_ff), as the bench times it.
TOKENS = 8192
PRESETS = {"bert-base": (768, 3072), "bert-large": (1024, 4096), "gpt2-xl": (1600, 6400),
           "llama-7b": (4096, 11008)}


class _Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](**kwargs)`` records the config."""

    def __init__(self, name: str, seen: set) -> None:
        self.name, self.seen = name, seen

    def __getitem__(self, grid) -> Callable[..., None]:
        def launch(**kwargs) -> None:
            meta = {k: v for k, v in kwargs.items()
                    if k.isupper() or k in ("num_warps", "num_stages")}
            self.seen.add((self.name, tuple(sorted(meta.items()))))
        return launch


@contextlib.contextmanager
def replaying(arch: str, policy: str) -> Iterator[dict]:
    """Every Tuner and Paths of the package chooses as on an ``arch`` GPU under ``policy``, with
    fake timings, recorders for kernels and a fresh temporary cache; yields the record being
    filled ({"compiled": set of (kernel, config), "paths_timed": count})."""
    import tempfile

    import triton_gelu.kernels  # noqa: F401 (registers every Tuner and Paths)
    from triton_gelu.autotune import policy as use_policy
    from triton_gelu.tuning import keys
    from triton_gelu.tuning.paths import path_choosers
    from triton_gelu.tuning.tuner import tuners

    state = {"compiled": set(), "paths_timed": 0}

    def kernel_timer(fn) -> float:
        fn()
        return 1.0

    def path_timer(fn) -> float:
        state["paths_timed"] += 1
        return 1.0

    saved = []
    for chooser in [*tuners.values(), *path_choosers.values()]:
        chooser.source_hash  # noqa: B018 (hashed from the real kernel before it is replaced)
    for chooser in [*tuners.values(), *path_choosers.values()]:
        saved.append((chooser, chooser.bench, getattr(chooser, "kernel", None)))
        chooser.forget()
        if chooser in tuners.values():
            chooser.bench = kernel_timer
            chooser.kernel = _Recorder(chooser.name, state["compiled"])
        else:
            chooser.bench = path_timer
    device = keys._devices.get(-1)
    keys._devices[-1] = keys.Device(-1, f"modelled {arch}", arch)
    old_cache = os.environ.get("TRITON_GELU_CACHE_DIR")
    with tempfile.TemporaryDirectory() as cache, use_policy(policy):
        os.environ["TRITON_GELU_CACHE_DIR"] = cache
        try:
            yield state
        finally:
            if device is None:
                keys._devices.pop(-1, None)
            else:
                keys._devices[-1] = device
            for chooser, bench, kernel in saved:
                chooser.forget()
                chooser.bench = bench
                if kernel is not None:
                    chooser.kernel = kernel
            if old_cache is None:
                os.environ.pop("TRITON_GELU_CACHE_DIR", None)
            else:
                os.environ["TRITON_GELU_CACHE_DIR"] = old_cache


def _meta(*shape: int, grad: bool = True) -> torch.Tensor:
    return torch.empty(*shape, dtype=torch.bfloat16).requires_grad_(grad)


def _ops(m: int, k: int, n: int) -> dict[str, Callable[[], torch.Tensor]]:
    """op label -> a first call (forward; the caller runs its backward) at (m, k) -> n, as each
    op's bench module declares them (``first_calls``)."""
    from bench import op_modules

    return {label: call for op in op_modules()
            for label, call in op.first_calls(_meta, m, k, n).items()}


def op_names() -> list[str]:
    """The public ops whose first calls are measured, in order."""
    return list(dict.fromkeys(label.split()[0] for label in _ops(0, 0, 0)))


def _first_call(fn: Callable[[], torch.Tensor]) -> None:
    import warnings

    with warnings.catch_warnings():  # an aliasing check reads fake data pointers: harmless
        warnings.simplefilter("ignore", UserWarning)
        out = fn()
        out.backward(torch.empty_like(out))


@contextlib.contextmanager
def _no_data() -> Iterator[None]:
    """CPU tensors without storage or arithmetic (torch's fake tensors, as torch.compile traces
    with): a preset-sized matmul costs nothing."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        yield


def _chosen(arch: str, compiled: set) -> list[dict]:
    """The config each Tuner chose, with its compile facts."""
    import triton

    from triton_gelu.tuning import facts
    from triton_gelu.tuning.tuner import tuners

    rows = []
    for name, tuner in sorted(tuners.items()):
        for choice in tuner.choices.values():
            config = choice.config
            fact = facts.facts_of(arch, name, config) or {}
            rows.append({"kernel": name,
                         "config": facts.config_text(config.kwargs, config.num_warps,
                                                     config.num_stages),
                         **{f: fact.get(f) for f in ("regs", "spills", "spills_in_loop",
                                                     "smem")}})
    del triton
    return rows


def records(arches=ARCHES, policies=POLICIES, presets=tuple(PRESETS), ops=None) -> list[dict]:
    """Every record (see the module docstring)."""
    out = []
    for arch in arches:
        for policy in policies:
            for preset in presets:
                k, n = PRESETS[preset]
                for op in _ops(0, 0, 0):
                    if ops is not None and op.split()[0] not in ops:
                        continue
                    with replaying(arch, policy) as state, _no_data():
                        _first_call(_ops(TOKENS, k, n)[op])
                        chosen = _chosen(arch, state["compiled"])
                    out.append({"op": op.split()[0], "problem": f"{preset} {TOKENS}x{k}x{n}"
                                + (" p=0.1" if "p=" in op else ""), "arch": arch,
                                "policy": policy, "configs_compiled": len(state["compiled"]),
                                "paths_timed": state["paths_timed"], "chosen": chosen})
        # --export: every preset, one process (what one compile serves twice is compiled
        # once), forward and backward of every op, under the default policy.
        if ops is None:
            with replaying(arch, "fast") as state, _no_data():
                for preset in presets:
                    k, n = PRESETS[preset]
                    for fn in _ops(TOKENS, k, n).values():
                        _first_call(fn)
            out.append({"op": "export", "arch": arch,
                        "configs_compiled": len(state["compiled"])})
    return out


def table(rows: list[dict]) -> str:
    lines = [f"{'op':<20} {'problem':<30} {'arch':<5} {'policy':<6} {'compiled':>8} "
             f"{'paths':>5}  spills in a chosen main loop"]
    for r in rows:
        if r["op"] == "export":
            lines.append(f"{'export':<20} {'every bench preset':<30} {r['arch']:<5} {'fast':<6} "
                         f"{r['configs_compiled']:>8}")
            continue
        spilling = [c["kernel"] for c in r["chosen"] if c["spills_in_loop"]]
        lines.append(f"{r['op']:<20} {r['problem']:<30} {r['arch']:<5} {r['policy']:<6} "
                     f"{r['configs_compiled']:>8} {r['paths_timed']:>5}  "
                     f"{', '.join(spilling) or '-'}")
    return "\n".join(lines)
