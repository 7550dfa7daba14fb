"""User settings that steer the kernels, read without importing Triton.

Forced paths: each op that can be computed more than one way (the fused Triton kernel, cuBLAS
plus an elementwise kernel, PyTorch's own op) has named *paths*; ``_autotune.Paths`` picks one
per problem. A path can be forced, for tests and for users who want to rule one out:

- ``TRITON_GELU_PATH="linear_gelu_fwd=composed,gelu_fwd=torch"`` in the environment (read at
  each choice, so a test may set it with ``monkeypatch.setenv``);
- ``with triton_gelu.autotune.force_path(linear_gelu_fwd="composed"): ...`` in Python, which
  wins over the environment.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator

PATH_ENV = "TRITON_GELU_PATH"

_forced: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("forced", default={})


def _parse_paths(text: str) -> dict[str, str]:
    paths = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        op, sep, name = item.partition("=")
        if not sep or not op.strip() or not name.strip():
            raise ValueError(
                f"{PATH_ENV} must be a comma-separated list of op=path, like "
                f"'linear_gelu_fwd=composed'; got {text!r}"
            )
        paths[op.strip()] = name.strip()
    return paths


def forced_path(op: str) -> str | None:
    """The path forced for ``op`` (Python setting first, then ``$TRITON_GELU_PATH``), else None."""
    forced = _forced.get()
    if op in forced:
        return forced[op]
    return _parse_paths(os.environ.get(PATH_ENV, "")).get(op)


@contextlib.contextmanager
def force_path(**paths: str) -> Iterator[None]:
    """Force ``op=path`` choices inside the ``with`` block (names are checked when the op runs)."""
    token = _forced.set({**_forced.get(), **paths})
    try:
        yield
    finally:
        _forced.reset(token)
