"""longformer_ext: exact, fused Longformer attention as PyTorch custom ops (``torch.ops.longformer``)."""

from . import ops, reference
from .attention import longformer_attention
from . import nn

__version__ = "0.1.0"
__all__ = ["build_info", "longformer_attention", "nn", "ops", "reference"]


def build_info() -> dict:
    """What was built and what runs it: the op library's path, the oldest torch it loads under
    (``torch_target``), the torch it was built with, its CUDA major version (None: CPU only), the
    torch running now, and whether the op ran (a tiny attention call checked against the
    reference, on the CPU)."""
    import torch

    from . import _loader
    from .reference import dense_attention

    try:
        from . import _build_info as info
        built = {"torch_target": info.TORCH_TARGET, "built_with_torch": info.BUILT_WITH_TORCH,
                 "cuda_major": info.CUDA_MAJOR}
    except ImportError:  # a build tree through LONGFORMER_LIBRARY
        built = {"torch_target": None, "built_with_torch": None, "cuda_major": None}
    q = torch.randn(1, 2, 16, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ok = torch.allclose(longformer_attention(q, q, q, 2), dense_attention(q, q, q, 2))
    return {"library": str(_loader.library_path()), **built, "torch": torch.__version__, "op_runs": ok}
