"""triton_gelu: Triton kernels for GELU, fused Linear + bias + GELU and the whole FFN block,
drop-in for PyTorch."""

from .functional import feed_forward, gelu, linear_gelu
from .modules import GELU, FeedForward, LinearGELU
from .patch import patch

__all__ = ["gelu", "linear_gelu", "feed_forward", "GELU", "LinearGELU", "FeedForward", "patch"]
__version__ = "0.1.0"
