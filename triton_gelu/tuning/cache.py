"""Where tuning results live on disk, and how they are read and written. No Triton needed.

One JSON file per (kernel, device name, Triton version, kernel source hash), each holding
``{"entries": {key text: entry}}`` plus what it was measured on. The directory is
``$TRITON_GELU_CACHE_DIR``, else ``$XDG_CACHE_HOME/triton_gelu``, else ``~/.cache/triton_gelu``.
Files are replaced atomically (write a temporary file, then rename), so a reader never sees half
a file; an unreadable or foreign file reads as empty.

Processes that tune at once (the ranks of one job on one machine) serialize on ``locked(path)``:
an exclusive ``fcntl.flock`` on ``<file>.lock`` beside the cache file, held around
read-check-tune-write, so the first process tunes a key and the others, once they get the lock,
read its entry instead of tuning it again; they all end with the same choice. Where there is no
``fcntl`` (Windows) or the lock file cannot be made, only threads of one process are serialized,
and the atomic replace (plus the merge with the entries on disk in every write) still keeps the
file valid. A lock held longer than ``LOCK_TIMEOUT_S`` (a hung process) is given up with a
warning and the caller tunes on its own.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no inter-process lock, see the module docstring
    fcntl = None  # type: ignore[assignment]

LOCK_TIMEOUT_S = 900.0
_POLL_S = 0.02


def cache_dir() -> Path:
    """``$TRITON_GELU_CACHE_DIR``, else ``$XDG_CACHE_HOME/triton_gelu``, else ``~/.cache/...``."""
    if os.environ.get("TRITON_GELU_CACHE_DIR"):
        return Path(os.environ["TRITON_GELU_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "triton_gelu"


def cache_files() -> list[Path]:
    """Every tuning file of the cache directory, sorted."""
    return sorted(cache_dir().glob("*.json"))


def clear_cache() -> list[Path]:
    """Delete every tuning file of the cache directory; return the paths deleted."""
    removed = []
    for path in cache_files():
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def read_entries(path: Path) -> dict[str, dict]:
    """The entries of a cache file; {} if it is missing, unreadable or not ours."""
    try:
        document = json.loads(path.read_text())
        entries = document["entries"]
        return dict(entries) if isinstance(entries, dict) else {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def write_document(path: Path, document: dict) -> None:
    """Replace ``path`` with ``document`` atomically; warn (never raise) if it cannot be written."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(document, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        warnings.warn(f"triton_gelu: could not write the autotune cache {path}: {e}",
                      stacklevel=3)


# ---- one tuner at a time per cache file --------------------------------------------------------

_thread_locks: collections.defaultdict[str, threading.RLock] = collections.defaultdict(
    threading.RLock)
_depth: collections.Counter = collections.Counter()  # how deeply the holding thread holds each


def _flock(lock_file: Path, deadline: float):
    """An open file holding an exclusive flock on ``lock_file``, or None (no fcntl, the file
    cannot be made, or the deadline passed)."""
    if fcntl is None:
        return None
    try:
        lock_file.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock_file, "a")
    except OSError:
        return None
    while True:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return handle
        except BlockingIOError:
            if time.monotonic() >= deadline:
                handle.close()
                warnings.warn(f"triton_gelu: {lock_file} was held for more than "
                              f"{LOCK_TIMEOUT_S:.0f} s; tuning without it", stacklevel=4)
                return None
            time.sleep(_POLL_S)
        except OSError:  # a file system without flock (some network mounts)
            handle.close()
            return None


@contextlib.contextmanager
def locked(path: Path, timeout: float | None = None) -> Iterator[None]:
    """Hold the tuning lock of cache file ``path`` (re-entrant within a thread)."""
    name = str(path)
    deadline = time.monotonic() + (LOCK_TIMEOUT_S if timeout is None else timeout)
    thread_lock = _thread_locks[name]
    if not thread_lock.acquire(timeout=max(deadline - time.monotonic(), 0.0)):
        warnings.warn(f"triton_gelu: another thread held {path}'s tuning lock too long; "
                      "tuning without it", stacklevel=3)
        yield
        return
    try:
        outermost = _depth[name] == 0
        handle = _flock(path.with_name(path.name + ".lock"), deadline) if outermost else None
        _depth[name] += 1
        try:
            yield
        finally:
            _depth[name] -= 1
            if handle is not None:
                handle.close()  # closing the last descriptor releases the flock
    finally:
        thread_lock.release()
