"""The ops, one module each: ``gelu``, ``linear_gelu``, ``ffn`` (the FFN block), ``geglu``,
``gated_ffn`` (the gated FFN block).

Each module is its op's declaration, in one place:

- its PyTorch custom ops (namespace ``triton_gelu``, what ``torch.compile`` traces and tensor
  parallel runs on the shards) with their fake (meta) functions; each op validates its operands
  (its own checks, built from the shared ones of ``_checks.py``), the launchers below it trust
  them;
- its one autograd definition (``setup_context`` + ``backward``), registered on the custom op
  and made into the eager ``autograd.Function`` (``_core.register_autograd``): eager calls take
  the Function (a custom op's dispatch costs ~10 us more per call), compiled code the op;
- its eager PyTorch twin (the fallback where no Triton kernel can run, and every path forced to
  "torch"): eager PyTorch's own ops under PyTorch's autograd;
- its public function, which validates a problem once and keeps a plan for it (``_plans.py``);
- its DTensor sharding rules (``sharding_rules``, declared in ``_declared.py`` and registered
  by ``_dtensor_rules.py``, which holds the layouts they choose from, on the first DTensor), and
  what its public function runs on DTensors;
- its PyTorch launchers, the fallback's (``@fallback.launcher``: the kernels' launchers' twins,
  for a tensor-parallel shard without Triton).

Beside it: the kernels, their paths and config spaces (``kernels/<op>.py``), the float64 truth
(``reference.py``). A new op is a module here (this package imports every module whose name
does not start with ``_`` and re-exports the custom ops each lists in ``CUSTOM_OPS``) and one in
``kernels/``, and its public name in ``triton_gelu/__init__.py``. Custom ops cannot return None:
an output not asked for is an empty tensor of shape ``(0,)``. Ops::

    gelu_fwd(x, activation) -> y
    gelu_bwd(dy, x, activation) -> dx
    linear_gelu_fwd(x, weight, bias?, activation, save_preact) -> (y, preact | empty)
    linear_preact(x, weight, bias?) -> preact
    linear_gelu_bwd(dy, x, weight, preact, activation, need_dx, need_dw, need_db)
        -> (dx | empty, dw | empty, db | empty)
    geglu_fwd(x, w_gate, w_up, b_gate?, b_up?, activation, save_gate_up)
        -> (h, g | empty, u | empty)
    geglu_gate_up(x, w_gate, w_up, b_gate?, b_up?, p, activation) -> (g, u)
    geglu_bwd(dh, x, w_gate, w_up, g, u, seed?, p, activation, needs[5], write_h,
              col_offset=0, n_cols?=None)
        -> (dx, dw_gate, dw_up, db_gate, db_up, h), each empty when not asked for
    gated_ffn_fwd(x, w_gate, w_up, w_down, b_gate?, b_up?, b_down?, seed?, p, activation,
                  save_gate_up, col_offset=0, n_cols?=None) -> (y, g | empty, u | empty)
    ffn_fwd(x, w1, b1?, w2, b2?, seed?, p, activation, save_preact, col_offset=0,
            n_cols?=None) -> (y, preact | empty)
    ffn_bwd(dy, x, w1, w2, preact, seed?, p, activation, needs[5], col_offset=0,
            n_cols?=None) -> (dx, dw1, db1, dw2, db2), each empty when not needed

``torch.library.custom_op`` (not ``triton_op`` + ``wrap_triton``) because it also traces on the
CPU while the kernels run under the Triton interpreter: Inductor treats each op as an opaque
extern call in both cases.
"""

import importlib
import pkgutil

from ._core import dropout_seed, needs_grad, rows

_OP_MODULES = [importlib.import_module(f"{__name__}.{info.name}")
               for info in sorted(pkgutil.iter_modules(__path__), key=lambda info: info.name)
               if not info.name.startswith("_")]
globals().update({module.__name__.rpartition(".")[2]: module for module in _OP_MODULES})
globals().update({name: getattr(module, name) for module in _OP_MODULES
                  for name in module.CUSTOM_OPS})

__all__ = [*(module.__name__.rpartition(".")[2] for module in _OP_MODULES),
           "dropout_seed", "needs_grad", "rows",
           *(name for module in _OP_MODULES for name in module.CUSTOM_OPS)]
