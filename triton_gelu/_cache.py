"""Where tuning results live on disk, and how they are read and written. No Triton needed.

One JSON file per (kernel, device name, Triton version, kernel source hash), each holding
``{"entries": {key text: entry}}`` plus what it was measured on. The directory is
``$TRITON_GELU_CACHE_DIR``, else ``$XDG_CACHE_HOME/triton_gelu``, else ``~/.cache/triton_gelu``.
Files are replaced atomically (write a temporary file, then rename), so a reader never sees half
a file; an unreadable or foreign file reads as empty.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path


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
