"""``Paths``: the choice between the named ways of computing one op, per problem key."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import torch
import triton

from .._runtime import path_runs
from .._settings import PATH_ENV, forced_path, tune_policy
from .cache import cache_dir
from .chooser import Bench, Chooser, do_bench, valid_ms
from .keys import Device, device_of, slug, source_hash
from .model import paths_worth_timing
from .tuner import Tuner, tuners

class PathChoice(NamedTuple):
    path: str
    ms: float  # the winner's time when timed (NaN when nothing was timed here)
    candidates: dict[str, float | None]  # every path timed -> ms (None: it failed)
    source: str  # "tuned", "cache", "table", "default", "only" or "forced"


# Every op with paths by name, for the CLI, the exporter and the tests.
path_choosers: dict[str, Paths] = {}
_recorders: list[list[tuple[str, PathChoice]]] = []


@contextlib.contextmanager
def recording_paths() -> Iterator[list[tuple[str, PathChoice]]]:
    """Collect (op, choice) for every path run inside the block (the bench's "path" column)."""
    seen: list[tuple[str, PathChoice]] = []
    _recorders.append(seen)
    try:
        yield seen
    finally:
        _recorders.remove(seen)


def _callable_text(fn: Callable) -> str:
    """The source of a path callable, for the cache key (its qualified name if it has none);
    never a repr, which could hold a memory address."""
    fn = inspect.unwrap(fn)
    if isinstance(fn, functools.partial):
        return _callable_text(fn.func)
    try:
        return inspect.getsource(fn)
    except (OSError, TypeError):
        return f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', type(fn).__name__)}"


PathName = str | Callable[[tuple], str]


class Paths(Chooser):
    """The named ways to compute one op, and the choice between them per problem key.

    ``paths`` maps a name to a callable; every callable takes the op's arguments and returns the
    op's outputs as new tensors (never writing into its inputs), with results within the suite's
    tolerance rules, so any of them may serve any call.

    - ``default``: the path where nothing can be timed and nothing is known: under the Triton
      interpreter (so the test suite runs the kernels) and, unless ``untuned`` says otherwise,
      on a GPU under the ``off`` policy or CUDA-graph capture;
    - ``untuned``: the path on a GPU for a problem that may not be timed (policy ``off``,
      capture) and has no cached or shipped choice; the safe one, e.g. cuBLAS + our GELU;
    - both may be a name or a function of the key returning one; the arguments below are
      optional and keyword-only;
    - ``applies``: {name: predicate(*args, **kwargs)}: a path whose predicate is false is not a
      candidate for that problem (e.g. cuBLASLt's GELU epilogue only has the tanh form); it is
      asked on a miss only, so it must depend on nothing but the key and the device;
    - ``kernels``: the Tuners (or ``@triton.jit`` kernels) the paths launch; the cache and the
      table are keyed on their source hashes and the paths' own source. Default: every Tuner
      registered when the op first tunes (safe: any kernel edit retunes the choice);
    - ``bench``: a timing function (tests), as for ``Tuner``.

    A path forced with ``$TRITON_GELU_PATH`` or ``triton_gelu.autotune.force_path``
    (``_settings.py``) always wins where it applies (where it does not, a warning says so once
    and the op chooses as usual).
    """

    section = "paths"

    def __init__(
        self, op: str, paths: dict[str, Callable], default: PathName, *,
        untuned: PathName | None = None,
        applies: dict[str, Callable[..., bool]] | None = None,
        kernels: Iterable | None = None,
        bench: Bench | None = None,
    ) -> None:
        super().__init__(op, bench)
        for what, name in (("default", default), ("untuned", untuned)):
            if isinstance(name, str) and name not in paths:
                raise ValueError(f"{what} path {name!r} of {op} is not one of {list(paths)}")
        unknown = set(applies or ()) - set(paths)
        if unknown:
            raise ValueError(f"applies names unknown paths of {op}: {sorted(unknown)}")
        self.op = op
        self.paths = paths
        self.default = default
        self.untuned = default if untuned is None else untuned
        self.applies = dict(applies or {})
        self.kernels = None if kernels is None else list(kernels)
        # best: (device index, key) -> path name; choices: -> PathChoice
        self._forced_warned: set[str] = set()
        path_choosers[op] = self

    def _compute_hash(self) -> str:
        digest = hashlib.sha256(self.op.encode())
        for name, fn in self.paths.items():
            digest.update(f"\0{name}\0{_callable_text(fn)}".encode())
        kernels = self.kernels if self.kernels is not None else list(tuners.values())
        for kernel in sorted(kernels, key=lambda k: getattr(k, "name", "")):
            digest.update((kernel.source_hash if isinstance(kernel, Tuner)
                           else source_hash(kernel)).encode())
        return digest.hexdigest()

    def cache_path(self, device: Device) -> Path:
        versions = f"triton-{slug(triton.__version__)}.torch-{slug(torch.__version__)}"
        return cache_dir() / f"paths.{self.op}.{slug(device.name)}.{versions}." \
                             f"{self.source_hash[:16]}.json"

    def applicable(self, args: tuple, kwargs: dict) -> list[str]:
        """The paths that can compute this call, in registration order."""
        return [name for name in self.paths
                if name not in self.applies or self.applies[name](*args, **kwargs)]

    @staticmethod
    def _name(spec: PathName, key: tuple, names: list[str]) -> str:
        name = spec(key) if callable(spec) else spec
        return name if name in names else names[0]

    def _device_index(self, args: tuple) -> int:
        if self._interpreted:
            return -1
        tensor = next((a for a in args if isinstance(a, torch.Tensor)), None)
        return -1 if tensor is None else tensor.get_device()  # -1 on the CPU

    def _time(self, names: list[str], args: tuple, kwargs: dict) -> dict | None:
        bench = self.bench or do_bench
        times = {}
        for name in names:
            def call(fn=self.paths[name]):
                return fn(*args, **kwargs)
            try:
                call()  # warm-up: compiles, and lets the Tuners inside the path tune first
                times[name] = float(bench(call))
            except Exception:  # a path that cannot run this problem on this device
                times[name] = math.inf
        best = min(names, key=times.__getitem__)
        if math.isinf(times[best]):
            return None
        return {"path": best, "ms": times[best],
                "candidates": {name: valid_ms(ms) for name, ms in times.items()}}

    def _choose(self, slot: tuple, args: tuple, kwargs: dict) -> tuple[PathChoice, bool]:
        key = slot[1]
        names = self.applicable(args, kwargs)
        if len(names) == 1:
            return PathChoice(names[0], math.nan, {}, "only"), True
        if not self.tunes:
            return PathChoice(self._name(self.default, key, names), math.nan, {}, "default"), True

        def valid(entry: object) -> bool:
            return isinstance(entry, dict) and entry.get("path") in names

        device = device_of(slot[0])

        def tune(seed: dict | None) -> dict | None:
            # fast: the paths the cost model shows cannot win here are not timed
            timed = names if tune_policy() != "fast" else paths_worth_timing(
                self.op, names, key, device.arch, tuners)
            return self._time(timed, args, kwargs)

        entry, source, final = self._decide(
            device, key, tune,
            lambda: {"path": self._name(self.untuned, key, names), "ms": None, "candidates": {}},
            valid)
        if entry is None:  # no path ran: take the default, so its error surfaces
            return PathChoice(self._name(self.default, key, names), math.inf, {}, "tuned"), True
        ms = entry.get("ms")
        return PathChoice(entry["path"], math.nan if ms is None else float(ms),
                          dict(entry.get("candidates", {})), source), final

    def choose(self, key: tuple, args: tuple, kwargs: dict) -> str:
        """The path for ``key`` and these arguments: forced, remembered, or decided now."""
        return self._resolve(key, args, kwargs)[0]

    def _forced(self, forced: str, args: tuple, kwargs: dict) -> str | None:
        if forced not in self.paths:
            raise ValueError(
                f"{PATH_ENV} / force_path asks {self.op} for path {forced!r}; "
                f"its paths are {', '.join(self.paths)}"
            )
        if forced in self.applies and not self.applies[forced](*args, **kwargs):
            if forced not in self._forced_warned:
                self._forced_warned.add(forced)
                warnings.warn(f"triton_gelu: path {forced!r} of {self.op} is forced but does not "
                              "apply to this problem; choosing as usual", stacklevel=5)
            return None
        return forced

    def _resolve(self, key: tuple, args: tuple, kwargs: dict) -> tuple[str, PathChoice | None]:
        forced = forced_path(self.op)
        if forced is not None and self._forced(forced, args, kwargs) is not None:
            return forced, PathChoice(forced, math.nan, {}, "forced")
        slot = (self._device_index(args), key)
        name = self.best.get(slot)
        if name is not None:
            return name, None
        choice, final = self._choose(slot, args, kwargs)
        self.choices[slot] = choice
        if final:
            self.best[slot] = choice.path
        return choice.path, choice

    def settled(self, key: tuple, args: tuple, kwargs: dict | None = None) -> str | None:
        """The path every later call of ``key`` will run, when that is settled (forced, or a
        final choice: the problem ran once) and no ``recording_paths`` block is open; else
        None. A plan that binds it runs it by ``runner``, or counts its runs with ``counted``."""
        if _recorders:
            return None
        forced = forced_path(self.op)
        if forced is not None:
            return self._forced(forced, args, kwargs or {})
        return self.best.get((self._device_index(args), key))

    def runner(self, name: str, fixed: tuple = (), kwargs: dict | None = None) -> Callable:
        """Path ``name`` (a ``settled`` one) as a callable of the call's leading positional
        arguments, run with ``fixed`` after them and ``kwargs``, counted as ``run`` counts it:
        no key, no choice."""
        kwargs = kwargs or {}
        fn, count = self.paths[name], self.counted(name)

        def run(*tensors):
            count()
            return fn(*tensors, *fixed, **kwargs)
        return run

    def counted(self, name: str) -> Callable[[], None]:
        """What ``run`` counts of a run of path ``name``, for a plan that runs it directly."""
        slot = (self.op, name)

        def count() -> None:
            path_runs[slot] += 1
        return count

    def run(self, key: tuple, *args, **kwargs):
        """Compute the op by the path chosen for ``key``."""
        name, choice = self._resolve(key, args, kwargs)
        path_runs[(self.op, name)] += 1
        if _recorders:
            if choice is None:
                choice = self.choices.get((self._device_index(args), key))
            for seen in _recorders:
                seen.append((self.op, choice or PathChoice(name, math.nan, {}, "cache")))
        return self.paths[name](*args, **kwargs)
