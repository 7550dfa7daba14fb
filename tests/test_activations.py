"""The activation table (``triton_gelu.activations``) and the quick_gelu form through every op.

Every entry's float32 derivative is checked against autograd of PyTorch's own op in float64, so
a new entry is checked by adding it. quick_gelu (x * sigmoid(1.702 x), CLIP's) runs through
every op and every path of each op (each forced in turn) against float64, by the suite's rule:
no worse than twice PyTorch's own error in the same dtype plus a few ulps.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_no_worse_than_torch

import triton_gelu
from triton_gelu import activations, reference
from triton_gelu.autotune import force_path
from triton_gelu.testing import dropout_seed

pytestmark = pytest.mark.usefixtures("ieee_float32")

QUICK = "quick_gelu"
X_SHAPE, HIDDEN, OUT = (2, 19, 45), 51, 29  # N-D x; multiples of no block size


@pytest.mark.parametrize("name", activations.NAMES)
def test_every_entry_derivative_is_its_values(name):
    """The float32 value and derivative (the kernels' formulas, in activations.py) against
    PyTorch's op and its autograd in float64, over |x| up to 1e4 (the tails included), and NaN."""
    x64 = torch.cat([torch.linspace(-12, 12, 2001, dtype=torch.float64),
                     torch.tensor([-1e4, -300.0, 300.0, 1e4], dtype=torch.float64)])
    x64.requires_grad_(True)
    y64 = activations.torch_activation(x64, name)
    (dydx64,) = torch.autograd.grad(y64.sum(), x64)
    x32 = x64.detach().float()
    for what, ours, want in (("value", activations.value_fp32(x32, name), y64.detach()),
                             ("derivative", activations.grad_fp32(x32, name), dydx64)):
        err = (ours.double() - want).abs()
        bound = 4e-7 * want.abs().clamp_min(1.0)  # a few float32 ulps of the result
        worst = (err - bound).argmax()
        assert (err <= bound).all(), (
            f"{name} {what} at x={x64[worst].item():.6g}: {ours[worst].item():.9g} vs "
            f"{want[worst].item():.9g}")
    nan = torch.tensor([float("nan")])
    assert activations.grad_fp32(nan, name).isnan().all() and \
        activations.value_fp32(nan, name).isnan().all()


def test_approximate_and_activation_name_one_form():
    assert activations.resolve("none") == "gelu" and activations.resolve("tanh") == "gelu_tanh"
    assert activations.resolve("none", QUICK) == QUICK
    assert activations.resolve("tanh", QUICK, default="tanh") == QUICK  # the gated default
    assert activations.resolve("tanh", "gelu_tanh") == "gelu_tanh"
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="approximate='tanh' contradicts activation='quick_gelu'"):
        triton_gelu.gelu(x, "tanh", activation=QUICK)
    with pytest.raises(ValueError, match="approximate='none' contradicts activation='gelu_tanh'"):
        triton_gelu.geglu(x, torch.randn(3, 8), torch.randn(3, 8), approximate="none",
                          activation="gelu_tanh")
    for bad in ("quick", "GELU", "", True):
        with pytest.raises(ValueError, match="activation must be None or one of"):
            triton_gelu.linear_gelu(x, torch.randn(3, 8), activation=bad)
        with pytest.raises(ValueError, match="activation must be None or one of"):
            triton_gelu.FeedForward(8, 16, activation=bad)


def _tensors(dtype, device, *shapes):
    """Operands O(1) at the activation: weights ~ N(0, 1/fan_in), biases ~ N(0, 1)."""
    out = []
    for shape in shapes:
        t = torch.randn(shape, device=device)
        out.append((t / shape[-1] ** 0.5 if len(shape) == 2 else t).to(dtype))
    return out


def _quick(t: torch.Tensor) -> torch.Tensor:
    return activations.torch_activation(t, QUICK)


def _dropped(h, keep, p):
    return h if keep is None else h * keep.to(h.dtype) / (1 - p)


def _ops(dtype, device, p):
    """(name, ours(*leaves), eager(*leaves) in any dtype, leaves, its dropout's keep mask)."""
    x = torch.randn(X_SHAPE, device=device).to(dtype)
    d, rows = X_SHAPE[-1], X_SHAPE[0] * X_SHAPE[1]
    w1, b1, w2, b2 = _tensors(dtype, device, (HIDDEN, d), (HIDDEN,), (OUT, HIDDEN), (OUT,))
    wu, bu = _tensors(dtype, device, (HIDDEN, d), (HIDDEN,))
    keeps = {}
    for name in ("ffn", "gated"):  # the seed each call will draw, drawn ahead from the same state
        state = torch.random.get_rng_state()
        seed = dropout_seed(device)
        torch.random.set_rng_state(state)
        keeps[name] = (reference.dropout_keep(seed, rows, HIDDEN, p).view(*X_SHAPE[:-1], HIDDEN)
                       if p > 0 else None)

    def reseeded(fn):
        state = torch.random.get_rng_state()

        def call(*leaves):
            torch.random.set_rng_state(state)
            return fn(*leaves)
        return call

    return [
        ("gelu", lambda x: triton_gelu.gelu(x, activation=QUICK), _quick, [x], None),
        ("linear_gelu", lambda x, w, b: triton_gelu.linear_gelu(x, w, b, activation=QUICK),
         lambda x, w, b: _quick(F.linear(x, w, b)), [x, w1, b1], None),
        ("feed_forward",
         reseeded(lambda x, w1, b1, w2, b2: triton_gelu.feed_forward(
             x, w1, b1, w2, b2, p=p, activation=QUICK)),
         lambda x, w1, b1, w2, b2: F.linear(_dropped(_quick(F.linear(x, w1, b1)), keeps["ffn"],
                                                     p), w2, b2),
         [x, w1, b1, w2, b2], keeps["ffn"]),
        ("geglu", lambda x, wg, wu, bg, bu: triton_gelu.geglu(x, wg, wu, bg, bu,
                                                             activation=QUICK),
         lambda x, wg, wu, bg, bu: _quick(F.linear(x, wg, bg)) * F.linear(x, wu, bu),
         [x, w1, wu, b1, bu], None),
        ("gated_feed_forward",
         reseeded(lambda x, wg, wu, wd, bg, bu, bd: triton_gelu.gated_feed_forward(
             x, wg, wu, wd, bg, bu, bd, dropout=p, training=True, activation=QUICK)),
         lambda x, wg, wu, wd, bg, bu, bd: F.linear(
             _dropped(_quick(F.linear(x, wg, bg)) * F.linear(x, wu, bu), keeps["gated"], p),
             wd, bd),
         [x, w1, wu, w2, b1, bu, b2], keeps["gated"]),
    ]


def _run(fn, leaves, dy):
    leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    y = fn(*leaves)
    y.backward(dy.to(y.dtype))
    return y.detach(), [t.grad for t in leaves]


def _check_quick(dtype, device, p, only=None):
    for name, ours, eager, leaves, _ in _ops(dtype, device, p):
        if only is not None and name not in only:
            continue
        dy = torch.randn(*X_SHAPE[:-1], OUT if "feed_forward" in name else
                         (X_SHAPE[-1] if name == "gelu" else HIDDEN), device=device)
        y, grads = _run(ours, leaves, dy)
        y_torch, grads_torch = _run(eager, leaves, dy)
        y64, grads64 = _run(eager, [t.double() for t in leaves], dy.double())
        assert_no_worse_than_torch(y, y_torch, y64, f"{name} y {dtype} p={p}")
        for i, (g, g_torch, g64) in enumerate(zip(grads, grads_torch, grads64)):
            # parameter gradients sum over the tokens: rounding relative to their size
            summed = g.dim() != len(X_SHAPE) and dtype == torch.float32
            atol = 1e-6 * max(1.0, g64.abs().max().item()) if summed else None
            assert_no_worse_than_torch(g, g_torch, g64, f"{name} grad {i} {dtype} p={p}",
                                       atol=atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_quick_gelu_every_op_on_default_paths(dtype, device):
    _check_quick(dtype, device, p=0.0)


def test_quick_gelu_blocks_with_dropout(device):
    _check_quick(torch.float32, device, p=0.3, only=("feed_forward", "gated_feed_forward"))


def _every_path():
    from triton_gelu.tuning.paths import path_choosers

    return [(op, path) for op, chooser in path_choosers.items()
            for path in chooser.paths]


OPS_OF = {"gelu": ("gelu",), "linear": ("linear_gelu", "feed_forward"),
          "ffn": ("feed_forward",), "geglu": ("geglu", "gated_feed_forward")}


@pytest.mark.parametrize("op, path", _every_path(), ids="-".join)
def test_quick_gelu_on_every_path(op, path, device):
    """Each path of each op forced in turn (where it does not apply, the op's default runs)."""
    family = op.split("_")[0] if not op.startswith("linear") else "linear"
    with force_path(**{op: path}), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a forced path that does not apply says so
        _check_quick(torch.float32, device, p=0.0, only=OPS_OF[family])


def test_modules_keep_the_form_and_the_state_dict(device):
    torch.manual_seed(0)
    block = triton_gelu.FeedForward(12, 20, dropout=0.0, activation=QUICK).to(device)
    plain = torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.Identity(),
                                torch.nn.Linear(20, 12)).to(device)
    assert list(block.state_dict()) == ["linear1.weight", "linear1.bias", "linear2.weight",
                                        "linear2.bias"]
    plain[0].load_state_dict(block.linear1.state_dict())
    plain[2].load_state_dict(block.linear2.state_dict())
    x = torch.randn(3, 7, 12, device=device)
    y64 = plain.double()[2](_quick(plain.double()[0](x.double())))
    assert_no_worse_than_torch(block(x).detach(), plain.float()[2](_quick(plain.float()[0](x))),
                               y64, "FeedForward quick")
    assert "activation='quick_gelu'" in repr(block.linear1)
    gated = triton_gelu.GatedFeedForward(12, 20, activation=QUICK)  # approximate's "tanh" yields
    assert gated.activation == QUICK and "activation='quick_gelu'" in repr(gated)
    assert "activation" not in repr(triton_gelu.GELU("tanh"))
    g = triton_gelu.GELU(activation=QUICK)
    assert_no_worse_than_torch(g(x), _quick(x), _quick(x.double()), "GELU module quick")
