"""What every chooser (``Tuner``, ``Paths``) shares: memory, disk, table, policy, capture, lock
(steps 2-4 of the package docstring)."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import triton

from .._plans import forget_plans
from .._runtime import capturing, interpreting
from .._settings import tune_policy
from . import table as _table
from .cache import locked, read_entries, write_document
from .keys import Device, key_string

Grid = Callable[[dict], tuple]
Bench = Callable[[Callable[[], None]], float]

# Seconds spent timing candidates in this process (the bench reports it per first call); a
# path's timing includes the Tuners tuning inside it, so only the outermost timing counts.
tuned_seconds = 0.0
_timing_depth = 0


class UntunedWarning(UserWarning):
    """A problem met first while a CUDA graph was being captured ran with an untimed choice."""


def valid_ms(ms: float) -> float | None:
    return None if math.isinf(ms) or math.isnan(ms) else ms


class Chooser:
    """Where a Tuner's or a Paths' choices are remembered, and when it may time.

    Subclasses give ``section`` (their part of the shipped table), ``_compute_hash`` and
    ``cache_path``; ``_decide`` runs steps 2-4 of the module docstring for one problem.
    """

    section = ""

    def __init__(self, name: str, bench: Bench | None) -> None:
        self.name = name
        self.bench = bench
        self._interpreted = interpreting()
        self._source_hash: str | None = None
        self._disk_entries: dict[int, dict[str, dict]] = {}  # device index -> cache entries
        self._warned: set[str] = set()
        # (device index, key) -> what to launch: the hot path's one lookup; and every choice
        # made, with how (the CLI and the bench report them).
        self.best: dict[tuple, object] = {}
        self.choices: dict[tuple, Any] = {}  # -> Choice (Tuner) or PathChoice (Paths)

    @property
    def tunes(self) -> bool:
        """Whether misses may be timed: on a GPU; under the interpreter only with a bench."""
        return self.bench is not None or not self._interpreted

    @property
    def source_hash(self) -> str:
        if self._source_hash is None:
            self._source_hash = self._compute_hash()
        return self._source_hash

    def _compute_hash(self) -> str:
        raise NotImplementedError

    def cache_path(self, device: Device) -> Path:
        raise NotImplementedError

    def forget(self) -> None:
        """Forget what this process chose and read (the files on disk stay), and every plan,
        which may keep a launch of the choices forgotten (``_plans.py``)."""
        forget_plans()
        self._disk_entries.clear()
        self._warned.clear()
        self.best.clear()
        self.choices.clear()

    def _disk(self, device: Device) -> dict[str, dict]:
        entries = self._disk_entries.get(device.index)
        if entries is None:
            entries = self._disk_entries[device.index] = read_entries(self.cache_path(device))
        return entries

    def _table(self, device: Device) -> dict[str, dict]:
        return _table.section_entries(device.arch, self.section, self.name, self.source_hash)

    def _save(self, device: Device, key_text: str, entry: dict) -> None:
        path = self.cache_path(device)
        entries = read_entries(path)  # another process may have added entries meanwhile
        entries[key_text] = entry
        self._disk_entries[device.index] = entries
        write_document(path, {
            "kind": self.section, "name": self.name, "device": device.name, "arch": device.arch,
            "triton": triton.__version__, "torch": torch.__version__,
            "source_hash": self.source_hash, "entries": entries,
        })

    def _warn_untuned(self, key_text: str, source: str) -> None:
        if key_text in self._warned:
            return
        self._warned.add(key_text)
        what = "the shipped table's choice" if source == "table" else "its default"
        warnings.warn(
            f"triton_gelu: {self.name} [{key_text}] was first met during CUDA-graph capture, "
            f"where nothing may be timed; it runs {what}, untuned. Run one step before "
            "capturing (or triton_gelu.autotune.warmup(model, inputs)) to tune it.",
            UntunedWarning, stacklevel=5,
        )

    def _decide(
        self, device: Device, key: tuple,
        tune: Callable[[dict | None], dict | None],
        untuned: Callable[[], dict],
        valid: Callable[[object], bool],
    ) -> tuple[dict | None, str, bool]:
        """(entry, source, final) for ``key``; ``final`` is False for a choice made under capture,
        which a later uncaptured call may time. ``tune(seed)`` times candidates and returns the
        winning entry (None if none ran); ``untuned()`` is the default entry; ``valid(entry)``
        says whether an entry from disk or the table is usable here."""
        global tuned_seconds, _timing_depth
        key_text = key_string(key)
        policy = tune_policy()
        entry = self._disk(device).get(key_text)
        if valid(entry) and (policy != "full" or entry.get("policy", "full") == "full"):
            return entry, "cache", True
        under_capture = capturing()
        if under_capture or policy == "off":
            if valid(entry):
                return entry, "cache", True
            table_entry = self._table(device).get(key_text)
            entry, source = (table_entry, "table") if valid(table_entry) else (untuned(), "default")
            if under_capture:
                self._warn_untuned(key_text, source)
            return entry, source, not under_capture
        path = self.cache_path(device)
        with locked(path):
            self._disk_entries.pop(device.index, None)  # re-read: another process may have tuned
            entry = self._disk(device).get(key_text)
            if valid(entry) and (policy != "full" or entry.get("policy", "full") == "full"):
                return entry, "cache", True
            seed = None
            if policy == "fast":
                table = self._table(device)
                seed = table.get(key_text) if valid(table.get(key_text)) else None
                if seed is None:
                    near = _table.nearest(table, key_text)
                    seed = near if valid(near) else None
            start = time.perf_counter()
            _timing_depth += 1
            try:
                entry = tune(seed)
            finally:
                _timing_depth -= 1
                if _timing_depth == 0:
                    tuned_seconds += time.perf_counter() - start
            if entry is not None:
                entry = {**entry, "policy": policy}
                self._save(device, key_text, entry)
        return entry, "tuned", True


def do_bench(fn: Callable[[], None]) -> float:
    return triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median")
