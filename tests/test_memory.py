"""bench/memory.py counts exactly what autograd keeps for the backward."""

import torch
import torch.nn.functional as F
from torch import nn

from bench.memory import saved_activation_bytes


def test_counts_each_saved_activation_once_and_no_parameters():
    m, d, f = 7, 5, 11
    lin1, lin2 = nn.Linear(d, f), nn.Linear(f, d)
    x = torch.randn(m, d, requires_grad=True)
    params = [*lin1.parameters(), *lin2.parameters()]
    # Linear saves its input, GELU its input, the second Linear its input: x, z and gelu(z).
    got = saved_activation_bytes(lambda: lin2(F.gelu(lin1(x))), exclude=params)
    assert got == (m * d + 2 * m * f) * 4, got
    # x read by two matmuls (a gated block) is one storage, counted once: x, g and u.
    gate, up = nn.Linear(d, f), nn.Linear(d, f)
    params = [*gate.parameters(), *up.parameters()]
    got = saved_activation_bytes(lambda: gate(x[1:]) * up(x[1:]), exclude=params)
    assert got == (m * d + 2 * (m - 1) * f) * 4, got  # x[1:] is a view of x's storage
    assert saved_activation_bytes(lambda: lin1(x), exclude=()) > m * d * 4  # weight counted
