"""``triton_gelu.compile_backend``: a ``torch.compile`` backend that fuses GELU feed-forwards
written anywhere, inline in a layer's ``forward`` included, then compiles with Inductor.

    model = torch.compile(model, backend=triton_gelu.compile_backend)

Dynamo hands the backend the traced FX graph of torch-level calls (modules inlined, before
AOTAutograd). There the backend finds, per ``torch._C._nn.linear`` node z = x W^T + b whose only
users are an activation of the table (``activations.py``):

- ``torch._C._nn.gelu(z)`` / ``F.gelu(z, approximate=...)``: the erf and tanh forms;
- ``z * torch.sigmoid(1.702 * z)``: quick_gelu (Hugging Face's ``QuickGELUActivation``, CLIP);

and rewrites

- Linear -> activation -> [``F.dropout(p, training)``] -> Linear (each link the previous one's
  only user, the dropout's p and mode constants of the trace) into one ``feed_forward`` of the
  custom ops (``ops/``: the same op, numerics and saved tensors as ``patch()``'s fused block;
  a dropout in training draws the kernels' mask from a seed drawn in the graph, not PyTorch's
  dropout's; in eval it is nothing, as ``nn.Dropout``'s; a p that Dynamo made a graph input
  (it does for a float attribute that changed between compiles) leaves the dropout and the
  second Linear unfused);
- any other Linear -> activation into one ``linear_gelu``.

Everything else (the residual around the block, attention, norms) is left to Inductor, which
compiles the rewritten graph (``compile_fx``) with our ops as opaque calls. Never rewritten: a
pre-activation with another user, an activation the table does not hold (SiLU, ReLU, formulas
such as ``gelu_new`` written out in ``tanh`` ops), operands of mixed or unsupported dtypes, and
any graph traced under autocast (our ops take one dtype; Inductor keeps the graph as traced).
``history`` lists what each compiled graph had rewritten.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx

from . import ops
from ._checks import FLOAT_DTYPES
from .activations import BY_APPROXIMATE
from .ops import dropout_seed

_LINEAR = (torch._C._nn.linear, F.linear)
_GELU = (torch._C._nn.gelu, F.gelu)
_MUL = (operator.mul, torch.mul)
_SIGMOID = (torch.sigmoid, torch.nn.functional.sigmoid)
_DROPOUT = (F.dropout,)

history: list[list[str]] = []  # per compiled graph: "feed_forward(quick_gelu)", ...


def compile_backend(gm: fx.GraphModule, example_inputs: list) -> object:
    """``torch.compile(model, backend=triton_gelu.compile_backend)``: fuse the graph's GELU
    feed-forwards into our ops (see the module docstring), then compile it with Inductor."""
    from torch._inductor.compile_fx import compile_fx

    history.append(rewrite_graph(gm))
    return compile_fx(gm, example_inputs)


def _linear_act(x, weight, bias, activation: str):
    return ops.linear_gelu.traced(x, weight, bias, activation, False)


def _feed_forward(x, w1, b1, w2, b2, p: float, activation: str):
    seed = dropout_seed(x.device) if p > 0.0 else None
    return ops.ffn.traced(x, w1, b1, w2, b2, seed, p, activation, False)


def _linear_args(node: fx.Node) -> tuple | None:
    """(x, weight, bias) of a linear node, None when it is not one."""
    if node.op != "call_function" or node.target not in _LINEAR:
        return None
    args = list(node.args) + [None] * (3 - len(node.args))
    x, weight, bias = args[:3]
    weight = node.kwargs.get("weight", weight)
    bias = node.kwargs.get("bias", bias)
    return x, weight, bias


def _is_call(node: object, targets: tuple, method: str | None = None) -> bool:
    return isinstance(node, fx.Node) and (
        (node.op == "call_function" and node.target in targets)
        or (method is not None and node.op == "call_method" and node.target == method))


def _activation(z: fx.Node) -> tuple[str, fx.Node, list[fx.Node]] | None:
    """(form, output node, the activation's nodes) when z's users are exactly one activation."""
    users = list(z.users)
    if len(users) == 1 and _is_call(users[0], _GELU) and users[0].args[0] is z:
        act = users[0]
        approximate = act.kwargs.get("approximate", act.args[1] if len(act.args) > 1 else "none")
        form = BY_APPROXIMATE.get(approximate)
        return None if form is None else (form, act, [act])
    if len(users) != 2:
        return None
    for scale in users:  # z * sigmoid(1.702 * z), the products in either order
        if _is_call(scale, _MUL) and set(scale.args) == {z, 1.702} and len(scale.users) == 1:
            sig = next(iter(scale.users))
            if not (_is_call(sig, _SIGMOID, "sigmoid") and len(sig.users) == 1):
                continue
            out = next(iter(sig.users))
            if _is_call(out, _MUL) and set(out.args) == {z, sig} and set(users) == {scale, out}:
                return "quick_gelu", out, [scale, sig, out]
    return None


def _dtype_ok(*nodes: object) -> bool:
    """All given tensors (by their traced example values) of one supported float dtype."""
    dtypes = set()
    for node in nodes:
        if node is None:
            continue
        value = node.meta.get("example_value") if isinstance(node, fx.Node) else None
        if not isinstance(value, torch.Tensor):
            return False
        dtypes.add(value.dtype)
    return len(dtypes) == 1 and dtypes.pop() in FLOAT_DTYPES


def rewrite_graph(gm: fx.GraphModule) -> list[str]:
    """Rewrite ``gm``'s GELU feed-forwards and Linear -> GELU pairs in place; return what was
    rewritten, one entry per pattern."""
    if torch.is_autocast_enabled() or torch.is_autocast_enabled("cpu"):
        return []
    graph, done, erased = gm.graph, [], set()
    for z in list(graph.nodes):
        if z in erased or (first := _linear_args(z)) is None:
            continue
        found = _activation(z)
        if found is None or not _dtype_ok(*first):
            continue
        form, act_out, act_nodes = found
        chain, p, tail = [], 0.0, act_out
        users = list(act_out.users)
        if len(users) == 1 and _is_call(users[0], _DROPOUT) and users[0].args[0] is act_out:
            drop = users[0]
            p = drop.kwargs.get("p", drop.args[1] if len(drop.args) > 1 else 0.5)
            training = drop.kwargs.get("training", drop.args[2] if len(drop.args) > 2 else True)
            if isinstance(p, (int, float)) and isinstance(training, bool) and 0.0 <= p < 1.0 \
                    and len(drop.users) == 1:
                chain, tail, p = [drop], drop, (float(p) if training else 0.0)
                users = list(drop.users)
        second = _linear_args(users[0]) if len(users) == 1 else None
        if second is not None and second[0] is tail and _dtype_ok(first[0], *second[1:]):
            last = users[0]
            with graph.inserting_before(last):
                new = graph.call_function(_feed_forward, (*first, *second[1:], p, form))
            last.replace_all_uses_with(new)
            dead = [last, *reversed(chain), *reversed(act_nodes), z]
            done.append(f"feed_forward({form})")
        else:
            with graph.inserting_before(act_out):
                new = graph.call_function(_linear_act, (*first, form))
            act_out.replace_all_uses_with(new)
            dead = [*reversed(act_nodes), z]
            done.append(f"linear_gelu({form})")
        if "example_value" in dead[0].meta:  # what the replaced output traced as
            new.meta["example_value"] = dead[0].meta["example_value"]
        for node in dead:
            graph.erase_node(node)
            erased.add(node)
    if done:
        graph.lint()
        gm.recompile()
    return done
