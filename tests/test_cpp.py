"""Torch-free C++ unit tests (tests/cpp/*_test.cpp), compiled with the host compiler and run."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "tests" / "cpp").glob("*_test.cpp"))
CXX = shutil.which("g++") or shutil.which("c++")


@pytest.mark.skipif(CXX is None, reason="no C++ compiler on PATH")
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_cpp(source, tmp_path):
    binary = tmp_path / source.stem
    includes = ["-I", str(ROOT / "csrc" / "include"), "-I", str(ROOT / "csrc" / "cpu")]
    subprocess.run([CXX, "-std=c++20", "-O1", "-Wall", "-fsanitize=address,undefined", "-DCPU_CAPABILITY=DEFAULT",
                    *includes, str(source), "-o",
                    str(binary)], check=True)
    result = subprocess.run([str(binary)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
