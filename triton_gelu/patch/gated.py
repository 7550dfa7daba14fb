"""Gated GELU FFN blocks: recognised by their code, swapped whole for a fused block that keeps
their child modules under the same names.

Four shapes of ``forward`` are recognised, whatever the class (Hugging Face's or a copy):

- Gemma 1/2/3's MLP (``GemmaMLP``, ``Gemma2MLP``, ``Gemma3MLP``, and every model that copies it):
  ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``;
- T5 v1.1 / Flan-T5's ``T5DenseGatedActDense``: ``wo(dropout(act(wi_0(x)) * wi_1(x)))``, with
  its cast of the hidden to ``wo``'s dtype when they differ (Flan-T5-XXL keeps ``wo`` in float32);
- LongT5's ``LongT5DenseGatedActDense``: T5's block without the cast;
- T5Gemma's ``T5GemmaMLP``: ``down_proj(dropout(act_fn(gate_proj(x)) * up_proj(x)))``;
- RecurrentGemma's ``RecurrentGemmaMlp``: Gemma's block, the activated gate first kept in a local;
- Gemma3n's ``Gemma3nTextMLP`` on its layers without activation sparsity (the top-k cut of the
  gate on the others is not a GeGLU: those keep their own code).

Proof that a block is one of them: its ``forward`` compiles to the same bytecode as a template
below (instruction for instruction, up to the names of its locals and of the children the
template names by role; every other name, constant and global must be the same), the children
in those roles are plain ``nn.Linear`` (gate and up of one shape and dtype, down reading their
width), a GELU (``match.gelu_form``: SwiGLU's SiLU and other activations are left alone) and,
for T5, a plain ``nn.Dropout`` with p < 1 (``match.dropout_p``); the block has no hooks, no
parameters or buffers of its own and no ``forward`` of its instance. Anything else is left as
it is.

The swap: the block is replaced, in its parent, by a ``GatedGELUBlock`` that registers the very
same child modules under the very same names (so Parameters, optimizers and state-dict keys are
untouched, both ways) and carries the block's plain attributes (``config``, sizes). Its forward
is the fused gated block (``triton_gelu.gated_feed_forward``: one kernel for both projections,
the gate and, in training, T5's dropout, with the dropout module's p and mode read at each call;
the backward keeps x, g, u and the seed, not h or the mask) whenever that computes what the
block's own code would: for T5, when no cast is needed (or autocast is on, where the cast
round-trips). Otherwise it runs the GeGLU kernel, then the block's own dropout, cast and down
projection. The fused dropout draws the FFN block's mask (Philox on the element's position,
seeded from PyTorch's generator), not the one ``nn.Dropout`` would have drawn. If a child has
gained hooks or been replaced by another class since the patch, it runs the block's original
``forward`` (its class is kept) on itself, unfused.

Tensor parallel: a block whose projections PyTorch's styles parallelized the way the fused block
runs (gate and up ``ColwiseParallel``, down ``RowwiseParallel``, on one mesh; or all three
``SequenceParallel``) is swapped too, with gate's input hook and down's output hook moved onto
the fused block (``parallel.move_tp_block_hooks``), which then runs on each rank's shards. A
block whose projections carry other style hooks is left as it is. Parallelizing after the patch:
``triton_gelu.parallel.FeedForwardParallel`` on the fused block.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..ops.gated_ffn import gated_feed_forward
from ..ops.geglu import geglu
from .match import (
    dropout_p, forced_form, form_arguments, gelu_form, has_hooks, linear_kind,
    parallel_block_style, tp_hooks_module,
)
from .template import match_template

ROLES = ("gate", "up", "act", "dropout", "down")


# ---- the templates: the forwards we recognise, written with role names --------------------------


def _gemma_mlp(self, x):
    down_proj = self.down(self.act(self.gate(x)) * self.up(x))
    return down_proj


def _gemma_mlp_returned(self, x):
    return self.down(self.act(self.gate(x)) * self.up(x))


def _t5_dense_gated_act_dense(self, hidden_states):
    hidden_gelu = self.act(self.gate(hidden_states))
    hidden_linear = self.up(hidden_states)
    hidden_states = hidden_gelu * hidden_linear
    hidden_states = self.dropout(hidden_states)
    # The cast T5 makes when wo is kept in another dtype (int8 quantised weights excepted).
    if (
        isinstance(self.down.weight, torch.Tensor)
        and hidden_states.dtype != self.down.weight.dtype
        and self.down.weight.dtype != torch.int8
    ):
        hidden_states = hidden_states.to(self.down.weight.dtype)
    hidden_states = self.down(hidden_states)
    return hidden_states


def _longt5_dense_gated_act_dense(self, hidden_states):
    # LongT5DenseGatedActDense: T5's block without the cast to wo's dtype.
    hidden_gelu = self.act(self.gate(hidden_states))
    hidden_linear = self.up(hidden_states)
    hidden_states = hidden_gelu * hidden_linear
    hidden_states = self.dropout(hidden_states)
    hidden_states = self.down(hidden_states)
    return hidden_states


def _t5gemma_mlp(self, x):
    # T5GemmaMLP: Gemma's MLP with a dropout on the gated hidden.
    hidden_states = self.act(self.gate(x)) * self.up(x)
    hidden_states = self.dropout(hidden_states)
    down_proj = self.down(hidden_states)
    return down_proj


def _gate_then_down(self, x):
    # RecurrentGemma's MLP: Gemma's, the activated gate kept in a local first.
    gate = self.act(self.gate(x))
    return self.down(gate * self.up(x))


def _sparse_gate(self, x):
    # Gemma3n's text MLP: Gemma's block, with a top-k cut of the gate on the layers whose
    # activation_sparsity is above 0 (those are not fused, and a fused one whose sparsity is set
    # later runs this code).
    gate_proj = self.gate(x)
    if self.activation_sparsity > 0.0:
        gate_proj = self._gaussian_topk(gate_proj)
    activations = self.act(gate_proj)
    up_proj = self.up(x)
    down_proj = self.down(activations * up_proj)
    return down_proj


# (template, whether it casts to down's dtype); Any: mypy sees a def as a Callable, not the
# FunctionType it is.
_TEMPLATES: tuple[tuple[Any, bool], ...] = (
    (_gemma_mlp, False), (_gemma_mlp_returned, False), (_t5_dense_gated_act_dense, True),
    (_longt5_dense_gated_act_dense, False), (_t5gemma_mlp, False), (_gate_then_down, False),
    (_sparse_gate, False),
)

# ---- what a block must hold ---------------------------------------------------------------------


@dataclass(frozen=True)
class GatedSpec:
    """A recognised gated GELU block: its child names by role, GELU form and T5's cast."""

    roles: dict[str, str]
    form: str
    casts_to_down_dtype: bool
    sparse_gate: bool = False  # Gemma3n: the block's own code wherever activation_sparsity > 0


def gated_spec(block: nn.Module) -> GatedSpec | None:
    """How ``block`` is a gated GELU FFN block we can fuse, or None when that is not proven."""
    if isinstance(block, GatedGELUBlock) or has_hooks(block) or "forward" in vars(block):
        return None
    if block._parameters or block._buffers:
        return None
    forward = type(block).forward
    for template, casts in _TEMPLATES:
        roles = match_template(forward, template, ROLES)
        if roles is not None:
            break
    else:
        return None
    children = {role: block._modules.get(name) for role, name in roles.items()}
    gate, up, down = children["gate"], children["up"], children["down"]
    if not (isinstance(gate, nn.Linear) and isinstance(up, nn.Linear)
            and isinstance(down, nn.Linear)):
        return None
    if not all(linear_kind(m) == "linear" for m in (gate, up, down)):
        return None
    if gate.weight.shape != up.weight.shape or gate.weight.dtype != up.weight.dtype or \
            down.in_features != gate.out_features:
        return None
    if not casts and down.weight.dtype != gate.weight.dtype:
        return None  # the block's own code would fail outside autocast; not ours to change
    act = children["act"]  # a module without state or hooks (gelu_form checks), never a function
    form = gelu_form(act) if isinstance(act, nn.Module) else None
    if form is None:
        return None
    if "dropout" in children and dropout_p(children["dropout"]) is None:
        return None
    sparse_gate = template is _sparse_gate
    if sparse_gate and _sparsity(block) != 0.0:
        return None  # the top-k cut is not a GeGLU: this layer keeps its own code
    return GatedSpec(roles, form, casts, sparse_gate)


def _sparsity(block: nn.Module) -> float | None:
    """Gemma3n's ``activation_sparsity`` of ``block`` (None: not a number)."""
    value = getattr(block, "activation_sparsity", None)
    return None if isinstance(value, bool) or not isinstance(value, (int, float)) else value


# ---- the fused block ------------------------------------------------------------------------------


class GatedGELUBlock(nn.Module):
    """A gated GELU FFN block of a model, fused: the same children under the same names, and a
    forward through ``triton_gelu.gated_feed_forward`` (see the module docstring)."""

    def __init__(self, block: nn.Module, spec: GatedSpec, approximate: str = "tanh",
                 recompute: bool = False, *, activation: str | None = None) -> None:
        super().__init__()
        for name, child in block._modules.items():  # the same order: the same state dict
            self.add_module(name, child)
        for name, value in vars(block).items():  # config, hidden_size, ...: plain attributes
            if not name.startswith("_") and name != "training":
                setattr(self, name, value)
        self.training = block.training  # not .train(): the children keep their own modes
        self.original_class = type(block)
        self.approximate = approximate
        self.activation = activation  # None: the form approximate names
        self.recompute = recompute
        self._spec = spec
        self._proven_types = self._child_types()
        if spec.sparse_gate:  # the block's own code calls its top-k cut as a method of self
            self._gaussian_topk = types.MethodType(self.original_class._gaussian_topk, self)

    def _child_types(self) -> tuple[type, ...]:
        return tuple(type(self.get_submodule(name)) for name in self._spec.roles.values())

    def _still_proven(self) -> bool:
        # A child swapped for another class (a parametrization, a quantised Linear) or given
        # hooks (FSDP, a user's) since the patch: run the block's own code, which calls each.
        return self._child_types() == self._proven_types and not any(
            has_hooks(self.get_submodule(name)) for name in self._spec.roles.values())

    def _role(self, role: str) -> Any:
        # nn.Linear / nn.Dropout by the patch's proof and _still_proven
        return self.get_submodule(self._spec.roles[role])

    def projections(self) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        """The (gate, up, down) projections, whatever the block names them."""
        return self._role("gate"), self._role("up"), self._role("down")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._still_proven() or (self._spec.sparse_gate and _sparsity(self) != 0.0):
            return self.original_class.forward(self, x)
        gate, up, down = self._role("gate"), self._role("up"), self._role("down")
        dropout = self._role("dropout") if "dropout" in self._spec.roles else None
        if not self._needs_cast(x, down):
            p, training = ((dropout.p, dropout.training) if isinstance(dropout, nn.Dropout)
                           else (0.0, False))
            return gated_feed_forward(x, gate.weight, up.weight, down.weight, gate.bias,
                                      up.bias, down.bias, self.approximate, dropout=p,
                                      training=training, recompute=self.recompute,
                                      activation=self.activation)
        hidden = geglu(x, gate.weight, up.weight, gate.bias, up.bias, self.approximate,
                       self.recompute, activation=self.activation)
        if dropout is not None:
            hidden = dropout(hidden)
        if self._spec.casts_to_down_dtype and hidden.dtype != down.weight.dtype:
            hidden = hidden.to(down.weight.dtype)
        return down(hidden)

    def _needs_cast(self, x: torch.Tensor, down: nn.Linear) -> bool:
        """Whether T5's cast of the hidden to down's dtype changes what down computes. Under
        autocast a float32 down weight does not: down's input is cast back to the autocast
        dtype, and the round trip through float32 is exact."""
        if not self._spec.casts_to_down_dtype:
            return False
        device = x.device.type
        if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
            hidden_dtype = torch.get_autocast_dtype(device)
            return down.weight.dtype not in (hidden_dtype, torch.float32)
        return x.dtype != down.weight.dtype

    def extra_repr(self) -> str:
        cls = self.original_class
        return (f"replaces={cls.__module__}.{cls.__qualname__}, approximate={self.approximate!r}, "
                f"recompute={self.recompute}"
                + ("" if self.activation is None else f", activation={self.activation!r}"))


def patch_gated(model: nn.Module, approximate: str | None, recompute: bool = False) -> int:
    """Swap every provable gated GELU block below ``model`` for a ``GatedGELUBlock`` (keeping
    x alone for the backward with ``recompute``); return how many blocks were swapped (a block
    shared by several parents is swapped once, and the same replacement put in each).
    ``model`` itself is not swapped: it has no parent."""
    swapped: dict[int, GatedGELUBlock] = {}
    for parent in list(model.modules()):
        for name, block in list(parent._modules.items()):
            if block is None:
                continue
            fused = swapped.get(id(block))
            if fused is None:
                spec = gated_spec(block)
                if spec is None:
                    continue
                form = forced_form(spec.form, approximate)
                fused = _swap(block, spec, form, recompute)
                if fused is None:
                    continue
                swapped[id(block)] = fused
            setattr(parent, name, fused)
    return len(swapped)


def _swap(block: nn.Module, spec: GatedSpec, form: str, recompute: bool) -> GatedGELUBlock | None:
    """The fused block for ``block``; when its projections carry the hooks of PyTorch's
    tensor-parallel styles (the only hooks ``gated_spec`` lets through), only if they make a
    plan the fused block serves (``parallel.tp_block_style``), whose input and output hooks then
    move onto the fused block. None: left as it is."""
    fused = GatedGELUBlock(block, spec, recompute=recompute, **form_arguments(form))
    gate, up, down = fused.projections()
    if not any(has_hooks(m) for m in (gate, up, down)):
        return fused
    if parallel_block_style([gate, up], down) is None:
        return None
    tp_hooks_module().move_tp_block_hooks([gate, up], down, fused)
    return fused
