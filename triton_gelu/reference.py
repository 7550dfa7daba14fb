"""Pure-PyTorch references. Tests and the bench compare against these; the CPU fallback (no
interpreter) uses the float32 ones, which follow the kernels' formulas in ``_math.py``."""

from __future__ import annotations


import torch
import torch.nn.functional as F

from . import activations


def form_name(form: str) -> str:
    """An activation's name from a form as the tests and the bench spell it: torch's
    ``approximate`` ("none", "tanh") or a name of ``activations.ACTIVATIONS``."""
    return activations.BY_APPROXIMATE.get(form, form)


def gelu_fp32(x: torch.Tensor, activation: str) -> torch.Tensor:
    """The activation of x computed in float32 with the kernels' formulas, returned in float32."""
    return activations.value_fp32(x, activation)


def gelu_grad_fp32(x: torch.Tensor, activation: str) -> torch.Tensor:
    """Its derivative computed in float32 with the kernels' formulas, returned in float32."""
    return activations.grad_fp32(x, activation)


def act64(x: torch.Tensor, form: str = "none") -> torch.Tensor:
    """The activation of x in x's dtype by PyTorch's own ops (float64 on float64 input)."""
    return activations.torch_activation(x, form_name(form))


def gelu64(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """Float64 ground truth of torch.nn.functional.gelu."""
    return act64(x.double(), approximate)


def gelu_grad64(x: torch.Tensor, dy: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """Float64 ground truth of dy * gelu'(x), through torch's own autograd."""
    x64 = x.detach().double().requires_grad_(True)
    (dx,) = torch.autograd.grad(act64(x64, approximate), x64, dy.double())
    return dx


# ---- Linear + bias + GELU -------------------------------------------------------------------


def linear_preact_fp32(
    x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """z = x @ W^T + b accumulated in float32 (inputs upcast first), returned in float32."""
    with torch.autocast(x2d.device.type, enabled=False):  # an enclosing autocast must not recast
        z = x2d.float() @ weight.float().t()
        return z if bias is None else z + bias.float()


def linear_gelu_backward_fp32(
    dy2d: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor, preact: torch.Tensor,
    activation: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dW, db) in float32 with the kernels' numerics.

    dz = dy * gelu'(z) in float32; the matmuls take dz rounded to the input dtype (what the
    kernels feed tl.dot), db sums the unrounded float32 dz.
    """
    with torch.autocast(x2d.device.type, enabled=False):
        dz = dy2d.float() * gelu_grad_fp32(preact, activation)
        dz_operand = dz.to(x2d.dtype).float()
        return dz_operand @ weight.float(), dz_operand.t() @ x2d.float(), dz.sum(0)


def linear_gelu64(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, approximate: str = "none"
) -> torch.Tensor:
    """Float64 ground truth of gelu(linear(x, weight, bias))."""
    bias64 = None if bias is None else bias.detach().double()
    z64 = F.linear(x.detach().double(), weight.detach().double(), bias64)
    return act64(z64, approximate)


def linear_gelu_grads64(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dy: torch.Tensor,
    approximate: str = "none",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Float64 ground truth of (dx, dW, db) for the upstream gradient ``dy``, by torch autograd."""
    x64 = x.detach().double().requires_grad_(True)
    w64 = weight.detach().double().requires_grad_(True)
    b64 = None if bias is None else bias.detach().double().requires_grad_(True)
    y64 = act64(F.linear(x64, w64, b64), approximate)
    grads = torch.autograd.grad(y64, [x64, w64] if b64 is None else [x64, w64, b64], dy.double())
    return grads[0], grads[1], None if b64 is None else grads[2]


# ---- dropout: Triton's Philox, bit for bit ----------------------------------------------------

# Philox-4x32-10 as triton.language.random implements it (the same on Triton 3.6 and 3.9).
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
_U32 = 0xFFFFFFFF


def dropout_constants(p: float) -> tuple[int, float]:
    """(threshold, scale) of dropout with probability ``p`` in [0, 1): an element is kept when
    the top 31 bits of its random word are >= threshold = round(p * 2**31) (kept with
    probability 1 - p to within 2**-32), and kept values are multiplied by scale = 1 / (1 - p)."""
    return min(round(p * 2**31), 2**31 - 1), 1.0 / (1.0 - p)


def _mul_hi_lo(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of a * b for uint32 values held in int64 (16-bit limbs, so no
    product overflows int64)."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    b_hi, b_lo = b >> 16, b & 0xFFFF
    ll, lh, hl, hh = a_lo * b_lo, a_lo * b_hi, a_hi * b_lo, a_hi * b_hi
    mid = (ll >> 16) + (lh & 0xFFFF) + (hl & 0xFFFF)
    return hh + (lh >> 16) + (hl >> 16) + (mid >> 16), ((mid & 0xFFFF) << 16) | (ll & 0xFFFF)


def philox4(seed: torch.Tensor, counter: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``tl.randint4x(seed, counter)`` in PyTorch: four uint32 words (in int64) for the int64
    seed and non-negative int64 counters, equal bit for bit to what the kernels draw."""
    c0, c1 = counter & _U32, (counter >> 32) & _U32
    c2 = c3 = torch.zeros_like(counter)
    k0, k1 = seed & _U32, (seed >> 32) & _U32
    for _ in range(10):
        hi_b, lo_b = _mul_hi_lo(c2, _PHILOX_ROUND_B)
        hi_a, lo_a = _mul_hi_lo(c0, _PHILOX_ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _PHILOX_KEY_A) & _U32, (k1 + _PHILOX_KEY_B) & _U32
    return c0, c1, c2, c3


def dropout_words(seed: torch.Tensor, rows: int, cols: int, col_offset: int = 0,
                  n_cols: int | None = None) -> torch.Tensor:
    """The (rows, cols) 32-bit words (in int64) the kernels' dropout draws for ``seed`` (a
    1-element int64 tensor, on the device the words are made on): element (m, n) of the whole
    (rows, ``n_cols``) activation (default ``cols``) takes word n % 4 of Philox at counter
    m * ceil(n_cols / 4) + n // 4; these are its columns ``col_offset`` .. ``col_offset + cols``
    (a tensor-parallel shard)."""
    groups = -(-(cols if n_cols is None else n_cols) // 4)
    first, last = col_offset // 4, -(-(col_offset + cols) // 4)  # the groups the columns touch
    row_start = torch.arange(rows, dtype=torch.int64, device=seed.device)[:, None] * groups
    counter = row_start + torch.arange(first, last, dtype=torch.int64, device=seed.device)
    words = torch.stack(philox4(seed.view(1), counter.reshape(-1)), dim=-1)  # (.., 4)
    start = col_offset - 4 * first
    return words.view(rows, (last - first) * 4)[:, start:start + cols]


def dropout_keep(seed: torch.Tensor, rows: int, cols: int, p: float, col_offset: int = 0,
                 n_cols: int | None = None) -> torch.Tensor:
    """The (rows, cols) boolean keep mask the kernels draw for ``seed`` and ``p`` (columns
    ``col_offset`` .. of an activation of ``n_cols``, as ``dropout_words``)."""
    words = dropout_words(seed, rows, cols, col_offset, n_cols)
    return (words >> 1) >= dropout_constants(p)[0]


# ---- the FFN block: linear2(dropout(gelu(linear1(x)))) --------------------------------------


def dropout64(h: torch.Tensor, keep: torch.Tensor | None, p: float) -> torch.Tensor:
    """Float64 dropout of ``h`` with the explicit keep mask ``keep`` (None: no dropout)."""
    if keep is None:
        return h
    return h * (keep.to(h.device, torch.float64) / (1.0 - p))


def dropout_fp32(y: torch.Tensor, keep: torch.Tensor | None, scale: float) -> torch.Tensor:
    """y * keep / (1 - p) in float32, as the kernels compute it (a product: NaN propagates)."""
    if keep is None:
        return y
    return y * torch.where(keep, torch.tensor(scale, dtype=torch.float32, device=y.device), 0.0)


def ffn_forward_fp32(
    x2d: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
    b2: torch.Tensor | None, keep: torch.Tensor | None, scale: float, activation: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, z) of the FFN block in float32 with the kernels' numerics: h = dropout(gelu(z)) from
    the float32 z, rounded to the input dtype before the second matmul."""
    preact = linear_preact_fp32(x2d, w1, b1)
    h = dropout_fp32(gelu_fp32(preact, activation), keep, scale).to(x2d.dtype)
    return linear_preact_fp32(h, w2, b2), preact


def ffn_backward_fp32(
    dy2d: torch.Tensor, x2d: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
    preact: torch.Tensor, keep: torch.Tensor | None, scale: float, activation: str,
) -> tuple[torch.Tensor, ...]:
    """(dx, dW1, db1, dW2, db2) of the FFN block in float32 with the kernels' numerics.

    dh = dy @ W2, dz = dh * keep / (1 - p) * gelu'(z), h = dropout(gelu(z)); the matmuls take dz
    and h rounded to the input dtype, db1 sums the unrounded float32 dz.
    """
    with torch.autocast(x2d.device.type, enabled=False):
        dy = dy2d.float()
        dz = dropout_fp32((dy @ w2.float()) * gelu_grad_fp32(preact, activation),
                           keep, scale)
        dz_operand = dz.to(x2d.dtype).float()
        h = dropout_fp32(gelu_fp32(preact, activation), keep, scale).to(x2d.dtype)
        return (dz_operand @ w1.float(), dz_operand.t() @ x2d.float(), dz.sum(0),
                dy.t() @ h.float(), dy.sum(0))


def feed_forward64(
    x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
    b2: torch.Tensor | None, keep: torch.Tensor | None, p: float, approximate: str,
    dy: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """Float64 ground truth of y = linear2(dropout(gelu(linear1(x)))) with the explicit keep
    mask ``keep`` ((..., d_ff) booleans, None for no dropout), and, given the upstream gradient
    ``dy``, the gradients [dx, dW1, db1, dW2, db2] (``grads64``)."""
    def block(x, w1, b1, w2, b2):
        h = act64(F.linear(x, w1, b1), approximate)
        return F.linear(dropout64(h, keep, p), w2, b2)

    tensors = [x, w1, b1, w2, b2]
    with torch.no_grad():
        y = block(*(None if t is None else t.detach().double() for t in tensors))
    return y, ([] if dy is None else grads64(block, tensors, dy))


# ---- Gated GELU (GeGLU) ---------------------------------------------------------------------


def geglu_fp32(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """h = gelu(g) * u in float32 with the kernels' formulas, returned in float32."""
    return gelu_fp32(gate, activation) * up.float()


def geglu_forward_fp32(
    x2d: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, b_gate: torch.Tensor | None,
    b_up: torch.Tensor | None, activation: str, keep: torch.Tensor | None = None,
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h in float32, g, u in x's dtype) with the kernels' numerics: g and u accumulated in
    float32, rounded to the input dtype, then gated in float32; with the keep mask ``keep``,
    h is dropout(gelu(g) * u) (kept elements times ``scale`` = 1 / (1 - p))."""
    gate = linear_preact_fp32(x2d, w_gate, b_gate).to(x2d.dtype)
    up = linear_preact_fp32(x2d, w_up, b_up).to(x2d.dtype)
    return dropout_fp32(geglu_fp32(gate, up, activation), keep, scale), gate, up


def geglu_backward_fp32(
    dh2d: torch.Tensor, x2d: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
    gate: torch.Tensor, up: torch.Tensor, activation: str,
    keep: torch.Tensor | None = None, scale: float = 1.0,
) -> tuple[torch.Tensor, ...]:
    """(dx, dW_gate, dW_up, db_gate, db_up) in float32 with the fused kernels' numerics.

    dg = dh * u * gelu'(g) and du = dh * gelu(g) in float32 (with ``keep``, dh is the gradient
    of dropout(h) and enters as dh * keep * scale); the matmuls take them rounded to the input
    dtype, the bias gradients sum the float32 values.
    """
    with torch.autocast(x2d.device.type, enabled=False):
        dh, g, u = dropout_fp32(dh2d.float(), keep, scale), gate.float(), up.float()
        dgate = dh * u * gelu_grad_fp32(g, activation)
        dup = dh * gelu_fp32(g, activation)
        dg_op, du_op = dgate.to(x2d.dtype).float(), dup.to(x2d.dtype).float()
        x = x2d.float()
        return (dg_op @ w_gate.float() + du_op @ w_up.float(), dg_op.t() @ x, du_op.t() @ x,
                dgate.sum(0), dup.sum(0))


def geglu64(
    x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, b_gate: torch.Tensor | None = None,
    b_up: torch.Tensor | None = None, approximate: str = "tanh",
) -> torch.Tensor:
    """Float64 ground truth of gelu(linear(x, w_gate, b_gate)) * linear(x, w_up, b_up)."""
    # Not detached: ``grads64`` differentiates through these references.
    x, w_gate, w_up = x.double(), w_gate.double(), w_up.double()
    gate = F.linear(x, w_gate, _double_or_none(b_gate))
    return act64(gate, approximate) * F.linear(x, w_up, _double_or_none(b_up))


def gated_feed_forward64(
    x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
    b_gate: torch.Tensor | None = None, b_up: torch.Tensor | None = None,
    b_down: torch.Tensor | None = None, approximate: str = "tanh",
    keep: torch.Tensor | None = None, p: float = 0.0,
) -> torch.Tensor:
    """Float64 ground truth of linear(dropout(geglu(x, ...)), w_down, b_down), dropout with the
    explicit keep mask ``keep`` ((..., hidden) booleans, None for none) and probability p."""
    h = dropout64(geglu64(x, w_gate, w_up, b_gate, b_up, approximate), keep, p)
    return F.linear(h, w_down.double(), _double_or_none(b_down))


def grads64(
    fn, tensors: list[torch.Tensor | None], dy: torch.Tensor
) -> list[torch.Tensor | None]:
    """Float64 ground truth of the gradients of ``fn(*tensors)`` for the upstream ``dy``, by
    torch autograd on float64 copies; None for each tensor that is None."""
    leaves = [t.detach().double().requires_grad_(True) if t is not None else None
              for t in tensors]
    fn(*leaves).backward(dy.double())
    return [t.grad if t is not None else None for t in leaves]


def _double_or_none(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.double()
