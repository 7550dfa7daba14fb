"""triton_gelu on a machine without Triton (macOS, Windows, a CPU-only container), simulated:
``python tests/no_triton.py`` hides Triton from the import system, runs every check below and
prints one line, ``NO_TRITON_RESULT {json}``. tests/test_no_triton.py runs it in a subprocess.

``hide_triton()`` puts, in place of the import system's path finder, one that finds nothing named
``triton`` or ``triton.*`` and delegates everything else: ``import triton`` raises
ModuleNotFoundError and ``importlib.util.find_spec("triton")`` is None, as when Triton is not
installed (torch and transformers ask find_spec; a finder that raised instead would break them).

``CHECKS`` has one check per public name (``public_names()``: the ``__all__`` of each module in
``PUBLIC_MODULES`` and the public functions and classes it defines or re-exports from a private
module, as ``autotune`` does ``force_path``). Each runs the name
on the CPU, where it takes the PyTorch fallback, and compares its results (forward and gradients)
with the PyTorch code it replaces, the ground truth being that code in float64, by the suite's
rule (``helpers.assert_like_torch``). A public name without a check here fails
``test_every_public_name_has_a_fallback_check``: a new public function or module needs its row.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.machinery
import importlib.metadata
import importlib.util
import inspect
import io
import itertools
import json
import os
import shutil
import sys
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def _is_triton(name: str | None) -> bool:
    return name is not None and name.partition(".")[0].lower() == "triton"


class _TritonHidingFinder:
    """Stands in for ``importlib.machinery.PathFinder``: finds no ``triton`` module and no
    ``triton`` distribution (importlib.metadata asks the same finders)."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def find_spec(self, name, path=None, target=None):
        return None if _is_triton(name) else self.inner.find_spec(name, path, target)

    def find_distributions(self, context=None):
        context = context or importlib.metadata.DistributionFinder.Context()
        if _is_triton(context.name):
            return iter(())
        return (d for d in self.inner.find_distributions(context)
                if not _is_triton(d.metadata["Name"]))

    def __getattr__(self, name):  # invalidate_caches and anything else: PathFinder's own
        return getattr(self.inner, name)


def hide_triton() -> None:
    """Make Triton impossible to import in this process, as if it were not installed."""
    if "triton" in sys.modules:
        raise RuntimeError("triton is already imported: hide it before anything imports it")
    index = sys.meta_path.index(importlib.machinery.PathFinder)
    sys.meta_path[index] = _TritonHidingFinder(importlib.machinery.PathFinder)


def hidden_command(code: str) -> list[str]:
    """A command line running ``code`` in a fresh Python with Triton hidden (see hidden_env)."""
    return [sys.executable, "-c", f"import no_triton; no_triton.hide_triton()\n{code}"]


def hidden_env(cache_dir: Path, **extra: str) -> dict[str, str]:
    """The environment for hidden_command and this script: the repository and tests/ importable,
    and the tuning cache in ``cache_dir``."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(REPO)]),
                TRITON_GELU_CACHE_DIR=str(cache_dir), **extra)


if __name__ == "__main__":
    hide_triton()  # before torch or triton_gelu could import it

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from helpers import DTYPES, assert_like_torch, assert_no_worse_than_torch  # noqa: E402
from torch import nn  # noqa: E402

import triton_gelu  # noqa: E402

# Modules whose names users call (besides the package itself); one not yet written is skipped.
PUBLIC_MODULES = ("triton_gelu", "triton_gelu.autotune", "triton_gelu.parallel",
                  "triton_gelu.testing")
# The only modules that import Triton: every other module of the package imports without it.
TRITON_MODULES = ("triton_gelu.kernels", "triton_gelu.tuning.spaces", "triton_gelu.tuning.keys",
                  "triton_gelu.tuning.chooser", "triton_gelu.tuning.tuner",
                  "triton_gelu.tuning.paths", "triton_gelu.tuning.compiled")
FORMS = ("none", "tanh")


def _offered_by(module_name: str, obj: object) -> bool:
    """``obj`` is defined in the module, or comes from a private one (``triton_gelu._x``) and so
    is public only through this module."""
    if not (inspect.isfunction(obj) or inspect.isclass(obj)):
        return False
    origin = obj.__module__.split(".")
    return obj.__module__ == module_name or (
        origin[0] == "triton_gelu" and any(part.startswith("_") for part in origin[1:]))


def public_names() -> list[str]:
    """``gelu`` for ``triton_gelu.gelu``, ``autotune.main`` for ``triton_gelu.autotune.main``..."""
    names = set()
    for module_name in PUBLIC_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name == module_name:
                continue
            raise
        own = {name for name, obj in vars(module).items()
               if not name.startswith("_") and _offered_by(module_name, obj)}
        prefix = module_name.removeprefix("triton_gelu").lstrip(".")
        names |= {f"{prefix}.{name}" if prefix else name
                  for name in own | set(getattr(module, "__all__", ()))}
    return sorted(names)


def package_modules() -> list[str]:
    """Every module of the package, by its file (nothing is imported to list them)."""
    root = Path(triton_gelu.__file__).parent
    names = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


class Skip(Exception):
    """A check that cannot run here (e.g. Inductor without a C++ compiler)."""


CHECKS: dict[str, Callable[[], None]] = {}  # public name -> its fallback check
EXTRAS: dict[str, Callable[[], None]] = {}  # more checks of the same run, not tied to a name


def check(*names: str, table: dict[str, Callable[[], None]] = CHECKS):
    def register(fn: Callable[[], None]) -> Callable[[], None]:
        for name in names:
            table[name] = fn
        return fn
    return register


def _x(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Random activations of ``shape``, non-contiguous (the first two dimensions swapped)."""
    return (3 * torch.randn(shape[1], shape[0], *shape[2:])).to(dtype).transpose(0, 1)


class TorchFeedForward(nn.Module):
    """The usual PyTorch FFN block, FeedForward's counterpart (same state-dict names)."""

    def __init__(self, d_model: int, d_ff: int, approximate: str = "none") -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_ff)
        self.dropout = nn.Dropout(0.0)
        self.activation = nn.GELU(approximate)
        self.linear2 = nn.Linear(d_ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.dropout(self.activation(self.linear1(x))))


# ---- one check per public name ----------------------------------------------------------------


@check("gelu")
def _gelu() -> None:
    for dtype, approximate in itertools.product(DTYPES, FORMS):
        assert_like_torch(lambda x: triton_gelu.gelu(x, approximate=approximate),
                          lambda x: F.gelu(x, approximate=approximate),
                          [_x(7, 3, 5, dtype=dtype)], f"gelu {dtype} {approximate}")
    empty = triton_gelu.gelu(torch.empty(0, 4))
    assert empty.shape == (0, 4), empty.shape


@check("linear_gelu")
def _linear_gelu() -> None:
    for dtype, approximate, recompute in itertools.product(DTYPES, FORMS, (False, True)):
        x, w, b = _x(5, 2, 12, dtype=dtype), torch.randn(7, 12).to(dtype) / 4, torch.randn(7)
        assert_like_torch(
            lambda x, w, b: triton_gelu.linear_gelu(x, w, b, approximate, recompute),
            lambda x, w, b: F.gelu(F.linear(x, w, b), approximate=approximate),
            [x, w, b.to(dtype)], f"linear_gelu {dtype} {approximate} recompute={recompute}",
        )
    x, w = _x(5, 12), torch.randn(7, 12)
    with torch.no_grad():  # inference and no bias
        assert_like_torch(lambda x, w: triton_gelu.linear_gelu(x, w),
                          lambda x, w: F.gelu(F.linear(x, w)), [x, w], "no_grad", grad=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # operands cast as F.linear's are
        assert_like_torch(lambda x, w: triton_gelu.linear_gelu(x, w),
                          lambda x, w: F.gelu(F.linear(x, w)), [x, w], "autocast bf16")


def _pytorch_keep(shape: tuple[int, ...], p: float) -> torch.Tensor:
    """The keep mask (0 or 1) F.dropout draws for a float32 tensor of ``shape`` right after
    torch.manual_seed(3): bernoulli(1 - p) on a tensor of that shape, as the fallback's does."""
    torch.manual_seed(3)
    return (F.dropout(torch.ones(shape), p) != 0).float()


@check("feed_forward")
def _feed_forward() -> None:
    for dtype, approximate, recompute in itertools.product(DTYPES, FORMS, (False, True)):
        x = _x(5, 2, 12, dtype=dtype)
        w1, w2 = torch.randn(20, 12).to(dtype) / 4, torch.randn(12, 20).to(dtype) / 4
        assert_like_torch(
            lambda x, w1, b1, w2, b2: triton_gelu.feed_forward(
                x, w1, b1, w2, b2, approximate=approximate, recompute=recompute),
            lambda x, w1, b1, w2, b2: F.linear(
                F.gelu(F.linear(x, w1, b1), approximate=approximate), w2, b2),
            [x, w1, torch.randn(20).to(dtype), w2, torch.randn(12).to(dtype)],
            f"feed_forward {dtype} {approximate} recompute={recompute}",
        )
    # Dropout: PyTorch's own (the fallback is eager's block), so under one seed its mask is
    # the one F.dropout draws for the (tokens, hidden) activation, scaled by 1 / 0.7.
    x, w1, w2 = _x(5, 2, 12), torch.randn(20, 12) / 4, torch.randn(12, 20) / 4
    keep = _pytorch_keep((5, 2, 20), 0.3)
    torch.manual_seed(3)  # the seed feed_forward draws from (assert_like_torch runs ours first)
    assert_like_torch(lambda x, w1, w2: triton_gelu.feed_forward(x, w1, None, w2, None, p=0.3),
                      lambda x, w1, w2: F.linear(F.gelu(F.linear(x, w1)) * keep / 0.7, w2),
                      [x, w1, w2], "feed_forward p=0.3")
    with torch.no_grad():  # inference, and training=False: no dropout
        assert_like_torch(
            lambda x, w1, w2: triton_gelu.feed_forward(x, w1, None, w2, None, p=0.3,
                                                       training=False),
            lambda x, w1, w2: F.linear(F.gelu(F.linear(x, w1)), w2), [x, w1, w2], "eval",
            grad=False)


@check("GELU")
def _gelu_module() -> None:
    for dtype, approximate in itertools.product(DTYPES, FORMS):
        assert_like_torch(triton_gelu.GELU(approximate), nn.GELU(approximate),
                          [_x(4, 6, dtype=dtype)], f"GELU {dtype} {approximate}")


@check("LinearGELU")
def _linear_gelu_module() -> None:
    for dtype, bias in itertools.product(DTYPES, (True, False)):
        linear = nn.Linear(12, 7, bias=bias).to(dtype)
        ours = triton_gelu.LinearGELU(12, 7, bias=bias, approximate="tanh", dtype=dtype)
        ours.load_state_dict(linear.state_dict())
        assert_like_torch(ours, nn.Sequential(linear, nn.GELU("tanh")), [_x(5, 3, 12, dtype=dtype)],
                          f"LinearGELU {dtype} bias={bias}")
    linear = nn.Linear(12, 7)
    shared = triton_gelu.LinearGELU.from_linear(linear, recompute=True)
    assert shared.weight is linear.weight and shared.bias is linear.bias
    assert_like_torch(shared, nn.Sequential(copy.deepcopy(linear), nn.GELU()), [_x(5, 12)],
                      "from_linear")


@check("FeedForward")
def _feed_forward_module() -> None:
    for dtype in DTYPES:
        ours = triton_gelu.FeedForward(12, 20, dropout=0.0, dtype=dtype)
        theirs = TorchFeedForward(12, 20).to(dtype)
        ours.load_state_dict(theirs.state_dict())
        assert_like_torch(ours, theirs, [_x(5, 2, 12, dtype=dtype)], f"FeedForward {dtype}")


def _patchable_model() -> nn.Module:
    """Two pairs to fuse: a Linear -> GELU in a Sequential, and the PyTorch FFN block's."""
    return nn.Sequential(nn.Linear(12, 20), nn.GELU("tanh"), TorchFeedForward(20, 16))


@check("TritonUnavailableWarning")
def _fallback_warning_category() -> None:
    """Users silence the fallback's warning by its public category."""
    from triton_gelu import _runtime, autotune

    for silenced in (True, False):
        _runtime._warned = False  # given once per process: give it again here
        autotune.clear_plans()  # and asked when a problem is planned: plan it again
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if silenced:
                warnings.filterwarnings("ignore", category=triton_gelu.TritonUnavailableWarning)
            triton_gelu.gelu(torch.randn(3))
        got = [w for w in caught if issubclass(w.category, triton_gelu.TritonUnavailableWarning)]
        assert len(got) == (0 if silenced else 1), (silenced, [str(w.message) for w in caught])
    _runtime._warned = True


@check("patch")
def _patch() -> None:
    for dtype in DTYPES:
        model = _patchable_model().to(dtype)
        patched = copy.deepcopy(model)
        assert triton_gelu.patch(patched) == 2, patched
        assert_like_torch(patched, model, [_x(5, 2, 12, dtype=dtype)], f"patched {dtype}")
    if importlib.util.find_spec("transformers") is not None:  # GPT-2: a transposed weight
        from transformers import GPT2Config
        from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

        mlp = GPT2MLP(32, GPT2Config(n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0))
        patched = copy.deepcopy(mlp)
        assert triton_gelu.patch(patched) == 1, patched
        # (Conv1D itself views its input: it must be contiguous.)
        assert_like_torch(patched, mlp, [_x(5, 2, 16).contiguous()], "patched GPT2MLP")


def _gathered_run(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Output, x's gradient and every parameter's gradient, DTensors gathered."""
    x = x.detach().requires_grad_()
    out = model(x)
    out.backward(torch.ones_like(out))
    grads = [p.grad for p in model.parameters()]
    return [t.full_tensor() if hasattr(t, "full_tensor") else t for t in (out, x.grad, *grads)]


@check("parallel.ColwiseParallel", "parallel.RowwiseParallel", "parallel.UnfusedFallbackWarning",
       "parallel.fusable_layout", "parallel.tp_style", "parallel.FeedForwardParallel",
       "parallel.tp_block_style")
def _parallel() -> None:
    """Tensor parallel on the fallback, on a 1-rank gloo group with an in-process store: linear1
    column-parallel on a FeedForward (our style: its LinearGELU fused); the whole block under
    FeedForwardParallel (FeedForward, GatedFeedForward) and after PyTorch's styles then patch
    (the block fused whole, hooks moved); GeGLU column-parallel; and linear1 row-parallel
    (unfused, with its warning); every result like the unpatched model's."""
    import torch.distributed as dist

    if not dist.is_available():
        raise Skip("this torch has no torch.distributed")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
    from torch.distributed.tensor.parallel import parallelize_module

    from triton_gelu import _dtensor, parallel

    _dtensor._warned_layouts.clear()  # this check runs once per name: warn each time
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        model = TorchFeedForward(12, 16)
        built = triton_gelu.FeedForward(12, 16, dropout=0.0)
        built.load_state_dict(model.state_dict())
        row, block = copy.deepcopy(built), copy.deepcopy(built)
        parallelize_module(built, mesh, {"linear1": parallel.ColwiseParallel(),
                                         "linear2": RowwiseParallel()})
        parallelize_module(block, mesh, parallel.FeedForwardParallel())
        after = copy.deepcopy(model)
        parallelize_module(after, mesh, {"linear1": ColwiseParallel(),
                                         "linear2": RowwiseParallel()})
        assert parallel.tp_style(after.linear1) == "colwise"
        assert parallel.tp_block_style([after.linear1], after.linear2) == "tensor"
        assert triton_gelu.patch(after) == 1  # the whole block (its hooks moved onto it)
        parallelize_module(row, mesh, {"linear1": parallel.RowwiseParallel(
            input_layouts=parallel.Replicate())})
        gated_model = TorchGatedFeedForward(12, 16)
        gated = triton_gelu.GatedFeedForward(12, 16)
        gated_model.load_state_dict(gated.state_dict(), strict=False)
        parallelize_module(gated, mesh, parallel.FeedForwardParallel())
        geglu = triton_gelu.GeGLU(12, 16, bias=True)
        geglu_model = TorchGeGLU(*copy.deepcopy(geglu).children(), "tanh")
        parallelize_module(geglu, mesh, parallel.ColwiseParallel())
        x = _x(5, 2, 12)
        cases = [("colwise", built, model), ("block style", block, model),
                 ("patched after", after, model), ("rowwise", row, model),
                 ("gated block style", gated, gated_model), ("geglu colwise", geglu, geglu_model)]
        for name, ours, theirs in cases:
            want = _gathered_run(theirs, x)
            truth = _gathered_run(copy.deepcopy(theirs).double(), x.double())
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                got = _gathered_run(ours, x)
            unfused = [w for w in caught if issubclass(w.category, parallel.UnfusedFallbackWarning)]
            assert bool(unfused) == (name == "rowwise"), (name, caught)
            for i, (g, w, t) in enumerate(zip(got, want, truth)):
                assert_no_worse_than_torch(g, w, t, f"{name}: result {i}")
    finally:
        dist.destroy_process_group()


@check("autotune.main")
def _autotune_main() -> None:
    from triton_gelu import autotune
    from triton_gelu.tuning import cache as _cache

    tuning = _cache.cache_dir() / "gelu_fwd.device.triton-x.0.json"
    tuning.parent.mkdir(parents=True, exist_ok=True)
    tuning.write_text('{"entries": {}}')
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert autotune.main(["--clear"]) == 0
    assert not tuning.exists() and "removed 1" in out.getvalue(), out.getvalue()
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert autotune.main(["--shapes", "64x32x48"]) == 2
    assert "triton does not import" in err.getvalue(), err.getvalue()


@check("autotune.force_path")
def _autotune_force_path() -> None:
    from triton_gelu import _settings, autotune

    with autotune.force_path(linear_gelu_fwd="composed"):
        assert _settings.forced_path("linear_gelu_fwd") == "composed"
        assert_like_torch(lambda x, w: triton_gelu.linear_gelu(x, w),
                          lambda x, w: F.gelu(F.linear(x, w)), [_x(5, 12), torch.randn(7, 12)],
                          "linear_gelu with a forced path")
    assert _settings.forced_path("linear_gelu_fwd") is None


@check("autotune.clear_plans")
def _autotune_clear_plans() -> None:
    from triton_gelu import _plans, autotune

    x = _x(3, 5)
    triton_gelu.gelu(x)
    planned = _plans.counts["planned"]
    triton_gelu.gelu(x)  # the same problem: its plan, no new one
    assert _plans.counts["planned"] == planned
    autotune.clear_plans()
    assert_like_torch(triton_gelu.gelu, F.gelu, [x], "gelu planned anew")
    assert _plans.counts["planned"] == planned + 1


@check("testing.count_launches", "testing.count_paths")
def _testing_counts() -> None:
    from triton_gelu import testing

    # The fallback is PyTorch's own ops: no kernel launches, no path of ours is chosen.
    with testing.count_launches() as launched, testing.count_paths() as ran:
        assert_like_torch(lambda x, w: triton_gelu.linear_gelu(x, w),
                          lambda x, w: F.gelu(F.linear(x, w)), [_x(5, 12), torch.randn(7, 12)],
                          "linear_gelu, counted")
        triton_gelu.feed_forward(_x(5, 12).requires_grad_(True), torch.randn(16, 12), None,
                                 torch.randn(12, 16), None, p=0.5).sum().backward()
    assert launched == {} and ran == {}, (launched, ran)


@check("testing.dropout_seed")
def _testing_dropout_seed() -> None:
    # Without Triton the fallback's dropout is PyTorch's own mask (see feed_forward's check);
    # the seed is still drawn from the default generator, reproducibly, as the kernels draw it.
    from triton_gelu import reference, testing

    torch.manual_seed(3)
    seed = testing.dropout_seed("cpu")
    torch.manual_seed(3)
    assert torch.equal(seed, testing.dropout_seed("cpu")), "same torch seed, another dropout seed"
    assert seed.dtype == torch.int64 and seed.shape == (1,) and 0 <= seed.item() < 2**62, seed
    assert not torch.equal(seed, testing.dropout_seed("cpu")), "the generator did not move on"
    kept = reference.dropout_keep(seed, 64, 64, 0.25).float().mean().item()
    assert abs(kept - 0.75) < 0.03, f"the mask of the seed keeps {kept:.3f}, not 0.75"


@check("autotune.parse_shape", "autotune.preset_shapes", "autotune.decode_shapes")
def _autotune_shapes() -> None:
    from triton_gelu import autotune

    assert autotune.parse_shape("8x4x16") == (8, 4, 16)
    assert autotune.preset_shapes(["bert-base"], tokens=64) == [(64, 768, 3072)]
    assert autotune.decode_shapes([1, 16], ("bert-base",)) == [(1, 768, 3072), (16, 768, 3072)]


@check("autotune.set_policy", "autotune.policy")
def _autotune_policy() -> None:
    from triton_gelu import _settings, autotune

    # The policy is checked on every call, the fallback included: a bad value is refused.
    with autotune.policy("off"):
        assert _settings.tune_policy() == "off"
        assert_like_torch(lambda x: triton_gelu.gelu(x), F.gelu, [_x(5, 12)], "gelu, policy off")
    autotune.set_policy("full")
    try:
        assert _settings.tune_policy() == "full"
    finally:
        autotune.set_policy(None)
    try:
        autotune.set_policy("fastest")
    except ValueError as e:
        assert "fastest" in str(e), e
    else:
        raise AssertionError("set_policy('fastest') was accepted")


@check("autotune.warmup")
def _autotune_warmup() -> None:
    from triton_gelu import autotune

    model = triton_gelu.FeedForward(12, 20, dropout=0.0)
    x = _x(5, 12).requires_grad_(True)
    autotune.warmup(model, (x,))  # runs on the fallback and leaves nothing behind
    assert x.grad is None and all(p.grad is None for p in model.parameters())


# ---- gated GELU (GeGLU) ------------------------------------------------------------------------


class TorchGatedFeedForward(nn.Module):
    """Gemma's MLP with nn.GELU: GatedFeedForward's counterpart (same state-dict names)."""

    def __init__(self, d_model: int, d_ff: int, approximate: str = "tanh") -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=False)
        self.up_proj = nn.Linear(d_model, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)
        self.act_fn = nn.GELU(approximate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _torch_geglu(approximate: str):
    return lambda x, wg, wu, bg: F.gelu(F.linear(x, wg, bg), approximate=approximate) * \
        F.linear(x, wu)


@check("geglu")
def _geglu() -> None:
    for dtype, approximate, recompute in itertools.product(DTYPES, FORMS, (False, True)):
        x, wg, wu = _x(5, 2, 12, dtype=dtype), *(torch.randn(7, 12).to(dtype) / 4 for _ in "gu")
        assert_like_torch(
            lambda x, wg, wu, bg: triton_gelu.geglu(x, wg, wu, bg, None, approximate, recompute),
            _torch_geglu(approximate), [x, wg, wu, torch.randn(7).to(dtype)],
            f"geglu {dtype} {approximate} recompute={recompute}",
        )
    x, wg, wu, bg = _x(5, 12), torch.randn(7, 12), torch.randn(7, 12), torch.randn(7)
    with torch.no_grad():
        assert_like_torch(lambda *t: triton_gelu.geglu(*t), _torch_geglu("tanh"),
                          [x, wg, wu, bg], "geglu no_grad", grad=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert_like_torch(lambda *t: triton_gelu.geglu(*t), _torch_geglu("tanh"),
                          [x, wg, wu, bg], "geglu autocast bf16")


@check("gated_feed_forward")
def _gated_feed_forward() -> None:
    for dtype, recompute in itertools.product(DTYPES, (False, True)):
        x = _x(5, 2, 12, dtype=dtype)
        wg, wu, wd = (torch.randn(*shape).to(dtype) / 4 for shape in ((20, 12), (20, 12), (12, 20)))
        assert_like_torch(
            lambda x, wg, wu, wd: triton_gelu.gated_feed_forward(x, wg, wu, wd,
                                                                 recompute=recompute),
            lambda x, wg, wu, wd: F.linear(_torch_geglu("tanh")(x, wg, wu, None), wd),
            [x, wg, wu, wd], f"gated_feed_forward {dtype} recompute={recompute}",
        )
    # Dropout in training: PyTorch's own mask, as for feed_forward.
    x, wg, wu, wd = _x(5, 2, 12), torch.randn(20, 12) / 4, torch.randn(20, 12) / 4, \
        torch.randn(12, 20) / 4
    keep = _pytorch_keep((5, 2, 20), 0.3)
    for recompute in (False, True):
        torch.manual_seed(3)  # the seed gated_feed_forward draws (ours runs first)
        assert_like_torch(
            lambda x, wg, wu, wd: triton_gelu.gated_feed_forward(
                x, wg, wu, wd, dropout=0.3, training=True, recompute=recompute),
            lambda x, wg, wu, wd: F.linear(_torch_geglu("tanh")(x, wg, wu, None) * keep / 0.7,
                                           wd),
            [x, wg, wu, wd], f"gated_feed_forward p=0.3 recompute={recompute}")


class TorchGeGLU(nn.Module):
    """gelu(gate_proj(x)) * up_proj(x) by PyTorch: GeGLU's counterpart (same parameter names)."""

    def __init__(self, gate_proj: nn.Linear, up_proj: nn.Linear, approximate: str) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.approximate = gate_proj, up_proj, approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.gate_proj(x), approximate=self.approximate) * self.up_proj(x)


@check("GeGLU")
def _geglu_module() -> None:
    gate, up = nn.Linear(12, 20), nn.Linear(12, 20)
    ours = triton_gelu.GeGLU.from_linears(copy.deepcopy(gate), copy.deepcopy(up), "none")
    assert_like_torch(ours, TorchGeGLU(gate, up, "none"), [_x(5, 3, 12)], "GeGLU")


@check("GatedFeedForward")
def _gated_feed_forward_module() -> None:
    for dtype in DTYPES:
        ours = triton_gelu.GatedFeedForward(12, 20, dtype=dtype)
        theirs = TorchGatedFeedForward(12, 20).to(dtype)
        theirs.load_state_dict(ours.state_dict(), strict=False)  # act_fn has no state
        assert_like_torch(ours, theirs, [_x(5, 2, 12, dtype=dtype)], f"GatedFeedForward {dtype}")


# ---- the same run: what is not one public name ------------------------------------------------


@check("CUDA tensors take the fallback", table=EXTRAS)
def _cuda_tensors() -> None:
    from triton_gelu import _backend, fallback

    cuda_tensor = SimpleNamespace(is_cuda=True, device=torch.device("cuda"))  # no GPU needed
    assert _backend.launchers(cuda_tensor) is fallback
    if torch.cuda.is_available():  # a GPU without Triton: the fallback's numerics on it
        x, w = _x(5, 12).cuda(), torch.randn(7, 12, device="cuda")
        assert_like_torch(lambda x, w: triton_gelu.linear_gelu(x, w),
                          lambda x, w: F.gelu(F.linear(x, w)), [x, w], "linear_gelu on CUDA")


def _compile_patched(backend: str) -> None:
    """torch.compile(fullgraph=True) of a patched model traces through the custom ops, whose
    implementations take the fallback, and matches eager mode forward and backward."""
    if backend == "inductor" and shutil.which("g++") is None:
        raise Skip("Inductor on the CPU needs a C++ compiler")
    from torch._dynamo.backends.registry import lookup_backend

    torch._dynamo.reset()
    model = _patchable_model()
    assert triton_gelu.patch(model) == 2
    traced_ops = set()

    def recording(gm, example_inputs):
        traced_ops.update(str(node.target) for node in gm.graph.nodes
                          if node.op == "call_function" and "triton_gelu" in str(node.target))
        return lookup_backend(backend)(gm, example_inputs)

    compiled = torch.compile(copy.deepcopy(model), backend=recording, fullgraph=True,
                             dynamic=True)
    x = _x(5, 2, 12)
    got, want = compiled(x), model(x)
    dy = torch.randn_like(want)
    got.backward(dy)
    want.backward(dy)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    want_grads = dict(model.named_parameters())
    for name, p in compiled.named_parameters():
        torch.testing.assert_close(p.grad, want_grads[name.removeprefix("_orig_mod.")].grad,
                                   rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    assert any("linear_gelu_fwd" in op for op in traced_ops), traced_ops


@check("compile_backend")
def _compile_backend() -> None:
    """The compile route without Triton: the inline FFN fused into the custom ops (their
    fallback implementations) and compiled by Inductor, like the uncompiled model."""
    if shutil.which("g++") is None:
        raise Skip("Inductor on the CPU needs a C++ compiler")
    from triton_gelu import compile_route

    torch._dynamo.reset()
    model = TorchFeedForward(12, 16, approximate="tanh")
    compiled = torch.compile(copy.deepcopy(model), backend=triton_gelu.compile_backend)
    assert_like_torch(compiled, model, [_x(5, 2, 12)], "compile_backend")
    assert compile_route.history[-1] == ["feed_forward(gelu_tanh)"], compile_route.history


@check("torch.compile aot_eager", table=EXTRAS)
def _compile_aot_eager() -> None:
    _compile_patched("aot_eager")


@check("torch.compile inductor", table=EXTRAS)
def _compile_inductor() -> None:
    _compile_patched("inductor")


# ---- the run ----------------------------------------------------------------------------------


def _run_all(table: dict[str, Callable[[], None]]) -> dict[str, str]:
    results = {}
    for name, fn in table.items():
        torch.manual_seed(0)
        try:
            fn()
            results[name] = "ok"
        except Skip as e:
            results[name] = f"skipped: {e}"
        except Exception:
            results[name] = traceback.format_exc()
    return results


def run() -> dict:
    """Every check, with every warning recorded; then which modules import and what got
    imported."""
    from triton_gelu import TritonUnavailableWarning  # public: users filter by category

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        checks, extras = _run_all(CHECKS), _run_all(EXTRAS)
    import_errors = {}
    for name in package_modules():
        if not name.startswith(TRITON_MODULES):
            try:
                importlib.import_module(name)
            except Exception as e:
                import_errors[name] = f"{type(e).__name__}: {e}"
    return {
        "checks": checks,
        "extras": extras,
        "fallback_warnings": [str(w.message) for w in caught
                              if issubclass(w.category, TritonUnavailableWarning)],
        "import_errors": import_errors,
        "imported": sorted(name for name in sys.modules
                           if _is_triton(name) or name.startswith(TRITON_MODULES)),
        "public_names": public_names(),
    }


if __name__ == "__main__":
    print("NO_TRITON_RESULT " + json.dumps(run()))
