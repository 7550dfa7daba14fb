"""The checks the ops share: a tensor, one device and dtype, a Linear's operands, dropout. Each
op's own checks are in its module (``ops/<op>.py``, built from these): every bad input is
refused in Python, before any kernel runs."""

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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


def check_linear(
    x: object, weight: object, bias: object | None, weight_name: str = "weight",
    bias_name: str = "bias",
) -> None:
    """Validate ``gelu(x @ weight.T + bias)``'s operands: x (..., K), weight (N, K), bias (N,).

    ``weight_name`` / ``bias_name`` are the argument names the messages use (``w_gate``...)."""
    check_tensor("x", x)
    check_weight_and_bias(("x", x), weight, bias, weight_name, bias_name)
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension (..., in_features), got shape ()")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"in_features mismatch: x has shape {tuple(x.shape)} (last dim {x.shape[-1]}) but "
            f"{weight_name} has shape {tuple(weight.shape)} (in_features {weight.shape[1]})"
        )


def check_weight_and_bias(
    like: tuple[str, torch.Tensor], weight: object, bias: object | None, weight_name: str,
    bias_name: str,
) -> None:
    """weight (out_features, in_features) and bias (out_features,) or None: float tensors of
    the dtype and on the device of ``like`` = (its name, the tensor)."""
    check_tensor(weight_name, weight)
    named = [like, (weight_name, weight)]
    if bias is not None:
        named.append((bias_name, check_tensor(bias_name, bias)))
    check_same_device(named)
    check_same_dtype(named)
    if weight.dim() != 2:
        raise ValueError(
            f"{weight_name} must be 2-D (out_features, in_features), got shape "
            f"{tuple(weight.shape)}"
        )
    if bias is not None:
        if bias.dim() != 1:
            raise ValueError(
                f"{bias_name} must be 1-D (out_features,), got shape {tuple(bias.shape)}"
            )
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(
                f"{bias_name} has shape {tuple(bias.shape)} but {weight_name} has shape "
                f"{tuple(weight.shape)}: {bias_name} length must equal out_features "
                f"{weight.shape[0]}"
            )


def check_dropout_p(p: object) -> float:
    """Validate the dropout probability: a real number in [0, 1) (1 would drop everything and
    scale by 1 / 0). Returns it as a float."""
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(f"dropout probability p must be a float in [0, 1), got {p!r}")
    if not 0.0 <= p < 1.0:  # NaN fails too
        raise ValueError(f"dropout probability p must be in [0, 1), got {p!r}")
    return float(p)


def check_dropout_seed(seed: object, p: float, x: torch.Tensor) -> None:
    """With dropout (p > 0) the launchers need the call's seed: a 1-element int64 tensor on
    x's device."""
    if p == 0.0:
        return
    if not isinstance(seed, torch.Tensor) or seed.dtype != torch.int64 or seed.numel() != 1:
        raise ValueError(
            f"seed must be a 1-element int64 tensor when p > 0 (p = {p}), got "
            + (f"{seed.dtype} of shape {tuple(seed.shape)}" if isinstance(seed, torch.Tensor)
               else type(seed).__name__)
        )
    check_same_device([("x", x), ("seed", seed)])


def check_dropout(seed: object, p: object, x: torch.Tensor) -> float:
    """A launcher's dropout arguments: p in [0, 1) and, when p > 0, the call's seed (a 1-element
    int64 tensor on x's device). Returns p as a float."""
    p = check_dropout_p(p)
    check_dropout_seed(seed, p, x)
    return p


def check_dropout_columns(col_offset: object, n_cols: object, hidden: int) -> tuple[int, int]:
    """Where the call's ``hidden`` activation columns sit in the whole activation whose dropout
    mask is drawn: columns ``col_offset`` .. ``col_offset + hidden`` of ``n_cols`` (tensor
    parallel: a rank's shard). ``n_cols=None`` is ``hidden``. Returns (col_offset, n_cols)."""
    n_cols = hidden if n_cols is None else n_cols
    for name, value in (("col_offset", col_offset), ("n_cols", n_cols)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {value!r}")
    if col_offset < 0 or col_offset + hidden > n_cols:
        raise ValueError(
            f"the {hidden} hidden columns at col_offset {col_offset} do not fit in an activation "
            f"of n_cols {n_cols} columns"
        )
    return col_offset, n_cols
