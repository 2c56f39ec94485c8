"""The package refuses, with a message that says how to rebuild, to load a library built for
another torch or a library that is missing."""

import pytest

from longformer_ext import _build_info, _loader


def test_other_torch_build_is_refused(monkeypatch):
    monkeypatch.delenv("LONGFORMER_LIBRARY", raising=False)
    monkeypatch.setattr(_build_info, "TORCH_VERSION", "0.0.0+other")
    with pytest.raises(ImportError, match=r"built against torch 0\.0\.0\+other.*--no-build-isolation"):
        _loader.load_library()


def test_missing_library_is_reported(monkeypatch, tmp_path):
    monkeypatch.setenv("LONGFORMER_LIBRARY", str(tmp_path / "nope.so"))
    with pytest.raises(ImportError, match="missing.*Rebuild"):
        _loader.load_library()
