"""``Tuner``: the choice of one ``@triton.jit`` kernel's launch config per problem key."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
import triton

from .._runtime import record_launch
from .._settings import tune_policy
from .cache import cache_dir
from .chooser import Bench, Chooser, Grid, do_bench
from .keys import Device, device_of, slug, source_hash
from .facts import admissible
from .model import rank_configs
from .spaces import config_id, config_kwargs

# Configs the fast policy times besides the shipped table's: the cost model's best few. A
# memory-bound kernel (no K loop) gets one: its configs differ only in bytes in flight and
# occupancy, which the model knows, so timing a second one buys little.
MODEL_TOP = {"matmul": 2, "memory": 1}


def _top_count(configs: list[triton.Config]) -> int:
    return MODEL_TOP["matmul" if configs and "BLOCK_SIZE_K" in configs[0].kwargs else "memory"]

class Choice(NamedTuple):
    config: triton.Config
    ms: float  # measured when tuned (NaN when nothing was timed here)
    source: str  # "tuned", "cache", "table", "default" or "only" (nothing could be timed)


def config_entry(config: triton.Config, ms: float | None = None) -> dict:
    """A config as a cache or table entry."""
    return {"kwargs": dict(config.kwargs), "num_warps": config.num_warps,
            "num_stages": config.num_stages, "ms": ms}


def entry_config(entry: object) -> triton.Config | None:
    """The config recorded by an entry, or None if the entry is missing or malformed."""
    try:
        return triton.Config(dict(entry["kwargs"]), num_warps=int(entry["num_warps"]),
                             num_stages=int(entry["num_stages"]))
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def _takes(fn: Callable | None, n_args: int) -> bool:
    if fn is None:
        return False
    try:
        inspect.signature(fn).bind(*range(n_args))
        return True
    except (TypeError, ValueError):
        return False


# Every tuner by name, so ``python -m triton_gelu.autotune`` can report what each one chose.
tuners: dict[str, Tuner] = {}


class Tuner(Chooser):
    """Pick, remember and persist the fastest config of ``configs(arch)`` for each problem key.

    ``bench`` times a zero-argument callable and returns milliseconds; the default is
    ``triton.testing.do_bench``. Passing one also enables tuning under the interpreter (tests).
    """

    section = "tuners"

    def __init__(
        self,
        kernel,
        name: str,
        configs: Callable[..., list[triton.Config]],
        prune: Callable[..., list[triton.Config]] | None = None,
        bench: Bench | None = None,
    ) -> None:
        super().__init__(name, bench)
        self.kernel = kernel  # what launches (the benches swap in stand-ins)
        self.jit_kernel = kernel  # which kernel this tuner tunes, for the launchers to tell
        self.configs = configs
        self.prune = prune
        # Older call sites pass configs() and prune(configs, key) without the arch argument.
        self._configs_take_arch = _takes(configs, 1)
        self._prune_takes_arch = _takes(prune, 3)
        # best: (device index, key) -> (meta-parameters, launch kwargs); choices: -> Choice
        tuners[name] = self

    def _compute_hash(self) -> str:
        return source_hash(self.kernel)

    def cache_path(self, device: Device) -> Path:
        version = slug(triton.__version__)
        return cache_dir() / (f"{self.name}.{slug(device.name)}.triton-{version}."
                              f"{self.source_hash[:16]}.json")

    def pruned_space(self, key: tuple, arch: str | None) -> list[triton.Config]:
        """The config space of ``arch``, pruned for ``key``."""
        configs = self.configs(arch) if self._configs_take_arch else self.configs()
        if self.prune is not None:
            pruned = (self.prune(configs, key, arch) if self._prune_takes_arch
                      else self.prune(configs, key))
            configs = pruned or configs[:1]
        return configs

    def candidates(self, key: tuple, arch: str | None) -> list[triton.Config]:
        """The pruned config space of ``arch`` for ``key`` (the space's first config alone when
        nothing can be timed)."""
        if not self.tunes:
            configs = self.configs(arch) if self._configs_take_arch else self.configs()
            return configs[:1]
        return admissible(self.pruned_space(key, arch), self.name, arch)

    def ranked(self, key: tuple, arch: str | None) -> list[triton.Config]:
        """``candidates`` fastest first by the cost model (``model.py``)."""
        return rank_configs(self, self.candidates(key, arch), key, arch)

    # ---- tuning ----

    def _time(self, grid: Grid, config: triton.Config, kwargs: dict) -> float:
        launch = config_kwargs(config)
        bench = self.bench or do_bench
        try:
            return float(bench(lambda: self.kernel[grid(config.kwargs)](**kwargs, **launch)))
        except Exception:  # a config that does not compile or fit on this device
            return math.inf

    def choose(self, slot: tuple, grid: Grid, kwargs: dict) -> Choice:
        """Config for ``slot`` = (device index, key), decided now (see the module docstring)."""
        return self._choose(slot, grid, kwargs)[0]

    def _choose(self, slot: tuple, grid: Grid, kwargs: dict,
                aliased: tuple[str, ...] = ()) -> tuple[Choice, bool]:
        """(choice, final): a choice made under CUDA-graph capture is not final."""
        device = device_of(slot[0])
        key = slot[1]
        candidates = self.candidates(key, device.arch)
        if not self.tunes:
            return Choice(candidates[0], math.nan, "only"), True
        allowed = {config_id(c) for c in candidates}

        def valid(entry: object) -> bool:
            config = entry_config(entry)
            return config is not None and config_id(config) in allowed

        ranked = rank_configs(self, candidates, key, device.arch)

        def tune(seed: dict | None) -> dict | None:
            # full: every candidate; fast: the table's config (or its nearest problem's) and
            # the model's best few others (MODEL_TOP); every candidate where no architecture
            # is known (the interpreter with an injected timer: the model has no figures).
            configs = candidates
            if tune_policy() == "fast" and device.arch is not None:
                first = [] if seed is None else [entry_config(seed)]
                ids = {config_id(c) for c in first}
                configs = first + [c for c in ranked
                                   if config_id(c) not in ids][:_top_count(ranked)]
            # An output that is also an input (in place) is timed into a copy: the kernel must
            # run once, on the real tensors, after the choice.
            timed_kwargs = {**kwargs, **{name: kwargs[name].clone() for name in aliased}}
            times = [self._time(grid, c, timed_kwargs) for c in configs]
            best = min(range(len(configs)), key=times.__getitem__)
            return None if math.isinf(times[best]) else config_entry(configs[best], times[best])

        entry, source, final = self._decide(
            device, key, tune, lambda: config_entry(ranked[0]), valid)
        if entry is None:  # nothing ran: launch the model's best so its error surfaces
            return Choice(ranked[0], math.inf, "tuned"), True
        ms = entry.get("ms")
        return Choice(entry_config(entry), math.nan if ms is None else float(ms), source), final

    def _current_device(self) -> int:
        return -1 if self._interpreted else torch.cuda.current_device()

    def smallest(self, meta: str) -> int:
        """The smallest value of meta-parameter ``meta`` in this tuner's config space on the
        current device: a kernel whose output size depends on its tile (one row of partial sums
        per tile) gets a buffer sized for any config it may be launched with."""
        arch = device_of(self._current_device()).arch
        configs = self.configs(arch) if self._configs_take_arch else self.configs()
        return min(c.kwargs[meta] for c in configs)

    def run(self, grid: Grid, key: tuple, *, aliased: tuple[str, ...] = (), **kwargs) -> dict:
        """Launch the kernel with the tuned config for ``key``; kwargs are the kernel arguments.
        Returns the meta-parameters it launched with.

        Tuning launches the kernel several times on the real arguments, so kernels must be
        idempotent (pure stores, no accumulation into their outputs); an output that aliases an
        input (an in-place launch) is named in ``aliased`` and timed into a copy instead.
        """
        slot = (self._current_device(), key)
        launch = self.best.get(slot)
        if launch is None:
            choice, final = self._choose(slot, grid, kwargs, aliased)
            self.choices[slot] = choice
            launch = (choice.config.kwargs, config_kwargs(choice.config))
            if final:
                self.best[slot] = launch
        record_launch(self.name)
        self.kernel[grid(launch[0])](**kwargs, **launch[1])
        return launch[0]

    def best_meta(self, key: tuple) -> dict | None:
        """The meta-parameters ``key`` launches with on the current device (None while it has
        no final choice): what ``run`` returns."""
        launch = self.best.get((self._current_device(), key))
        return None if launch is None else launch[0]

    def bound(self, grid: Grid, key: tuple, **constants) -> Callable[..., None] | None:
        """The launch of ``key``'s config for one problem, bound: its grid computed and the
        arguments every call of the problem shares (``constants``) merged with the config's, so
        that ``bound(**operands)`` (the rest: pointers, strides) launches as ``run`` would. None
        while ``key`` has no final choice on the current device (``run`` it first). The kernel
        is looked up at each launch (the bench stubs it)."""
        launch = self.best.get((self._current_device(), key))
        if launch is None:
            return None
        grid_size, fixed, name = grid(launch[0]), {**constants, **launch[1]}, self.name

        def run(**operands) -> None:
            record_launch(name)
            self.kernel[grid_size](**operands, **fixed)
        return run
