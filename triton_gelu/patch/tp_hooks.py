"""Recognising the hooks a PyTorch tensor-parallel style installed, for ``patch()``.

``tp_style(module)`` recognises the hooks a PyTorch style installed (through
``distribute_module``), so ``patch()`` can fuse a column-parallel Linear and carry its hooks over
to the fused module (``copy_tp_hooks``), and ``tp_block_style`` a whole block parallelized with
PyTorch's styles on its Linears (column then row, or sequence-parallel), whose first input hook
and last output hook ``move_tp_block_hooks`` moves onto the fused block; user hooks are still
refused. Imported by ``patch`` only when a module holds DTensor parameters (it imports
``torch.distributed``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from torch import nn
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.parallel import style as _style

# The functions PyTorch's styles hand to distribute_module as input_fn / output_fn (our styles
# hand the same ones).
_STYLE_FUNCTIONS = {
    _style.ColwiseParallel._prepare_input_fn: "colwise",
    _style.ColwiseParallel._prepare_output_fn: "colwise",
    _style.RowwiseParallel._prepare_input_fn: "rowwise",
    _style.RowwiseParallel._prepare_output_fn: "rowwise",
    _style.SequenceParallel._prepare_input_fn: "sequence",
    _style.SequenceParallel._prepare_output_fn: "sequence",
}


def _style_partial(hook: object) -> functools.partial | None:
    """The style function ``hook`` applies, with its layouts bound: the function itself (a
    partial of it), or distribute_module's wrapper around it (a closure holding that partial)."""
    candidates = [hook]
    if getattr(hook, "__qualname__", "").startswith("distribute_module."):
        candidates += [cell.cell_contents for cell in getattr(hook, "__closure__", None) or ()]
    for fn in candidates:
        if isinstance(fn, functools.partial) and fn.func in _STYLE_FUNCTIONS:
            return fn
    return None


def _style_hooks(module: nn.Module) -> tuple[functools.partial, functools.partial] | None:
    """The (input, output) style functions of ``module``'s hooks when they are exactly the two
    hooks one PyTorch tensor-parallel style installed on it; None when it has any other hook
    (a user's, a backward hook, a hook taking kwargs), or none."""
    pre, post = module._forward_pre_hooks, module._forward_hooks
    if module._backward_hooks or module._backward_pre_hooks or len(pre) != 1 or len(post) != 1:
        return None
    special = (module._forward_pre_hooks_with_kwargs, module._forward_hooks_with_kwargs,
               getattr(module, "_forward_hooks_always_called", {}))
    if any(key in table for table in special for key in (*pre, *post)):
        return None
    fns = (_style_partial(next(iter(pre.values()))), _style_partial(next(iter(post.values()))))
    if fns[0] is None or fns[1] is None or \
            _STYLE_FUNCTIONS[fns[0].func] != _STYLE_FUNCTIONS[fns[1].func]:
        return None
    return fns[0], fns[1]


def tp_style(module: nn.Module) -> str | None:
    """``"colwise"``, ``"rowwise"`` or ``"sequence"`` when ``module``'s hooks are exactly the
    input and output hooks one PyTorch tensor-parallel style installed on it; None when it has
    any other hook (a user's, a backward hook, a hook taking kwargs), or none."""
    fns = _style_hooks(module)
    return None if fns is None else _STYLE_FUNCTIONS[fns[0].func]


def copy_tp_hooks(source: nn.Module, target: nn.Module) -> None:
    """Register ``source``'s style hooks (checked by ``tp_style``) on ``target``, in order."""
    for hook in source._forward_pre_hooks.values():
        target.register_forward_pre_hook(hook)
    for hook in source._forward_hooks.values():
        target.register_forward_hook(hook)
    setattr(target, "_distribute_module_applied", True)  # noqa: B010 (as distribute_module marks)


def _mesh_of(module: nn.Module) -> object:
    meshes = {p.device_mesh for p in module.parameters(recurse=False) if isinstance(p, DTensor)}
    return meshes.pop() if len(meshes) == 1 else None


def tp_block_style(first: Sequence[nn.Module], last: nn.Module) -> str | None:
    """How PyTorch's styles parallelized a block's Linears, when it is a way the fused block
    serves: ``"tensor"`` when each of ``first`` is column-parallel (output Shard(-1), all taking
    the same input layouts) and ``last`` row-parallel (input Shard(-1)): between them the hidden
    activation is each rank's columns, which the fused block keeps; ``"sequence"`` when all are
    sequence-parallel on one sequence dimension. All on one mesh; None otherwise."""
    found = [_style_hooks(m) for m in (*first, last)]
    hooks = [h for h in found if h is not None]
    if len(hooks) != len(found) or len({_mesh_of(m) for m in (*first, last)}) != 1 \
            or _mesh_of(last) is None:
        return None
    kinds = [_STYLE_FUNCTIONS[h[0].func] for h in hooks]
    first_inputs = {h[0].args for h in hooks[:-1]}
    if len(first_inputs) != 1:
        return None
    if kinds == ["colwise"] * len(first) + ["rowwise"]:
        hidden_out = {h[1].args[0] for h in hooks[:-1]}  # the first ones' output layouts
        return "tensor" if hidden_out == {(Shard(-1),)} and \
            hooks[-1][0].args[0] == (Shard(-1),) else None  # the last one's input layouts
    if kinds == ["sequence"] * (len(first) + 1):
        return "sequence" if len({h[0].args for h in hooks}) == 1 else None
    return None


def move_tp_block_hooks(first: Sequence[nn.Module], last: nn.Module, block: nn.Module) -> None:
    """For a block ``tp_block_style`` accepts: register the input hook of ``first[0]`` and the
    output hook of ``last`` on ``block`` (the hidden activation's hooks between them are no-ops
    for the fused block, which keeps each rank's hidden columns or rows), and remove the style
    hooks from every one of them (they stay the block's children, applied by it)."""
    block.register_forward_pre_hook(next(iter(first[0]._forward_pre_hooks.values())))
    block.register_forward_hook(next(iter(last._forward_hooks.values())))
    for module in (*first, last):
        module._forward_pre_hooks.clear()
        module._forward_hooks.clear()
    setattr(block, "_distribute_module_applied", True)  # noqa: B010 (as distribute_module marks)
