"""Hugging Face FFN modules whose ``forward`` is not a plain chain of children, proven by their
code and fused eagerly.

Each recogniser compares the module's class ``forward`` with a template below, instruction for
instruction (``gated.match_template``: up to the names of locals and of the children named by
role; every other name, constant and global must be the same, or pass the global's rule), then
checks the children in those roles (``match``: plain ``nn.Linear``, a GELU, a plain Dropout).
The module must have no hooks, no parameters or buffers of its own and no ``forward`` of its
instance. What is fused:

- StarCoder2's ``Starcoder2MLP``: ``c_fc -> act -> c_proj`` then
  ``F.dropout(p=self.residual_dropout, training=self.training)``: the three children become one
  ``feed_forward`` call (``ffn.py``'s slots: ``FusedFeedForward`` in ``c_fc``, ``nn.Identity`` in
  ``act``, ``FeedForwardOutput`` in ``c_proj``); the trailing dropout is the block's own code,
  untouched;
- DistilBERT's ``FFN``: ``apply_chunking_to_forward(self.ff_chunk, ...)`` (transformers'
  function, by its module and name) over ``ff_chunk``, a plain chain ``lin1 -> activation -> lin2
  -> dropout`` read by ``chain.call_chain``: the chain is fused as above; chunking along the
  sequence changes nothing for a per-token block;
- ESM's ``EsmIntermediate``: ``dense`` then the module-level ``gelu()`` of the ESM file, itself
  proven to be ``x * 0.5 * (1 + erf(x / sqrt 2))`` by its code: ``dense`` becomes a
  ``LinearGELU`` (the erf form) holding the same parameters, and the module is swapped for an
  ``EsmFusedIntermediate`` holding that child under the same name.
- ModernBERT's ``ModernBertMLP``: ``Wo(drop(act(input) * gate))`` with ``input, gate =
  Wi(x).chunk(2, dim=-1)``: swapped for a ``PackedGatedGELUBlock`` (the gated block on ``Wi``'s
  two row halves; its dropout fused, drawing our mask).
- Funnel's ``FunnelPositionwiseFFN``: ``linear_1 -> act -> activation_dropout -> linear_2`` fused
  as StarCoder2's chain; its trailing ``dropout`` and ``layer_norm(hidden + h)`` stay its own code.
- BLOOM's ``BloomMLP``: ``dropout_add(dense_4h_to_h(gelu_impl(dense_h_to_4h(x))), residual,
  hidden_dropout, training)``, with ``dropout_add`` (dropout, then the residual added) and
  ``gelu_impl`` (``BloomGelu``: an autograd Function whose forward is the tanh form) proven by
  their code: swapped for a ``DropoutAddFeedForward`` (``feed_forward`` on the two Linears, the
  model's own ``dropout_add`` after it). Its ``pretraining_tp > 1`` with ``slow_but_exact``
  branch (the down projection summed slice by slice, pretraining's order) runs BLOOM's own
  forward, as does a child hooked or swapped after the patch. The backward is the exact
  derivative of that forward (BLOOM's own backward is the same derivative, rounded otherwise).

The state dict keeps its keys and values (the same ``nn.Parameter`` objects).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..modules import LinearGELU
from .chain import call_chain
from .ffn import fuse_feed_forwards
from ..ops.ffn import feed_forward
from ..ops.gated_ffn import gated_feed_forward
from .match import dropout_p, forced_form, form_arguments, gelu_form, has_hooks, linear_kind
from .template import match_template

_LINEAR_ROLES = ("linear1", "act", "linear2", "dense", "packed", "dropout")


# ---- the templates ------------------------------------------------------------------------------


def _starcoder2_mlp(self, hidden_states):
    hidden_states = self.linear1(hidden_states)
    hidden_states = self.act(hidden_states)
    hidden_states = self.linear2(hidden_states)
    hidden_states = nn.functional.dropout(
        hidden_states, p=self.residual_dropout, training=self.training)
    return hidden_states


def _erf_gelu(x):
    return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _is_erf_gelu(fn: object) -> bool:
    return match_template(fn, _erf_gelu, roles_named=()) == {}


def _linear_then_gelu_function(self, hidden_states):
    hidden_states = self.dense(hidden_states)
    hidden_states = gelu(hidden_states)  # noqa: F821  (the model file's global, by its rule)
    return hidden_states


def _residual_norm_ffn(self, hidden):
    # Funnel's FunnelPositionwiseFFN: the chain, its own dropout, then layer_norm(x + h).
    h = self.linear1(hidden)
    h = self.act(h)
    h = self.act_dropout(h)
    h = self.linear2(h)
    h = self.dropout(h)
    return self.layer_norm(hidden + h)


def _chunked_forward(self, input):
    return apply_chunking_to_forward(self.ff_chunk, self.chunk_size_feed_forward,  # noqa: F821
                                     self.seq_len_dim, input)


def _is_apply_chunking(fn: object) -> bool:
    # transformers.pytorch_utils.apply_chunking_to_forward: forward_fn on each chunk of the
    # inputs along chunk_dim (or on the whole when chunk_size is 0): a per-token FFN computes
    # the same either way.
    return (getattr(fn, "__module__", None) == "transformers.pytorch_utils"
            and getattr(fn, "__qualname__", None) == "apply_chunking_to_forward")


def _packed_gated(self, hidden_states):
    input, gate = self.packed(hidden_states).chunk(2, dim=-1)
    return self.linear2(self.dropout(self.act(input) * gate))


def _residual_mlp(self, hidden_states, residual):
    hidden_states = self.act(self.linear1(hidden_states))
    if self.pretraining_tp > 1 and self.slow_but_exact:
        intermediate_output = torch.zeros_like(residual)
        slices = self.linear2.weight.shape[-1] / self.pretraining_tp
        for i in range(self.pretraining_tp):
            intermediate_output = intermediate_output + F.linear(
                hidden_states[:, :, int(i * slices) : int((i + 1) * slices)],
                self.linear2.weight[:, int(i * slices) : int((i + 1) * slices)],
            )
    else:
        intermediate_output = self.linear2(hidden_states)
    output = dropout_add(intermediate_output, residual, self.hidden_dropout,  # noqa: F821
                         self.training)
    return output


def _dropout_then_add(x, residual, prob, training):
    out = F.dropout(x, p=prob, training=training)
    out = residual + out
    return out


def _is_dropout_add(fn: object) -> bool:
    return match_template(fn, _dropout_then_add) == {}


def _tanh_gelu_literal(x):
    return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


def _apply_function(self, x):
    return GeLUFunction.apply(x)  # noqa: F821  (the model file's global, by its rule)


def _saves_input_returns_tanh_gelu(ctx, input):
    ctx.save_for_backward(input)
    return bloom_gelu_forward(input)  # noqa: F821  (the model file's global, by its rule)


def _is_tanh_gelu_function(cls: object) -> bool:
    """An autograd Function whose forward keeps its input and returns the tanh form of GELU
    (written out with sqrt(2 / pi) as 0.79788456: 1e-9 off, far below float32's rounding)."""
    forward = vars(cls).get("forward") if isinstance(cls, type) and \
        issubclass(cls, torch.autograd.Function) else None
    forward = getattr(forward, "__func__", forward)
    return match_template(forward, _saves_input_returns_tanh_gelu, (), {
        "bloom_gelu_forward": lambda fn: match_template(fn, _tanh_gelu_literal) == {}}) == {}


def _is_tanh_gelu_module(act: object) -> bool:
    """A module (no state, no hooks) whose forward applies such an autograd Function."""
    return isinstance(act, nn.Module) and not act._modules and _plain_container(act) and \
        match_template(type(act).forward, _apply_function, (),
                       {"GeLUFunction": _is_tanh_gelu_function}) == {}


def _plain_container(module: nn.Module) -> bool:
    return not (has_hooks(module) or "forward" in vars(module) or module._parameters
                or module._buffers)


# ---- StarCoder2 -----------------------------------------------------------------------------------


def fuse_starcoder2(module: nn.Module, approximate: str | None, recompute: bool) -> int:
    if not _plain_container(module):
        return 0
    roles = match_template(type(module).forward, _starcoder2_mlp, _LINEAR_ROLES)
    if roles is None:
        return 0
    chain = [roles["linear1"], roles["act"], roles["linear2"]]
    if len(set(chain)) != 3 or not all(name in module._modules for name in chain):
        return 0
    # fuse_feed_forwards proves the children (plain Linears, a GELU, matching widths).
    return fuse_feed_forwards(module, chain, approximate, recompute)


# ---- Funnel ---------------------------------------------------------------------------------------


def fuse_residual_norm(module: nn.Module, approximate: str | None, recompute: bool) -> int:
    """Funnel's ``FunnelPositionwiseFFN``: ``linear_1 -> act -> activation_dropout -> linear_2``
    fused as StarCoder2's chain is; the trailing ``dropout`` and ``layer_norm(hidden + h)`` are
    the block's own code, untouched."""
    if not _plain_container(module):
        return 0
    roles = match_template(type(module).forward, _residual_norm_ffn,
                           ("linear1", "act", "act_dropout", "linear2"))
    if roles is None:
        return 0
    chain = [roles["linear1"], roles["act"], roles["act_dropout"], roles["linear2"]]
    if len(set(chain)) != 4 or not all(name in module._modules for name in chain):
        return 0
    return fuse_feed_forwards(module, chain, approximate, recompute)


# ---- DistilBERT -----------------------------------------------------------------------------------


def fuse_chunked(module: nn.Module, approximate: str | None, recompute: bool) -> int:
    """DistilBERT's ``FFN``: ``forward`` hands ``ff_chunk`` to ``apply_chunking_to_forward``, and
    ``ff_chunk`` is a plain chain of children (``chain.call_chain``: lin1, act, lin2, dropout)."""
    if not _plain_container(module) or "ff_chunk" in vars(module):
        return 0
    if match_template(type(module).forward, _chunked_forward, (),
                      {"apply_chunking_to_forward": _is_apply_chunking}) != {}:
        return 0
    chain = call_chain(getattr(type(module), "ff_chunk", None))
    if chain is None:
        return 0
    return fuse_feed_forwards(module, chain, approximate, recompute)


# ---- ESM -------------------------------------------------------------------------------------------


class EsmFusedIntermediate(nn.Module):
    """ESM's ``EsmIntermediate`` fused: its ``dense`` child is a ``LinearGELU`` (erf form) with the
    same parameters under the same names."""

    def __init__(self, block: nn.Module, dense: LinearGELU) -> None:
        super().__init__()
        for name, child in block._modules.items():
            self.add_module(name, dense if child is block._modules["dense"] else child)
        self.training = block.training
        self.original_class = type(block)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dense(hidden_states)

    def extra_repr(self) -> str:
        cls = self.original_class
        return f"replaces={cls.__module__}.{cls.__qualname__}"


def esm_intermediate(block: nn.Module, approximate: str | None,
                     recompute: bool) -> EsmFusedIntermediate | None:
    """The fused replacement of ``block`` when it is proven ESM's intermediate, else None."""
    if isinstance(block, EsmFusedIntermediate) or not _plain_container(block):
        return None
    roles = match_template(type(block).forward, _linear_then_gelu_function, _LINEAR_ROLES,
                           {"gelu": _is_erf_gelu})
    if roles is None or set(block._modules) != {roles["dense"]}:
        return None
    dense = block._modules[roles["dense"]]
    if linear_kind(dense) != "linear" or not isinstance(dense, nn.Linear) or has_hooks(dense):
        return None
    form = "none" if approximate is None else approximate
    fused = LinearGELU.from_linear(dense, approximate=form, recompute=recompute)
    fused.train(dense.training)
    return EsmFusedIntermediate(block, fused)


# ---- ModernBERT ------------------------------------------------------------------------------------


class _TwinBlock(nn.Module):
    """A model's block swapped for its fused twin: the same children and plain attributes under
    the same names (the same state dict), the children's roles as the proof found them, the
    GELU form and ``recompute``. ``proven()`` is False once a child has been hooked or swapped
    for another class after the patch: the twin then runs the block's own ``forward``."""

    def __init__(self, block: nn.Module, roles: dict[str, str], form: str,
                 recompute: bool) -> None:
        super().__init__()
        for name, child in block._modules.items():
            self.add_module(name, child)
        for name, value in vars(block).items():
            if not name.startswith("_") and name != "training":
                setattr(self, name, value)
        self.training = block.training
        self.original_class = type(block)
        self.roles, self.form, self.recompute = roles, form, recompute
        self._types = self._child_types()

    def _child_types(self) -> tuple[type, ...]:
        return tuple(type(self._modules[name]) for name in self.roles.values())

    def children_by_role(self) -> dict[str, nn.Module]:
        return {role: self._modules[name] for role, name in self.roles.items()}

    def proven(self) -> bool:
        return self._child_types() == self._types and not any(
            has_hooks(m) for m in self.children_by_role().values())

    def extra_repr(self) -> str:
        cls = self.original_class
        return f"replaces={cls.__module__}.{cls.__qualname__}, form={self.form!r}"


class PackedGatedGELUBlock(_TwinBlock):
    """ModernBERT's ``ModernBertMLP`` fused: ``Wo(drop(act(a) * b))`` with ``a, b`` the two halves
    of ``Wi``'s output, as one ``gated_feed_forward`` call on the two row halves of ``Wi``'s
    weight (views: gradients reach ``Wi.weight`` itself). The dropout module's p and mode are
    read at each call and draw our mask."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not self.proven():
            return self.original_class.forward(self, hidden_states)
        children = self.children_by_role()
        packed, down, dropout = children["packed"], children["linear2"], children["dropout"]
        half = packed.weight.shape[0] // 2
        bias = packed.bias
        return gated_feed_forward(
            hidden_states, packed.weight[:half], packed.weight[half:], down.weight,
            None if bias is None else bias[:half], None if bias is None else bias[half:],
            down.bias, dropout=dropout.p, training=dropout.training, recompute=self.recompute,
            **form_arguments(self.form))


def packed_gated(block: nn.Module, approximate: str | None,
                 recompute: bool) -> PackedGatedGELUBlock | None:
    if isinstance(block, PackedGatedGELUBlock) or not _plain_container(block):
        return None
    roles = match_template(type(block).forward, _packed_gated, _LINEAR_ROLES)
    if roles is None or len(set(roles.values())) != 4:
        return None
    packed, down = block._modules.get(roles["packed"]), block._modules.get(roles["linear2"])
    act, dropout = block._modules.get(roles["act"]), block._modules.get(roles["dropout"])
    if not (isinstance(packed, nn.Linear) and isinstance(down, nn.Linear)
            and linear_kind(packed) == "linear" and linear_kind(down) == "linear"):
        return None
    if has_hooks(packed) or has_hooks(down) or not isinstance(dropout, nn.Dropout) \
            or dropout_p(dropout) is None:
        return None
    rows = packed.weight.shape[0]
    if rows % 2 or down.in_features != rows // 2 or \
            packed.weight.dtype != down.weight.dtype or packed.weight.device != down.weight.device:
        return None
    form = gelu_form(act) if isinstance(act, nn.Module) else None
    if form is None:
        return None
    return PackedGatedGELUBlock(block, roles, forced_form(form, approximate), recompute)


# ---- BLOOM -------------------------------------------------------------------------------------


class DropoutAddFeedForward(_TwinBlock):
    """BLOOM's ``BloomMLP`` fused: ``dropout_add(feed_forward(x, ...), residual, p, training)``,
    ``feed_forward`` on the block's two Linears and ``dropout_add`` the model's own (proven).
    ``pretraining_tp > 1`` with ``slow_but_exact`` runs the block's own ``forward``."""

    def __init__(self, block: nn.Module, roles: dict[str, str], form: str, recompute: bool,
                 dropout_add) -> None:
        super().__init__(block, roles, form, recompute)
        self.dropout_add = dropout_add

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        if (self.pretraining_tp > 1 and self.slow_but_exact) or not self.proven():
            return self.original_class.forward(self, hidden_states, residual)
        children = self.children_by_role()
        up, down = children["linear1"], children["linear2"]
        out = feed_forward(hidden_states, up.weight, up.bias, down.weight, down.bias,
                           recompute=self.recompute, **form_arguments(self.form))
        return self.dropout_add(out, residual, self.hidden_dropout, self.training)


def dropout_add_block(block: nn.Module, approximate: str | None,
                      recompute: bool) -> DropoutAddFeedForward | None:
    """The fused replacement of ``block`` when it is proven BLOOM's MLP, else None."""
    if isinstance(block, DropoutAddFeedForward) or not _plain_container(block):
        return None
    roles = match_template(type(block).forward, _residual_mlp, _LINEAR_ROLES,
                           {"dropout_add": _is_dropout_add})
    if roles is None or len(set(roles.values())) != 3 or set(block._modules) != set(roles.values()):
        return None
    up, down = block._modules[roles["linear1"]], block._modules[roles["linear2"]]
    if not all(isinstance(m, nn.Linear) and linear_kind(m) == "linear" and not has_hooks(m)
               for m in (up, down)):
        return None
    if up.out_features != down.in_features or up.weight.dtype != down.weight.dtype \
            or up.weight.device != down.weight.device:
        return None
    if not _is_tanh_gelu_module(block._modules[roles["act"]]):
        return None
    p = getattr(block, "hidden_dropout", None)
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        return None
    dropout_add = type(block).forward.__globals__["dropout_add"]
    return DropoutAddFeedForward(block, roles, forced_form("tanh", approximate), recompute,
                                 dropout_add)


def patch_families(model: nn.Module, approximate: str | None, recompute: bool) -> int:
    """Fuse every proven module of the families above below ``model``; return how many."""
    count = 0
    swapped: dict[int, nn.Module] = {}
    for parent in list(model.modules()):
        count += fuse_starcoder2(parent, approximate, recompute)
        count += fuse_chunked(parent, approximate, recompute)
        count += fuse_residual_norm(parent, approximate, recompute)
        for name, block in list(parent._modules.items()):
            if block is None:
                continue
            fused = swapped.get(id(block))
            if fused is None:
                fused = esm_intermediate(block, approximate, recompute) \
                    or packed_gated(block, approximate, recompute) \
                    or dropout_add_block(block, approximate, recompute)
                if fused is None:
                    continue
                swapped[id(block)] = fused
                count += 1
            setattr(parent, name, fused)
    return count
