"""Finds and loads the compiled op library, with errors that say how to fix a broken install."""

import os
from pathlib import Path

import torch

_LIBRARY_NAME = "_longformer_ops.so"
_REBUILD = (
    "Rebuild it against the torch you run: `pip install --no-build-isolation --force-reinstall --no-deps .` "
    "from the longformer_ext checkout (or `bash scripts/dev install`)."
)


def load_library() -> Path:
    """Loads the op library once; LONGFORMER_LIBRARY may point at another build (e.g. a sanitizer one)."""
    override = os.environ.get("LONGFORMER_LIBRARY")
    package_dir = Path(__file__).resolve().parent
    path = Path(override) if override else package_dir / _LIBRARY_NAME
    if not path.exists():
        raise ImportError(
            f"longformer_ext: the compiled op library {path} is missing; the package was not built. " + _REBUILD
        )
    if not override:
        try:
            from . import _build_info
        except ImportError as exc:
            raise ImportError("longformer_ext: _build_info.py is missing next to the library. " + _REBUILD) from exc
        # 2.13.0+cpu and 2.13.0+cu130 differ in their symbols too: compare the whole version tag.
        if _build_info.TORCH_VERSION != torch.__version__:
            raise ImportError(
                f"longformer_ext was built against torch {_build_info.TORCH_VERSION} but torch "
                f"{torch.__version__} is installed; C++ extensions only load under the torch they were built "
                "for. " + _REBUILD
            )
    try:
        torch.ops.load_library(str(path))
    except OSError as exc:
        raise ImportError(f"longformer_ext: loading {path} failed ({exc}). " + _REBUILD) from exc
    return path
