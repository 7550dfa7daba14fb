"""triton_gelu: Triton kernels for GELU, fused Linear + bias + GELU, the whole FFN block and
gated GELU (GeGLU), drop-in for PyTorch."""

from ._runtime import TritonUnavailableWarning
from .compile_route import compile_backend
from .ops.ffn import feed_forward
from .ops.gated_ffn import gated_feed_forward
from .ops.geglu import geglu
from .ops.gelu import gelu
from .ops.linear_gelu import linear_gelu
from .modules import GELU, FeedForward, GatedFeedForward, GeGLU, LinearGELU
from .patch import patch
from . import testing  # noqa: F401 (public: triton_gelu.testing, helpers for tests)

__all__ = [
    "gelu", "linear_gelu", "feed_forward", "geglu", "gated_feed_forward",
    "GELU", "LinearGELU", "FeedForward", "GeGLU", "GatedFeedForward", "patch",
    "TritonUnavailableWarning", "compile_backend",
]
__version__ = "0.1.0"
