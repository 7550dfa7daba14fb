"""The Triton kernels and their host launchers. Importing this package imports Triton.

Each launcher (``__all__``) allocates its outputs and launches its kernels, trusting its
operands (the public functions and the custom ops validated them); the launchers here and in
``triton_gelu.fallback`` (PyTorch, no Triton) take the same arguments and return the same
things, and ``triton_gelu._backend.launchers(tensor)`` picks one of the two. The ``*_launch``
functions, here only, bind a launcher to one problem for the plans (``ops/``): the launch with
its path, config, grid and constant arguments kept.
"""

from .ffn import backward_launch as ffn_backward_launch
from .ffn import ffn_backward, ffn_forward
from .ffn import forward_launch as ffn_forward_launch
from .geglu import backward_launch as geglu_backward_launch
from .geglu import forward_launch as geglu_forward_launch
from .geglu import gate_up_launch as geglu_gate_up_launch
from .geglu import geglu_backward, geglu_forward, geglu_gate_up
from .gelu import (
    backward_launch as gelu_backward_launch, forward_launch as gelu_forward_launch,
    gelu_backward, gelu_forward,
)
from .linear_gelu import (
    backward_launch as linear_gelu_backward_launch, forward_launch as linear_gelu_forward_launch,
    linear_gelu_backward, linear_gelu_forward, linear_preact,
    preact_launch as linear_preact_launch,
)

__all__ = [
    "gelu_forward", "gelu_backward",
    "linear_gelu_forward", "linear_preact", "linear_gelu_backward",
    "geglu_forward", "geglu_gate_up", "geglu_backward",
    "ffn_forward", "ffn_backward",
]
