"""The activation forms, as data: a name -> its value and derivative.

Every kernel takes the name as ``ACTIVATION: tl.constexpr`` and evaluates it with
``kernels/_math.activate`` / ``activate_grad`` (the ``@triton.jit`` twins of the float32
formulas below); the PyTorch fallback and the references use the float32 formulas here. A new
form is one entry in ``ACTIVATIONS``, its two float32 functions here and its two jit helpers in
``_math.py``; ``tests/test_activations.py`` checks every entry's derivative against autograd.

    gelu        x * Phi(x)                    torch.nn.functional.gelu(x)
    gelu_tanh   x * sigmoid(2u),              torch.nn.functional.gelu(x, approximate="tanh")
                u = sqrt(2/pi) (x + 0.044715 x^3)
    quick_gelu  x * sigmoid(1.702 x)          Hugging Face's QuickGELUActivation (OpenAI's CLIP)

The public API keeps torch's ``approximate=`` ("none" is ``gelu``, "tanh" is ``gelu_tanh``) and
takes the name as ``activation=``; ``resolve`` turns the two into one name, once, at the boundary.
This module imports only torch (the fallback and ``patch()`` use it without Triton).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

_SQRT_1_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _sigmoid_2u(u: Tensor) -> tuple[Tensor, Tensor]:
    """(sigmoid(2u), sigmoid(2u) * sigmoid(-2u)) without overflow for any u (t is in [0, 1])."""
    t = torch.exp(-2.0 * u.abs())
    r = 1.0 / (1.0 + t)
    return torch.where(u >= 0, r, t * r), t * r * r


def _tanh_arg(x: Tensor) -> Tensor:
    return _SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)


def _gelu(x: Tensor) -> Tensor:
    return 0.5 * x * (1.0 + torch.erf(x * _SQRT_1_2))


def _gelu_grad(x: Tensor) -> Tensor:
    # Phi(x) + x * phi(x)
    return 0.5 * (1.0 + torch.erf(x * _SQRT_1_2)) + x * torch.exp(-0.5 * x * x) * _INV_SQRT_2PI


def _gelu_tanh(x: Tensor) -> Tensor:
    return x * _sigmoid_2u(_tanh_arg(x))[0]


def _gelu_tanh_grad(x: Tensor) -> Tensor:
    # sigmoid(2u) + 2 x sigmoid(2u) sigmoid(-2u) du/dx, du/dx = sqrt(2/pi) (1 + 3 * 0.044715 x^2);
    # where the product underflowed to 0 the second term is 0 (and x^3 may be inf: skip it)
    s, s_1ms = _sigmoid_2u(_tanh_arg(x))
    du_dx = _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * x * x)
    return torch.where(s_1ms == 0, s, s + 2.0 * x * s_1ms * du_dx)


def _quick_gelu(x: Tensor) -> Tensor:
    return x * _sigmoid_2u(0.851 * x)[0]  # sigmoid(1.702 x) = sigmoid(2u), u = 0.851 x


def _quick_gelu_grad(x: Tensor) -> Tensor:
    # s + 1.702 x s (1 - s), s = sigmoid(1.702 x)
    s, s_1ms = _sigmoid_2u(0.851 * x)
    return torch.where(s_1ms == 0, s, s + 1.702 * x * s_1ms)


def _quick_gelu_torch(x: Tensor) -> Tensor:
    # Hugging Face's QuickGELUActivation, op for op (its rounding in low precision included)
    return x * torch.sigmoid(1.702 * x)


class Activation(NamedTuple):
    name: str
    value: Callable[[Tensor], Tensor]  # float32 in and out, the kernels' formula
    grad: Callable[[Tensor], Tensor]   # d value / dx, float32, the kernels' formula
    # PyTorch's own op in x's dtype: the baseline of the numerics rule in low precision, the
    # float64 ground truth on float64 input, and what the eager paths compute
    torch_value: Callable[[Tensor], Tensor]
    approximate: str | None  # torch's approximate= that selects this form in F.gelu, if any


ACTIVATIONS: dict[str, Activation] = {
    a.name: a for a in (
        Activation("gelu", _gelu, _gelu_grad, F.gelu, "none"),
        Activation("gelu_tanh", _gelu_tanh, _gelu_tanh_grad,
                   functools.partial(F.gelu, approximate="tanh"), "tanh"),
        Activation("quick_gelu", _quick_gelu, _quick_gelu_grad, _quick_gelu_torch, None),
    )
}
NAMES = tuple(ACTIVATIONS)
# torch's approximate= -> the form it selects ("none" -> "gelu", "tanh" -> "gelu_tanh")
BY_APPROXIMATE = {a.approximate: a.name for a in ACTIVATIONS.values() if a.approximate}
APPROXIMATE = tuple(BY_APPROXIMATE)


def resolve(approximate: object = "none", activation: object = None,
            default: str = "none") -> str:
    """The activation's name from the public arguments: torch's ``approximate`` ("none" or
    "tanh"; ``default`` is the signature's default, "tanh" for the gated ops) and our
    ``activation`` (a name of ``ACTIVATIONS``, or None to follow approximate). Given both, an
    ``approximate`` left at its default yields to ``activation``; one that names another form
    is refused."""
    if not isinstance(approximate, str) or approximate not in APPROXIMATE:
        raise ValueError(f"approximate must be one of {APPROXIMATE}, got {approximate!r}")
    by_approximate = BY_APPROXIMATE[approximate]
    if activation is None:
        return by_approximate
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"activation must be None or one of {NAMES}, got {activation!r}")
    if approximate != default and activation != by_approximate:
        raise ValueError(
            f"approximate={approximate!r} contradicts activation={activation!r}: pass one of "
            f"them (approximate='none' is activation='gelu', 'tanh' is 'gelu_tanh')")
    return activation


def check_activation(activation: object) -> str:
    """``activation`` when it names a form of the table, else a ValueError naming the forms."""
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {NAMES}, got {activation!r}")
    return activation


def torch_approximate(activation: str) -> str | None:
    """torch's ``approximate=`` for the form, None when ``F.gelu`` has no such form."""
    return ACTIVATIONS[activation].approximate


def torch_activation(x: Tensor, activation: str) -> Tensor:
    """PyTorch's own op for the form, in x's dtype (eager paths, baselines, float64 truth)."""
    return ACTIVATIONS[activation].torch_value(x)


def value_fp32(x: Tensor, activation: str) -> Tensor:
    """The activation of x in float32 with the kernels' formula, returned in float32."""
    return ACTIVATIONS[activation].value(x.float())


def grad_fp32(x: Tensor, activation: str) -> Tensor:
    """Its derivative at x in float32 with the kernels' formula, returned in float32."""
    return ACTIVATIONS[activation].grad(x.float())
