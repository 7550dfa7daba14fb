"""Per-problem plans: a problem is validated and routed on its first call, a repeated call is a
look-up and the call (``triton_gelu/_plans.py``); whatever changes the problem or the route
(shape, dtype, a bad operand, a forced path, autocast, grad mode) is planned or routed anew,
never served by a stale plan."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from helpers import assert_like_torch

import triton_gelu
from triton_gelu import _plans
from triton_gelu.autotune import clear_plans, force_path
from triton_gelu.ops import linear_gelu as linear_gelu_op
from triton_gelu.testing import count_launches, count_paths


@pytest.fixture
def checks(monkeypatch) -> list[int]:
    """Counts the validations of ``linear_gelu``'s operands (its declaration's check)."""
    seen = []
    check = linear_gelu_op.check_linear

    def counting(*args, **kwargs):
        seen.append(1)
        return check(*args, **kwargs)

    monkeypatch.setattr(linear_gelu_op, "check_linear", counting)
    return seen


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _operands(m=5, k=12, n=7, dtype=torch.float32):
    return tuple(torch.randn(*shape, device=DEVICE).to(dtype) for shape in ((m, k), (n, k), (n,)))


def test_a_problem_is_validated_once_and_planned_once(checks):
    x, w, b = _operands()
    planned = _plans.counts["planned"]
    for _ in range(3):
        y = triton_gelu.linear_gelu(x, w, b)
    assert len(checks) == 1 and _plans.counts["planned"] == planned + 1
    torch.testing.assert_close(y, F.gelu(F.linear(x, w, b)), rtol=1e-5, atol=1e-5)
    # New operands of the same problem reuse the plan; another shape or dtype plans anew.
    triton_gelu.linear_gelu(*_operands())
    assert len(checks) == 1
    triton_gelu.linear_gelu(*_operands(m=6))
    triton_gelu.linear_gelu(*_operands(dtype=torch.bfloat16))
    assert len(checks) == 3 and _plans.counts["planned"] == planned + 3
    clear_plans()
    triton_gelu.linear_gelu(x, w, b)
    assert len(checks) == 4


def test_a_bad_problem_after_a_good_one_is_refused():
    x, w, b = _operands()
    triton_gelu.linear_gelu(x, w, b)
    with pytest.raises(ValueError, match="in_features mismatch"):
        triton_gelu.linear_gelu(torch.randn(5, 13, device=DEVICE), w, b)
    with pytest.raises(ValueError, match="bias has shape"):
        triton_gelu.linear_gelu(x, w, torch.randn(8, device=DEVICE))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        triton_gelu.linear_gelu(x.tolist(), w, b)
    with pytest.raises(ValueError, match="approximate must be one of"):
        triton_gelu.linear_gelu(x, w, b, approximate="erf")
    with pytest.raises(TypeError, match="dropout probability p must be a float"):
        triton_gelu.feed_forward(x, w, b, w.t(), None, p=[0.1])  # unhashable: no key at all


def test_grad_mode_and_requires_grad_route_each_call():
    x, w, b = _operands()
    with torch.no_grad():
        y = triton_gelu.linear_gelu(x, w, b)
    assert y.grad_fn is None
    w.requires_grad_(True)  # same problem (shapes, dtypes, devices): a graph now
    y = triton_gelu.linear_gelu(x, w, b)
    y.sum().backward()
    expected = torch.autograd.grad(F.gelu(F.linear(x, w, b)).sum(), w)[0]
    torch.testing.assert_close(w.grad, expected, rtol=1e-4, atol=1e-5)


def test_a_forced_path_applies_to_a_planned_problem():
    x, w, b = _operands()
    triton_gelu.linear_gelu(x, w, b)
    with count_launches() as launched, count_paths() as ran, \
            force_path(linear_gelu_fwd="torch", linear_gelu_bwd="torch"):
        y = triton_gelu.linear_gelu(x, w, b)
    assert not launched, f"a kernel ran on the forced torch path: {launched}"
    assert ran[("linear_gelu_fwd", "torch")] == 1, ran
    torch.testing.assert_close(y, F.gelu(F.linear(x, w, b)), rtol=1e-5, atol=1e-5)
    with count_launches() as launched:
        triton_gelu.linear_gelu(x, w, b)  # outside the block: the kernels again
    assert launched, "no kernel ran after the forced block"


def test_autocast_casts_a_planned_problem():
    x, w, b = _operands()
    dtype = torch.bfloat16 if DEVICE == "cpu" else torch.float16
    assert triton_gelu.linear_gelu(x, w, b).dtype == torch.float32
    assert triton_gelu.feed_forward(x, w, b, w.t(), None).dtype == torch.float32
    with torch.autocast(DEVICE, dtype=dtype):
        y = triton_gelu.linear_gelu(x, w, b)
        assert y.dtype == dtype
        assert_like_torch(lambda x, w, b: triton_gelu.feed_forward(x, w, b, w.t(), None),
                          lambda x, w, b: F.linear(F.gelu(F.linear(x, w, b)), w.t()),
                          [x, w, b], "feed_forward under autocast")
    assert triton_gelu.linear_gelu(x, w, b).dtype == torch.float32


def _linear_ops(x, w, b):
    """name -> (ours, eager PyTorch's) for each op with Linear operands, on x, w, b."""
    wu, w2 = w.flip(0), w.t()
    return {
        "linear_gelu": (lambda: triton_gelu.linear_gelu(x, w, b),
                        lambda: F.gelu(F.linear(x, w, b))),
        "feed_forward": (lambda: triton_gelu.feed_forward(x, w, b, w2, None),
                         lambda: F.linear(F.gelu(F.linear(x, w, b)), w2)),
        "geglu": (lambda: triton_gelu.geglu(x, w, wu, b),
                  lambda: F.gelu(F.linear(x, w, b), approximate="tanh") * F.linear(x, wu)),
        "gated_feed_forward": (
            lambda: triton_gelu.gated_feed_forward(x, w, wu, w2, b),
            lambda: F.linear(F.gelu(F.linear(x, w, b), approximate="tanh") * F.linear(x, wu),
                             w2)),
    }


EAGER_ROUTES = dict(linear_gelu_fwd="torch", linear_gelu_bwd="torch", ffn_fwd="torch",
                    ffn_bwd="torch", geglu_fwd="torch", geglu_bwd="torch")


@pytest.mark.parametrize("op", ["linear_gelu", "feed_forward", "geglu", "gated_feed_forward"])
def test_an_eager_route_planned_without_autocast_casts_under_it(op):
    """The eager routes keep no autocast guard (``F.linear`` casts by itself): a problem planned
    outside autocast gives, inside it, eager PyTorch's result and gradients bit for bit."""
    x, w, b = _operands()
    w.requires_grad_(True)
    dtype = torch.bfloat16 if DEVICE == "cpu" else torch.float16
    ours, eager = _linear_ops(x, w, b)[op]
    with force_path(**EAGER_ROUTES):
        assert ours().dtype == torch.float32  # planned here, outside autocast
        with torch.autocast(DEVICE, dtype=dtype):
            y, y_eager = ours(), eager()
        assert y.dtype == dtype
        assert torch.equal(y, y_eager)
        grads = [torch.autograd.grad(t.float().square().sum(), w)[0] for t in (y, y_eager)]
    assert torch.equal(*grads)


@pytest.mark.parametrize("op", ["gelu", "linear_gelu", "feed_forward", "geglu",
                                "gated_feed_forward"])
def test_a_second_derivative_is_refused(op):
    """The kernels' backward is differentiable once: with ``create_graph=True`` the gradients
    carry a node that refuses a second backward (never a silently wrong second derivative)."""
    x, w, b = _operands()
    x.requires_grad_(True)
    ours = (lambda: triton_gelu.gelu(x)) if op == "gelu" else _linear_ops(x, w, b)[op][0]
    with count_launches() as launched:
        y = ours()
        (dx,) = torch.autograd.grad(y.float().square().sum(), x, create_graph=True)
    assert launched, "no kernel ran"
    # the first derivative is right: eager PyTorch's in float64
    x64, w64, b64 = (t.detach().double().requires_grad_(True) for t in (x, w, b))
    eager = (lambda: F.gelu(x64)) if op == "gelu" else _linear_ops(x64, w64, b64)[op][1]
    (expected,) = torch.autograd.grad(eager().square().sum(), x64)
    torch.testing.assert_close(dx.double(), expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        dx.sum().backward()


class _AtenOps(TorchDispatchMode):
    """Records the ATen ops run while it is on."""

    def __init__(self):
        super().__init__()
        self.ran = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ran.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("op", ["linear_gelu", "feed_forward", "geglu", "gated_feed_forward"])
def test_the_backward_fills_no_gradient_of_a_kept_tensor(op):
    """The ops keep tensors for their backward (z, g, u) that the caller never sees: the backward
    gets no zero-filled gradient for them (autograd fills one, of the kept tensor's size, for
    each output of a node that received none), and its gradients are eager PyTorch's."""
    x, w, b = _operands()
    w.requires_grad_(True)
    ours, eager = _linear_ops(x, w, b)[op]
    with count_launches() as launched:
        y = ours()
    assert launched, "no kernel ran"
    dy = torch.randn_like(y)
    with _AtenOps() as aten:
        (dw,) = torch.autograd.grad(y, w, dy)
    filled = [name for name in aten.ran if name in ("zeros", "zeros_like", "new_zeros", "zero_",
                                                    "fill_", "full", "full_like")]
    assert filled == [], aten.ran
    (dw_eager,) = torch.autograd.grad(eager(), w, dy)
    torch.testing.assert_close(dw, dw_eager, rtol=1e-4, atol=1e-4)


def test_eager_routes_count_their_runs_inside_count_paths_only():
    """A plan of a path forced to "torch" counts its runs where ``count_paths`` is open: one made
    outside a block is not the one a block runs."""
    x, w, b = _operands()
    with force_path(linear_gelu_fwd="torch", linear_gelu_bwd="torch"):
        for _ in range(2):
            triton_gelu.linear_gelu(x, w, b)  # planned, not counted
        with count_paths() as ran:
            for _ in range(3):
                triton_gelu.linear_gelu(x, w, b)
    assert ran[("linear_gelu_fwd", "torch")] == 3, ran


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors under the interpreter")
def test_the_environment_is_read_once_and_again_after_clear_plans(monkeypatch):
    x = torch.randn(3, 5)
    triton_gelu.gelu(x)  # reads the environment (the conftest cleared it before the test)
    monkeypatch.setenv("TRITON_GELU_TUNE", "fastest")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with count_launches() as launched:
        triton_gelu.gelu(torch.randn(7, 2))  # a new problem, the environment as first read
    assert launched == {"gelu_fwd": 1}, f"the interpreter's kernel did not run: {launched}"
    clear_plans()
    with count_launches() as launched:
        with pytest.raises(ValueError, match=r"TRITON_GELU_TUNE .* got 'fastest'"):
            triton_gelu.gelu(x)
        monkeypatch.delenv("TRITON_GELU_TUNE")
        clear_plans()
        assert_like_torch(triton_gelu.gelu, F.gelu, [x], "gelu on the fallback")
    assert not launched, f"a kernel ran on the fallback: {launched}"


def _layouts(*shape: int) -> list[torch.Tensor]:
    """Fresh operands of one shape in three layouts: contiguous, transposed (a vector: every
    other element), a slice."""
    if len(shape) == 1:
        (n,) = shape
        return [torch.randn(n, device=DEVICE), torch.randn(2 * n, device=DEVICE)[::2],
                torch.randn(n + 9, device=DEVICE)[4:4 + n]]
    m, k = shape
    return [torch.randn(m, k, device=DEVICE), torch.randn(k, m, device=DEVICE).t(),
            torch.randn(m, k + 9, device=DEVICE)[:, 4:4 + k]]


def _tanh(t):
    return F.gelu(t, approximate="tanh")


# entry -> (ours, eager PyTorch's, the parameters' shapes) for x (5, 12)
ENTRIES = {
    "gelu": (triton_gelu.gelu, F.gelu, []),
    "linear_gelu": (triton_gelu.linear_gelu, lambda x, w, b: F.gelu(F.linear(x, w, b)),
                    [(7, 12), (7,)]),
    "feed_forward": (triton_gelu.feed_forward,
                     lambda x, w1, b1, w2, b2: F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2),
                     [(7, 12), (7,), (12, 7), (12,)]),
    "geglu": (triton_gelu.geglu, lambda x, wg, wu: _tanh(F.linear(x, wg)) * F.linear(x, wu),
              [(7, 12), (7, 12)]),
    "gated_feed_forward": (triton_gelu.gated_feed_forward,
                           lambda x, wg, wu, wd: F.linear(
                               _tanh(F.linear(x, wg)) * F.linear(x, wu), wd),
                           [(7, 12), (7, 12), (12, 7)]),
}


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("grad", [False, True], ids=["infer", "fwd+bwd"])
def test_later_calls_launch_the_kept_launch_as_the_first_call_did(entry, grad):
    """After a problem's first call its plan keeps the launch (path, config, grid, constant
    arguments): later calls, with fresh operands of the same problem in other layouts (the
    parameters' too, and a contiguous x with strided parameters), compute what the first did,
    by the suite's rule, and run and count the same paths and launches."""
    ours, theirs, shapes = ENTRIES[entry]
    counted = []
    for x_layout, params_layout in [(0, 0), (1, 1), (2, 2), (0, 1), (0, 2)]:
        x = _layouts(5, 12)[x_layout]
        # scaled in place: the layout stays
        params = [_layouts(*shape)[params_layout].div_(3) for shape in shapes]
        inputs = [x, *params] if params else [x.requires_grad_(grad)]
        with count_launches() as launched, count_paths() as ran:
            assert_like_torch(ours, theirs, inputs, f"{entry}, x strides {x.stride()}, "
                              f"parameters' layout {params_layout}", grad=grad)
        counted.append((dict(launched), dict(ran)))
    assert counted[0][0], f"no kernel ran: {counted}"
    assert counted[1:] == counted[:1] * 4, counted


@pytest.mark.parametrize("entry", ["feed_forward", "gated_feed_forward"])
def test_later_calls_draw_and_regenerate_the_dropout_mask_as_the_first_did(entry):
    """A block with dropout: a later call under the same torch seed gives the first call's
    output and gradients bit for bit (the kept launches draw the mask from the call's seed,
    and the backward regenerates it)."""
    ours, _, shapes = ENTRIES[entry]
    params = [(torch.randn(*shape, device=DEVICE) / 3).requires_grad_(True) for shape in shapes]
    x = torch.randn(5, 12, device=DEVICE, requires_grad=True)
    dropout = {"p": 0.3} if entry == "feed_forward" else {"dropout": 0.3, "training": True}
    results = []
    for _ in range(3):
        torch.manual_seed(7)
        y = ours(x, *params, **dropout)
        y.backward(torch.ones_like(y))
        results.append([y.detach(), *(t.grad for t in (x, *params))])
        for t in (x, *params):
            t.grad = None
    with torch.no_grad():
        assert not torch.allclose(results[0][0], ours(x, *params)), "dropout did not run"
    for later in results[1:]:
        for first, again in zip(results[0], later):
            assert torch.equal(first, again)


def _linear_gelu_launches(monkeypatch) -> list[tuple]:
    """The (x dtype, tl.dot input precision) of every launch of the linear_gelu forward kernel
    from now on (the kernel still runs)."""
    from triton_gelu.tuning.tuner import tuners

    tuner, seen = tuners["linear_gelu_fwd"], []

    class Spy:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(**arguments):
                seen.append((arguments["x_ptr"].dtype, arguments["INPUT_PRECISION"]))
                return self.kernel[grid](**arguments)
            return launch

    monkeypatch.setattr(tuner, "kernel", Spy(tuner.kernel))
    return seen


def test_a_kept_launch_follows_the_tf32_setting(monkeypatch):
    """float32 matmuls use TF32 exactly when torch allows it, also on a problem planned before
    the setting changed (``allow_tf32`` is read at each call, not kept)."""
    seen = _linear_gelu_launches(monkeypatch)
    allowed = torch.backends.cuda.matmul.allow_tf32
    x, w, b = _operands()
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        for _ in range(2):
            triton_gelu.linear_gelu(x, w, b)
        torch.backends.cuda.matmul.allow_tf32 = True
        triton_gelu.linear_gelu(x, w, b)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allowed
    assert [precision for _, precision in seen] == ["ieee", "ieee", "tf32"]


def test_a_problem_first_met_under_autocast_launches_its_own_dtype_after(monkeypatch):
    """Under autocast nothing is planned (the key holds the operands' dtypes, the launches the
    cast ones'): a later call without autocast plans the problem for float32, and its kept
    launch runs float32's ``tl.dot`` precision (IEEE when TF32 is not allowed), never the
    cast dtype's default."""
    seen = _linear_gelu_launches(monkeypatch)
    x, w, b = _operands()
    low = torch.bfloat16 if DEVICE == "cpu" else torch.float16
    planned, allowed = _plans.counts["planned"], torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        with torch.autocast(DEVICE, dtype=low):
            for _ in range(2):
                assert triton_gelu.linear_gelu(x, w, b).dtype == low
        assert _plans.counts["planned"] == planned, "a problem was planned under autocast"
        for _ in range(3):
            y = triton_gelu.linear_gelu(x, w, b)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allowed
    assert _plans.counts["planned"] == planned + 1
    assert seen == [(low, None)] * 2 + [(torch.float32, "ieee")] * 3, seen
    torch.testing.assert_close(y, F.gelu(F.linear(x, w, b)), rtol=1e-5, atol=1e-5)
