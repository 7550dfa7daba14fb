"""What every op's declaration uses: the custom-op conventions, the one autograd definition made
into an eager ``autograd.Function``, the per-problem plans, autocast, DTensor detection, dropout.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch.compiler import is_compiling

from .._plans import plans
from .._runtime import autocast_available_by_name, path_runs, runs_triton
from .._settings import paths_counted, plan_context, tune_policy
from ..activations import ACTIVATIONS

Tensor = torch.Tensor


# ---- custom-op conventions ------------------------------------------------------------------


def new_like(t: Tensor, shape: tuple[int, ...] | None = None) -> Tensor:
    """A new contiguous tensor of t's dtype and device, of t's shape or ``shape``. (Cheapest
    ways to allocate on the host: ``torch.empty`` parses a ``torch.Size`` ~0.5 us slower.)"""
    if shape is None:
        return torch.empty_like(t, memory_format=torch.contiguous_format)
    return t.new_empty(shape)


def rows(t: Tensor) -> Tensor:
    """(..., n) -> (rows, n): ``t`` itself when 2-D (a reshape would cost a view, and under
    autograd a node, for nothing), a view when the leading dimensions collapse, else a copy."""
    if t.dim() == 2:
        return t
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def linear_out_shape(x: Tensor, weight: Tensor) -> tuple[int, ...]:
    return (*x.shape[:-1], weight.shape[0])


def absent(t: Tensor) -> Tensor:
    """The stand-in for an output that was not asked for (custom ops cannot return None)."""
    return torch.empty((0,), dtype=t.dtype, device=t.device)


def or_absent(t: Tensor | None, like: Tensor) -> Tensor:
    return t if t is not None else absent(like)


def needs_grad(*tensors: Tensor | None) -> bool:
    """Whether autograd will ask for a gradient of any of ``tensors`` (else: inference). A loop,
    not ``any`` over a generator: every planned call asks, and that costs twice as much."""
    if not torch.is_grad_enabled():
        return False
    for t in tensors:
        if t is not None and t.requires_grad:
            return True
    return False


# ---- one autograd definition, two users -----------------------------------------------------


def register_autograd(op, name: str, setup_context: Callable, backward: Callable,
                      traced: Any) -> type[torch.autograd.Function]:
    """Register an op's one autograd definition (``setup_context``, ``backward``) on the custom
    op ``op``, and return its eager twin: an ``autograd.Function`` named ``name`` whose
    ``apply(*tensors, calls)`` runs ``calls.forward(*tensors)`` (the op's body without its
    checks, bound to the problem by its plan: the public functions validated it once) and the
    same two functions, on the op's inputs: ``tensors`` then ``calls.constants``, what the plan
    fixes (activation, flags). Those travel in ``calls``, not as arguments of ``apply``: it
    costs ~0.13 us an argument. Where the op returns a tuple (its output, then tensors kept
    for the backward, or empty stand-ins), the op marks the others non-differentiable and the
    twin returns the output alone; its backward is given None for the others' gradients.

    ``backward`` reads what to call from ``ctx.calls``: ``traced`` (the custom ops: what a
    compiled graph records) under the op, the plan's ``calls`` (the launchers, called directly:
    a custom op's dispatch costs ~10 us a call) under the twin."""
    def traced_setup(ctx, inputs, output) -> None:
        if type(output) is tuple:  # the outputs kept for the backward (z, g, u) have no gradient
            ctx.mark_non_differentiable(*output[1:])
        setup_context(ctx, inputs, output)
        ctx.calls = traced

    op.register_autograd(backward, setup_context=traced_setup)

    def forward(ctx, *tensors_and_calls):
        tensors, calls = tensors_and_calls[:-1], tensors_and_calls[-1]
        output = calls.forward(*tensors)
        setup_context(ctx, tensors + calls.constants, output)
        ctx.calls, ctx.n_tensors = calls, len(tensors)
        if type(output) is not tuple:
            ctx.kept_grads = ()
            return output
        # The op's other outputs (saved tensors: z, g, u) are the backward's, not the caller's:
        # returned, each would cost an output's wrapping and, in every backward, a zero-filled
        # gradient of its size (autograd materializes the gradients of unused outputs). The
        # backward is given None for each instead.
        ctx.kept_grads = (None,) * (len(output) - 1)
        return output[0]

    def grads_of_tensors(ctx, *grads):
        # the tensors' gradients (the constants have none), and none for ``calls``
        return (*backward(ctx, *grads, *ctx.kept_grads)[:ctx.n_tensors], None)

    once = torch.autograd.function.once_differentiable(grads_of_tensors)

    def twin_backward(ctx, *grads):
        # Fresh gradients every call, nothing saved written: a second backward is unchanged.
        # A second derivative (create_graph=True: grad mode on here) is refused, as
        # ``once_differentiable`` refuses it; without one, its wrapper would only add a
        # ``no_grad`` block (~1.5 us) around a backward that grad mode already leaves alone.
        if torch.is_grad_enabled():
            return once(ctx, *grads)
        return grads_of_tensors(ctx, *grads)

    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(forward), "backward": staticmethod(twin_backward)})


def bound_after_first(launcher: Callable, bind: Callable) -> Callable:
    """A launcher of one problem (``kernels``' launchers, each with its flags given): the first
    call runs ``launcher``, which chooses the problem's path and config, then ``bind(*args)``
    (the kernels' per-problem launches) binds them; every later call runs the bound launch."""
    bound = None

    def run(*args):
        nonlocal bound
        if bound is not None:
            return bound(*args)
        output = launcher(*args)
        bound = bind(*args)
        return output
    return run


def bound_launcher(backend, name: str, *flags) -> Callable:
    """``backend.<name>`` (a launcher whose flags follow its tensors) of one problem, with
    ``flags``, as a function of the tensors: ``bound_after_first`` of it and of its
    per-problem launch ``backend.<name>_launch`` (both looked up when called)."""
    return bound_after_first(
        lambda *tensors: getattr(backend, name)(*tensors, *flags),
        lambda *tensors: getattr(backend, f"{name}_launch")(*tensors, *flags))


def bound_per_flags(make: Callable) -> Callable:
    """``make(flags)`` -> a launcher taking the tensors, once per value of ``flags`` (e.g.
    which gradients a backward computes: it may differ from call to call of one problem)."""
    made: dict = {}

    def get(flags):
        launch = made.get(flags)
        if launch is None:
            launch = made[flags] = make(flags)
        return launch
    return get


# ---- routes and plans ---------------------------------------------------------------------


def distributed(*tensors: Tensor | None) -> bool:
    """Whether any operand is a DTensor (tensor parallel). Costs a dict look-up while
    torch.distributed.tensor was never imported (no DTensor can exist then), and imports nothing."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and any(isinstance(t, dtensor.DTensor) for t in tensors)


def dtensor_ops():
    """``triton_gelu._dtensor`` (the functional API on DTensors), imported on the first DTensor.
    Looked up in sys.modules first: torch.compile traces that without a graph break."""
    module = sys.modules.get("triton_gelu._dtensor")
    if module is None:
        from .. import _dtensor as module
    return module


def on_fallback(x: Tensor) -> bool:
    """Whether the call runs on the PyTorch fallback (no Triton kernel can run for x). There the
    ops are eager PyTorch's own under PyTorch's autograd (dropout included: PyTorch's mask),
    with eager's speed and saved tensors; only a tensor-parallel shard's dropout runs the
    kernels' float32 formulas, to draw the kernels' mask. The fallback reads the tuning policy,
    so a bad one is refused there as on every path (on the others ``launchers`` reads it)."""
    if runs_triton(x):
        return False
    tune_policy()
    return True


def planned(entry: str, arguments: tuple, x: Any, *others: Any) -> tuple[Any, Any]:
    """(the plan of this problem or None, its key or None when it has none). No plan while
    torch.compile traces (the trace routes by itself), and no key for an operand that is not a
    tensor (``others`` may be None: an absent bias) or an argument that is not hashable: the
    checks name what is wrong. An operand contributes what every check and route reads: its
    type, shape, dtype and device. The key is one flat tuple, grown operand by operand: a
    repeated call builds and hashes it before anything else, and nested tuples or a
    comprehension would cost a third more."""
    if is_compiling():
        return None, None
    try:
        key = (entry, arguments, plan_context(), type(x), x.shape, x.dtype, x.device)
        for t in others:
            key += (None,) if t is None else (type(t), t.shape, t.dtype, t.device)
        return plans.get(key), key
    except (AttributeError, TypeError):
        return None, None


def plan_key_unless_autocast(key: Any, x: Tensor) -> Any:
    """``key``, or None (plan nothing) when autocast is on for x's device: the key holds the
    operands' own dtypes, the launches a plan would bind the cast ones' (their config, their
    ``tl.dot`` precision). A problem is planned by its first call without autocast."""
    device_type = x.device.type
    if key is not None and autocast_available(device_type) \
            and torch.is_autocast_enabled(device_type):
        return None
    return key


def unless_autocast(launch: Callable, x: Tensor, unplanned: Callable | None) -> Callable:
    """The Triton route of a problem with Linear operands: ``launch`` them, unless autocast is
    on for their device, which casts them (then ``unplanned``: validated, cast and routed anew;
    None: the call is not planned, ``launch`` alone). Eager PyTorch's routes need no such
    guard: there ``F.linear`` casts under autocast by itself, as the unplanned call would."""
    device_type = x.device.type
    if unplanned is None or not autocast_available(device_type):
        return launch

    def run(*operands):
        if torch.is_autocast_enabled(device_type):
            return unplanned(*operands)
        return launch(*operands)
    return run


def counted(forward_op: str, backward_op: str, fn: Callable) -> Callable:
    """``fn`` (eager PyTorch's ops), made where ``count_paths`` blocks count (plans made there are
    kept apart: the plan key holds the context): counting each call as a run of the forward
    op's "torch" path, as ``Paths`` counts the paths it runs, and, when it records a graph, one
    of the backward op's (the backward PyTorch's autograd will run; a hook to count it as it
    runs would cost more host time than the count is worth). Elsewhere ``fn`` itself: the count
    would cost a third of its host time."""
    if not paths_counted():
        return fn
    forward_run, backward_run = (forward_op, "torch"), (backward_op, "torch")

    def run(*args):
        y = fn(*args)
        path_runs[forward_run] += 1
        if y.requires_grad:
            path_runs[backward_run] += 1
        return y
    return run


def linear_act(activation: str, linear: Callable = F.linear) -> Callable:
    """Eager PyTorch's ``act(F.linear(x, weight, bias))`` as a function of (x, weight, bias),
    its ops looked up once (a plan calls it per call); ``linear``: DTensors' own, for them."""
    act = ACTIVATIONS[activation].torch_value
    return lambda x, weight, bias: act(linear(x, weight, bias))


# ---- autocast -------------------------------------------------------------------------------

# torch.amp.is_autocast_available calls torch._C._is_autocast_available, which Dynamo folds to a
# constant from torch 2.12 on; torch 2.11's Dynamo cannot trace it (torch.compile(fullgraph=True)
# fails), so there the answer comes from ``_runtime.NO_AUTOCAST``, which it can read.
autocast_available = (torch.amp.is_autocast_available if torch.__version__ >= "2.12"
                      else autocast_available_by_name)


def autocast_linear(*tensors: Any) -> tuple[Any, ...]:
    """Cast the operands as ``F.linear`` is cast under autocast: to the autocast dtype of their
    device (fp16/bf16/fp32 only; float64 is left alone, as autocast does, and then refused).
    The first is a checked tensor; the others are checked after the cast (hence ``Any``)."""
    device_type = tensors[0].device.type
    if not (autocast_available(device_type)
            and torch.is_autocast_enabled(device_type)):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(
        t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point()
        and t.dtype != torch.float64 else t
        for t in tensors
    )


# ---- dropout ----------------------------------------------------------------------------------


class BlockConfig(NamedTuple):
    """What an FFN block (plain or gated) carries besides tensors."""

    p: float  # dropout probability; 0: no dropout (eval, or none asked for)
    activation: str
    recompute: bool
    # The hidden columns are columns col_offset .. of n_cols (None: all of them); the dropout
    # mask is drawn for those positions (tensor parallel: a rank's shard of the hidden layer).
    col_offset: int = 0
    n_cols: int | None = None


def dropout_seed(device: torch.device | str) -> Tensor:
    """The seed of one dropout call: a 1-element int64 tensor drawn on ``device`` from PyTorch's
    default generator there (``torch.manual_seed`` makes it reproducible). Drawn by a device
    op, so there is no host sync and CUDA-graph capture and torch.compile trace it."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)
