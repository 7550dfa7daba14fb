"""Compile facts, the pruning they drive, the cost model's ranking, and what a first call compiles
(the real tuner replayed with fake timings on an sm90 or sm80 it pretends to be: no GPU)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton

from bench import cold_start
from triton_gelu.tuning import facts, model
from triton_gelu.tuning.spaces import SMEM_BYTES, matmul_configs
from triton_gelu.tuning.tuner import MODEL_TOP, tuners

REPO = Path(__file__).resolve().parents[1]


def _config(bm, bn, bk, warps=8, stages=3):
    return triton.Config({"BLOCK_SIZE_M": bm, "BLOCK_SIZE_N": bn, "BLOCK_SIZE_K": bk,
                          "GROUP_SIZE_M": 8}, num_warps=warps, num_stages=stages)


# ---- the committed facts -----------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["sm90", "sm80"])
def test_committed_facts_have_the_schema_and_name_real_tuners_and_configs(arch):
    document = json.loads(facts.facts_path(arch).read_text())
    assert facts.schema_problems(document) == [] and document["arch"] == arch
    assert facts.load_facts(arch) == document, "the package reads the same file"
    for case, section in document["kernels"].items():
        tuner = tuners[section["tuner"]]  # a section for a tuner that no longer exists fails
        assert case.partition("+")[0] == tuner.name, case
        space = {facts.config_text(c.kwargs, c.num_warps, c.num_stages)
                 for c in (tuner.configs(arch))}
        assert set(section["configs"]) <= space, (case, set(section["configs"]) - space)
        for text, fact in section["configs"].items():
            if "error" not in fact and fact["mma"] is not None:  # the matmuls
                assert fact["mma"] == ("wgmma" if arch == "sm90" else "mma.sync"), (case, text)
    assert facts.SMEM_LIMIT[arch] == SMEM_BYTES[arch]


def test_schema_problems_are_found():
    good = {"schema": 1, "arch": "sm90", "triton": "3.9.0", "dtype": "bfloat16", "problem": "p",
            "kernels": {"k": {"tuner": "k", "source_hash": "h", "configs": {
                "c": {f: 0 for f in facts.FIELDS}, "d": {"error": "ptxas"}}}}}
    assert facts.schema_problems(good) == []
    bad_schema = {**good, "schema": 2}
    missing_field = copy.deepcopy(good)
    del missing_field["kernels"]["k"]["configs"]["c"]["regs"]
    no_tuner = copy.deepcopy(good)
    del no_tuner["kernels"]["k"]["tuner"]
    for document, words in ((bad_schema, "schema must be 1"), (missing_field, "needs error"),
                            (no_tuner, "needs tuner"), ([], "not a JSON object")):
        problems = facts.schema_problems(document)
        assert any(words in p for p in problems), (words, problems)


# ---- pruning by facts ----------------------------------------------------------------------------


@pytest.fixture
def fake_facts(tmp_path, monkeypatch):
    """Write a facts document for sm90 with the given configs of one Tuner; read it back."""
    monkeypatch.setattr(facts, "FACTS_DIR", tmp_path / "facts")

    def write(tuner: str, configs: dict) -> None:
        path = facts.facts_path("sm90")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"schema": 1, "arch": "sm90", "triton": "x", "dtype": "bf16",
                                    "problem": "p", "kernels": {tuner: {
                                        "tuner": tuner, "source_hash": "h",
                                        "configs": configs}}}))
    return write


def _fact(**changes) -> dict:
    return {"regs": 168, "spills": 0, "spills_in_loop": 0, "loop_instructions": 150,
            "smem": 98304, "mma": "wgmma", "loads": "cp.async", **changes}


def test_facts_prune_main_loop_spills_overflowing_shared_memory_and_failed_compiles(fake_facts):
    a, b, c, d = _config(128, 128, 64), _config(128, 256, 64), _config(256, 128, 64), \
        _config(64, 64, 64, 4, 4)
    text = {id(x): facts.config_text(x.kwargs, x.num_warps, x.num_stages) for x in (a, b, c, d)}
    fake_facts("test_pruned", {
        text[id(a)]: _fact(), text[id(b)]: _fact(spills=288, spills_in_loop=12),
        text[id(c)]: _fact(smem=SMEM_BYTES["sm90"] + 1), text[id(d)]: {"error": "ptxas"}})
    kept = facts.admissible([a, b, c, d], "test_pruned", "sm90")
    assert kept == [a], kept
    # An epilogue spill (outside the main loop) is kept; a config without facts is kept.
    fake_facts("test_pruned", {text[id(a)]: _fact(spills=288, spills_in_loop=0)})
    assert facts.admissible([a, b], "test_pruned", "sm90") == [a, b]
    # Where every config is condemned, the one spilling least in its main loop stays.
    fake_facts("test_pruned", {text[id(a)]: _fact(spills_in_loop=40),
                               text[id(b)]: _fact(spills_in_loop=3)})
    assert facts.admissible([a, b], "test_pruned", "sm90") == [b]
    # Another architecture's facts, or none, prune nothing.
    assert facts.admissible([a, b], "test_pruned", "sm80") == [a, b]
    assert facts.admissible([a, b], "test_pruned", None) == [a, b]


@pytest.mark.parametrize("arch", ["sm90", "sm80"])
def test_no_config_a_tuner_can_choose_spills_in_its_main_loop(arch):
    condemned_somewhere = 0
    for name, tuner in sorted(tuners.items()):
        known = facts.tuner_facts(arch, name)
        if not known:
            continue
        space = tuner.configs(arch)
        key = (8192, 16384, 4096, torch.bfloat16) if "BLOCK_SIZE_K" in space[0].kwargs \
            else (8192, 16384, torch.bfloat16) if "BLOCK_SIZE_M" in space[0].kwargs \
            else (1 << 27, torch.bfloat16)

        def condemned(config) -> bool:
            return any(facts.condemned(f, arch) for f in known.get(
                facts.config_text(config.kwargs, config.num_warps, config.num_stages), []))

        pruned = tuner.pruned_space(key, arch)
        condemned_somewhere += sum(map(condemned, pruned))
        assert not all(map(condemned, pruned)), f"{name}: every {arch} config is condemned"
        offered = tuner.candidates(key, arch)
        assert offered and not [c for c in offered if condemned(c)], name
    assert condemned_somewhere, "the committed facts condemn nothing: nothing is pruned"


# ---- the cost model ------------------------------------------------------------------------------


def test_a_tile_wasting_half_its_work_at_an_edge_ranks_below_one_that_does_not():
    # N = 128: a 256-wide tile computes 256 columns for 128 useful ones.
    wide, fitting = _config(128, 256, 64), _config(128, 128, 64)
    args = dict(M=8192, N=128, K=4096, itemsize=2, arch="sm90")
    assert model.matmul_time(wide, **args) > 1.5 * model.matmul_time(fitting, **args)
    # Where N is a multiple of both, the bigger tile (more reuse) is no slower.
    args["N"] = 8192
    assert model.matmul_time(wide, **args) <= model.matmul_time(fitting, **args)


def test_one_program_past_a_full_wave_costs_a_second_wave():
    config = _config(128, 128, 64)
    one_per_sm = {"smem": 150_000, "regs": 168}  # shared memory allows one program per SM
    assert model.ARCHES["sm90"].sms == 12 * 11
    # 12 x 11 tiles of 128 x 128: one wave; one column more: 12 x 12 tiles, two waves.
    full = model.matmul_time(config, 12 * 128, 11 * 128, 16384, 2, "sm90", fact=one_per_sm)
    over = model.matmul_time(config, 12 * 128, 11 * 128 + 1, 16384, 2, "sm90", fact=one_per_sm)
    assert over > 1.8 * full, (full, over)


def test_a_main_loop_of_thousands_of_instructions_is_issue_bound():
    # The backward kernels that rebuild dz in their K loop: 6,000 SASS instructions an iteration
    # against the forward's 150 take longer than the tensor-core work.
    config = _config(128, 128, 64)
    lean = model.matmul_time(config, 8192, 3072, 768, 2, "sm90", "N", fact=_fact())
    heavy = model.matmul_time(config, 8192, 3072, 768, 2, "sm90", "N",
                              fact=_fact(loop_instructions=6000))
    assert heavy > 5 * lean, (lean, heavy)


def test_memory_bound_blocks_with_too_few_bytes_in_flight_rank_last():
    ranked = sorted([(b, w) for b in (1024, 16384) for w in (4, 16)],
                    key=lambda bw: model.elementwise_time(bw[0], bw[1], 1 << 27, 2, "sm90"))
    assert ranked[-1] == (1024, 16), ranked  # 64 threads' worth of elements per 16 warps


def test_paths_the_model_shows_losing_are_not_timed(monkeypatch):
    monkeypatch.setitem(model.PATH_MODELS, "test_op", lambda key, c: {
        "fast": 1.0, "close": 1.2, "slow": 2.0, "torch": 5.0, "unknown": float("nan")})
    kept = model.paths_worth_timing(
        "test_op", ["slow", "fast", "close", "torch", "unknown", "unmodelled"], ("key",), "sm90",
        tuners)
    # PyTorch's own path stays a candidate however slow the model thinks it (never slower than
    # eager, by construction); it compiles nothing.
    assert kept == ["fast", "close", "torch", "unknown", "unmodelled"]
    # No architecture (the interpreter), or an op without a model: every path.
    assert model.paths_worth_timing("test_op", ["slow", "fast"], ("key",), None, tuners) == \
        ["slow", "fast"]
    assert model.paths_worth_timing("no_model", ["a", "b"], ("key",), "sm90", tuners) == ["a", "b"]


def test_the_tuner_ranks_its_space_by_the_model():
    tuner = tuners["linear_gelu_fwd"]
    key = (8192, 3072, 768, torch.bfloat16)
    ranked = tuner.ranked(key, "sm90")
    times = [model.config_time(tuner, c, key, "sm90") for c in ranked]
    assert times == sorted(times) and len(ranked) == len(tuner.candidates(key, "sm90"))
    assert set(map(str, matmul_configs(None))) == set(map(str, tuner.ranked(key, None))), \
        "no architecture: the interpreter's one config, unranked"


# ---- what a first call compiles ------------------------------------------------------------------

# Configs a first call compiles under the default policy on sm90 (fwd + bwd in training), at
# bert-base (8192 tokens, 768 -> 3072), with empty shipped tables: replayed exactly.
FIRST_CALL_SM90 = {
    ("gelu", ""): 2, ("linear_gelu", ""): 5, ("feed_forward", ""): 9,
    ("feed_forward", "p=0.1"): 9, ("geglu", ""): 5, ("gated_feed_forward", ""): 5,
    ("gated_feed_forward", "p=0.1"): 5,
}


def test_first_call_compile_counts_on_sm90():
    rows = cold_start.records(arches=("sm90",), policies=("fast",), presets=("bert-base",),
                              ops=cold_start.op_names())
    counts = {(r["op"], r["problem"].partition(" p=")[1] and "p=0.1"): r["configs_compiled"]
              for r in rows}
    assert counts == FIRST_CALL_SM90, counts
    # The issue's targets: at most 3 configs per kernel; linear_gelu at most 8 in all, the FFN
    # block with dropout and GeGLU at most 10; nothing chosen spills inside a main loop.
    for r in rows:
        assert not [c for c in r["chosen"] if c["spills_in_loop"]], r
    assert counts[("linear_gelu", "")] <= 8 and counts[("feed_forward", "p=0.1")] <= 10
    assert counts[("geglu", "")] <= 10 and MODEL_TOP["matmul"] + 1 <= 3


def test_off_compiles_one_config_per_kernel_and_full_every_admissible_one():
    fast, off, full = (cold_start.records(arches=("sm90",), policies=(policy,),
                                          presets=("bert-base",), ops=("linear_gelu",))[0]
                       for policy in ("fast", "off", "full"))
    assert off["paths_timed"] == 0 and off["configs_compiled"] == len(off["chosen"])
    assert full["configs_compiled"] > fast["configs_compiled"] > off["configs_compiled"]


def test_bench_cold_start_writes_its_records(tmp_path):
    out = tmp_path / "cold.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-m", "bench", "--cold-start", "--json", str(out)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(out.read_text())
    export = {r["arch"]: r["configs_compiled"] for r in rows if r["op"] == "export"}
    assert set(export) == {"sm90", "sm80"} and export["sm90"] <= 150, export
    ops = {r["op"] for r in rows}
    assert ops == {*cold_start.op_names(), "export"}, ops
    record = next(r for r in rows if r["op"] == "linear_gelu")
    assert set(record) == {"op", "problem", "arch", "policy", "configs_compiled", "paths_timed",
                           "chosen"}
    assert set(record["chosen"][0]) == {"kernel", "config", "regs", "spills", "spills_in_loop",
                                        "smem"}
    assert "export" in run.stdout and "linear_gelu" in run.stdout
