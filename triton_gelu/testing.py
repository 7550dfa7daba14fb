"""Helpers for tests of code that uses triton_gelu (ours included): prove which code ran, and
reproduce the dropout mask a call drew.

    from triton_gelu.testing import count_launches, count_paths, dropout_seed

    with count_launches() as launched:
        y = triton_gelu.linear_gelu(x, w, b)
    assert launched["linear_gelu_fwd"] == 1      # the Triton kernel ran, not a fallback

    with count_paths() as ran:
        y = triton_gelu.gelu(x)
    assert ran[("gelu_fwd", "triton")] == 1      # (op, path) -> runs

    torch.manual_seed(0)
    y = triton_gelu.feed_forward(x, w1, b1, w2, b2, p=0.1)
    torch.manual_seed(0)
    keep = triton_gelu.reference.dropout_keep(dropout_seed(x.device), rows, d_ff, 0.1)

Both counters are filled when the block exits (an exception included) with what ran inside it;
they read the package's own counts, which run in every process, except the runs of paths forced
to PyTorch's own ops: those are counted only while a ``count_paths`` block is open (a count costs
a third of such a call's host time), and problems planned inside such a block plan anew.
Nothing here imports Triton: on a machine without it, the fallback launches no kernel and every
count is zero.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterator

from . import _runtime, _settings
from .ops._core import dropout_seed

__all__ = ["count_launches", "count_paths", "dropout_seed"]


@contextlib.contextmanager
def _count_inside(totals: collections.Counter) -> Iterator[collections.Counter]:
    inside: collections.Counter = collections.Counter()
    before = collections.Counter(totals)
    try:
        yield inside
    finally:
        inside.update(totals - before)  # only what grew: keys that ran inside the block


def count_launches() -> contextlib.AbstractContextManager[collections.Counter]:
    """A context manager: the Triton kernel launches inside the block, ``{kernel name: count}``
    (``"gelu_fwd"``, ``"linear_gelu_fwd"``, ``"ffn_bwd_dz"``...). Empty when only PyTorch ran
    (the fallback, or paths forced to ``torch``)."""
    return _count_inside(_runtime.launches)


def count_paths() -> contextlib.AbstractContextManager[collections.Counter]:
    """A context manager: the paths run inside the block, ``{(op, path): count}``, with the op
    and path names ``triton_gelu.autotune.force_path`` takes (``("linear_gelu_fwd", "fused")``,
    ``("ffn_bwd", "torch")``...). Empty on the PyTorch fallback (no Triton, or a CPU tensor
    without ``TRITON_INTERPRET``), which runs PyTorch's own ops and chooses no path."""
    return _counting_paths_inside()


@contextlib.contextmanager
def _counting_paths_inside() -> Iterator[collections.Counter]:
    # Plans that run PyTorch's own ops (paths forced to "torch") count their runs only inside
    # such a block (``_settings.counting_paths``); the others always do.
    with _settings.counting_paths(), _count_inside(_runtime.path_runs) as inside:
        yield inside


# dropout_seed(device): the seed one dropout call of feed_forward / gated_feed_forward (or their
# modules) draws, a 1-element int64 tensor from PyTorch's default generator on ``device``. Drawn
# after the same torch.manual_seed as the call, it is that call's seed; with
# ``triton_gelu.reference.dropout_keep(seed, rows, cols, p)`` it gives the call's mask.
