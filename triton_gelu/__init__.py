"""triton_gelu: Triton kernels for GELU and fused Linear + bias + GELU, drop-in for PyTorch."""

from .functional import gelu, linear_gelu
from .modules import GELU, FeedForward, LinearGELU
from .patch import patch

__all__ = ["gelu", "linear_gelu", "GELU", "LinearGELU", "FeedForward", "patch"]
__version__ = "0.1.0"
