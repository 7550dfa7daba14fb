"""The Hopper paths ("tma": tensor-descriptor loads, a persistent grid) of the forwards and of
the FFN block's backward (its dz = dy @ W2 kernel).

Without a GPU the interpreter runs the descriptor kernels (``tl.make_tensor_descriptor`` and
``tl.range`` work there, with the TMA rules checked): the tests force the "tma" path and hold
it to the suite's rule, no worse than twice PyTorch's error in the same dtype against float64,
with NaN-filled outputs. The interpreter's persistent grid has 3 programs, fewer than the
tiles of these shapes, so programs walk several tiles. K must be a multiple of 8 here (16-byte
rows in fp16/bf16), but no shape is a multiple of a block size (32 under the interpreter).
What the compiled code does on sm90 (TMA, wgmma, spills, shared memory) is tests/aot_compile.py's.
"""

import contextlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import ATOL, DTYPES, assert_all_written, assert_no_worse_than_torch, launched, tf32

import triton_gelu
from triton_gelu import reference
from triton_gelu.tuning import spaces
from triton_gelu.tuning.paths import path_choosers
from triton_gelu.autotune import force_path
from triton_gelu.kernels import _matmul
from triton_gelu.testing import count_paths, dropout_seed

M, K, N = 70, 40, 51  # 3 x 2 tiles of 32 for 3 programs; K: 16-byte rows, no multiple of 32
HIDDEN = 56  # the FFN block's: the backward's W2 (K, HIDDEN) rows 16-byte aligned too
FORMS = ["none", "tanh"]
TMA_OPS = ("linear_gelu_fwd", "linear_preact", "ffn_fwd", "ffn_bwd", "geglu_fwd")

pytestmark = pytest.mark.usefixtures("ieee_float32")


@contextlib.contextmanager
def tma_paths():
    """Every forward by its Hopper path; afterwards, check that each op that ran took it."""
    with count_paths() as ran, force_path(**{op: "tma" for op in TMA_OPS}):
        yield
    untaken = {(op, name) for op, name in ran if op in TMA_OPS and name != "tma"}
    assert not untaken, f"forced to tma, these ran another path: {untaken}"


def _randn(*shape, dtype, device, scale=1.0):
    return (torch.randn(*shape, device=device) * scale).to(dtype)


def _linear_operands(dtype, device, bias=True, k=K):
    x = _randn(M, k, dtype=dtype, device=device)
    weight = _randn(N, k, dtype=dtype, device=device, scale=k**-0.5)
    b = _randn(N, dtype=dtype, device=device) if bias else None
    return x, weight, b


# ---- numerics, forced onto the Hopper paths ---------------------------------------------------


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("recompute", [False, True], ids=["saved", "recompute"])
@pytest.mark.parametrize("approximate", FORMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_gelu_matches_float64(dtype, approximate, recompute, bias, device,
                                     poison_outputs):
    x, weight, b = _linear_operands(dtype, device, bias)
    dy = _randn(M, N, dtype=dtype, device=device)
    leaves = [t.detach().requires_grad_(True) if t is not None else None for t in (x, weight, b)]
    out = {}

    def forward_backward():
        out["y"] = triton_gelu.linear_gelu(*leaves, approximate=approximate,
                                           recompute=recompute)
        out["y"].backward(dy)

    with tma_paths():
        counts = launched(forward_backward)
    y = out["y"].detach()
    y_torch = F.gelu(F.linear(x, weight, b), approximate=approximate)
    what = f"{dtype} {approximate} bias={bias} recompute={recompute}"
    y64 = reference.linear_gelu64(x, weight, b, approximate)
    assert_no_worse_than_torch(y, y_torch, y64, "y " + what)
    assert_all_written(y, y64, "y " + what)
    # The forward (and, with recompute, the backward's z) came from the Hopper kernel; the
    # gradients, from the backward's kernels, hold the suite's rule too.
    assert counts.get("linear_gelu_fwd_tma") == 1, counts
    assert counts.get("linear_preact_tma", 0) == int(recompute), counts
    assert "linear_gelu_fwd" not in counts and "linear_preact" not in counts, counts
    torch_leaves = [t.detach().clone().requires_grad_(True) if t is not None else None
                    for t in (x, weight, b)]
    F.gelu(F.linear(*torch_leaves), approximate=approximate).backward(dy)
    grads64 = reference.linear_gelu_grads64(x, weight, b, dy, approximate)
    for name, ours, theirs, ref in zip(("dx", "dw", "db"), leaves, torch_leaves, grads64):
        if ours is not None:
            assert_no_worse_than_torch(ours.grad, theirs.grad, ref, f"{name} {what}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_saved_and_recomputed_preact_are_one(dtype, device, poison_outputs):
    # The forward's z and linear_preact's (the recompute) from the same Hopper kernel config.
    x, weight, b = _linear_operands(dtype, device)
    lg = path_choosers
    with tma_paths():
        y, preact = lg["linear_gelu_fwd"].paths["tma"](x, weight, b, "gelu", True)
        z_only = lg["linear_preact"].paths["tma"](x, weight, b)
    z64 = F.linear(x.double(), weight.double(), b.double())
    assert_no_worse_than_torch(preact, F.linear(x, weight, b), z64, f"z {dtype}")
    assert_all_written(preact, z64, "preact")
    torch.testing.assert_close(z_only, preact, rtol=0, atol=0, msg="linear_preact != saved z")


@pytest.mark.parametrize("p", [0.0, 0.3], ids=["p0", "p0.3"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_feed_forward_with_dropout_matches_float64(dtype, p, device, poison_outputs):
    # Forward (the linear kernel with its dropout epilogue) and backward (the dz kernel, its
    # epilogue regenerating the mask) both on their Hopper kernels. W2 is (K, HIDDEN): a
    # descriptor needs its rows 16-byte aligned too.
    operands = (_randn(M, K, dtype=dtype, device=device),
                _randn(HIDDEN, K, dtype=dtype, device=device, scale=K**-0.5),
                _randn(HIDDEN, dtype=dtype, device=device),
                _randn(K, HIDDEN, dtype=dtype, device=device, scale=HIDDEN**-0.5),
                _randn(K, dtype=dtype, device=device))
    dy = _randn(M, K, dtype=dtype, device=device)
    leaves = [t.detach().requires_grad_(True) for t in operands]
    call_seed = int(torch.randint(0, 2**31, ()))
    torch.manual_seed(call_seed)
    out = {}

    def forward_backward():
        out["y"] = triton_gelu.feed_forward(*leaves, p=p, approximate="tanh")
        out["y"].backward(dy)

    with tma_paths():
        counts = launched(forward_backward)
    assert counts.get("ffn_fwd_gelu_dropout_tma") == 1 and counts.get("ffn_bwd_dz_tma") == 1, \
        counts
    assert "ffn_fwd_gelu_dropout" not in counts and "ffn_bwd_dz" not in counts, counts
    keep = None
    if p:
        torch.manual_seed(call_seed)
        keep = reference.dropout_keep(dropout_seed(device), M, HIDDEN, p)
    theirs = [t.detach().clone().requires_grad_(True) for t in operands]
    h = F.gelu(F.linear(theirs[0], theirs[1], theirs[2]), approximate="tanh")
    if keep is not None:
        h = h * (keep.to(h.dtype) / (1.0 - p))
    y_torch = F.linear(h, theirs[3], theirs[4])
    y_torch.backward(dy)
    y64, grads64 = reference.feed_forward64(*operands, keep, p, "tanh", dy)
    what = f"ffn {dtype} p={p}"
    assert_no_worse_than_torch(out["y"].detach(), y_torch.detach(), y64, "y " + what)
    assert_all_written(out["y"].detach(), y64, "y " + what)
    for name, ours, torch_leaf, ref in zip(("dx", "dW1", "db1", "dW2", "db2"), leaves, theirs,
                                           grads64):
        assert_no_worse_than_torch(ours.grad, torch_leaf.grad, ref, f"{name} {what}")


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("approximate", FORMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_geglu_matches_float64(dtype, approximate, bias, device, poison_outputs):
    x = _randn(M, K, dtype=dtype, device=device)
    w_gate, w_up = (_randn(N, K, dtype=dtype, device=device, scale=K**-0.5) for _ in "gu")
    b_gate, b_up = ((_randn(N, dtype=dtype, device=device) for _ in "gu") if bias
                    else (None, None))
    operands = (x, w_gate, w_up, b_gate, b_up)
    with tma_paths():
        counts = launched(lambda: triton_gelu.geglu(*operands, approximate=approximate))
        h = triton_gelu.geglu(*operands, approximate=approximate)
    assert counts.get("geglu_fwd_tma") == 1 and "geglu_fwd" not in counts, counts
    h_torch = F.gelu(F.linear(x, w_gate, b_gate), approximate=approximate) * \
        F.linear(x, w_up, b_up)
    h64 = reference.geglu64(*operands, approximate)
    assert_no_worse_than_torch(h, h_torch, h64, f"geglu h {dtype} {approximate}")
    assert_all_written(h, h64, "geglu h")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gated_block_dropout_is_the_pointer_kernels(dtype, device):
    # The gated block's dropout epilogue on the Hopper kernel draws the mask the pointer
    # kernel draws (whose numerics test_geglu proves): the same outputs, bit for bit, under
    # the interpreter, where both run the same tile.
    x = _randn(M, K, dtype=dtype, device=device)
    w_gate, w_up = (_randn(N, K, dtype=dtype, device=device, scale=K**-0.5) for _ in "gu")
    w_down = _randn(K, N, dtype=dtype, device=device, scale=N**-0.5)
    ys = {}
    for path in ("tma", "fused"):
        torch.manual_seed(7)
        with force_path(geglu_fwd=path):
            counts = launched(lambda: ys.__setitem__(path, triton_gelu.gated_feed_forward(
                x, w_gate, w_up, w_down, dropout=0.3, training=True)))
        assert counts.get("geglu_fwd_tma", 0) == (path == "tma"), counts
    torch.testing.assert_close(ys["tma"], ys["fused"], rtol=0, atol=0)


def test_tf32_float32(device):
    # float32 with TF32 allowed (input_precision "tf32", as torch.matmul): within TF32's error.
    x, weight, b = _linear_operands(torch.float32, device)
    with tf32(True), tma_paths():
        y = triton_gelu.linear_gelu(x, weight, b)
    y64 = reference.linear_gelu64(x, weight, b)
    err = (y.double() - y64).abs().max().item()
    assert err <= 2e-3 + ATOL[torch.float32], f"TF32 forward off by {err:.3e}"


# ---- where the Hopper paths apply -------------------------------------------------------------


def _cases(device):
    """(name, tensor, descriptor-compatible?) for the host check."""
    bf16, f32 = torch.bfloat16, torch.float32
    wide = torch.randn(M, 64, device=device).to(bf16)
    return [
        ("contiguous bf16, K = 40", torch.randn(M, 40, device=device).to(bf16), True),
        ("odd K bf16", torch.randn(M, 45, device=device).to(bf16), False),
        ("K = 44 bf16 (88-byte rows)", torch.randn(M, 44, device=device).to(bf16), False),
        ("K = 44 float32 (176-byte rows)", torch.randn(M, 44, device=device, dtype=f32), True),
        ("odd K float32", torch.randn(M, 45, device=device, dtype=f32), False),
        ("transposed weight", torch.randn(40, N, device=device).to(bf16).t(), False),
        ("column slice at 8 elements (16 bytes)", wide[:, 8:48], True),
        ("column slice at 1 element (2 bytes)", wide[:, 1:41], False),
        ("every other row", wide[::2], True),
        ("1-D", torch.randn(40, device=device).to(bf16), False),
        ("expanded rows (stride 0)", torch.randn(1, 40, device=device).to(bf16).expand(M, 40),
         False),
    ]


def test_descriptor_check(device):
    wrong = [(name, expected) for name, t, expected in _cases(device)
             if _matmul.tma_compatible(t) != expected]
    assert not wrong, f"tma_compatible wrong for (case, expected): {wrong}"
    # Every operand must pass: one incompatible one is enough to refuse.
    good, bad = _cases(device)[0][1], _cases(device)[1][1]
    assert _matmul.tma_compatible(good, good) and not _matmul.tma_compatible(good, bad)


def test_undescribable_problems_keep_todays_kernel(device):
    # An odd K in bf16: forced onto "tma", the path does not apply (a warning, once), and the
    # forward runs the pointer kernel; a problem whose key chose "tma" before and comes back with
    # an operand descriptors cannot serve is checked again in Python, before any launch.
    x, weight, b = _linear_operands(torch.bfloat16, device, k=45)
    with warnings.catch_warnings(record=True) as caught, force_path(linear_gelu_fwd="tma"):
        warnings.simplefilter("always")
        counts = launched(lambda: triton_gelu.linear_gelu(x, weight, b))
    assert counts == {"linear_gelu_fwd": 1}, counts
    assert any("does not apply" in str(w.message) for w in caught), [str(w) for w in caught]
    direct = {
        "linear_gelu_fwd": lambda: path_choosers["linear_gelu_fwd"].paths["tma"](
            x, weight, b, "gelu", False),
        "linear_preact": lambda: path_choosers["linear_preact"].paths["tma"](
            x, weight, b),
    }
    for kernel, call in direct.items():
        assert launched(call) == {kernel: 1}, kernel
    sliced = torch.randn(M, 48, device=device).to(torch.bfloat16)[:, 1:41]
    assert launched(lambda: path_choosers["geglu_fwd"].paths["tma"](
        sliced, weight[:, :40].contiguous(), weight[:, :40].contiguous(), None, None, "gelu",
        True, False, None, 0.0, 0, N)) == {"geglu_fwd": 1}


def test_only_forced_under_the_interpreter_and_only_hopper_gpus(device, monkeypatch):
    # Under the interpreter nothing is timed: the default (pointer) path runs unless forced.
    x, weight, b = _linear_operands(torch.bfloat16, device)
    assert launched(lambda: triton_gelu.linear_gelu(x, weight, b)) == {"linear_gelu_fwd": 1}
    assert _matmul.tma_applies(x, weight)
    # Outside the interpreter a CPU tensor is no Hopper GPU (nor is sm80: capability 8).
    monkeypatch.setattr(_matmul, "interpreting", lambda: False)
    assert not _matmul.tma_device(x)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    cuda_like = type("CudaTensor", (), {"is_cuda": True, "device": "cuda:0"})()
    assert not _matmul.tma_device(cuda_like)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert _matmul.tma_device(cuda_like) == (torch.version.hip is None)


def test_config_space_and_estimate():
    # The Hopper space: wgmma's 64-row tiles, every config within sm90's shared memory by the
    # estimate aot_compile.py holds against the compiler's figure.
    configs = spaces.tma_matmul_configs("sm90")
    assert all(c.kwargs["BLOCK_SIZE_M"] >= 64 for c in configs)
    key = (8192, 4096, 4096, torch.bfloat16)
    kept = spaces.prune_matmul(configs, key, "sm90", reduction="K", persistent=True)
    assert kept == configs
    gated = spaces.prune_matmul(configs, key, "sm90", reduction="K", gated=True,
                                   persistent=True)
    assert [c.kwargs["BLOCK_SIZE_K"] for c in configs if c not in gated] == [128], gated
    assert len(spaces.tma_matmul_configs(None)) == 1  # the interpreter: one config


def test_one_warp_specialized_tile_for_the_linear_forward_only():
    # The linear forward's Hopper kernel takes WARP_SPECIALIZE: on sm90 its space is the shared
    # one plus the 4-warp tile that only warp specialization keeps from spilling (aot_compile.py
    # checks setmaxnreg in its PTX); the FFN forward's (a dropout epilogue) and the interpreter's
    # have none specialized.
    shared = spaces.tma_matmul_configs("sm90")
    linear = spaces.tma_linear_configs("sm90")
    dropout = spaces.tma_dropout_configs("sm90")
    assert [c.kwargs["WARP_SPECIALIZE"] for c in linear] == [False] * len(shared) + [True]
    assert linear[-1].num_warps == 4
    tiles = [(c.kwargs["BLOCK_SIZE_M"], c.kwargs["BLOCK_SIZE_N"], c.num_warps) for c in shared]
    assert (128, 128, 4) not in tiles  # without warp specialization this tile spills
    assert not any(c.kwargs["WARP_SPECIALIZE"] for c in dropout) and len(dropout) == len(shared)
    interpreter = spaces.tma_linear_configs(None)
    assert len(interpreter) == 1 and interpreter[0].kwargs["WARP_SPECIALIZE"] is False
    key = (8192, 4096, 4096, torch.bfloat16)
    assert spaces.prune_matmul(linear, key, "sm90", reduction="K", persistent=True) == linear
