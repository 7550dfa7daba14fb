"""The nn.Modules as drop-ins for their PyTorch counterparts: constructor, repr, parameters,
state dicts, and outputs and gradients against the same PyTorch composition."""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_no_worse_than_torch
from torch import nn

import triton_gelu
from triton_gelu import reference

FORMS = ["none", "tanh"]


pytestmark = pytest.mark.usefixtures("ieee_float32")


def _compare_modules(ours: nn.Module, theirs: nn.Module, x: torch.Tensor, what: str) -> None:
    """Forward and every gradient (input and parameters) of ``ours`` against ``theirs`` in the
    same dtype and against ``theirs`` in float64, which must share parameter names."""
    ref = {name: p.detach().double() for name, p in theirs.named_parameters()}
    x_ours, x_theirs = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y, y_torch = ours(x_ours), theirs(x_theirs)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_torch.backward(dy)

    x64 = x.detach().double().requires_grad_(True)
    ref_params = {name: p.requires_grad_(True) for name, p in ref.items()}
    y64 = torch.func.functional_call(theirs, ref_params, (x64,))
    y64.backward(dy.double())

    assert_no_worse_than_torch(y, y_torch, y64, f"{what} forward")
    assert_no_worse_than_torch(x_ours.grad, x_theirs.grad, x64.grad, f"{what} d input")
    theirs_params = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        assert_no_worse_than_torch(
            p.grad, theirs_params[name].grad, ref_params[name].grad, f"{what} d {name}"
        )


# ---- GELU -------------------------------------------------------------------------------------


@pytest.mark.parametrize("approximate", FORMS)
def test_gelu_module_matches_nn_gelu(approximate, device):
    ours, theirs = triton_gelu.GELU(approximate), nn.GELU(approximate)
    assert repr(ours) == repr(theirs) == f"GELU(approximate={approximate!r})"
    assert ours.state_dict() == {} == theirs.state_dict()
    ours.load_state_dict(theirs.state_dict())
    x = 3 * torch.randn(7, 13, device=device)
    _compare_modules(ours, theirs, x, f"GELU {approximate}")


# ---- LinearGELU -------------------------------------------------------------------------------


def _reference_linear_gelu(linear: nn.Linear, approximate: str) -> nn.Sequential:
    return nn.Sequential(linear, nn.GELU(approximate))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_linear_gelu_parameters_like_nn_linear(bias, device):
    torch.manual_seed(1)
    ours = triton_gelu.LinearGELU(45, 51, bias=bias, device=device)
    torch.manual_seed(1)
    theirs = nn.Linear(45, 51, bias=bias, device=device)
    # Same names, shapes and initialisation (the same random draws).
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for name, p in theirs.named_parameters():
        torch.testing.assert_close(getattr(ours, name), p, rtol=0, atol=0, msg=name)
        assert isinstance(getattr(ours, name), nn.Parameter)
    if not bias:
        assert ours.bias is None
    assert repr(ours) == (
        f"LinearGELU(in_features=45, out_features=51, bias={bias}, approximate='none', "
        "recompute=False)"
    )
    assert repr(theirs).replace("Linear(", "LinearGELU(")[:-1] in repr(ours)
    ours.reset_parameters()  # re-draws, like nn.Linear.reset_parameters
    assert not torch.equal(ours.weight, theirs.weight)


def test_linear_gelu_factory_kwargs():
    m = triton_gelu.LinearGELU(8, 4, dtype=torch.bfloat16, device="meta", approximate="tanh",
                               recompute=True)
    assert m.weight.dtype == m.bias.dtype == torch.bfloat16 and m.weight.is_meta
    assert (m.in_features, m.out_features, m.approximate, m.recompute) == (8, 4, "tanh", True)
    assert "approximate='tanh', recompute=True" in repr(m)


@pytest.mark.parametrize("recompute", [False, True], ids=["saved", "recompute"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("approximate", FORMS)
def test_linear_gelu_matches_linear_then_gelu(approximate, bias, recompute, device):
    linear = nn.Linear(45, 51, bias=bias, device=device)
    ours = triton_gelu.LinearGELU(45, 51, bias=bias, approximate=approximate,
                                  recompute=recompute, device=device)
    ours.load_state_dict(linear.state_dict())  # an nn.Linear state dict loads as is
    theirs = _reference_linear_gelu(linear, approximate)
    # parameter names of nn.Sequential are prefixed "0."; compare through a flat view.
    flat = _Flat(theirs)
    x = torch.randn(3, 7, 45, device=device)
    _compare_modules(ours, flat, x, f"LinearGELU {approximate} bias={bias}")


class _Flat(nn.Module):
    """nn.Linear + nn.GELU with the Linear's parameter names at the top level."""

    def __init__(self, seq: nn.Sequential) -> None:
        super().__init__()
        self.weight, self.bias = seq[0].weight, seq[0].bias
        self.approximate = seq[1].approximate

    def forward(self, x):
        return F.gelu(F.linear(x, self.weight, self.bias), approximate=self.approximate)


def test_linear_gelu_bf16_module(device):
    linear = nn.Linear(45, 51, device=device, dtype=torch.bfloat16)
    ours = triton_gelu.LinearGELU.from_linear(copy.deepcopy(linear), approximate="tanh")
    x = torch.randn(37, 45, device=device, dtype=torch.bfloat16)
    _compare_modules(ours, _Flat(_reference_linear_gelu(linear, "tanh")), x, "bf16 LinearGELU")


def test_from_linear_shares_parameters(device):
    linear = nn.Linear(45, 51, device=device)
    rng_before = torch.get_rng_state()
    ours = triton_gelu.LinearGELU.from_linear(linear, approximate="tanh")
    assert torch.equal(torch.get_rng_state(), rng_before), "from_linear drew random numbers"
    assert ours.weight is linear.weight and ours.bias is linear.bias
    assert ours.approximate == "tanh" and not ours.recompute
    assert (ours.in_features, ours.out_features) == (45, 51)
    # Training one trains the other.
    ours(torch.randn(5, 45, device=device)).sum().backward()
    assert linear.weight.grad is not None and linear.bias.grad is not None
    with torch.no_grad():
        linear.weight.zero_()
    assert not ours.weight.any()

    no_bias = triton_gelu.LinearGELU.from_linear(nn.Linear(3, 2, bias=False, device=device))
    assert no_bias.bias is None and "bias=False" in repr(no_bias)
    assert [name for name, _ in no_bias.named_parameters()] == ["weight"]


# ---- FeedForward ------------------------------------------------------------------------------


class _TorchFeedForward(nn.Module):
    """The PyTorch block FeedForward replaces: Linear -> GELU -> Dropout -> Linear."""

    def __init__(self, d_model, dim_feedforward, dropout, approximate="none", bias=True):
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward, bias=bias)
        self.dropout = nn.Dropout(dropout)
        self.activation = nn.GELU(approximate)
        self.linear2 = nn.Linear(dim_feedforward, d_model, bias=bias)

    def forward(self, x):
        return self.linear2(self.dropout(self.activation(self.linear1(x))))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("approximate", FORMS)
def test_feed_forward_loads_torch_state_dict(approximate, bias, device):
    theirs = _TorchFeedForward(24, 40, dropout=0.3, approximate=approximate, bias=bias).to(device)
    ours = triton_gelu.FeedForward(24, 40, dropout=0.3, approximate=approximate, bias=bias,
                                   device=device)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())  # strict: same keys and shapes
    assert isinstance(ours.linear1, triton_gelu.LinearGELU)
    assert isinstance(ours.linear2, nn.Linear) and isinstance(ours.dropout, nn.Dropout)
    assert ours.dropout.p == 0.3 and ours.linear1.approximate == approximate
    ours.eval()
    theirs.eval()  # dropout off: the two must agree
    x = torch.randn(2, 9, 24, device=device)
    _compare_modules(ours, theirs, x, f"FeedForward {approximate} bias={bias}")


def test_feed_forward_defaults_and_train_mode(device):
    ff = triton_gelu.FeedForward(16, device=device)
    assert ff.linear1.weight.shape == (2048, 16) and ff.linear2.weight.shape == (16, 2048)
    assert ff.dropout.p == 0.1 and ff.linear1.approximate == "none"
    small = triton_gelu.FeedForward(16, 32, dropout=0.5, device=device).train()
    x = torch.randn(4, 16, device=device)
    y = small(x)
    y.sum().backward()
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert all(p.grad is not None for p in small.parameters())


def test_reference_helpers_agree_with_torch():
    # reference.linear_gelu64 is what the other tests trust: it is F.linear + F.gelu in float64.
    x, w, b = torch.randn(3, 5), torch.randn(4, 5), torch.randn(4)
    expected = F.gelu(x.double() @ w.double().t() + b.double(), approximate="tanh")
    torch.testing.assert_close(reference.linear_gelu64(x, w, b, "tanh"), expected)
