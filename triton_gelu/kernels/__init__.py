"""The Triton kernels and their host launchers. Importing this package imports Triton.

Each launcher validates its operands, allocates its outputs and launches its kernels; the
launchers here and in ``triton_gelu.fallback`` (PyTorch, no Triton) take the same arguments and
return the same things, and ``triton_gelu._backend.launchers(tensor)`` picks one of the two.
"""

from .ffn import ffn_backward, ffn_forward
from .geglu import geglu_backward, geglu_forward, geglu_gate_up
from .gelu import gelu_backward, gelu_forward
from .linear_gelu import linear_gelu_backward, linear_gelu_forward, linear_preact

__all__ = [
    "gelu_forward", "gelu_backward",
    "linear_gelu_forward", "linear_preact", "linear_gelu_backward",
    "geglu_forward", "geglu_gate_up", "geglu_backward",
    "ffn_forward", "ffn_backward",
]
