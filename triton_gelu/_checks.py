"""Argument validation: every bad input is refused here, in Python, before any kernel runs."""

from collections.abc import Sequence

import torch

APPROXIMATE = ("none", "tanh")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_approximate(approximate: object) -> bool:
    """Validate ``approximate`` and return True for the tanh form."""
    if not isinstance(approximate, str) or approximate not in APPROXIMATE:
        raise ValueError(
            f"approximate must be one of {APPROXIMATE}, got {approximate!r}"
        )
    return approximate == "tanh"


def check_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be float32, float16 or bfloat16, got {t.dtype} "
            f"(shape {tuple(t.shape)})"
        )
    return t


def check_same_device(named: Sequence[tuple[str, torch.Tensor]]) -> None:
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{name} is on {t.device} but {first_name} is on {first.device}; "
                "all tensors must be on the same device"
            )


def check_same_dtype(named: Sequence[tuple[str, torch.Tensor]]) -> None:
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.dtype != first.dtype:
            raise TypeError(
                f"{name} has dtype {t.dtype} but {first_name} has dtype {first.dtype}; "
                "all tensors must have the same dtype"
            )


def check_linear(x: object, weight: object, bias: object | None) -> None:
    """Validate ``gelu(x @ weight.T + bias)``'s operands: x (..., K), weight (N, K), bias (N,)."""
    check_tensor("x", x)
    check_tensor("weight", weight)
    named = [("x", x), ("weight", weight)]
    if bias is not None:
        named.append(("bias", check_tensor("bias", bias)))
    check_same_device(named)
    check_same_dtype(named)
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension (..., in_features), got shape ()")
    if weight.dim() != 2:
        raise ValueError(
            f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}"
        )
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"in_features mismatch: x has shape {tuple(x.shape)} (last dim {x.shape[-1]}) but "
            f"weight has shape {tuple(weight.shape)} (in_features {weight.shape[1]})"
        )
    if bias is not None:
        if bias.dim() != 1:
            raise ValueError(f"bias must be 1-D (out_features,), got shape {tuple(bias.shape)}")
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(
                f"bias has shape {tuple(bias.shape)} but weight has shape "
                f"{tuple(weight.shape)}: bias length must equal out_features {weight.shape[0]}"
            )


def check_linear_2d(x2d: object, weight: object, bias: object | None) -> None:
    """``check_linear`` for the launchers, which take x already flattened to (M, K)."""
    check_linear(x2d, weight, bias)
    if x2d.dim() != 2:
        raise ValueError(f"x must be 2-D (M, in_features) here, got shape {tuple(x2d.shape)}")


def check_linear_backward(
    dy2d: object, x2d: torch.Tensor, weight: torch.Tensor, preact: object
) -> None:
    """The backward launchers' operands: dy and the saved pre-activation are (M, N)."""
    check_linear_2d(x2d, weight, None)
    check_same_device([("x", x2d), ("dy", check_tensor("dy", dy2d)),
                       ("preact", check_tensor("preact", preact))])
    expected = (x2d.shape[0], weight.shape[0])
    for name, t in (("dy", dy2d), ("preact", preact)):
        if tuple(t.shape) != expected:
            raise ValueError(
                f"{name} must have shape (M, N) = {expected} for x of shape {tuple(x2d.shape)} "
                f"and weight of shape {tuple(weight.shape)}, got {tuple(t.shape)}"
            )
