"""User settings that steer the kernels, read without importing Triton.

Forced paths: each op that can be computed more than one way (the fused Triton kernel, cuBLAS
plus an elementwise kernel, PyTorch's own op) has named *paths*; ``tuning.paths.Paths`` picks one
per problem. A path can be forced, for tests and for users who want to rule one out:

- ``TRITON_GELU_PATH="linear_gelu_fwd=composed,gelu_fwd=torch"`` in the environment;
- ``with triton_gelu.autotune.force_path(linear_gelu_fwd="composed"): ...`` in Python, which
  wins over the environment.

Tuning policy, how much a first call may time (``tuning/`` applies it):

- ``full``: every config of the pruned space and every path;
- ``fast`` (the default): the shipped table's config plus its nearest neighbours (every config
  where the table has nothing to start from), and every path;
- ``off``: nothing is timed: the cached or shipped choice, else the default config and the
  op's untuned path.

Set it with ``TRITON_GELU_TUNE``, ``triton_gelu.autotune.set_policy(name)``
for the process, or ``with triton_gelu.autotune.policy(name):`` for a block; the Python
settings win over the environment. Any other value is refused with a ``ValueError`` naming
``TRITON_GELU_TUNE``: by the setters at once, and for the environment at the first call of any
triton_gelu function that plans a problem (whether the Triton kernels, the interpreter or the
PyTorch fallback serve it), so a typo never goes unnoticed.

The environment (these two variables and ``TRITON_INTERPRET``) is read once, when first needed,
and kept: reading it costs about 0.5 us a variable, more than a planned call may spend.
``triton_gelu.autotune.clear_plans()`` reads it again (and makes every problem plan anew).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from collections.abc import Callable, Iterator

PATH_ENV = "TRITON_GELU_PATH"
TUNE_ENV = "TRITON_GELU_TUNE"
POLICIES = ("full", "fast", "off")
DEFAULT_POLICY = "fast"

_forced: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("forced", default={})
# What a plan (``_plans.py``) depends on in this context, as a frozenset (it keeps its hash, so a
# plan key holds it whole): the forced paths' (op, path) pairs, so that a ``force_path`` block
# takes effect on problems already planned, and ``COUNTING_PATHS`` while a
# ``triton_gelu.testing.count_paths`` block is open (a plan that runs PyTorch's own ops counts
# its runs only then: counting costs a third of such a plan's own host time).
_plan_context: contextvars.ContextVar[frozenset] = contextvars.ContextVar(
    "plan_context", default=frozenset())
COUNTING_PATHS = "counting paths"
_policy_block: contextvars.ContextVar[str | None] = contextvars.ContextVar("policy", default=None)
_policy_process: str | None = None

INTERPRET_ENV = "TRITON_INTERPRET"
_environment: dict[str, str | None] = {}  # the variables as first read (empty: not yet)


def env_value(name: str) -> str | None:
    """The value of environment variable ``name`` (None if unset) as read when first needed
    since the last ``reread_environment()``; the parsers below are cached on the raw text."""
    if not _environment:
        _environment.update((n, os.environ.get(n)) for n in (PATH_ENV, TUNE_ENV, INTERPRET_ENV))
    return _environment[name]


def reread_environment() -> None:
    """Read the environment again at its next use (``clear_plans`` calls this)."""
    _environment.clear()


@functools.lru_cache(maxsize=16)
def _parse_paths_raw(raw) -> dict[str, str]:
    return _parse_paths(raw)


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
    raw = env_value(PATH_ENV)
    return _parse_paths_raw(raw).get(op) if raw else None


@contextlib.contextmanager
def force_path(**paths: str) -> Iterator[None]:
    """Force ``op=path`` choices inside the ``with`` block (names are checked when the op runs)."""
    forced = {**_forced.get(), **paths}
    # the plan context holds the paths in force (an inner block's win), and keeps its markers
    markers = frozenset(item for item in _plan_context.get() if not isinstance(item, tuple))
    tokens = _forced.set(forced), _plan_context.set(frozenset(forced.items()) | markers)
    try:
        yield
    finally:
        _plan_context.reset(tokens[1])
        _forced.reset(tokens[0])


@contextlib.contextmanager
def counting_paths() -> Iterator[None]:
    """Inside the block, plans count the runs of the paths they take (``count_paths``)."""
    token = _plan_context.set(_plan_context.get() | {COUNTING_PATHS})
    try:
        yield
    finally:
        _plan_context.reset(token)


def paths_counted() -> bool:
    """Whether plans made here count their runs (a ``counting_paths`` block is open)."""
    return COUNTING_PATHS in _plan_context.get()


# What plans depend on in this context (forced paths, counting): part of each plan key. The
# ContextVar's own ``get``: a planned call asks at every call, and a function would cost a frame.
plan_context: Callable[[], frozenset] = _plan_context.get


# ---- the tuning policy ---------------------------------------------------------------------


def check_policy(name: object, where: str = TUNE_ENV) -> str:
    """``name`` if it is a policy, else a ValueError naming TRITON_GELU_TUNE and the value."""
    if not isinstance(name, str) or name not in POLICIES:
        raise ValueError(
            f"{TUNE_ENV} (the tuning policy) must be one of {', '.join(POLICIES)}; got {name!r}"
            f" from {where}"
        )
    return name


@functools.lru_cache(maxsize=16)
def _env_policy(raw) -> str:
    return check_policy(raw, f"the environment variable {TUNE_ENV}")


def tune_policy() -> str:
    """The policy in force: a ``policy()`` block, else ``set_policy()``, else
    ``$TRITON_GELU_TUNE`` (unset or empty: "fast"). Raises ValueError for any other value."""
    name = _policy_block.get()
    if name is not None:
        return name
    if _policy_process is not None:
        return _policy_process
    raw = env_value(TUNE_ENV)
    return _env_policy(raw) if raw else DEFAULT_POLICY


def set_policy(name: str | None) -> None:
    """Set the tuning policy for the process ("full", "fast" or "off"); None goes back to
    ``$TRITON_GELU_TUNE``. Problems already chosen keep their choice."""
    global _policy_process
    _policy_process = None if name is None else check_policy(name, "set_policy()")


@contextlib.contextmanager
def policy(name: str) -> Iterator[None]:
    """Use tuning policy ``name`` ("full", "fast" or "off") inside the ``with`` block."""
    token = _policy_block.set(check_policy(name, "policy()"))
    try:
        yield
    finally:
        _policy_block.reset(token)
