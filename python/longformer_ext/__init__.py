"""longformer_ext: exact, fused Longformer attention as PyTorch custom ops (``torch.ops.longformer``)."""

from . import ops, reference
from .attention import longformer_attention
from . import nn

__version__ = "0.1.0"
__all__ = ["longformer_attention", "nn", "ops", "reference"]
