"""Moved to ``triton_gelu/tuning/`` (one module per job: spaces, keys, chooser, tuner, paths).

Kept only so that code written against the old flat module (branches in flight) still imports:
every name resolves to the tuning module that now holds it. New code imports from ``tuning``.
"""

from __future__ import annotations

import importlib

_MODULES = ("spaces", "keys", "chooser", "tuner", "paths", "cache")
_RENAMED = {"_key_itemsize": "key_itemsize", "_config_id": "config_id",
            "_entry_config": "entry_config", "_valid_ms": "valid_ms", "_slug": "slug",
            "_Chooser": "Chooser", "_do_bench": "do_bench"}


def __getattr__(name: str):
    wanted = _RENAMED.get(name, name)
    for module in _MODULES:
        found = importlib.import_module(f"triton_gelu.tuning.{module}")
        if hasattr(found, wanted):
            return getattr(found, wanted)
    raise AttributeError(f"module 'triton_gelu._autotune' has no attribute {name!r}")
