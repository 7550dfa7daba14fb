"""GELU and its derivative as ``@triton.jit`` helpers: the one copy every kernel uses.

All helpers take and return float32 tensors; callers upcast on load and cast once on store.

Exact form (``approximate="none"``)::

    gelu(x)  = x * Phi(x)              Phi(x) = 0.5 * (1 + erf(x / sqrt(2)))
    gelu'(x) = Phi(x) + x * phi(x)     phi(x) = exp(-x^2 / 2) / sqrt(2 * pi)

Tanh form (``approximate="tanh"``), with u = sqrt(2/pi) * (x + 0.044715 x^3)::

    gelu(x)  = 0.5 * x * (1 + tanh(u)) = x * sigmoid(2u)
    gelu'(x) = sigmoid(2u) + x * 2 * sigmoid(2u) * sigmoid(-2u) * du/dx
    du/dx    = sqrt(2/pi) * (1 + 3 * 0.044715 x^2)

The tanh form is evaluated through sigmoid(2u) built from t = exp(-2|u|), which lies in [0, 1]:
nothing overflows for any finite x (x^3 is taken in float32, so |x| up to 65504 from fp16 is fine),
there is no inf/inf, and 1 + tanh(u) loses no digits to cancellation for negative x (torch's
formula does). It also avoids ``tanh``, which moved between Triton releases.

Dropout (``dropout_keep``): element ``counter`` of a call with seed ``seed`` is kept when the top
31 of the 32 bits ``tl.randint(seed, counter)`` draws (Philox-4x32, 10 rounds, keyed by the
64-bit seed, counter = the element's int64 position row * n_cols + col in the (rows, n_cols)
activation) are at least ``threshold`` = round(p * 2**31): probability 1 - p to within 2**-32,
the same bits for any tile shape, and the same bits as ``reference.dropout_keep`` (an exact
PyTorch copy of the generator).
"""

import triton
import triton.language as tl

from .._runtime import interpreting

# Read once, like Triton itself reads TRITON_INTERPRET once at import.
_INTERPRETING: tl.constexpr = tl.constexpr(interpreting())


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
def gelu(x, APPROXIMATE_TANH: tl.constexpr):
    """GELU of a float32 tensor, erf or tanh form."""
    if APPROXIMATE_TANH:
        return _gelu_tanh(x)
    else:
        return _gelu_erf(x)


@triton.jit
def gelu_grad(x, APPROXIMATE_TANH: tl.constexpr):
    """d gelu(x) / dx of a float32 tensor, erf or tanh form."""
    if APPROXIMATE_TANH:
        return _gelu_tanh_grad(x)
    else:
        return _gelu_erf_grad(x)


@triton.jit
def cast_to(y, dtype: tl.constexpr):
    """Cast float32 ``y`` to ``dtype`` rounding to nearest even, as the GPU does.

    The interpreter truncates float32 -> bfloat16 (round toward zero: half-ulp errors that the
    GPU does not make), so there, and only there, round the float32 bits first.
    """
    if _INTERPRETING:
        if dtype == tl.bfloat16:
            bits = y.to(tl.uint32, bitcast=True)
            bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
            y = bits.to(tl.float32, bitcast=True)
    return y.to(dtype)


@triton.jit
def dropout_keep(seed_ptr, counter, threshold):
    """Boolean keep mask of dropout for int64 element positions ``counter`` (any shape).

    ``seed_ptr`` points to the call's int64 seed; ``threshold`` = round(p * 2**31) as int32.
    """
    bits = tl.randint(tl.load(seed_ptr), counter)  # uint32; both 32-bit halves of counter used
    return (bits >> 1).to(tl.int32) >= threshold


@triton.jit
def dropout_factor(seed_ptr, counter, threshold, scale):
    # What dropout multiplies each element by: 1 / (1 - p) where kept, else 0 (a product, not
    # a select, so NaN and inf propagate as through nn.Dropout's input * mask / (1 - p))
    return tl.where(dropout_keep(seed_ptr, counter, threshold), scale, 0.0)


@triton.jit
def dropout(y, seed_ptr, counter, threshold, scale):
    # nn.Dropout of float32 y: y * keep / (1 - p), scale = 1 / (1 - p)
    return y * dropout_factor(seed_ptr, counter, threshold, scale)
