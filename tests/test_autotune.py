"""Autotuning on the CPU: key bucketing, per-architecture spaces and pruning, the on-disk cache
(write, reload without timing, invalidation when the kernel changes), and the CLI's no-GPU exit.

Timing is injected (``Tuner(..., bench=fake)``): the interpreter cannot benchmark, but the tuner's
logic, the choice of the fastest config, and the cache are the same as on a GPU.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton
from fakes import FakeTimer
from fakes import launch as _launch
from fakes import load_kernel as _load_kernel
from fakes import three_configs as _three_configs

from triton_gelu.tuning.cache import cache_dir, clear_cache
from triton_gelu.tuning.keys import arch_of, device_of, source_hash
from triton_gelu.tuning.spaces import (
    SMEM_BYTES, bucket, elementwise_configs, matmul_configs, matmul_smem_bytes,
    prune_elementwise, prune_matmul,
)
from triton_gelu.tuning.tuner import Tuner, tuners

ARCHES = ("sm90", "sm80", "sm86", "sm89", "default")
REPO = Path(__file__).resolve().parents[1]


# ---- keys -----------------------------------------------------------------------------------


def test_bucket_rounds_up_to_a_power_of_two():
    assert [bucket(n) for n in (0, 1, 2, 3, 4, 5, 1000, 1024, 1025, 8192, 8193)] == [
        1, 1, 2, 4, 4, 8, 1024, 1024, 2048, 8192, 16384]


def test_every_token_count_in_a_bucket_shares_one_key():
    keys = {bucket(m) for m in range(4097, 8193)}
    assert keys == {8192}, f"token counts 4097..8192 map to {sorted(keys)}"


def test_arch_of_capability():
    got = {cap: arch_of(cap) for cap in [(9, 0), (8, 0), (8, 6), (8, 9), (8, 7), (7, 5), (10, 0)]}
    assert got == {(9, 0): "sm90", (8, 0): "sm80", (8, 6): "sm86", (8, 9): "sm89",
                   (8, 7): "default", (7, 5): "default", (10, 0): "default"}
    assert arch_of((9, 4), hip=True) == "default"


# ---- config spaces and pruning ----------------------------------------------------------------


def test_interpreter_gets_one_small_config():
    assert len(matmul_configs(None)) == 1 and len(elementwise_configs(None)) == 1


ROLES = {"K": "forward y = x @ W^T", "N": "backward dx = dz @ W", "M": "backward dW = dz^T @ x"}


@pytest.mark.parametrize("arch", ARCHES)
def test_matmul_space_serves_forward_and_backward_in_16_bit(arch):
    configs = matmul_configs(arch)
    big_key = (8192, 4096, 4096, torch.bfloat16)
    # Every tile is there for the forward; enough of them also fit each backward kernel.
    assert len(prune_matmul(configs, big_key, arch, reduction="K")) == len(configs)
    for role, what in ROLES.items():
        kept = prune_matmul(configs, big_key, arch, reduction=role)
        assert len(kept) >= 4, f"{arch}: only {len(kept)} tiles fit the {what}"
        assert all(matmul_smem_bytes(c, 2, arch, role) <= SMEM_BYTES[arch] for c in kept)
    assert len(prune_matmul(configs, big_key, arch)) >= 4, "too few tiles fit every role"


def test_hopper_tiles_are_wgmma_sized():
    small = [c.kwargs for c in matmul_configs("sm90") if c.kwargs["BLOCK_SIZE_M"] < 64]
    assert not small, f"wgmma needs BLOCK_SIZE_M >= 64; these fall back to mma: {small}"


def _tile(bm, bn, bk, stages):
    return triton.Config({"BLOCK_SIZE_M": bm, "BLOCK_SIZE_N": bn, "BLOCK_SIZE_K": bk,
                          "GROUP_SIZE_M": 8}, num_warps=8, num_stages=stages)


@pytest.mark.parametrize("arch, dtype, fits", [
    ("sm90", torch.bfloat16, True),    # (128*64 + 64*256) * 2 B * 3 buffers = 144 KB <= 227 KB
    ("sm80", torch.float16, True),     # Ampere keeps num_stages - 1 buffers: 96 KB <= 163 KB
    ("sm86", torch.bfloat16, True),    # 96 KB <= 99 KB
    ("default", torch.bfloat16, False),  # counted as 144 KB on an unknown GPU: > 64 KB
    ("sm90", torch.float32, False),    # 288 KB in fp32
])
def test_prune_matmul_drops_tiles_that_do_not_fit_shared_memory(arch, dtype, fits):
    big, small = _tile(128, 256, 64, 3), _tile(64, 64, 32, 2)
    kept = prune_matmul([big, small], (8192, 4096, 4096, dtype), arch, reduction="K")
    assert (big in kept) == fits and small in kept, (
        f"{arch} {dtype}: 128x256x64 tile kept={big in kept}, expected {fits}")


def test_smem_estimate_follows_the_kernel_and_the_architecture():
    # Figures of real sm80 / sm90 compiles of linear_gelu's kernels (tests/aot_compile.py).
    tile = _tile(128, 256, 64, 3)
    assert matmul_smem_bytes(tile, 2, "sm90", "K") == 147456
    assert matmul_smem_bytes(tile, 2, "sm80", "K") == 98304
    # dx loops over N, staging dy and z (BM, BN) tiles: 352 KB, too big for sm90.
    assert matmul_smem_bytes(tile, 2, "sm90", "N") == 360448
    assert matmul_smem_bytes(_tile(128, 128, 64, 3), 2, "sm80", "N") == 163840
    # dW loops over M; db's partial sums add a little.
    assert matmul_smem_bytes(tile, 2, "sm80", "M") == (2 * 2 * 128 * 256 + 2 * 128 * 64) * 2 \
        + 32 * 256
    key = (8192, 4096, 4096, torch.bfloat16)
    small = _tile(64, 64, 32, 2)
    assert prune_matmul([tile, small], key, "sm90", reduction="K") == [tile, small]
    assert prune_matmul([tile, small], key, "sm90", reduction="N") == [small]
    assert prune_matmul([tile, small], key, "sm90") == [small], "no role given: fit all three"


def test_prune_matmul_drops_tiles_far_larger_than_a_small_problem():
    configs = matmul_configs("sm90")
    kept = prune_matmul(configs, (bucket(5), 4096, 4096, torch.bfloat16), "sm90")
    sizes = sorted({c.kwargs["BLOCK_SIZE_M"] for c in kept})
    assert kept and sizes[-1] <= 64, f"M=5 kept BLOCK_SIZE_M {sizes}"
    assert len(kept) < len(configs)
    narrow = prune_matmul(configs, (8192, 48, 4096, torch.bfloat16), "sm90")
    assert narrow and max(c.kwargs["BLOCK_SIZE_N"] for c in narrow) <= 64


def test_prune_matmul_never_returns_nothing():
    huge = [_tile(256, 256, 128, 5), _tile(128, 256, 128, 4)]
    kept = prune_matmul(huge, (16, 16, 16, torch.float32), "default")
    assert kept == [huge[1]], "the config with the smallest shared memory must remain"


def test_gated_smem_estimate_and_fewer_stages_when_nothing_fits():
    # Figures of real sm90 compiles of the GeGLU kernels (tests/aot_compile.py --only geglu):
    # the forward stages an x tile and two weight tiles, dx three (BM, BN) tiles and two weights.
    assert matmul_smem_bytes(_tile(128, 128, 64, 3), 2, "sm90", "K", gated=True) == 147456
    assert matmul_smem_bytes(_tile(128, 64, 64, 4), 2, "sm90", "N", gated=True) == 212992
    # dW: never below the compiled 223232 bytes.
    assert 223232 <= matmul_smem_bytes(_tile(128, 128, 32, 3), 2, "sm90", "M", gated=True) \
        <= 223232 + 8192
    gated = functools.partial(prune_matmul, reduction="N", gated=True)
    key = (8192, 16384, 2048, torch.bfloat16)
    # 128x128x64 with 4 stages needs 416 KB; with 2, 160 KB: that is what remains.
    assert [c.num_stages for c in gated([_tile(128, 128, 64, 4)], key, "sm90")] == [2]
    # In float32 no sm90 tile fits the gated dx; the smallest one runs with fewer stages.
    kept = gated(matmul_configs("sm90"), key[:3] + (torch.float32,), "sm90")
    assert len(kept) == 1 and kept[0].num_stages < 4, kept
    assert matmul_smem_bytes(kept[0], 4, "sm90", "N", gated=True) <= SMEM_BYTES["sm90"]


def test_prune_elementwise_by_size_and_vector_width():
    configs = elementwise_configs("sm90")
    small = prune_elementwise(configs, (bucket(3000), torch.float32), "sm90")
    assert small and all(c.kwargs["BLOCK_SIZE"] <= 4096 for c in small)
    tiny = prune_elementwise(configs, (bucket(10), torch.bfloat16), "sm90")
    assert tiny and all(c.kwargs["BLOCK_SIZE"] == 1024 for c in tiny)
    # A 16-byte vector per thread: bf16 needs BLOCK_SIZE >= num_warps * 32 * 8.
    for c in prune_elementwise(configs, (1 << 30, torch.bfloat16), "sm90"):
        assert c.kwargs["BLOCK_SIZE"] >= c.num_warps * 256, (c.kwargs, c.num_warps)
    assert len(prune_elementwise(configs, (1 << 30, torch.float32), "sm90")) > len(tiny)


# ---- the tuner and its cache ------------------------------------------------------------------

@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    directory = tmp_path / "cache"
    monkeypatch.setenv("TRITON_GELU_CACHE_DIR", str(directory))
    return directory


def test_tuner_picks_the_fastest_and_writes_the_cache(tmp_path, cache):
    kernel = _load_kernel(tmp_path, "2.0", "kernel_a")
    timer = FakeTimer([3.0, 1.0, 2.0])
    tuner = Tuner(kernel, "test_copy", _three_configs, bench=timer)
    y = _launch(tuner)
    torch.testing.assert_close(y, 2.0 * torch.arange(100.0))
    assert timer.calls == 3
    (choice,) = tuner.choices.values()
    assert choice.config.kwargs == {"BLOCK_SIZE": 32} and choice.ms == 1.0
    assert choice.source == "tuned"
    _launch(tuner, n=90)  # same bucket: the hot path, no timing
    assert timer.calls == 3

    (path,) = cache.glob("*.json")
    assert path == tuner.cache_path(device_of(-1))
    assert path.name.startswith(f"test_copy.interpreter.triton-{triton.__version__}.")
    document = json.loads(path.read_text())
    assert document["source_hash"] == source_hash(kernel)
    # The default policy is "fast"; with no shipped table to start from it times every config.
    assert document["entries"] == {"128|torch.float32": {
        "kwargs": {"BLOCK_SIZE": 32}, "num_warps": 4, "num_stages": 1, "ms": 1.0,
        "policy": "fast"}}


def test_a_new_tuner_reloads_the_cache_without_timing(tmp_path, cache):
    kernel = _load_kernel(tmp_path, "2.0", "kernel_b")
    _launch(Tuner(kernel, "test_copy", _three_configs, bench=FakeTimer([3.0, 2.0, 1.0])))

    timer = FakeTimer([0.5])  # would pick BLOCK_SIZE 16 if it were asked
    again = Tuner(kernel, "test_copy", _three_configs, bench=timer)  # as in a new process
    y = _launch(again)
    torch.testing.assert_close(y, 2.0 * torch.arange(100.0))
    assert timer.calls == 0, "a cached key must not be timed again"
    (choice,) = again.choices.values()
    assert (choice.config.kwargs, choice.source, choice.ms) == ({"BLOCK_SIZE": 64}, "cache", 1.0)
    _launch(again, n=1000)  # a new bucket is tuned and added to the same file
    assert timer.calls == 3
    (path,) = cache.glob("*.json")
    assert set(json.loads(path.read_text())["entries"]) == {"128|torch.float32",
                                                            "1024|torch.float32"}


def test_changing_the_kernel_or_a_helper_invalidates_the_cache(tmp_path, cache):
    v1 = _load_kernel(tmp_path, "2.0", "kernel_v1")
    v2 = _load_kernel(tmp_path, "3.0", "kernel_v2")  # same kernel, edited helper
    assert source_hash(v1) != source_hash(v2)
    assert source_hash(v1) == source_hash(_load_kernel(tmp_path, "2.0", "kernel_v1_again"))

    _launch(Tuner(v1, "test_copy", _three_configs, bench=FakeTimer([1.0, 2.0, 3.0])))
    timer = FakeTimer([1.0, 2.0, 3.0])
    y = _launch(Tuner(v2, "test_copy", _three_configs, bench=timer))
    torch.testing.assert_close(y, 3.0 * torch.arange(100.0))
    assert timer.calls == 3, "an edited kernel must be retuned, not served the old entry"
    assert len(list(cache.glob("test_copy.*.json"))) == 2


def test_real_kernels_hash_their_own_source():
    fwd, bwd = tuners["gelu_fwd"].kernel, tuners["gelu_bwd"].kernel  # their @triton.jit kernels
    assert source_hash(fwd) == source_hash(fwd) != source_hash(bwd)


def test_corrupt_or_foreign_cache_files_are_ignored(tmp_path, cache):
    kernel = _load_kernel(tmp_path, "2.0", "kernel_c")
    tuner = Tuner(kernel, "test_copy", _three_configs, bench=FakeTimer([2.0, 1.0, 3.0]))
    path = tuner.cache_path(device_of(-1))
    for garbage in ("{not json", "[1, 2]", '{"entries": {"128|torch.float32": {"kwargs": 7}}}'):
        cache.mkdir(exist_ok=True)
        path.write_text(garbage)
        timer = FakeTimer([2.0, 1.0, 3.0])
        y = _launch(Tuner(kernel, "test_copy", _three_configs, bench=timer))
        torch.testing.assert_close(y, 2.0 * torch.arange(100.0))
        assert timer.calls == 3, f"cache file {garbage!r} was not ignored"
        entry = json.loads(path.read_text())["entries"]["128|torch.float32"]
        assert entry["kwargs"] == {"BLOCK_SIZE": 32}, "the bad file must be replaced"


def test_configs_that_fail_are_skipped_and_total_failure_is_not_cached(tmp_path, cache):
    kernel = _load_kernel(tmp_path, "2.0", "kernel_d")

    def flaky(fn):
        flaky.calls += 1
        if flaky.calls != 2:
            raise RuntimeError("out of resources")
        return 5.0
    flaky.calls = 0
    tuner = Tuner(kernel, "test_copy", _three_configs, bench=flaky)
    _launch(tuner)
    assert next(iter(tuner.choices.values())).config.kwargs == {"BLOCK_SIZE": 32}

    def broken(fn):
        raise RuntimeError("nothing compiles")
    other = _load_kernel(tmp_path, "4.0", "kernel_e")
    _launch(Tuner(other, "test_broken", _three_configs, bench=broken))
    assert not list(cache.glob("test_broken.*.json")), "a failed tuning must not be cached"


def test_an_unwritable_cache_warns_and_the_launch_still_runs(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("TRITON_GELU_CACHE_DIR", str(blocker / "cache"))  # cannot be created
    tuner = Tuner(_load_kernel(tmp_path, "2.0", "kernel_i"), "test_copy", _three_configs,
                  bench=FakeTimer([2.0, 1.0, 3.0]))
    with pytest.warns(UserWarning, match="could not write the autotune cache"):
        y = _launch(tuner)
    torch.testing.assert_close(y, 2.0 * torch.arange(100.0))
    assert next(iter(tuner.choices.values())).config.kwargs == {"BLOCK_SIZE": 32}


def test_interpreter_without_a_timer_uses_one_config_and_writes_nothing(tmp_path, cache):
    kernel = _load_kernel(tmp_path, "2.0", "kernel_f")
    tuner = Tuner(kernel, "test_copy", _three_configs)
    assert not tuner.tunes
    y = _launch(tuner)
    torch.testing.assert_close(y, 2.0 * torch.arange(100.0))
    (choice,) = tuner.choices.values()
    assert choice.config.kwargs == {"BLOCK_SIZE": 16} and choice.source == "only"
    assert not cache.exists() or not any(cache.iterdir())


def test_old_style_config_and_prune_functions_still_work(tmp_path, cache):
    kernel = _load_kernel(tmp_path, "2.0", "kernel_g")
    timer = FakeTimer([1.0])
    tuner = Tuner(kernel, "test_copy", lambda: _three_configs(),
                  lambda configs, key: configs[1:2], bench=timer)
    _launch(tuner)
    assert timer.calls == 1
    assert next(iter(tuner.choices.values())).config.kwargs == {"BLOCK_SIZE": 32}


# ---- where the cache lives --------------------------------------------------------------------


def test_cache_dir_env_override_then_xdg_then_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_GELU_CACHE_DIR", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("TRITON_GELU_CACHE_DIR")
    assert cache_dir() == tmp_path / "xdg" / "triton_gelu"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "triton_gelu"


def test_clear_cache_removes_only_tuning_files(tmp_path, cache):
    _launch(Tuner(_load_kernel(tmp_path, "2.0", "kernel_h"), "test_copy", _three_configs,
                  bench=FakeTimer([1.0])))
    (cache / "notes.txt").write_text("keep me")
    removed = clear_cache()
    assert len(removed) == 1 and not list(cache.glob("*.json"))
    assert (cache / "notes.txt").exists()


# ---- the CLI ----------------------------------------------------------------------------------


def _cli(*args, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(CUDA_VISIBLE_DEVICES="", TRITON_GELU_CACHE_DIR=str(tmp_path / "cli-cache"))
    return subprocess.run([sys.executable, "-m", "triton_gelu.autotune", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)


def test_cli_without_a_gpu_says_so_and_exits_2(tmp_path):
    result = _cli("--shapes", "64x32x48", tmp_path=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "no CUDA GPU" in output and "Traceback" not in output, output
    assert len(output.strip().splitlines()) == 1, output


def test_cli_rejects_bad_arguments_without_a_traceback(tmp_path):
    for args in (["--dtypes", "bf17"], ["--preset", "gpt5"], ["--shapes", "12x34"]):
        result = _cli(*args, tmp_path=tmp_path)
        output = result.stdout + result.stderr
        assert result.returncode == 2 and "Traceback" not in output, (args, output)


def test_cli_clear(tmp_path):
    directory = tmp_path / "cli-cache"
    directory.mkdir()
    (directory / "gelu_fwd.x.json").write_text("{}")
    result = _cli("--clear", tmp_path=tmp_path)
    assert result.returncode == 0 and "removed 1" in result.stdout, result.stdout + result.stderr
    assert not list(directory.glob("*.json"))


def test_the_export_tunes_the_first_contact_problems_first():
    """`--export` (no --shapes) starts with what `bench.first_contact` times, each once, so a
    lease cut short has tuned those; every problem asked for still follows."""
    from triton_gelu import autotune

    shapes = autotune.preset_shapes(["bert-base", "llama-7b"])
    dtypes = [torch.bfloat16, torch.float16]
    problems = autotune._problems(shapes, dtypes, ["none", "tanh"], first=True)
    lead = [(s, torch.bfloat16, a) for s, a in autotune.FIRST_CONTACT]
    assert problems[:len(lead)] == lead
    every = [(s, d, a) for s in shapes for d in dtypes for a in ("none", "tanh")]
    assert set(every) <= set(problems) and len(problems) == len(set(problems))
    assert (8192, 768, 3072) in autotune.preset_shapes(["bert-base"])  # the first one is a preset
    assert autotune._problems(shapes, dtypes, ["none"], first=False) == [
        (s, d, "none") for s in shapes for d in dtypes]
