"""The package loads under every torch from its library's target on, and refuses, with a message
that says what to do, an older torch, another CUDA major version, or a missing library."""

import types

import pytest

from longformer_ext import _loader


def _build(target="2.13", cuda=None):
    return types.SimpleNamespace(TORCH_TARGET=target, BUILT_WITH_TORCH="2.13.0+cpu", CUDA_MAJOR=cuda)


@pytest.mark.parametrize("version", ["2.13.0+cpu", "2.13.0", "2.14.1+cu130", "2.15.0", "2.16.0.dev20261101", "3.0.0"])
def test_torch_from_the_target_on_is_accepted(version):
    _loader.check_compatible(_build(), version, None)


def test_a_cpu_build_targets_torch_2_10():
    """The default target of a CPU build (CMakeLists.txt): the first torch with the stable ABI."""
    from longformer_ext import _build_info
    if _build_info.CUDA_MAJOR is None:
        assert _build_info.TORCH_TARGET == "2.10"
        _loader.check_compatible(_build_info, "2.10.0+cu128", "12.8")
    else:
        assert _build_info.TORCH_TARGET == "2.13"


@pytest.mark.parametrize("version", ["2.12.1+cpu", "2.9.0", "1.13.1"])
def test_older_torch_is_refused(version):
    with pytest.raises(ImportError, match=r"needs torch >= 2\.13.*upgrade torch"):
        _loader.check_compatible(_build(), version, None)


def test_cuda_build_needs_the_same_cuda_major():
    _loader.check_compatible(_build(cuda="13"), "2.14.1+cu130", "13.0")
    _loader.check_compatible(_build(cuda="13"), "2.15.0+cu132", "13.2")
    _loader.check_compatible(_build(cuda="13"), "2.13.0+cpu", None)  # its CPU kernels still serve
    with pytest.raises(ImportError, match=r"built for CUDA 13\.x.*CUDA 12\.8.*build for CUDA 12"):
        _loader.check_compatible(_build(cuda="13"), "2.14.1+cu128", "12.8")


def test_installed_build_info_matches_this_torch():
    """The library this suite runs was built for a target this torch satisfies (skipped when the
    tests run against a build tree through LONGFORMER_LIBRARY, which has no _build_info)."""
    import torch

    build_info = pytest.importorskip("longformer_ext._build_info")
    _loader.check_compatible(build_info, torch.__version__, torch.version.cuda)
    assert _loader._release(build_info.BUILT_WITH_TORCH) >= _loader._release(build_info.TORCH_TARGET)


def test_missing_library_is_reported(monkeypatch, tmp_path):
    monkeypatch.setenv("LONGFORMER_LIBRARY", str(tmp_path / "nope.so"))
    with pytest.raises(ImportError, match="missing.*Rebuild"):
        _loader.load_library()
