"""Finds and loads the compiled op library, with errors that say how to fix a broken install.

The library is built on LibTorch's stable ABI (csrc/include/longformer/glue.h) with
``TORCH_TARGET_VERSION``: it loads under every torch from its target on, whichever torch it was
built with. A CUDA build also needs a torch of the same CUDA major version (its kernels were
compiled by that toolkit); under a CPU-only torch its CPU kernels still serve.
"""

import os
import re
from pathlib import Path

import torch

_LIBRARY_NAME = "_longformer_ops.so"
_REBUILD = (
    "Rebuild it against the torch you run: `pip install --no-build-isolation --force-reinstall --no-deps .` "
    "from the longformer_ext checkout (or `bash scripts/dev install`)."
)


def _release(version: str) -> tuple[int, int]:
    """(major, minor) of a version string such as 2.14.1+cu130 or 2.16.0.dev20260101."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        raise ImportError(f"longformer_ext: cannot read the torch version {version!r}")
    return int(match.group(1)), int(match.group(2))


def check_compatible(build_info, torch_version: str, torch_cuda) -> None:
    """Raises ImportError unless a library described by ``build_info`` (_build_info.py) loads under
    this torch: at least its TORCH_TARGET, and the same CUDA major version for a CUDA build."""
    if _release(torch_version) < _release(build_info.TORCH_TARGET):
        raise ImportError(
            f"longformer_ext needs torch >= {build_info.TORCH_TARGET} (its op library targets LibTorch's stable ABI "
            f"of that version) but torch {torch_version} is installed; upgrade torch.")
    if build_info.CUDA_MAJOR is not None and torch_cuda is not None:
        if torch_cuda.split(".")[0] != build_info.CUDA_MAJOR:
            raise ImportError(
                f"longformer_ext was built for CUDA {build_info.CUDA_MAJOR}.x but torch {torch_version} uses CUDA "
                f"{torch_cuda}; install the longformer_ext build for CUDA {torch_cuda.split('.')[0]}. " + _REBUILD)


def library_path() -> Path:
    """The op library this process loads: the package's, or LONGFORMER_LIBRARY's (another build, e.g.
    a sanitizer one or a build tree)."""
    override = os.environ.get("LONGFORMER_LIBRARY")
    return Path(override) if override else Path(__file__).resolve().parent / _LIBRARY_NAME


def load_library() -> Path:
    """Loads the op library once, after checking that it suits this torch."""
    override = os.environ.get("LONGFORMER_LIBRARY")
    path = library_path()
    if not path.exists():
        raise ImportError(
            f"longformer_ext: the compiled op library {path} is missing; the package was not built. " + _REBUILD
        )
    if not override:
        try:
            from . import _build_info
        except ImportError as exc:
            raise ImportError("longformer_ext: _build_info.py is missing next to the library. " + _REBUILD) from exc
        check_compatible(_build_info, torch.__version__, torch.version.cuda)
    try:
        torch.ops.load_library(str(path))
    except OSError as exc:
        # torch says only "Could not load this library"; the dynamic loader's reason is the cause.
        reason = f"{exc}; {exc.__cause__}" if exc.__cause__ else str(exc)
        raise ImportError(f"longformer_ext: loading {path} failed ({reason}). " + _REBUILD) from exc
    return path
