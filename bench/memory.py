"""Activation memory without a GPU: the bytes autograd saves for the backward.

``torch.autograd.graph.saved_tensors_hooks`` sees every tensor an autograd node saves during a
forward, on any device, so what a block keeps between forward and backward is exact on the CPU
too. Parameters (and anything else passed in ``exclude``) are not activations and are left out;
a storage saved twice (x saved by two matmuls, a view of x) counts once, at its full size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    storage = t.untyped_storage()
    return (str(t.device), storage.data_ptr())


def saved_activation_bytes(
    fn: Callable[[], object], exclude: Iterable[torch.Tensor] = ()
) -> int:
    """Bytes of the distinct storages autograd saves while ``fn()`` runs, except ``exclude``'s
    (pass the block's parameters). Nothing runs backward; the graph is dropped on return."""
    excluded = {_storage_key(t) for t in exclude}
    saved: dict[tuple[str, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in excluded:
            saved[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(saved.values())
