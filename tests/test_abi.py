"""The op libraries use LibTorch's stable ABI only, which is what lets one build load under every
torch from its target on: they import no C++ symbol of torch (no at::, c10::, torch:: names, only
the C shim), depend on libtorch_cpu alone among torch's libraries, and still find the BLAS that
libtorch_cpu exports (gemm.h's weak symbols: without it the kernels would silently fall back to
plain loops). scripts/dev abi-matrix runs the suite from one wheel under several torch versions."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from longformer_ext import _loader
from longformer_ext.testing import load_emulated_library

NM = shutil.which("nm")
READELF = shutil.which("readelf")
# Itanium-mangled names with a part in namespace at, c10, torch or caffe2 (the name itself, or a type in it).
TORCH_CPP = re.compile(r"(?:^_Z[NKRVOL]*|N[KRVO]*)(?:2at|3c10|5torch|6caffe2)")
TORCH_LIBRARIES = ("libc10", "libtorch.so", "libtorch_python", "libtorch_cuda", "libgomp", "libomp", "libiomp")


def _libraries():
    libraries = [_loader.library_path()]
    try:
        libraries.append(load_emulated_library())
    except RuntimeError:
        pass  # built with LONGFORMER_CUDA_EMULATION=OFF
    return libraries


def _undefined(library: Path) -> list[str]:
    out = subprocess.run([NM, "-D", "--undefined-only", str(library)], capture_output=True, text=True, check=True)
    return [line.split()[-1].split("@")[0] for line in out.stdout.splitlines() if line.strip()]


@pytest.mark.skipif(NM is None, reason="nm (binutils) not on PATH")
@pytest.mark.parametrize("library", _libraries(), ids=lambda p: p.name)
def test_no_torch_cpp_symbols(library):
    symbols = _undefined(library)
    assert any(s.startswith("aoti_torch_") for s in symbols), "expected the stable ABI's C shim"
    cpp = [s for s in symbols if TORCH_CPP.search(s)]
    assert not cpp, f"{library.name} imports torch C++ symbols (not on the stable ABI): {cpp[:10]}"


@pytest.mark.skipif(READELF is None, reason="readelf (binutils) not on PATH")
@pytest.mark.parametrize("library", _libraries(), ids=lambda p: p.name)
def test_links_libtorch_cpu_only(library):
    out = subprocess.run([READELF, "-d", str(library)], capture_output=True, text=True, check=True).stdout
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)
    assert "libtorch_cpu.so" in needed, needed
    assert not [n for n in needed if n.startswith(TORCH_LIBRARIES)], needed


def test_regression_pattern_catches_torch_symbols():
    """The pattern above would see the symbols an ATen build imports."""
    for name in ["_ZN2at4_ops19empty_memory_format4callEN3c108ArrayRefINS2_6SymIntEEE",
                 "_ZNK3c1010TensorImpl5sizesEv", "_ZN3c10lsERSoRKNS_6DeviceE", "_ZNR5torch7Library5_implEPKc",
                 "_ZNSt6vectorIN3c106SymIntESaIS1_EED1Ev", "_ZN6caffe28TypeMeta13typeMetaDatasEv"]:
        assert TORCH_CPP.search(name), name
    for name in ["_ZNSt13runtime_errorD1Ev", "aoti_torch_get_sizes", "_ZSt4cerr", "_ZNSo9_M_insertIlEERSoT_"]:
        assert not TORCH_CPP.search(name), name


@pytest.mark.skipif(NM is None, reason="nm (binutils) not on PATH")
def test_blas_is_found_in_libtorch_cpu():
    """gemm.h's weak sgemm_/dgemm_ resolve against the running torch (MKL on x86-64 wheels)."""
    import ctypes
    import os

    import torch

    symbols = _undefined(_loader.library_path())
    assert "sgemm_" in symbols and "dgemm_" in symbols
    if not torch.backends.mkl.is_available():
        pytest.skip("this torch ships no MKL")
    libtorch_cpu = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
    assert hasattr(libtorch_cpu, "sgemm_") and hasattr(libtorch_cpu, "dgemm_")
