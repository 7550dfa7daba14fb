"""Eight ranks of one job on one machine tuning the same problem at once must agree and leave a
valid cache: several real processes (multiprocessing spawn), each with a fake timer that makes a
different candidate fastest, all released at the same moment by a barrier."""

from __future__ import annotations

import json
import multiprocessing
import queue

from fakes import load_kernel, tuning_worker

PROCESSES = 4


def test_processes_tuning_one_key_at_once_agree_and_keep_the_cache_valid(tmp_path,
                                                                          monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("TRITON_GELU_CACHE_DIR", str(cache))  # inherited by the children
    monkeypatch.delenv("TRITON_GELU_TUNE", raising=False)
    load_kernel(tmp_path, "2.0", "mp_kernel")  # written once, before the children read it
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(PROCESSES), context.Queue()
    workers = [context.Process(target=tuning_worker, args=(rank, str(tmp_path), barrier, results))
               for rank in range(PROCESSES)]
    for worker in workers:
        worker.start()
    reports = []
    try:
        for _ in workers:
            reports.append(results.get(timeout=240))
    except queue.Empty:
        raise AssertionError(f"only {len(reports)} of {PROCESSES} processes reported: {reports}")
    finally:
        for worker in workers:
            worker.join(timeout=30)
            if worker.is_alive():
                worker.kill()
    errors = [r for r in reports if r[-1] is not None]
    assert not errors, errors
    assert all(r[5] and r[6] for r in reports), f"a wrong result: {reports}"
    configs, paths = {r[1] for r in reports}, {r[3] for r in reports}
    assert len(configs) == 1 and len(paths) == 1, f"the processes disagree: {sorted(reports)}"
    # The first process to take the lock tuned; every other one read its entry.
    assert sorted(r[2] for r in reports) == ["cache"] * (PROCESSES - 1) + ["tuned"], reports
    assert sorted(r[4] for r in reports) == ["cache"] * (PROCESSES - 1) + ["tuned"], reports
    files = sorted(cache.glob("*.json"))
    assert [f.name.split(".")[0] for f in files] == ["mp_copy", "paths"], files
    for path in files:
        entries = json.loads(path.read_text())["entries"]
        assert len(entries) == 1, entries
    (config_entry,) = json.loads(files[0].read_text())["entries"].values()
    assert config_entry["kwargs"] == {"BLOCK_SIZE": configs.pop()}
    assert not list(cache.glob("*.tmp")), "a temporary file was left behind"
