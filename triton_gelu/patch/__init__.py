"""Model patching: swap every whole FFN block (Linear -> GELU -> [Dropout] -> Linear) and every
other Linear followed by GELU that is provably such a chain for the fused kernels, in place.

``patch(model)`` looks at every submodule and finds the order in which it applies its children:

- ``nn.Sequential`` (and subclasses that keep its ``forward``): its children, in order;
- any other module whose ``forward`` is a plain chain ``x = self.a(x); x = self.b(x); ...;
  return x`` (or the nested ``self.b(self.a(x))``, or a mix): the chain is read off the bytecode of
  ``forward`` and only accepted when it is nothing else. This covers the common PyTorch
  FeedForward (``linear1 -> activation -> dropout -> linear2``) and the Hugging Face transformers
  FFN blocks: ``BertIntermediate`` / ``RobertaIntermediate`` / ``ViTIntermediate`` (``dense ->
  intermediate_act_fn``), ``ViTMLP`` / ``CLIPMLP``-style (``fc1 -> activation_fn -> fc2``) and
  ``GPT2MLP`` (``c_fc -> act -> c_proj -> dropout``);
- ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer``: the chain of ``_ff_block``.

Where the chain holds Linear -> GELU -> [Dropout] -> Linear, the whole block becomes one
``feed_forward`` call (``ffn.py``: ``FusedFeedForward`` in the first Linear's slot,
``FeedForwardOutput`` keeping the second Linear's parameters in its slot). Elsewhere, where the
chain holds a Linear directly followed by a GELU, and each is used once in it, the
Linear becomes a ``LinearGELU`` holding the very same parameters (same names in the state dict)
and the GELU becomes ``nn.Identity()``. GPT-2's ``Conv1D`` (weight stored as (in, out)) becomes a
``Conv1DGELU`` that keeps that parameter and passes its transposed view to the kernel, which
takes strides.

Gated GELU blocks (Gemma's MLP, T5's DenseGatedActDense: ``down(gelu(gate(x)) * up(x))``) are
recognised by ``gated.py`` and swapped whole for a fused block holding the same children
(also LongT5's block and T5Gemma's MLP). StarCoder2's MLP (a chain, then a dropout in its code)
and ESM's intermediate (a Linear, then the model file's own erf ``gelu()``) are proven by their
code in ``families.py``.

A model already tensor-parallelized with PyTorch's styles: a column-parallel Linear -> GELU pair
is fused with the Linear's hooks carried over, and a whole block whose Linears are column- then
row-parallel (or all sequence-parallel) is fused with its first input and last output hooks
moved onto the fused block (``triton_gelu.parallel``).

The package's rooms: ``chain.py`` reads which children a module applies in which order,
``match.py`` says what is a Linear, a GELU and a Dropout, ``fuse.py`` makes the pair swap,
``ffn.py`` the block swap, ``gated.py`` the gated blocks.
transformers is never imported: its classes are recognised by module path and name.
"""

from __future__ import annotations

from torch import nn

from ..activations import resolve
from .chain import application_chain, call_chain
from .ffn import FeedForwardOutput, FusedFeedForward, fuse_feed_forwards
from .families import (
    DropoutAddFeedForward, EsmFusedIntermediate, PackedGatedGELUBlock, patch_families,
)
from .fuse import Conv1DGELU, fuse_pair
from .gated import GatedGELUBlock, patch_gated
from .match import gelu_form

__all__ = ["patch", "gelu_form", "call_chain", "Conv1DGELU", "FusedFeedForward",
           "FeedForwardOutput", "GatedGELUBlock", "EsmFusedIntermediate",
           "PackedGatedGELUBlock", "DropoutAddFeedForward"]


def patch(model: nn.Module, approximate: str | None = None, recompute: bool = False) -> int:
    """Replace, in place, every whole FFN block (Linear -> GELU -> [Dropout] -> Linear) in
    ``model`` by one fused ``feed_forward`` call, every other Linear followed by GELU by the
    fused ``LinearGELU``, and every gated GELU block (Gemma, T5 v1.1) by a fused
    ``GatedGELUBlock``, where each provably is such a chain; return how many blocks and pairs
    were replaced.

    ``approximate=None`` keeps each block's own GELU form; ``"none"`` or ``"tanh"`` forces one.
    ``recompute=True`` makes every fused block and pair keep less for the backward (x alone:
    the pre-activation is recomputed). Parameters are kept (the same ``nn.Parameter`` objects
    under the same state-dict names), so optimizers, tied weights and ``state_dict`` save/load
    keep working. Patching twice is a no-op.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if approximate is not None:
        resolve(approximate)
    count = 0
    seen: set[int] = set()
    for module in list(model.modules()):  # a snapshot: the new modules are not visited
        if id(module) in seen:
            continue
        seen.add(id(module))
        chain = application_chain(module)
        if chain is None:
            continue
        count += fuse_feed_forwards(module, chain, approximate, recompute)
        for linear_name, act_name in zip(chain, chain[1:]):
            if chain.count(linear_name) != 1 or chain.count(act_name) != 1:
                continue  # a child used twice: swapping it would change the other use
            count += fuse_pair(module, linear_name, act_name, approximate, recompute)
    count += patch_families(model, approximate, recompute)
    return count + patch_gated(model, approximate, recompute)
