"""The shipped tuning table (triton_gelu/tuning/tuned/<arch>.json): its schema, that every entry
passes its tuner's pruning, what the exporter writes, and that the package ships the files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fakes import FakeTimer, double_by_add, double_by_mul, launch, load_kernel, three_configs

from triton_gelu.tuning import keys as _keys
from triton_gelu.tuning import table as _table
from triton_gelu.tuning.keys import Device, parse_key
from triton_gelu.tuning.paths import Paths, path_choosers
from triton_gelu.tuning.spaces import config_id
from triton_gelu.tuning.tuner import Tuner, entry_config, tuners
from triton_gelu.autotune import _export_table as export_table
from triton_gelu.autotune import policy

REPO = Path(__file__).resolve().parents[1]
ARCHES = ("sm90", "sm80")


@pytest.mark.parametrize("arch", ARCHES)
def test_shipped_table_has_the_schema_and_every_entry_passes_pruning(arch):
    path = REPO / "triton_gelu" / "tuning" / "tuned" / f"{arch}.json"
    document = json.loads(path.read_text())
    assert _table.schema_problems(document) == [] and document["arch"] == arch
    for name, part in document["tuners"].items():
        tuner = tuners[name]  # a table section for a tuner that no longer exists fails
        for key_text, entry in part["entries"].items():
            space = {config_id(c)
                     for c in tuner.pruned_space(parse_key(key_text), arch)}
            assert config_id(entry_config(entry)) in space, (
                f"{arch} {name} [{key_text}]: {entry} is not in the pruned space")
    for op, part in document["paths"].items():
        paths = path_choosers[op]
        for key_text, entry in part["entries"].items():
            assert set(entry["candidates"]) <= set(paths.paths), (op, key_text, entry)
    assert _table.load_table(arch) == document, "the package reads the same file"


def test_the_wheel_ships_the_tables():
    import fnmatch

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["triton_gelu"]
    for arch in ARCHES:
        assert any(fnmatch.fnmatch(f"tuning/tuned/{arch}.json", p) for p in patterns), patterns


def test_schema_problems_are_found():
    good = _table.empty_table("sm90")
    assert _table.schema_problems(good) == []
    entry = {"kwargs": {"BLOCK_SIZE": 16}, "num_warps": 4, "num_stages": 1, "ms": 0.5}
    path_entry = {"path": "a", "ms": 1.0, "candidates": {"a": 1.0, "b": None}}
    cases = {
        "schema must be 1": {**good, "schema": 2},
        "kwargs must map names to integers": {**good, "tuners": {"k": {
            "source_hash": "h", "entries": {"1": {**entry, "kwargs": {"BLOCK_SIZE": "16"}}}}}},
        "num_stages must be an integer": {**good, "tuners": {"k": {
            "source_hash": "h", "entries": {"1": {**entry, "num_stages": 1.5}}}}},
        "needs source_hash": {**good, "paths": {"op": {"entries": {}}}},
        "the chosen path must be one of the candidates": {**good, "paths": {"op": {
            "source_hash": "h", "entries": {"1": {**path_entry, "path": "c"}}}}},
        "ms must be a number or null": {**good, "paths": {"op": {
            "source_hash": "h", "entries": {"1": {**path_entry, "ms": "fast"}}}}},
    }
    for message, document in cases.items():
        problems = _table.schema_problems(document)
        assert any(message in p for p in problems), (message, problems)
    with pytest.raises(ValueError, match="malformed"):
        _table.write_table(Path("/nonexistent/x.json"), cases["schema must be 1"])


def test_nearest_entry_compares_sizes_only_within_the_same_flags():
    entries = {"8192|3072|768|torch.bfloat16|False": "big", "64|3072|768|torch.bfloat16|False":
               "decode", "8192|3072|768|torch.float16|False": "fp16"}
    assert _table.nearest(entries, "4096|3072|768|torch.bfloat16|False") == "big"
    assert _table.nearest(entries, "16|3072|768|torch.bfloat16|False") == "decode"
    assert _table.nearest(entries, "16|3072|768|torch.bfloat16|True") is None


def test_export_writes_what_was_tuned_and_the_table_then_serves(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_GELU_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setitem(_keys._devices, -1, Device(-1, "interpreter", "sm90"))
    monkeypatch.setattr(_table, "TABLE_DIR", tmp_path / "tuned")
    kernel = load_kernel(tmp_path, "2.0", "export_kernel")
    tuner = Tuner(kernel, "test_export", three_configs, bench=FakeTimer([3.0, 1.0, 2.0]))
    paths = Paths("test_export_op", {"add": double_by_add, "mul": double_by_mul}, "add",
                  bench=FakeTimer([2.0, 1.0]), kernels=[tuner])
    with policy("full"):
        launch(tuner)
        paths.run(("k",), torch.arange(3.0))
    table = _table.table_path("sm90")
    document = export_table(table, "sm90", -1, ["100x1x1 float32 none"])
    assert _table.schema_problems(json.loads(table.read_text())) == []
    assert document["tuners"]["test_export"] == {"source_hash": tuner.source_hash, "entries": {
        "128|torch.float32": {"kwargs": {"BLOCK_SIZE": 32}, "num_warps": 4, "num_stages": 1,
                              "ms": 1.0}}}
    assert document["paths"]["test_export_op"]["entries"] == {
        "k": {"path": "mul", "ms": 1.0, "candidates": {"add": 2.0, "mul": 1.0}}}
    assert document["measured_on"]["device"] == "interpreter"
    export_table(table, "sm90", -1, ["second problem"])  # merges, never drops
    again = _table.read_table(table)
    assert again["exported"] == ["100x1x1 float32 none", "second problem"]
    assert "128|torch.float32" in again["tuners"]["test_export"]["entries"]

    # A fresh process with no cache and the policy off takes the table's choices.
    monkeypatch.setenv("TRITON_GELU_CACHE_DIR", str(tmp_path / "empty-cache"))
    fresh = Tuner(kernel, "test_export", three_configs, bench=FakeTimer([0.1]))
    fresh_paths = Paths("test_export_op", {"add": double_by_add, "mul": double_by_mul}, "add",
                        bench=FakeTimer([0.1]), kernels=[fresh])
    with policy("off"):
        launch(fresh)
        fresh_paths.run(("k",), torch.arange(3.0))
    assert fresh.bench.calls == fresh_paths.bench.calls == 0
    (choice,) = fresh.choices.values()
    (path_choice,) = fresh_paths.choices.values()
    assert (choice.config.kwargs, choice.source) == ({"BLOCK_SIZE": 32}, "table")
    assert (path_choice.path, path_choice.source) == ("mul", "table")
