"""The activations and their derivatives as ``@triton.jit`` helpers: the one copy every kernel
uses. ``activate`` / ``activate_grad`` select a form by its name in ``triton_gelu.activations``
(a ``tl.constexpr`` string: the untaken branches are not compiled).

All helpers take and return float32 tensors; callers upcast on load and cast once on store.

Exact form (``approximate="none"``)::

    gelu(x)  = x * Phi(x)              Phi(x) = 0.5 * (1 + erf(x / sqrt(2)))
    gelu'(x) = Phi(x) + x * phi(x)     phi(x) = exp(-x^2 / 2) / sqrt(2 * pi)

Tanh form (``approximate="tanh"``), with u = sqrt(2/pi) * (x + 0.044715 x^3)::

    gelu(x)  = 0.5 * x * (1 + tanh(u)) = x * sigmoid(2u)
    gelu'(x) = sigmoid(2u) + x * 2 * sigmoid(2u) * sigmoid(-2u) * du/dx
    du/dx    = sqrt(2/pi) * (1 + 3 * 0.044715 x^2)

quick_gelu (``activation="quick_gelu"``, OpenAI's CLIP), with s = sigmoid(1.702 x)::

    quick_gelu(x)  = x * s
    quick_gelu'(x) = s + 1.702 x s (1 - s)

The tanh and quick forms are evaluated through sigmoid(2u) built from t = exp(-2|u|), which lies in [0, 1]:
nothing overflows for any finite x (x^3 is taken in float32, so |x| up to 65504 from fp16 is fine),
there is no inf/inf, and 1 + tanh(u) loses no digits to cancellation for negative x (torch's
formula does). It also avoids ``tanh``, which moved between Triton releases.

Dropout: element (m, n) of an (M, N) activation draws its 32-bit word from Philox-4x32-10
(``tl.randint4x``, keyed by the call's 64-bit seed): one call per group of 4 columns of a row,
counter m * ceil(N / 4) + n // 4 (int64), word n % 4 of the four it returns. It is kept when the
top 31 bits of its word are at least threshold = round(p * 2**31): probability 1 - p to within
2**-32. The mask is a function of the seed and the position alone, so any tile shape (tiles
start at multiples of 4 columns) and the elementwise kernels draw the same one, and
``reference.dropout_keep`` (an exact PyTorch copy of the generator) too. Four words per Philox
call: a quarter of the integer work of one call per element, which in a matmul epilogue is the
difference between hiding under the matmul and doubling a small one's time. The host side of
dropout is here too: ``dropout_arguments`` (what every launcher passes a dropout epilogue;
``dropout_constants``, the part a problem's launches share) and ``without_dropout`` (the
``Paths`` predicate of the paths that cannot draw this mask).

Under tensor parallel a rank holds columns ``col_offset`` .. ``col_offset + N`` of the whole
(M, ``n_cols``) activation: the helpers take both and draw each element's word at its position in
the whole activation, so the ranks together drop exactly what one process would.
"""

import functools

import torch
import triton
import triton.language as tl

from .. import reference
from .._runtime import interpreting

# Read once, like Triton itself reads TRITON_INTERPRET once at import.
INTERPRETING: tl.constexpr = tl.constexpr(interpreting())


@triton.jit
def _sigmoid_2u(u):
    """Return (sigmoid(2u), sigmoid(2u) * sigmoid(-2u)) without overflow for any u."""
    t = tl.exp(-2.0 * tl.abs(u))  # in [0, 1]; NaN stays NaN
    r = 1.0 / (1.0 + t)
    s = tl.where(u >= 0, r, t * r)
    return s, t * r * r


@triton.jit
def _gelu_erf(x):
    # x * 0.5 * (1 + erf(x / sqrt(2)))
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def _gelu_erf_grad(x):
    # Phi(x) + x * phi(x); exp(-x^2/2) underflows to 0 for large |x|, so x * phi stays finite.
    cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
    pdf = tl.exp(-0.5 * x * x) * 0.3989422804014327
    return cdf + x * pdf


@triton.jit
def _tanh_arg(x):
    # u = sqrt(2/pi) * (x + 0.044715 x^3)
    return 0.7978845608028654 * (x + 0.044715 * x * x * x)


@triton.jit
def _gelu_tanh(x):
    s, _ = _sigmoid_2u(_tanh_arg(x))
    return x * s


@triton.jit
def _gelu_tanh_grad(x):
    s, s_1ms = _sigmoid_2u(_tanh_arg(x))
    du_dx = 0.7978845608028654 * (1.0 + 0.134145 * x * x)  # 0.134145 = 3 * 0.044715
    # Where s * (1 - s) underflowed to 0 the second term is exactly 0; skipping it there keeps
    # x * x^2 (inf for |x| > 7e12 in fp32) from turning 0 * inf into NaN.
    return tl.where(s_1ms == 0.0, s, s + 2.0 * x * s_1ms * du_dx)


@triton.jit
def _quick_gelu(x):
    # x * sigmoid(1.702 x) = x * sigmoid(2u) with u = 0.851 x
    s, _ = _sigmoid_2u(0.851 * x)
    return x * s


@triton.jit
def _quick_gelu_grad(x):
    # s + 1.702 x s (1 - s), s = sigmoid(1.702 x); where s (1 - s) underflowed to 0 the second
    # term is exactly 0 (skipping it keeps inf * 0 from turning into NaN), as in the tanh form.
    s, s_1ms = _sigmoid_2u(0.851 * x)
    return tl.where(s_1ms == 0.0, s, s + 1.702 * x * s_1ms)


@triton.jit
def activate(x, ACTIVATION: tl.constexpr):
    """The activation ``ACTIVATION`` (a name of ``triton_gelu.activations.ACTIVATIONS``) of a
    float32 tensor. The name is a compile-time constant: each form compiles its own kernel."""
    if ACTIVATION == "gelu_tanh":
        return _gelu_tanh(x)
    elif ACTIVATION == "quick_gelu":
        return _quick_gelu(x)
    else:
        tl.static_assert(ACTIVATION == "gelu", "ACTIVATION is not a name of activations.py")
        return _gelu_erf(x)


@triton.jit
def activate_grad(x, ACTIVATION: tl.constexpr):
    """d activation(x) / dx of a float32 tensor, for the activation named ``ACTIVATION``."""
    if ACTIVATION == "gelu_tanh":
        return _gelu_tanh_grad(x)
    elif ACTIVATION == "quick_gelu":
        return _quick_gelu_grad(x)
    else:
        tl.static_assert(ACTIVATION == "gelu", "ACTIVATION is not a name of activations.py")
        return _gelu_erf_grad(x)


@triton.jit
def cast_to(y, dtype: tl.constexpr):
    """Cast float32 ``y`` to ``dtype`` rounding to nearest even, as the GPU does.

    The interpreter truncates float32 -> bfloat16 (round toward zero: half-ulp errors that the
    GPU does not make), so there, and only there, round the float32 bits first.
    """
    if INTERPRETING:
        if dtype == tl.bfloat16:
            bits = y.to(tl.uint32, bitcast=True)
            bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
            y = bits.to(tl.float32, bitcast=True)
    return y.to(dtype)


@triton.jit
def _keep_scale(bits, threshold, scale):
    # What dropout multiplies an element by: 1 / (1 - p) where kept, else 0 (a product, not a
    # select, so NaN and inf propagate as through nn.Dropout's input * mask / (1 - p))
    return tl.where((bits >> 1).to(tl.int32) >= threshold, scale, 0.0)


@triton.jit
def dropout_factor_tile(seed_ptr, offs_m, pid_n, n_cols, col_offset, threshold, scale,
                        BLOCK_SIZE_N: tl.constexpr):
    """Dropout factors (0 or 1 / (1 - p)) of a (BLOCK_SIZE_M, BLOCK_SIZE_N) tile: rows ``offs_m``
    (int64), local columns pid_n * BLOCK_SIZE_N + arange (BLOCK_SIZE_N a multiple of 4), which
    are columns ``col_offset`` + those of the whole (M, ``n_cols``) activation. ``seed_ptr``: the
    call's int64 seed; ``threshold`` = round(p * 2**31)."""
    if col_offset % 4 == 0:  # tiles start on a group of 4 columns: one Philox call per group
        offs_group = (col_offset // 4 + pid_n.to(tl.int64) * (BLOCK_SIZE_N // 4)
                      + tl.arange(0, BLOCK_SIZE_N // 4))
        counter = offs_m[:, None] * tl.cdiv(n_cols, 4) + offs_group[None, :]  # (BM, BN / 4)
        r0, r1, r2, r3 = tl.randint4x(tl.load(seed_ptr), counter)
        # (BM, BN): column 4g + i gets word i of group g
        bits = tl.interleave(tl.interleave(r0, r2), tl.interleave(r1, r3))
        factor = _keep_scale(bits, threshold, scale)
    else:  # a shard starting inside a group (an uneven split): one call per element
        cols = col_offset + pid_n.to(tl.int64) * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)
        factor = dropout_factor(seed_ptr, offs_m[:, None], cols[None, :], n_cols, threshold,
                                scale)
    return factor


@triton.jit
def dropout_factor(seed_ptr, row, col, n_cols, threshold, scale):
    """Dropout factors of elements (row, col) (int64 tensors of any shape, positions in the
    whole (rows, n_cols) activation): the same as ``dropout_factor_tile``, one Philox call per
    element."""
    r0, r1, r2, r3 = tl.randint4x(tl.load(seed_ptr), row * tl.cdiv(n_cols, 4) + col // 4)
    word = col % 4
    bits = tl.where(word == 0, r0, tl.where(word == 1, r1, tl.where(word == 2, r2, r3)))
    return _keep_scale(bits, threshold, scale)


@triton.jit
def dropout_factor_flat(seed_ptr, offs, n_cols, col_offset, whole_cols, threshold, scale):
    """Dropout factors of the elements at flat indices ``offs`` (int64, any shape) of a row-major
    (rows, ``n_cols``) activation whose columns are columns ``col_offset`` .. of the whole
    (rows, ``whole_cols``) one (the elementwise kernels)."""
    row = offs // n_cols
    return dropout_factor(seed_ptr, row, col_offset + offs - row * n_cols, whole_cols,
                          threshold, scale)


def ceil_div(a: int, b: int) -> int:
    """ceil(a / b) on the host, for launch grids: ``triton.cdiv`` is a ConstexprFunction,
    whose call from Python costs about 4 us (Triton 3.6 and 3.9), more than a grid is worth."""
    return -(-a // b)


# ---- the host side of dropout --------------------------------------------------------------


def dropout_arguments(seed: torch.Tensor | None, p: float, n_cols: int,
                      col_offset: int = 0) -> dict:
    """The dropout arguments every kernel with a dropout epilogue takes (``seed_ptr``,
    ``dropout_n_cols`` and ``dropout_constants``), for probability ``p`` and the call's columns
    being columns ``col_offset`` .. of an activation of ``n_cols`` (tensor parallel: a rank's
    shard; else the call's own columns and 0): with p == 0 dropout is compiled out and no seed
    is read."""
    return dict(seed_ptr=seed if p != 0.0 else None, dropout_n_cols=n_cols,
                **dropout_constants(p, col_offset))


@functools.lru_cache(maxsize=256)
def dropout_constants(p: float, col_offset: int = 0) -> dict:
    """The dropout arguments that are the same for every call of a problem (``dropout_threshold``,
    ``dropout_scale``, ``dropout_col_offset``, ``HAS_DROPOUT``): one shared dict per (p,
    col_offset), which the callers only read."""
    threshold, scale = reference.dropout_constants(p)
    return dict(dropout_threshold=threshold, dropout_scale=scale, dropout_col_offset=col_offset,
                HAS_DROPOUT=p != 0.0)


def without_dropout(*args: object, p: float, **kwargs: object) -> bool:
    """``Paths(applies=...)`` for a path that cannot draw the kernels' dropout mask (PyTorch's
    own ops draw another): it serves p == 0 only. The ops pass ``p`` by keyword, and their path
    keys hold p > 0, so the answer depends on the key alone."""
    return p == 0.0
