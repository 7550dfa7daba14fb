"""The functional API: one public function per op, each declared with its op in ``ops/``."""

from .ops._core import distributed, dropout_seed
from .ops.ffn import feed_forward
from .ops.gated_ffn import gated_feed_forward
from .ops.geglu import geglu
from .ops.gelu import gelu
from .ops.linear_gelu import linear_gelu

__all__ = ["gelu", "linear_gelu", "feed_forward", "geglu", "gated_feed_forward",
           "dropout_seed", "distributed"]
