"""The Triton kernels and their host launchers. Importing this package imports Triton.

One module per op (``gelu.py``, ``linear_gelu.py``, ``ffn.py``, ``geglu.py``; the modules whose
names start with ``_`` are what they share), each listing in its ``__all__`` its launchers and
their per-problem launches; this package imports every op module and re-exports those names, so
a new op's module needs no line here.

Each launcher allocates its outputs and launches its kernels, trusting its operands (the public
functions and the custom ops validated them); the launchers here and in
``triton_gelu.fallback`` (PyTorch, no Triton) take the same arguments and return the same
things, and ``triton_gelu._backend.launchers(tensor)`` picks one of the two. The ``*_launch``
functions bind a launcher to one problem for the plans (``ops/``): the launch with its path,
config, grid and constant arguments kept.
"""

import importlib
import pkgutil

_OP_MODULES = [importlib.import_module(f"{__name__}.{info.name}")
               for info in sorted(pkgutil.iter_modules(__path__), key=lambda info: info.name)
               if not info.name.startswith("_")]
for _module in _OP_MODULES:
    globals().update({name: getattr(_module, name) for name in _module.__all__})

# The launchers (the per-problem launches are re-exported too, outside __all__).
__all__ = sorted(name for module in _OP_MODULES for name in module.__all__
                 if not name.endswith("_launch"))
