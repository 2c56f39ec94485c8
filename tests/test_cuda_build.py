"""What the compiler made of the CUDA kernels, read from the built library with cuobjdump (no GPU
needed): machine code for every configured architecture, no register spills in the head-dim-64
kernels, and tensor-core instructions (HMMA) in the float16/bfloat16 forward.

Runs on a CUDA build (`bash scripts/dev cuda-build`); skipped on a CPU-only build unless
LONGFORMER_REQUIRE_CUDA_BUILD=1, which CI sets for its CUDA build.
"""

import os
import re
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

import longformer_ext

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ["sm_" + a.replace(".", "") for a in os.environ.get("LONGFORMER_CUDA_ARCHS", "8.0;9.0").split(";")]
# Head dim 64: the SIMT kernels take 64 / 32 lanes = 2 elements per lane (exact), the MMA kernel 64.
D64 = re.compile(r"<(float|double|__half|__nv_bfloat16), (2, true|64)\b")


def _require(condition, reason):
    if not condition:
        if os.environ.get("LONGFORMER_REQUIRE_CUDA_BUILD") == "1":
            pytest.fail(reason)
        pytest.skip(reason)


def _library():
    override = os.environ.get("LONGFORMER_LIBRARY")  # the library the package loaded instead of its own
    if override:
        return Path(override)
    from longformer_ext import _build_info
    _require(_build_info.WITH_CUDA, "this build of longformer_ext has no CUDA kernels")
    return Path(longformer_ext.__file__).parent / "_longformer_ops.so"


def _cuobjdump():
    found = shutil.which("cuobjdump")
    if not found:  # the nvidia-cuda-cuobjdump wheel (scripts/dev cuda-build installs it)
        for site in map(Path, sys.path):
            candidate = site / "nvidia" / "cu13" / "bin" / "cuobjdump"
            if candidate.exists():
                found = str(candidate)
                break
    _require(found is not None, "cuobjdump not found (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)")
    return found


@lru_cache(maxsize=None)
def _dump(flag):
    tool = _cuobjdump()
    # --dump-sass runs nvdisasm, which the nvidia-cuda-nvdisasm wheel puts next to cuobjdump.
    env = dict(os.environ, PATH=os.pathsep.join([str(Path(tool).parent), os.environ.get("PATH", "")]))
    result = subprocess.run([tool, flag, str(_library())], capture_output=True, text=True, env=env)
    assert result.returncode == 0, f"cuobjdump {flag} failed: {result.stderr}"
    return result.stdout


def _demangle(names):
    result = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True)
    return result.stdout.splitlines()


def _per_function(dump, marker):
    """{(arch, demangled function): text} from a cuobjdump dump whose functions start with `marker`."""
    arch, entries = None, []
    for line in dump.splitlines():
        if line.startswith("arch = "):
            arch = line.split("=")[1].strip()
        match = re.match(marker, line)
        if match:
            entries.append([arch, match.group(1), []])
        elif entries:
            entries[-1][2].append(line)
    names = _demangle([e[1] for e in entries])
    return {(arch, name): "\n".join(lines) for (arch, _, lines), name in zip(entries, names)}


def test_machine_code_for_every_arch():
    elves = _dump("--list-elf")
    for source in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
        for arch in ARCHS:
            assert f"{source.stem}.{arch}.cubin" in elves, f"no {arch} code for {source.name}"


def test_no_spills_in_head_dim_64_kernels():
    usage = _per_function(_dump("--dump-resource-usage"), r"\s*Function (\S+):")
    checked = set()
    for (arch, name), text in usage.items():
        if arch in ARCHS and D64.search(name):
            stack = int(re.search(r"STACK:(\d+)", text).group(1))
            local = int(re.search(r"LOCAL:(\d+)", text).group(1))
            assert stack == 0 and local == 0, f"{name} on {arch} spills: STACK {stack}, LOCAL {local}"
            checked.add(re.search(r"(\w+)<", name).group(1))
    expected = {"banded_forward_simt_kernel", "banded_attention_forward_mma_kernel", "local_rows_kernel",
                "global_forward_kernel", "global_dq_kernel", "global_dkdv_kernel"}
    assert expected <= checked, f"kernels not found in the library: {expected - checked}"


def test_half_forward_uses_tensor_cores():
    sass = _per_function(_dump("--dump-sass"), r"\s*Function : (\S+)")
    for arch in ARCHS:
        for dtype in ("__half", "__nv_bfloat16"):
            kernels = {name: text for (a, name), text in sass.items()
                       if a == arch and "banded_attention_forward_mma_kernel<" + dtype in name}
            assert kernels, f"no {dtype} tensor-core forward for {arch}"
            for name, text in kernels.items():
                assert "HMMA" in text, f"{name} on {arch} has no HMMA instruction"
