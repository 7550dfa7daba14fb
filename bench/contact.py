"""What each op module declares for a GPU's first run (``first_contact.py``): its public ops,
each as a ``Contact``. ``first_contact.py`` finds them through ``bench.op_modules`` (each
module's ``first_contact()``), so a new op's first contact is its own module's declaration.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class Problem:
    """One public op at one shape: its inputs, ours and eager PyTorch as functions of them."""

    inputs: list[torch.Tensor]  # differentiable in training (x first)
    ours: Callable[..., torch.Tensor]
    eager: Callable[..., torch.Tensor]  # PyTorch in the inputs' dtype (float64 inputs: the ref)
    names: list[str]  # the gradients' names, one per input


@dataclass
class Timing:
    """One timed case: a public op, a mode and a shape, in bf16."""

    key: str
    public: str
    mode: str  # "infer", "fwd", "bwd" or "fwd+bwd"
    shape: tuple[int, int, int]
    p: float = 0.0
    approximate: str = "none"
    ops: tuple[str, ...] = field(default=())  # whose paths are the candidates


# (M, K, N): multiples of no block size, so every masked edge runs (the correctness cases' shape
# and the dry run's timings')
ODD = (37, 45, 51)


@dataclass
class Kit:
    """What a ``Contact.problem`` builds from: the case (shape (M, K, N), dtype, form, device,
    dropout p, recompute), its x and first contact's helpers for operands and dropout."""

    shape: tuple[int, int, int]
    dtype: torch.dtype
    approximate: str
    device: str
    p: float
    recompute: bool
    x: torch.Tensor  # (M, K) ~ N(0, 1)
    dropout: Callable[[torch.Tensor], torch.Tensor]  # eager's dropout of the case (identity at 0)
    seeded: Callable[[Callable], Callable]  # ours, drawing the case's mask (the check's)

    def weight(self, n: int, k: int) -> torch.Tensor:
        """(n, k) ~ N(0, 1/k): pre-activations are O(1), where GELU bends."""
        return (torch.randn(n, k, device=self.device) / k**0.5).to(self.dtype)

    def bias(self, n: int) -> torch.Tensor:
        return torch.randn(n, device=self.device).to(self.dtype)

    def gelu(self, z: torch.Tensor) -> torch.Tensor:
        """Eager's GELU of the case's form."""
        return F.gelu(z, approximate=self.approximate)


@dataclass(frozen=True)
class Contact:
    """First contact's cases of one public op."""

    # the path ops it runs through, forward then backward: the correctness stage forces each
    # one's paths in turn (``linear_preact``, recompute's z, runs with ``recompute=True``)
    ops: tuple[str, ...]
    problem: Callable[[Kit], Problem]
    timings: Callable[[bool], list[Timing]]  # its timed cases (real shapes, or the dry run's)
    # (bytes, flops) the op must move and compute at least at (M, K, N) in a mode (bf16)
    floor: Callable[[str, int, int, int], tuple[float, float]]
    dropout: tuple[float, ...] = (0.0,)  # the dropout probabilities its correctness cases take


def step_share(step: tuple[float, float], mode: str) -> tuple[float, float]:
    """A matmul op's (bytes, flops) in ``mode`` from those of one fwd+bwd step: a forward does
    a third of a step's work."""
    share = {"infer": 1 / 3, "fwd": 1 / 3, "fwd+bwd": 1.0}[mode]
    return step[0] * share, step[1] * share
