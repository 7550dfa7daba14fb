"""Run test scenarios on several CPU processes, the ranks of one gloo process group, and bring
each rank's result of each scenario back to the test process.

One spawned job runs a list of scenarios (plain functions ``scenario(rank, world_size)`` in a
module the ranks import), so the process start, the imports and the process group are paid once
per job, not once per scenario. Every rank runs every scenario in the same order; a scenario that
raises is recorded (with its traceback) and the next one runs. Each rank also reports the
kernel launches (``triton_gelu.testing.count_launches``) of each scenario.

Only loopback addresses are used (the store on 127.0.0.1, gloo on the ``lo`` interface), the
kernels run under the Triton interpreter (``TRITON_INTERPRET=1`` is set in each rank before
triton is imported), collectives time out after ``COLLECTIVE_TIMEOUT_S`` and the whole job after
``timeout`` seconds, after which its processes are killed and the test fails: a hung rank never
hangs the suite.
"""

from __future__ import annotations

import datetime
import importlib
import json
import os
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch.multiprocessing

COLLECTIVE_TIMEOUT_S = 60


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(
    rank: int, world_size: int, port: int, module_name: str, names: list[str], out_dir: str
) -> None:
    os.environ.update(
        TRITON_INTERPRET="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
        GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1",
    )
    if "triton" in sys.modules:
        raise RuntimeError("triton was imported before TRITON_INTERPRET=1 could be set")
    import torch
    import torch.distributed as dist

    from triton_gelu.testing import count_launches

    torch.set_num_threads(1)  # ranks share the machine's cores
    dist.init_process_group(
        "gloo", rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )
    module = importlib.import_module(module_name)
    results = {}
    uncounted = getattr(module, "UNCOUNTED", None)  # launches a scenario does not report
    for name in names:
        if uncounted is not None:
            uncounted.clear()
        torch.manual_seed(0)  # the same model and data on every rank
        start = time.perf_counter()
        with count_launches() as launched:
            try:
                getattr(module, name)(rank, world_size)
                error = None
            except Exception:
                error = traceback.format_exc()
        if uncounted is not None:
            launched.subtract(uncounted)
        results[name] = {
            "error": error, "launches": {k: n for k, n in launched.items() if n > 0},
            "seconds": round(time.perf_counter() - start, 2),
        }
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def run_scenarios(
    module_name: str, names: list[str], world_size: int, timeout: float = 240.0
) -> list[dict[str, dict]]:
    """Run ``module_name``'s scenarios ``names`` on ``world_size`` spawned ranks; return, per
    rank, ``{name: {"error": traceback or None, "launches": {kernel: count}, "seconds": s}}``.
    Raises TimeoutError (after killing the ranks) when the job outlives ``timeout``."""
    with tempfile.TemporaryDirectory() as out_dir:
        context = torch.multiprocessing.start_processes(
            _rank_main, args=(world_size, _free_port(), module_name, names, out_dir),
            nprocs=world_size, join=False, start_method="spawn",
        )
        deadline = time.monotonic() + timeout
        try:
            while not context.join(timeout=max(0.0, deadline - time.monotonic())):
                if time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"{world_size} ranks running {names} did not finish in {timeout:.0f} s"
                    )
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
                    process.join()
        return [json.loads(Path(out_dir, f"rank{r}.json").read_text())
                for r in range(world_size)]


def once_per_test_run(shared_dir: Path, key: str, job: Callable[[], object]) -> object:
    """``job()``'s JSON-able result, computed once per pytest run however many pytest-xdist
    workers ask (each worker has its own fixtures, and xdist may send the tests that share a job
    to different workers): the first to take the lock runs it and leaves the result in
    ``shared_dir`` (the run's base temporary directory, common to its workers); the others wait
    and read it. A job that raised raises again for every asker."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return job()
    try:
        import fcntl
    except ImportError:  # no POSIX locks (Windows): each worker runs the job
        return job()
    result_path = shared_dir / f"{key}.json"
    with open(shared_dir / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not result_path.exists():
            try:
                outcome = {"result": job()}
            except Exception:
                outcome = {"error": traceback.format_exc()}
            result_path.write_text(json.dumps(outcome))
        outcome = json.loads(result_path.read_text())
    if "error" in outcome:
        raise RuntimeError(f"the job {key!r} failed:\n{outcome['error']}")
    return outcome["result"]
