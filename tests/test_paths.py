"""Choosing between paths and configs on the CPU, with injected timers: timing and caching of
paths, forced paths, per-problem availability, the tuning policy (full / fast / off, from the
environment or from Python), the shipped table as seed and fallback, and the CUDA-graph capture
guard (``torch.cuda.is_current_stream_capturing`` faked)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import triton
from fakes import FakeTimer, double_by_add, double_by_mul, launch, load_kernel

import triton_gelu
from triton_gelu.tuning import keys as _keys
from triton_gelu.tuning import table as _table
from triton_gelu.tuning.chooser import UntunedWarning
from triton_gelu.tuning.keys import Device, device_of
from triton_gelu.tuning.paths import Paths, path_choosers
from triton_gelu.tuning.tuner import MODEL_TOP, Tuner, tuners
from triton_gelu.autotune import clear_plans, force_path, policy, set_policy
from triton_gelu.testing import count_paths

REPO = Path(__file__).resolve().parents[1]
X = torch.arange(5.0)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    directory = tmp_path / "cache"
    monkeypatch.setenv("TRITON_GELU_CACHE_DIR", str(directory))
    monkeypatch.delenv("TRITON_GELU_TUNE", raising=False)
    clear_plans()  # the environment is read when first needed
    return directory


def _doubling(bench=None, name="test_double", **options) -> Paths:
    return Paths(name, {"add": double_by_add, "mul": double_by_mul}, "add", bench=bench,
                 kernels=[], **options)


def _only(choices: dict):
    (choice,) = choices.values()
    return choice


# ---- paths: timing, cache, forcing, availability --------------------------------------------


def test_paths_time_every_candidate_keep_the_fastest_and_cache_it(cache):
    timer = FakeTimer([2.0, 1.0])
    paths = _doubling(timer)
    with count_paths() as ran:
        torch.testing.assert_close(paths.run(("k",), X), 2 * X)
        assert timer.calls == 2
        choice = _only(paths.choices)
        assert (choice.path, choice.ms, choice.source) == ("mul", 1.0, "tuned")
        assert choice.candidates == {"add": 2.0, "mul": 1.0}
        paths.run(("k",), X)  # warm: no timing
    assert timer.calls == 2 and ran == {("test_double", "mul"): 2}, ran

    (path,) = cache.glob("paths.test_double.*.json")
    assert path == paths.cache_path(device_of(-1))
    assert f".torch-{torch.__version__}".replace("+", "-") in path.name
    document = json.loads(path.read_text())
    assert document["entries"] == {"k": {"path": "mul", "ms": 1.0,
                                         "candidates": {"add": 2.0, "mul": 1.0},
                                         "policy": "fast"}}

    again = _doubling(FakeTimer([1.0, 2.0]))  # as in a new process: reads, does not time
    again.run(("k",), X)
    assert again.bench.calls == 0
    assert (_only(again.choices).path, _only(again.choices).source) == ("mul", "cache")


def test_each_path_is_warmed_up_before_it_is_timed(cache):
    calls = []

    def counted(x):
        calls.append(x)
        return x + x

    def bench(fn):
        assert calls, "timed before the warm-up call (an inner Tuner would tune inside timing)"
        fn()
        return 1.0

    paths = Paths("test_warm", {"counted": counted, "mul": double_by_mul}, "mul", bench=bench,
                  kernels=[])
    paths.run(("k",), X)
    assert _only(paths.choices).path == "counted"  # a tie: the first registered
    assert len(calls) == 3  # the warm-up, the timed call, then the call itself


def test_forced_path_wins_without_timing_and_unknown_names_are_refused(cache, monkeypatch):
    timer = FakeTimer([2.0, 1.0])  # would pick "mul"
    paths = _doubling(timer, name="test_forced")
    with count_paths() as ran, force_path(test_forced="add"):
        paths.run(("k",), X)
    assert ran == {("test_forced", "add"): 1}, ran
    monkeypatch.setenv("TRITON_GELU_PATH", "other_op=x, test_forced=add")
    clear_plans()  # the environment is read when first needed
    with count_paths() as ran:
        paths.run(("k",), X)
    assert timer.calls == 0 and ran == {("test_forced", "add"): 1}, ran
    with force_path(test_forced="div"), pytest.raises(ValueError, match="its paths are add, mul"):
        paths.run(("k",), X)
    monkeypatch.setenv("TRITON_GELU_PATH", "test_forced")
    clear_plans()  # the environment is read when first needed
    with pytest.raises(ValueError, match="TRITON_GELU_PATH must be a comma-separated list"):
        paths.run(("k",), X)


def test_a_path_that_does_not_apply_is_no_candidate(cache):
    timer = FakeTimer([2.0, 1.0])
    paths = _doubling(timer, name="test_applies",
                      applies={"mul": lambda x: x.dtype == torch.float32})
    paths.run(("half",), X.half())
    assert timer.calls == 0 and _only(paths.choices)[::3] == ("add", "only")
    with force_path(test_applies="mul"), pytest.warns(UserWarning, match="does not apply"):
        out = paths.run(("half",), X.half())
    assert out.dtype == torch.float16 and _only(paths.choices).path == "add"
    paths.run(("float",), X)
    assert timer.calls == 2 and paths.choices[(-1, ("float",))].path == "mul"
    with pytest.raises(ValueError, match="applies names unknown paths"):
        _doubling(applies={"div": lambda x: True})


def test_a_failing_path_loses_and_total_failure_is_not_cached(cache):
    def broken(x):
        raise RuntimeError("no kernel for this")

    paths = Paths("test_fail", {"broken": broken, "mul": double_by_mul}, "broken",
                  bench=FakeTimer([1.0]), kernels=[])
    torch.testing.assert_close(paths.run(("k",), X), 2 * X)
    assert _only(paths.choices).candidates == {"broken": None, "mul": 1.0}
    none_run = Paths("test_fail_all", {"a": broken, "b": broken}, "a",
                     bench=FakeTimer([1.0]), kernels=[])
    with pytest.raises(RuntimeError, match="no kernel for this"):
        none_run.run(("k",), X)
    assert not list(cache.glob("paths.test_fail_all.*.json"))


def test_interpreter_without_a_timer_takes_the_default_path_and_writes_nothing(cache):
    paths = _doubling(None, name="test_untimed", untuned="mul")
    assert not paths.tunes
    paths.run(("k",), X)
    assert _only(paths.choices)[::3] == ("add", "default")
    assert not cache.exists()


def test_the_real_ops_register_their_paths():
    ops = path_choosers
    assert set(ops["gelu_fwd"].paths) == set(ops["gelu_bwd"].paths) == {"triton", "torch"}
    # PyTorch's own computation is a candidate of every op: the fastest is never slower.
    # The forwards' Hopper variants (TMA, persistent grid) are one more candidate: "tma".
    assert set(ops["linear_gelu_fwd"].paths) == {"fused", "composed", "addmm_gelu", "torch",
                                                 "tma"}
    assert set(ops["linear_preact"].paths) == {"fused", "composed", "tma"}
    # The backwards compute dz (GeGLU: dg and du) once per element, never per output tile.
    assert set(ops["linear_gelu_bwd"].paths) == {"dz_once", "torch"}
    assert set(ops["ffn_fwd"].paths) == {"fused", "composed", "torch", "tma"}
    assert set(ops["ffn_bwd"].paths) == {"fused", "composed", "torch", "tma"}
    assert set(ops["geglu_fwd"].paths) == {"fused", "composed", "torch", "tma"}
    assert set(ops["geglu_bwd"].paths) == {"once", "torch"}
    # Interpreter default: the Triton kernels (the suite tests them); untuned on a GPU: PyTorch
    # or cuBLAS (with our elementwise kernel), never slower than the unfused op.
    assert [ops[op].default for op in sorted(ops) if op in _KNOWN] == [
        "fused", "fused", "once", "fused", "triton", "triton", "dz_once", "fused", "fused"]
    assert [ops[op].untuned for op in sorted(ops) if op in _KNOWN] == [
        "composed", "composed", "once", "composed", "torch", "torch", "dz_once", "composed",
        "composed"]
    # Their cache keys name the kernels they launch (editing one retunes its op only).
    for op in _KNOWN:
        assert ops[op].kernels, f"{op} registers no kernels= for its cache key"
    # Each Tuner of the package is in the kernels= of the ops whose paths launch it.
    assert set(ops["geglu_fwd"].kernels) == {tuners["geglu_fwd"], tuners["geglu_act"],
                                             tuners["geglu_fwd_tma"]}
    assert set(ops["geglu_bwd"].kernels) == {tuners["geglu_bwd_act"]}


_KNOWN = {"gelu_fwd", "gelu_bwd", "linear_gelu_fwd", "linear_preact", "linear_gelu_bwd",
          "ffn_fwd", "ffn_bwd", "geglu_fwd", "geglu_bwd"}


def _torch_is_fastest(paths: Paths):
    """A timer under which ``paths``' "torch" path wins (1 ms, every other path 2 ms)."""
    def bench(call) -> float:
        call()
        return 1.0 if call.__defaults__[0] is paths.paths["torch"] else 2.0
    return bench


def test_eager_paths_are_candidates_without_dropout_only(cache, monkeypatch):
    """The FFN block's and the gated block's ops: where PyTorch is fastest it serves p = 0
    (eval), and with dropout on it is no candidate (it cannot draw the kernels' mask) for the
    same shapes: the dropout flag is in the path key, so a choice made at p = 0 never serves
    p > 0."""
    names = ("ffn_fwd", "ffn_bwd", "geglu_fwd", "geglu_bwd")
    choosers = {name: path_choosers[name] for name in names}
    for paths in choosers.values():
        paths.forget()
        monkeypatch.setattr(paths, "bench", _torch_is_fastest(paths))
    try:
        x = torch.randn(9, 12, requires_grad=True)
        ffn = triton_gelu.FeedForward(12, 20, dropout=0.2)
        gated = triton_gelu.GatedFeedForward(12, 20, dropout=0.2)
        for dropout_on in (False, True):
            known = {n: set(c.choices) for n, c in choosers.items()}
            with count_paths() as ran:
                for block in (ffn, gated):
                    block.train(dropout_on)(x).sum().backward()
            for name, paths in choosers.items():
                (choice,) = [c for slot, c in paths.choices.items() if slot not in known[name]]
                # geglu_bwd with dropout: "once" alone applies (no timing)
                only = dropout_on and name == "geglu_bwd"
                assert choice.source == ("only" if only else "tuned"), (name, choice)
                assert ("torch" in choice.candidates) == (not dropout_on), (name, choice)
                assert (choice.path == "torch") == (not dropout_on), (name, choice)
                assert (name, choice.path) in ran, (name, ran)
    finally:
        for paths in choosers.values():
            paths.forget()


def test_a_paths_cache_is_keyed_on_its_kernels_and_its_paths_source(tmp_path):
    v1, v2 = load_kernel(tmp_path, "2.0", "paths_k1"), load_kernel(tmp_path, "3.0", "paths_k2")
    hashes = {
        Paths("test_hash", {"add": double_by_add, "mul": double_by_mul}, "add",
              kernels=[k]).source_hash for k in (v1, v2)
    }
    assert len(hashes) == 2, "a changed kernel must change the paths' cache key"
    same = [Paths("test_hash", {"add": double_by_add, "mul": double_by_mul}, "add",
                  kernels=[v1]).source_hash for _ in range(2)]
    other_fn = Paths("test_hash", {"add": double_by_add, "mul": lambda x: x * 2}, "add",
                     kernels=[v1]).source_hash
    assert same[0] == same[1] != other_fn


# ---- the policy ------------------------------------------------------------------------------


def _eight_configs(arch=None):
    return [triton.Config({"BLOCK_SIZE": 16 << i}, num_warps=4, num_stages=1) for i in range(8)]


def _recording_tuner(tmp_path, name, monkeypatch, times=None):
    """A copy-kernel tuner over 8 block sizes whose timing records which ones it timed."""
    tuner = Tuner(load_kernel(tmp_path, "2.0", f"k_{name}"), name, _eight_configs,
                  bench=FakeTimer([1.0]))
    timed = []

    def fake_time(grid, config, kwargs):
        timed.append(config.kwargs["BLOCK_SIZE"])
        return (times or {}).get(config.kwargs["BLOCK_SIZE"], 5.0)

    monkeypatch.setattr(tuner, "_time", fake_time)
    return tuner, timed


@pytest.fixture
def sm90_table(tmp_path, monkeypatch):
    """The interpreter dressed as an sm90 device, with a writable shipped-table directory."""
    monkeypatch.setitem(_keys._devices, -1, Device(-1, "interpreter", "sm90"))
    monkeypatch.setattr(_table, "TABLE_DIR", tmp_path / "tuned")

    def write(section: str, chooser, entries: dict) -> None:
        path = _table.table_path("sm90")
        document = _table.read_table(path) or _table.empty_table("sm90")
        _table.merge_section(document, section, chooser.name, chooser.source_hash, entries)
        _table.write_table(path, document)
    return write


def _block(size: int) -> dict:
    return {"kwargs": {"BLOCK_SIZE": size}, "num_warps": 4, "num_stages": 1, "ms": 1.0}


def _model_best(tuner, key: tuple) -> list[int]:
    """The block sizes of the cost model's ranking at ``key`` on sm90, best first."""
    return [c.kwargs["BLOCK_SIZE"] for c in tuner.ranked(key, "sm90")]


def test_fast_times_the_table_entry_and_the_models_best(tmp_path, cache, sm90_table,
                                                        monkeypatch):
    times = {64: 0.5}
    tuner, timed = _recording_tuner(tmp_path, "test_fast", monkeypatch, times)
    sm90_table("tuners", tuner, {"128|torch.float32": _block(256)})
    y = launch(tuner, n=100)  # key 128|torch.float32
    torch.testing.assert_close(y, 2.0 * torch.arange(100.0))
    # 256, then the model's best (one: a memory-bound kernel) among the others.
    others = [b for b in _model_best(tuner, (128, torch.float32)) if b != 256]
    assert timed == [256, *others[:MODEL_TOP["memory"]]], timed
    fastest = min(timed, key=lambda b: times.get(b, 5.0))
    assert _only(tuner.choices).config.kwargs == {"BLOCK_SIZE": fastest}

    timed.clear()  # a problem the table lacks starts from the nearest problem it has
    launch(tuner, n=3000)  # key 4096|torch.float32
    assert timed[0] == 256 and len(timed) == 1 + MODEL_TOP["memory"], timed


def test_fast_without_a_table_times_the_models_best_and_full_every_config(
        tmp_path, cache, sm90_table, monkeypatch):
    tuner, timed = _recording_tuner(tmp_path, "test_full", monkeypatch)
    launch(tuner, n=100)
    best = _model_best(tuner, (128, torch.float32))
    assert timed == best[:MODEL_TOP["memory"]], "no table entry: the model's best alone"
    sm90_table("tuners", tuner, {"1024|torch.float32": _block(256)})
    timed.clear()
    with policy("full"):
        launch(tuner, n=1000)
    assert len(timed) == 8, "full ignores the table's seed"
    entry = json.loads(next(cache.glob("test_full.*.json")).read_text())["entries"]
    assert entry["1024|torch.float32"]["policy"] == "full"


def test_full_retunes_what_fast_tuned_and_fast_keeps_what_full_tuned(tmp_path, cache,
                                                                      sm90_table, monkeypatch):
    fast, timed_fast = _recording_tuner(tmp_path, "test_upgrade", monkeypatch)
    sm90_table("tuners", fast, {"128|torch.float32": _block(256)})
    launch(fast)
    assert len(timed_fast) == 1 + MODEL_TOP["memory"]
    full, timed_full = _recording_tuner(tmp_path, "test_upgrade", monkeypatch)
    with policy("full"):
        launch(full)
    assert len(timed_full) == 8, "an entry tuned under fast does not satisfy full"
    again, timed_again = _recording_tuner(tmp_path, "test_upgrade", monkeypatch)
    launch(again)
    assert timed_again == [] and _only(again.choices).source == "cache"


def test_off_never_times_table_then_default(tmp_path, cache, sm90_table, monkeypatch):
    monkeypatch.setenv("TRITON_GELU_TUNE", "off")
    clear_plans()  # the environment is read when first needed
    tuner, timed = _recording_tuner(tmp_path, "test_off", monkeypatch)
    sm90_table("tuners", tuner, {"128|torch.float32": _block(512)})
    torch.testing.assert_close(launch(tuner, n=100), 2.0 * torch.arange(100.0))
    torch.testing.assert_close(launch(tuner, n=1000), 2.0 * torch.arange(1000.0))
    assert timed == []
    # Without a table entry: the cost model's best, untimed.
    default = _model_best(tuner, (1024, torch.float32))[0]
    assert {k[1][0]: (c.config.kwargs["BLOCK_SIZE"], c.source)
            for k, c in tuner.choices.items()} == {128: (512, "table"), 1024: (default, "default")}
    assert not cache.exists(), "off writes nothing"

    paths = _doubling(FakeTimer([2.0, 1.0]), name="test_off_paths", untuned="mul")
    sm90_table("paths", paths, {"small": {"path": "add", "ms": 1.0,
                                          "candidates": {"add": 1.0, "mul": 2.0}}})
    paths.run(("small",), X)
    paths.run(("large",), X)
    assert paths.bench.calls == 0
    assert {k[1][0]: (c.path, c.source) for k, c in paths.choices.items()} == {
        "small": ("add", "table"), "large": ("mul", "default")}


def test_table_entries_of_an_edited_kernel_or_outside_the_space_are_ignored(
        tmp_path, cache, sm90_table, monkeypatch):
    tuner, timed = _recording_tuner(tmp_path, "test_stale", monkeypatch)
    path = _table.table_path("sm90")
    document = _table.empty_table("sm90")
    _table.merge_section(document, "tuners", "test_stale", "0" * 64,  # another source hash
                         {"128|torch.float32": _block(512)})
    _table.write_table(path, document)
    with policy("off"):
        launch(tuner)
    assert _only(tuner.choices).source == "default"
    sm90_table("tuners", tuner, {"1024|torch.float32": _block(3)})  # not in the space
    with policy("off"):
        launch(tuner, n=1000)
    assert tuner.choices[(-1, (1024, torch.float32))].source == "default"


def test_python_policy_wins_over_the_environment(monkeypatch):
    from triton_gelu._settings import tune_policy

    monkeypatch.setenv("TRITON_GELU_TUNE", "off")
    clear_plans()  # the environment is read when first needed
    assert tune_policy() == "off"
    with policy("full"):
        assert tune_policy() == "full"
    set_policy("fast")
    try:
        assert tune_policy() == "fast"
        with policy("off"):
            assert tune_policy() == "off"
    finally:
        set_policy(None)
    monkeypatch.setenv("TRITON_GELU_TUNE", "")
    clear_plans()  # the environment is read when first needed
    assert tune_policy() == "fast"


@pytest.mark.parametrize("where", ["interpreter", "fallback"])
def test_a_bad_policy_is_refused_by_name_on_every_machine(where, monkeypatch):
    if where == "fallback":
        monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU tensors take the PyTorch fallback
    monkeypatch.setenv("TRITON_GELU_TUNE", "fastest")
    clear_plans()  # the environment is read when first needed
    x = torch.randn(4, 3)
    for call in (lambda: triton_gelu.gelu(x),
                 lambda: triton_gelu.linear_gelu(x, torch.randn(5, 3)),
                 lambda: triton_gelu.autotune.warmup(triton_gelu.GELU(), (x,))):
        with pytest.raises(ValueError, match=r"TRITON_GELU_TUNE .* full, fast, off; got 'fastest'"):
            call()
    monkeypatch.delenv("TRITON_GELU_TUNE")
    clear_plans()  # the environment is read when first needed
    with pytest.raises(ValueError, match="TRITON_GELU_TUNE"):
        set_policy("Full")
    with pytest.raises(ValueError, match="TRITON_GELU_TUNE"), policy("none"):
        pass


def test_a_bad_policy_stops_the_cli():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(CUDA_VISIBLE_DEVICES="", TRITON_GELU_TUNE="quick")
    result = subprocess.run([sys.executable, "-m", "triton_gelu.autotune"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "TRITON_GELU_TUNE" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


# ---- CUDA-graph capture ------------------------------------------------------------------------


@pytest.fixture
def capturing(monkeypatch):
    """Pretend a CUDA stream is capturing; the fixture's value turns it off."""
    state = {"on": True}
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: state["on"])
    return state


def test_capture_never_times_warns_once_and_tunes_after(tmp_path, cache, sm90_table,
                                                         monkeypatch, capturing):
    tuner, timed = _recording_tuner(tmp_path, "test_capture", monkeypatch)
    with pytest.warns(UntunedWarning, match=r"test_capture \[128\|torch.float32\] .*capture"):
        torch.testing.assert_close(launch(tuner), 2.0 * torch.arange(100.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second launch of the same shape: no second warning
        launch(tuner)
    choice = _only(tuner.choices)
    best = _model_best(tuner, (128, torch.float32))
    assert timed == [] and (choice.config.kwargs, choice.source) == \
        ({"BLOCK_SIZE": best[0]}, "default")
    assert not tuner.best, "a choice made under capture is not final"
    capturing["on"] = False
    launch(tuner)
    assert timed == best[:MODEL_TOP["memory"]] and tuner.best, "the first uncaptured launch tunes"

    capturing["on"] = True  # a cached or shipped choice is used under capture, silently
    sm90_table("tuners", tuner, {"1024|torch.float32": _block(64)})
    with warnings.catch_warnings():
        warnings.simplefilter("error", UntunedWarning)
        launch(tuner, n=90)  # cached (tuned above)
    with pytest.warns(UntunedWarning, match="shipped table"):
        launch(tuner, n=1000)
    assert tuner.choices[(-1, (1024, torch.float32))].source == "table"
    assert len(timed) == MODEL_TOP["memory"], "nothing timed under capture"


def test_capture_takes_the_untuned_path_and_a_forced_one_still_wins(cache, capturing):
    paths = _doubling(FakeTimer([2.0, 1.0]), name="test_capture_paths", untuned="mul")
    with pytest.warns(UntunedWarning, match="test_capture_paths"):
        paths.run(("k",), X)
    assert paths.bench.calls == 0 and _only(paths.choices)[::3] == ("mul", "default")
    with count_paths() as ran, force_path(test_capture_paths="add"):
        paths.run(("k",), X)
    assert ran == {("test_capture_paths", "add"): 1}, ran


def test_the_real_ops_respect_capture(timed_choosers, capturing):
    """linear_gelu and the blocks under (faked) capture with timers everywhere: nothing is
    timed, and the untuned paths run: cuBLAS + our elementwise kernels."""
    x = torch.randn(9, 12, requires_grad=True)
    weight = torch.randn(10, 12, requires_grad=True)
    with count_paths() as ran, pytest.warns(UntunedWarning):
        triton_gelu.linear_gelu(x, weight).sum().backward()
    assert timed_choosers.calls == 0
    assert set(ran) == {("linear_gelu_fwd", "composed"), ("linear_gelu_bwd", "dz_once")}, ran
    # The blocks: cuBLAS with our elementwise kernels (the FFN block's composed paths, GeGLU's
    # composed forward and once backward).
    with count_paths() as ran, pytest.warns(UntunedWarning):
        triton_gelu.FeedForward(12, 10, dropout=0.0)(x).sum().backward()
        triton_gelu.GatedFeedForward(12, 10)(x).sum().backward()
    assert timed_choosers.calls == 0
    assert set(ran) == {("ffn_fwd", "composed"), ("ffn_bwd", "composed"), ("geglu_fwd", "composed"),
                   ("geglu_bwd", "once")}, ran


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a CPU-only torch")
def test_capture_check_is_false_on_a_cpu_only_torch():
    from triton_gelu._runtime import capturing

    with pytest.raises(RuntimeError):  # what the guard absorbs
        torch.cuda.is_current_stream_capturing()
    assert capturing() is False
