"""Benchmarks of triton_gelu against PyTorch: ``python -m bench`` (see ``__main__.py``).

One module per op, ``ops_<op>.py``, found by ``op_modules``: each declares its ``NAME`` and
``ORDER``, its timed ``cases`` and correctness ``checks`` (``harness.py`` runs them), the
calls the machine-independent benchmarks make: ``host_entries`` (``host.py``: every public
function and module of the op against eager PyTorch) and ``first_calls`` (``cold_start.py``),
and a GPU's first run of its public ops, ``first_contact`` (``first_contact.py``; each a
``contact.Contact``). A new op is one more such module.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType


def op_modules() -> list[ModuleType]:
    """Every ``bench/ops_<op>.py``, imported, in their ``ORDER``."""
    found = [importlib.import_module(f"{__name__}.{info.name}")
             for info in pkgutil.iter_modules(__path__) if info.name.startswith("ops_")]
    return sorted(found, key=lambda module: module.ORDER)
