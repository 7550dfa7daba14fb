"""``python -m triton_gelu``, the environment report for bug reports: every field printed, with
and without Triton, and exit code 0 whatever a field finds (no GPU, a broken driver, a cache path
that is not a directory)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import no_triton
import torch

import triton_gelu
from triton_gelu import __main__ as report  # python -m triton_gelu

LABELS = [label for label, _ in report.FIELDS]


def _parse(output: str) -> dict[str, str]:
    """{label: value} of the report's lines; every label must be there once."""
    fields = {}
    for line in output.splitlines():
        label = next((label for label in LABELS if line.startswith(label + " ")), None)
        assert label is not None and label not in fields, f"unexpected line {line!r}\n{output}"
        fields[label] = line[len(label):].strip()
    assert list(fields) == LABELS, output
    return fields


def _tuning_cache(directory):
    """Two tuning files holding 2 and 1 entries, and one unreadable file."""
    directory.mkdir()
    for name, entries in (("a", {"k1": {}, "k2": {}}), ("b", {"k3": {}})):
        (directory / f"{name}.json").write_text(json.dumps({"entries": entries}))
    (directory / "c.json").write_text("{not json")
    return directory


def _run(tmp_path, hidden: bool) -> dict[str, str]:
    code = "import runpy; runpy.run_module('triton_gelu', run_name='__main__', alter_sys=True)"
    command = no_triton.hidden_command(code) if hidden else [sys.executable, "-m", "triton_gelu"]
    cache = _tuning_cache(tmp_path / "cache")
    proc = subprocess.run(command, env=no_triton.hidden_env(cache), cwd=no_triton.REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    fields = _parse(proc.stdout)
    assert fields["triton_gelu"].startswith(f"{triton_gelu.__version__} (")
    assert fields["python"].startswith(f"{platform.python_version()} (")
    assert fields["torch"].startswith(f"{torch.__version__} (")
    assert fields["tuning cache"] == f"{cache} (3 tunings in 3 files)"
    assert f"TRITON_GELU_CACHE_DIR={cache}" in fields["settings"]
    if torch.cuda.is_available():
        assert torch.cuda.get_device_name(0) in fields["gpu"], fields["gpu"]
    else:
        assert fields["gpu"].startswith("none visible"), fields["gpu"]
    return fields


def test_report_with_triton(tmp_path):
    import triton

    fields = _run(tmp_path, hidden=False)
    assert fields["triton"] == triton.__version__
    # Where kernels run with Triton present: the interpreter when TRITON_INTERPRET is set (the
    # suite sets it without a GPU), else natively on a CUDA GPU, else the fallback.
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        where = "interpreted"
    else:
        where = "native" if torch.cuda.is_available() else "fallback"
    assert fields["kernels run"].startswith(where + " ("), fields


def test_report_without_triton(tmp_path):
    fields = _run(tmp_path, hidden=True)
    assert fields["triton"] == "missing: triton does not import (ModuleNotFoundError: " \
                               "No module named 'triton')", fields["triton"]
    assert fields["kernels run"].startswith("fallback (") and "No module named 'triton'" in \
        fields["kernels run"], fields["kernels run"]
    if torch.cuda.is_available():
        assert "config space none (triton missing)" in fields["gpu"], fields["gpu"]


def _main(capsys) -> dict[str, str]:
    assert report.main() == 0
    return _parse(capsys.readouterr().out)


def test_report_names_the_config_space_of_each_gpu(monkeypatch, capsys):
    gpus = [("NVIDIA H100 80GB HBM3", (9, 0)), ("NVIDIA A100-SXM4-80GB", (8, 0))]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(gpus))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: gpus[i][0])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: gpus[i][1])
    assert _main(capsys)["gpu"] == (
        "0: NVIDIA H100 80GB HBM3, compute capability 9.0, config space sm90; "
        "1: NVIDIA A100-SXM4-80GB, compute capability 8.0, config space sm80"
    )


def test_report_survives_a_broken_driver_and_a_bad_cache(tmp_path, monkeypatch, capsys):
    def broken() -> bool:
        raise RuntimeError("CUDA driver initialization failed")

    monkeypatch.setattr(torch.cuda, "is_available", broken)
    not_a_directory = tmp_path / "cache"
    not_a_directory.write_text("")
    monkeypatch.setenv("TRITON_GELU_CACHE_DIR", str(not_a_directory))
    fields = _main(capsys)
    assert fields["gpu"] == "unknown (RuntimeError: CUDA driver initialization failed)"
    assert fields["tuning cache"] == f"{not_a_directory} (not a directory: tunings cannot be saved)"
    monkeypatch.setenv("TRITON_GELU_CACHE_DIR", str(tmp_path / "absent"))
    assert "does not exist" in _main(capsys)["tuning cache"]
