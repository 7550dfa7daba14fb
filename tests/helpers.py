"""Assertions shared by the tests: compare with a float64 reference, never more loosely than the
error PyTorch itself makes in the same dtype."""

from __future__ import annotations

import contextlib
import copy
import io

import torch

# Slack added to the "no worse than torch" bound, per dtype: a few units in the last place of
# values of order one, scaled by the reference's largest magnitude (when above one), so a
# kernel that is wrong by more than rounding fails at any scale.
ATOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def poisoned(shape, dtype, device) -> torch.Tensor:
    """An output buffer full of NaN: any element a kernel fails to write stays NaN."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def assert_nan_where_ref_nan(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    ours_nan, ref_nan = ours.isnan(), ref.isnan()
    if not torch.equal(ours_nan.cpu(), ref_nan.cpu()):
        bad = (ours_nan != ref_nan).nonzero()[:5].tolist()
        raise AssertionError(
            f"{what}: NaN pattern differs from the reference at {bad} "
            f"({int(ours_nan.sum())} NaN in ours, {int(ref_nan.sum())} in ref)"
        )


def assert_no_worse_than_torch(
    ours: torch.Tensor, torch_same: torch.Tensor, ref64: torch.Tensor, what: str,
    atol: float | None = None, factor: float = 2.0,
) -> None:
    """max|ours - ref64| <= factor * max|torch_same - ref64| + atol * max(1, max|ref64|), and
    NaN exactly where ref64 is NaN."""
    assert ours.shape == ref64.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref64.shape)}"
    assert ours.dtype == torch_same.dtype, f"{what}: dtype {ours.dtype} != {torch_same.dtype}"
    atol = ATOL[ours.dtype] if atol is None else atol
    ours64, torch64, ref64 = ours.double().cpu(), torch_same.double().cpu(), ref64.double().cpu()
    assert_nan_where_ref_nan(ours64, ref64, what)
    if ref64.numel() == 0:
        return
    finite = ~ref64.isnan()
    err = (ours64 - ref64).abs().where(finite, 0.0)
    torch_err = (torch64 - ref64).abs().where(finite, 0.0).nan_to_num(0.0)
    scale = max(1.0, ref64.abs().where(finite, 0.0).max().item())
    bound = factor * torch_err.max().item() + atol * scale
    worst = err.argmax()
    if not err.max().item() <= bound:
        raise AssertionError(
            f"{what}: max error {err.max().item():.3e} at flat index {worst.item()} "
            f"(ours {ours64.flatten()[worst].item():.6g}, ref {ref64.flatten()[worst].item():.6g})"
            f" exceeds {factor} x torch's {torch_err.max().item():.3e} + {atol:.0e} x {scale:.3g}"
        )


def assert_all_written(out: torch.Tensor, ref64: torch.Tensor, what: str) -> None:
    """A poisoned output must hold no NaN except where the reference has one."""
    assert_nan_where_ref_nan(out.double().cpu(), ref64.double().cpu(), what + " (poisoned output)")


def _forward_backward(fn, inputs, dy, grad: bool):
    """fn(*inputs) on fresh leaves; with ``grad``, its backward from ``dy`` (made on first use)
    and the gradients of every input, then of every parameter: [(name, tensor), ...], dy."""
    leaves = [t.detach().requires_grad_(grad) for t in inputs]
    out = fn(*leaves)
    results = [("output", out.detach())]
    if grad:
        dy = torch.randn(out.shape) if dy is None else dy
        out.backward(dy.to(out.device, out.dtype))
        params = fn.named_parameters() if isinstance(fn, torch.nn.Module) else ()
        results += [(f"d input {i}", t.grad) for i, t in enumerate(leaves)]
        results += [(f"d {name}", p.grad) for name, p in params]
    return results, dy


def assert_like_torch(ours, theirs, inputs, what: str, grad: bool = True) -> None:
    """``ours`` against ``theirs``, the PyTorch code it replaces (functions, or modules with their
    parameters in the same order), on the same floating-point ``inputs``: the output and, with
    ``grad``, the gradient of every input and parameter must be no worse than twice PyTorch's own
    error, the ground truth being ``theirs`` run again in float64 (assert_no_worse_than_torch)."""
    ref = copy.deepcopy(theirs).double() if isinstance(theirs, torch.nn.Module) else theirs
    got, dy = _forward_backward(ours, inputs, None, grad)
    want, _ = _forward_backward(theirs, inputs, dy, grad)
    truth, _ = _forward_backward(ref, [t.double() for t in inputs], dy, grad)
    assert len(got) == len(want), f"{what}: {[n for n, _ in got]} vs {[n for n, _ in want]}"
    for (name, g), (_, w), (_, t) in zip(got, want, truth):
        assert_no_worse_than_torch(g, w, t, f"{what}: {name}")
def assert_finite_differences(loss, operands: list[torch.Tensor], names, samples: int = 4,
                              eps: float = 1e-2) -> None:
    """The gradients of the float32 scalar ``loss(*operands)`` match central differences at
    ``samples`` random elements of each operand (``names``: theirs, for the message). ``loss``
    must be a deterministic function of its inputs (reset any generator it draws from)."""
    grads = torch.autograd.grad(loss(*operands), operands)
    with torch.no_grad():
        for name, i, grad in zip(names, range(len(operands)), grads):
            for flat in torch.randperm(operands[i].numel())[:samples].tolist():
                args = [t.detach().clone() for t in operands]
                args[i].view(-1)[flat] += eps
                plus = loss(*args).double()
                args[i].view(-1)[flat] -= 2 * eps
                minus = loss(*args).double()
                numeric = ((plus - minus) / (2 * eps)).item()
                analytic = grad.view(-1)[flat].item()
                assert abs(numeric - analytic) <= 2e-3 + 1e-2 * abs(analytic), (
                    f"{name} element {flat}: finite difference {numeric:.6f}, "
                    f"gradient {analytic:.6f}")
    assert all(g.ne(0).any() for g in grads), "a gradient is all zeros: nothing was tested"


def launched(fn) -> dict[str, int]:
    """The Triton kernels ``fn()`` launched, by name, with how many times each."""
    from triton_gelu.testing import count_launches

    with count_launches() as counts:
        fn()
    return dict(counts)


@contextlib.contextmanager
def poisoned_allocations():
    """Inside the block every tensor PyTorch allocates uninitialised (``torch.empty`` and kin:
    the launchers' outputs and the transient buffers they are computed from) starts as NaN
    (integers: their largest value), so an element a kernel does not store shows up. This is
    PyTorch's own ``torch.utils.deterministic.fill_uninitialized_memory``, which works while
    deterministic algorithms are on (warn-only here: no operation is refused)."""
    import warnings

    import torch.utils.deterministic as deterministic

    saved = (torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(),
             deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)
    deterministic.fill_uninitialized_memory = True
    try:
        with warnings.catch_warnings():  # cuBLAS and others "have no deterministic version"
            warnings.filterwarnings("ignore", message=".*warn_only=True.*", category=UserWarning)
            yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        deterministic.fill_uninitialized_memory = saved[2]


def assert_reproducible_by_seed(fn) -> torch.Tensor:
    """``fn()`` draws its randomness from PyTorch's generator: after the same
    ``torch.manual_seed`` it gives the same output bit for bit, after another seed (or once the
    generator has moved on) another. Returns its output after ``torch.manual_seed(5)``."""
    torch.manual_seed(5)
    a = fn()
    torch.manual_seed(5)
    b = fn()
    torch.manual_seed(6)
    c = fn()
    d = fn()  # the generator moved on: a new seed
    torch.testing.assert_close(a, b, rtol=0, atol=0, msg="same seed, different output")
    assert not torch.equal(a, c) and not torch.equal(c, d), "another seed, the same output"
    return a


@contextlib.contextmanager
def tf32(allowed: bool):
    """float32 matmuls with TF32 allowed or not (IEEE: what the float64 comparisons need)."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


# Inputs x (..., k) of the matmul ops in every layout the launchers must take.
X_LAYOUTS = {
    "M=1": lambda k, dev: torch.randn(1, k, device=dev),
    "1-D": lambda k, dev: torch.randn(k, device=dev),
    "4-D": lambda k, dev: torch.randn(2, 3, 5, k, device=dev),
    "column slice": lambda k, dev: torch.randn(33, k + 7, device=dev)[:, 3:3 + k],
    "row step": lambda k, dev: torch.randn(66, k, device=dev)[::2],
    "transposed": lambda k, dev: torch.randn(k, 29, device=dev).t(),
    # Leading dimensions that do not collapse into one stride: copied, dx still in x's shape.
    "3-D permuted": lambda k, dev: torch.randn(5, 3, k, device=dev).permute(1, 0, 2),
    "empty M": lambda k, dev: torch.randn(0, k, device=dev),
    "empty 3-D": lambda k, dev: torch.randn(2, 0, k, device=dev),
}


def load_random_state(patched: torch.nn.Module, unpatched: torch.nn.Module) -> None:
    """New random values for every entry of ``unpatched``'s state dict, loaded into both models:
    into ``patched`` through ``torch.save`` / ``torch.load``, as a checkpoint reaches it."""
    new_state = {k: torch.randn_like(v) for k, v in unpatched.state_dict().items()}
    buf = io.BytesIO()
    torch.save(new_state, buf)
    buf.seek(0)
    patched.load_state_dict(torch.load(buf))
    unpatched.load_state_dict(new_state)
