"""Testing helpers: the CUDA kernels run on the CPU under host emulation, behind the real ops.

``cuda_emulation()`` is how the CUDA kernel source is verified on a machine without a GPU: inside
it, every ``torch.ops.longformer.*`` call on CPU tensors (from ``longformer_attention``, the
``nn`` modules or the ops directly, forward and backward) runs the CUDA kernels compiled for the
host (``torch.ops.longformer_emulated``, built with ``LONGFORMER_CUDA_EMULATION=ON``, the default)
instead of the CPU kernels. Autograd, the fake implementations and the argument checks stay the
real ops' own: the calls are redirected below autograd, at the dispatcher's Python key.
"""

import contextlib
import os
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["cuda_emulation", "load_emulated_library"]

_EMULATED_LIBRARY = "_longformer_cuda_emulated.so"


def load_emulated_library() -> Path:
    """Loads the host-emulated CUDA op library once (``LONGFORMER_EMULATED_LIBRARY`` may point at
    another build); raises ``RuntimeError`` when it was not built."""
    path = Path(os.environ.get("LONGFORMER_EMULATED_LIBRARY", Path(__file__).resolve().parent / _EMULATED_LIBRARY))
    if not hasattr(torch.ops, "longformer_emulated") or not hasattr(torch.ops.longformer_emulated, "banded_attn"):
        if not path.exists():
            raise RuntimeError(f"the host-emulated CUDA library {path} was not built (the package was built with "
                               "LONGFORMER_CUDA_EMULATION=OFF); rebuild with it ON to use cuda_emulation()")
        torch.ops.load_library(str(path))
    return path


class _EmulatedKernels(TorchDispatchMode):
    """Sends each ``longformer`` op to the same-named op of ``longformer_emulated`` (same schemas)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        namespace, name = func._schema.name.split("::")
        if namespace == "longformer":
            overload = getattr(torch.ops.longformer_emulated, name)
            return getattr(overload, func._overloadname)(*args, **kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def cuda_emulation():
    """Within the block, the longformer ops on CPU tensors run the host-emulated CUDA kernels.

    Backward passes must run inside the block too (``loss.backward()`` outside it would run the
    CPU kernels' backward). Launches are synchronous and slow: keep inputs small.
    """
    load_emulated_library()
    with _EmulatedKernels():
        yield
