"""Torch-free C++ unit tests (tests/cpp/*_test.cpp), compiled with the host compiler and run."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "tests" / "cpp").glob("*_test.cpp"))
CXX = shutil.which("g++") or shutil.which("c++")


# The instruction sets a test is compiled for: the baseline everywhere; AVX2 and AVX-512 (the CPU
# kernels' other builds, CMakeLists.txt) too for the tests of code whose vectors follow the
# instruction set, where this CPU runs them.
PER_ISA = {"vector_math_test"}
ISA_FLAGS = {
    "default": [],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX512"],
}
CPU_FLAGS = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()
ISA_RUNS = {"default": True, "avx2": {"avx2", "fma", "f16c"} <= CPU_FLAGS,
            "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= CPU_FLAGS}


@pytest.mark.skipif(CXX is None, reason="no C++ compiler on PATH")
@pytest.mark.parametrize("isa", list(ISA_FLAGS))
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_cpp(source, isa, tmp_path):
    if isa != "default" and source.stem not in PER_ISA:
        pytest.skip("the same code in every instruction set")
    if not ISA_RUNS[isa]:
        pytest.skip(f"this CPU does not run {isa}")
    import torch  # header-only parts of torch (half-precision types); no torch library is linked

    binary = tmp_path / source.stem
    includes = ["-I", str(ROOT / "csrc" / "include"), "-I", str(ROOT / "csrc" / "cpu"),
                "-isystem", str(Path(torch.__file__).parent / "include")]
    # -ffp-contract=fast and the ISA flags as the kernels are compiled (CMakeLists.txt).
    subprocess.run([CXX, "-std=c++20", "-O1", "-Wall", "-ffp-contract=fast", "-fsanitize=address,undefined",
                    "-DCPU_CAPABILITY=DEFAULT", *ISA_FLAGS[isa], *includes, str(source), "-o", str(binary)],
                   check=True)
    result = subprocess.run([str(binary)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
