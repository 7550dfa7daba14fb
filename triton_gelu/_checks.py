"""Argument validation: every bad input is refused here, in Python, before any kernel runs."""

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
    _check_weight_and_bias(("x", x), weight, bias, weight_name, bias_name)
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension (..., in_features), got shape ()")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"in_features mismatch: x has shape {tuple(x.shape)} (last dim {x.shape[-1]}) but "
            f"{weight_name} has shape {tuple(weight.shape)} (in_features {weight.shape[1]})"
        )


def _check_weight_and_bias(
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


def check_linear_backward(
    dy2d: object, x2d: torch.Tensor, weight: torch.Tensor, preact: object
) -> None:
    """The backward's other operands, once x (flattened to ``x2d``) and weight passed
    ``check_linear``: dy and the saved pre-activation are (M, N)."""
    check_same_device([("x", x2d), ("dy", check_tensor("dy", dy2d)),
                       ("preact", check_tensor("preact", preact))])
    expected = (x2d.shape[0], weight.shape[0])
    for name, t in (("dy", dy2d), ("preact", preact)):
        if tuple(t.shape) != expected:
            raise ValueError(
                f"{name} must have shape (M, N) = {expected} for x of shape {tuple(x2d.shape)} "
                f"and weight of shape {tuple(weight.shape)}, got {tuple(t.shape)}"
            )


def check_geglu(
    x: object, w_gate: object, w_up: object, b_gate: object | None, b_up: object | None
) -> None:
    """Validate ``gelu(x @ w_gate.T + b_gate) * (x @ w_up.T + b_up)``'s operands: each
    projection as a Linear, and the two of the same shape, dtype and device."""
    check_linear(x, w_gate, b_gate, "w_gate", "b_gate")
    check_linear(x, w_up, b_up, "w_up", "b_up")
    check_same_device([("w_gate", w_gate), ("w_up", w_up)])
    check_same_dtype([("w_gate", w_gate), ("w_up", w_up)])
    if w_up.shape != w_gate.shape:
        raise ValueError(
            f"w_up has shape {tuple(w_up.shape)} but w_gate has shape {tuple(w_gate.shape)}: "
            "the gate and up projections must have the same (hidden_features, in_features)"
        )


def check_geglu_2d(
    x2d: object, w_gate: object, w_up: object, b_gate: object | None, b_up: object | None
) -> None:
    """``check_geglu`` for the launchers, which take x already flattened to (M, K)."""
    check_geglu(x2d, w_gate, w_up, b_gate, b_up)
    if x2d.dim() != 2:
        raise ValueError(f"x must be 2-D (M, in_features) here, got shape {tuple(x2d.shape)}")


def check_geglu_backward(
    dh2d: object, x2d: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, gate: object,
    up: object, needs: Sequence[bool],
) -> tuple[bool, ...]:
    """The backward's other operands, once x (flattened to ``x2d``) and the weights passed
    ``check_geglu``: dh and the saved gate and up are (M, N); ``needs`` holds five flags (dx,
    dw_gate, dw_up, db_gate, db_up), returned as a tuple of bools."""
    named = [("dh", dh2d), ("gate", gate), ("up", up)]
    check_same_device([("x", x2d)] + [(name, check_tensor(name, t)) for name, t in named])
    expected = (x2d.shape[0], w_gate.shape[0])
    for name, t in named:
        if tuple(t.shape) != expected:
            raise ValueError(
                f"{name} must have shape (M, N) = {expected} for x of shape {tuple(x2d.shape)} "
                f"and w_gate of shape {tuple(w_gate.shape)}, got {tuple(t.shape)}"
            )
    if len(needs) != 5:
        raise ValueError(
            f"needs must hold 5 flags (dx, dw_gate, dw_up, db_gate, db_up), got {list(needs)}"
        )
    return tuple(bool(n) for n in needs)


def check_down(w_gate: torch.Tensor, w_down: object, b_down: object | None) -> None:
    """The down projection of a gated block: w_down (out_features, hidden_features) reads the
    gated hidden of width w_gate.shape[0]; b_down (out_features,)."""
    _check_weight_and_bias(("w_gate", w_gate), w_down, b_down, "w_down", "b_down")
    if w_down.shape[1] != w_gate.shape[0]:
        raise ValueError(
            f"w_down must be 2-D (out_features, hidden_features = {w_gate.shape[0]}) to read "
            f"the gated hidden of w_gate {tuple(w_gate.shape)}, got shape {tuple(w_down.shape)}"
        )


def check_dropout_p(p: object) -> float:
    """Validate the dropout probability: a real number in [0, 1) (1 would drop everything and
    scale by 1 / 0). Returns it as a float."""
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(f"dropout probability p must be a float in [0, 1), got {p!r}")
    if not 0.0 <= p < 1.0:  # NaN fails too
        raise ValueError(f"dropout probability p must be in [0, 1), got {p!r}")
    return float(p)


def check_ffn(
    x: object, w1: object, b1: object | None, w2: object, b2: object | None
) -> None:
    """The FFN block's operands: x (..., D), w1 (F, D), b1 (F,), w2 (D_out, F), b2 (D_out,),
    all of one dtype and on one device."""
    check_linear(x, w1, b1, "w1", "b1")
    _check_weight_and_bias(("x", x), w2, b2, "w2", "b2")
    if w2.shape[1] != w1.shape[0]:
        raise ValueError(
            f"linear2 in_features mismatch: w1 has shape {tuple(w1.shape)} (hidden features "
            f"{w1.shape[0]}) but w2 has shape {tuple(w2.shape)} (in_features {w2.shape[1]})"
        )


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


def check_ffn_2d(
    x2d: object, w1: object, b1: object | None, w2: object, b2: object | None, seed: object,
    p: object,
) -> float:
    """``check_ffn`` for the launchers, which take x flattened to (M, D), and the dropout
    arguments; returns p as a float."""
    check_ffn(x2d, w1, b1, w2, b2)
    if x2d.dim() != 2:
        raise ValueError(f"x must be 2-D (M, in_features) here, got shape {tuple(x2d.shape)}")
    return check_dropout(seed, p, x2d)


def check_ffn_backward(
    dy2d: object, x2d: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, preact: object,
    seed: object, p: object,
) -> float:
    """The backward launchers' operands: dy (M, D_out) and the pre-activation z (M, F)."""
    p = check_ffn_2d(x2d, w1, None, w2, None, seed, p)
    check_same_device([("x", x2d), ("dy", check_tensor("dy", dy2d)),
                       ("preact", check_tensor("preact", preact))])
    for name, t, expected in (("dy", dy2d, (x2d.shape[0], w2.shape[0])),
                              ("preact", preact, (x2d.shape[0], w1.shape[0]))):
        if tuple(t.shape) != expected:
            raise ValueError(
                f"{name} must have shape {expected} for x of shape {tuple(x2d.shape)}, "
                f"w1 of shape {tuple(w1.shape)} and w2 of shape {tuple(w2.shape)}, "
                f"got {tuple(t.shape)}"
            )
    return p


def check_ffn_needs(needs: object) -> tuple[bool, ...]:
    """Which of the backward's (dx, dW1, db1, dW2, db2) to compute: five booleans."""
    needs = tuple(bool(n) for n in needs)
    if len(needs) != 5:
        raise ValueError(f"needs must say which of (dx, dW1, db1, dW2, db2) to compute: five "
                         f"booleans, got {len(needs)}")
    return needs
