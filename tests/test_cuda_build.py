"""What the compiler made of the CUDA kernels, read from the built library with cuobjdump (no GPU
needed): machine code for every configured architecture; no local memory (spills or stack arrays) in
any instantiation of any kernel; register counts within the budgets below; tensor-core instructions
(HMMA) in the float16/bfloat16 tiled kernels, fed by cp.async (LDGSTS) copies; and exact fp32 FMA
(no HMMA) in their float32 instantiations.

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
    _require(_build_info.CUDA_MAJOR is not None, "this build of longformer_ext has no CUDA kernels")
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


def _resources():
    """{(arch, demangled kernel): (registers, local bytes, stack bytes)} for the configured archs."""
    usage = _per_function(_dump("--dump-resource-usage"), r"\s*Function (\S+):")
    return {(arch, name): tuple(int(re.search(field + r":(\d+)", text).group(1)) for field in ("REG", "LOCAL", "STACK"))
            for (arch, name), text in usage.items() if arch in ARCHS}


# Registers per thread that each kernel may use (sm_80 and sm_90 alike), per head-dim tile of the
# tensor-core kernels (128 threads per block). The forward at D=64: 168 registers leave 3 blocks
# (12 warps) per SM, which its shared memory (46 KiB per block) allows too; at D=128, 2 blocks;
# D=256 takes all 255; the global rows' forward (gathered query tiles) is within the same budgets
# (154-156, 168, 228-237, 252-254), and so are the global rows' dQ (136-146, 174-178, 176-177)
# and dK/dV (134-136, 222-229, 227-228: one accumulator pair over 64 key rows); the global keys'
# dK/dV from the local rows (165-166, 241-246, 252) like the local dK/dV kernel. The backward's dQ kernel (176-182 at D=64 and 128) leaves 2 blocks, so does
# its dK/dV kernel (two accumulators, dK and dV: 241-246 at D=64, 254-255 at 128). Measured with nvcc 13.0; a budget only a little above
# today's count catches a change that costs a block per SM. The SIMT kernels stay within 128
# (float64: 240, its values take register pairs; 228 today for the global rows at D > 128, sm_80).
MMA_REGISTERS = {
    "banded_attention_forward_mma_kernel": {32: 160, 64: 176, 128: 240, 256: 255},
    "global_rows_forward_mma_kernel": {32: 160, 64: 176, 128: 240, 256: 255},
    "local_dq_mma_kernel": {32: 160, 64: 192, 128: 192},
    "local_dkdv_mma_kernel": {32: 176, 64: 250, 128: 255},
    "global_keys_dkdv_mma_kernel": {32: 176, 64: 250, 128: 255},
    "global_dq_mma_kernel": {32: 160, 64: 192, 128: 192},
    "global_dkdv_mma_kernel": {32: 160, 64: 240, 128: 240},
}
# The tensor-core backward kernels: local rows (dQ; dK/dV of the band keys; the global keys' dK/dV
# from them) and global rows (their dQ; their part of every key's dK/dV).
MMA_BACKWARD_KERNELS = ("local_dq_mma_kernel", "local_dkdv_mma_kernel", "global_keys_dkdv_mma_kernel",
                        "global_dq_mma_kernel", "global_dkdv_mma_kernel")
# The tensor-core backward reduces nothing across lanes (its row statistics come with the rows).
MMA_BACKWARD_SHUFFLES = 0
# The float32 instantiations of the tiled kernels (exact fp32 on FMA, fma_tiles.h): 160-168
# registers everywhere today (nvcc 13.0, sm_80 and sm_90); 168 is the most that leaves 3 blocks
# (12 warps) per SM, so the budget is that; the backward at D = 128 takes 168-244, and its 100 KiB
# of shared memory allow 2 blocks per SM on an H100 whatever the count. Their TF32 instantiations (tf32_tiles.h) take 116-168,
# except the forward at D = 32 on sm_90 (185: 2 blocks per SM).
FLOAT_TILE_REGISTERS = {
    "banded_attention_forward_mma_kernel": {32: 168, 64: 168, 128: 168},
    "global_rows_forward_mma_kernel": {32: 168, 64: 168, 128: 168},
    **{kernel: {32: 168, 64: 168, 128: 255} for kernel in MMA_BACKWARD_KERNELS},
}
# Their SHFL instructions (static count in the SASS): the quads' exchange of P in P V (4 per loop
# iteration, more where the compiler unrolls a loop over P's n-tiles) and the softmax's quad
# reductions. Today 54-240 in the forward and 32-76 in the backward; a design with a shuffle
# reduction per (query, key) pair has thousands.
FLOAT_TILE_SHUFFLES = {
    "banded_attention_forward_mma_kernel": {32: 256, 64: 112, 128: 80},
    "global_rows_forward_mma_kernel": {32: 256, 64: 112, 128: 80},
    **{kernel: {32: 96, 64: 96, 128: 96} for kernel in MMA_BACKWARD_KERNELS},
}
# The tensor-core forward kernels: the local rows, and the global rows (gathered query tiles).
MMA_FORWARD_KERNELS = ("banded_attention_forward_mma_kernel", "global_rows_forward_mma_kernel")
TF32_TILES = "longformer::cuda::mma_tiles::Tf32"  # the kernels' type argument for float32 as TF32
TF32_TILE_REGISTERS = {kernel: dict(tiles) for kernel, tiles in FLOAT_TILE_REGISTERS.items()}
TF32_TILE_REGISTERS["banded_attention_forward_mma_kernel"][32] = 192
# The general op's instantiations of the tiled kernels (kGeneral): every tiled kernel, local and
# global rows, forward and backward, takes every argument but grouped KV heads (slices of calls
# without grouping). Score modifiers per element (tanh, ALiBi distance from the staged key
# positions), each row's sequence bounds and a sink cost registers; these instantiations ask for one
# resident block in their launch bounds (with none, ptxas held the 16-bit forwards at 168 and
# spilled 16-24 bytes). nvcc 13.0, sm_80 and sm_90, blocks per SM by the 64K-register file: 16-bit
# forwards 167-168 at D = 32 (3 blocks, as the plain ones), 200-205 at 64 (2 blocks, the plain ones
# 3), 252-254 at 128 and 230-235 at 256 (as the plain ones); dQ 208-214, 243-251 and 220-226, dK/dV
# (32 query rows per tile at D = 64) 176-179, 237-238 and 247-248, the global keys' dK/dV 175-190,
# 237-245 and 247-251, the global rows' dK/dV 151-155, 206-213 and 230-231. Float: forwards 168,
# 168 and 180-203, dQ 168, 190-208 and 192-216, dK/dV 168-204, 153-190 and 231-252. TF32: forwards
# 174-195 at D = 32 and 157-174 above, dQ 149-152 and 168-183, dK/dV 147-178, 157-192 and 219-254.
GENERAL_BACKWARD_KERNELS = MMA_BACKWARD_KERNELS
GENERAL_KERNELS = MMA_FORWARD_KERNELS + GENERAL_BACKWARD_KERNELS
GENERAL_REGISTERS = {
    "half": {"banded_attention_forward_mma_kernel": {32: 168, 64: 208, 128: 255, 256: 240},
             "global_rows_forward_mma_kernel": {32: 168, 64: 208, 128: 255, 256: 240},
             "local_dq_mma_kernel": {32: 216, 64: 255, 128: 232},
             "local_dkdv_mma_kernel": {32: 184, 64: 240, 128: 255},
             "global_keys_dkdv_mma_kernel": {32: 192, 64: 248, 128: 255},
             "global_dq_mma_kernel": {32: 216, 64: 248, 128: 232},
             "global_dkdv_mma_kernel": {32: 160, 64: 216, 128: 240}},
    "float": {"banded_attention_forward_mma_kernel": {32: 168, 64: 168, 128: 192},
              "global_rows_forward_mma_kernel": {32: 168, 64: 168, 128: 208},
              "local_dq_mma_kernel": {32: 168, 64: 216, 128: 216},
              "local_dkdv_mma_kernel": {32: 200, 64: 192, 128: 255},
              "global_keys_dkdv_mma_kernel": {32: 208, 64: 192, 128: 255},
              "global_dq_mma_kernel": {32: 168, 64: 216, 128: 216},
              "global_dkdv_mma_kernel": {32: 168, 64: 168, 128: 248}},
    "tf32": {"banded_attention_forward_mma_kernel": {32: 200, 64: 168, 128: 168},
             "global_rows_forward_mma_kernel": {32: 200, 64: 168, 128: 176},
             "local_dq_mma_kernel": {32: 160, 64: 168, 128: 192},
             "local_dkdv_mma_kernel": {32: 168, 64: 192, 128: 255},
             "global_keys_dkdv_mma_kernel": {32: 184, 64: 192, 128: 255},
             "global_dq_mma_kernel": {32: 160, 64: 168, 128: 192},
             "global_dkdv_mma_kernel": {32: 160, 64: 168, 128: 232}},
}
# Their float instantiations' SHFL count (as FLOAT_TILE_SHUFFLES): the compiler unrolls their loops
# differently, sm_90 up to 148 in the forward at D = 64 and 116 in dQ.
GENERAL_FLOAT_TILE_SHUFFLES = {
    **{kernel: {32: 256, 64: 160, 128: 112} for kernel in MMA_FORWARD_KERNELS},
    **{kernel: {32: 128, 64: 128, 128: 96} for kernel in GENERAL_BACKWARD_KERNELS},
}
# SIMT kernels. The general op's arguments (score modifiers, packed sequences' bounds) took the
# largest, the global keys' dK/dV partials at 128 < D <= 256 (8 values per lane in six rows, blocks
# of 8 warps), from 128 or fewer to 130 (sm_80) and 138 (sm_90): one such block per SM instead of
# two, on a path the tensor-core kernels leave only to head dims above 128 (and to float64).
SIMT_REGISTERS = 144
SIMT_FLOAT64_REGISTERS = 240


def test_no_local_memory_in_any_kernel():
    resources = _resources()
    for (arch, name), (_, local, stack) in resources.items():
        assert stack == 0 and local == 0, f"{name} on {arch} uses local memory: STACK {stack}, LOCAL {local}"
    checked = {re.search(r"(\w+)<", name).group(1) for (_, name) in resources if D64.search(name)}
    expected = {"banded_forward_simt_kernel", "banded_attention_forward_mma_kernel", "local_rows_kernel",
                "global_forward_kernel", "global_rows_forward_mma_kernel", "global_dq_kernel", "global_dkdv_kernel"}
    assert expected <= checked, f"kernels not found in the library: {expected - checked}"


def test_registers_within_budget():
    for (arch, name), (registers, _, _) in _resources().items():
        match = re.search(r"(\w+_mma_kernel)<([\w:]+), (\d+)(, true|, false)?>", name)
        if match:
            kind = {"__half": "half", "__nv_bfloat16": "half", "float": "float", TF32_TILES: "tf32"}[match.group(2)]
            if match.group(4) == ", true":  # the general op's instantiation
                budgets = GENERAL_REGISTERS[kind]
            else:
                budgets = {"half": MMA_REGISTERS, "float": FLOAT_TILE_REGISTERS, "tf32": TF32_TILE_REGISTERS}[kind]
            budget = budgets[match.group(1)][int(match.group(3))]
        else:
            budget = SIMT_FLOAT64_REGISTERS if "<double" in name else SIMT_REGISTERS
        assert registers <= budget, f"{name} on {arch}: {registers} registers, budget {budget}"


def test_tiled_forward_pipelines_its_tiles_with_cp_async():
    sass = _per_function(_dump("--dump-sass"), r"\s*Function : (\S+)")
    for arch in ARCHS:
        for kernel in MMA_FORWARD_KERNELS:
            kernels = {name: text for (a, name), text in sass.items() if a == arch and kernel + "<" in name}
            assert len(kernels) == 28, (f"expected 2 16-bit dtypes x 4 head-dim tiles and float, TF32 x 3, plain "
                                        f"and general, on {arch}, found {sorted(kernels)}")
            for name, text in kernels.items():
                # 16-byte cp.async (LDGSTS ... .128), commit (LDGDEPBAR) and wait (DEPBAR) instructions.
                assert re.search(r"LDGSTS\S*\.128", text), f"{name} on {arch} has no 16-byte cp.async"
                assert "LDGDEPBAR" in text and "DEPBAR.LE" in text, f"{name} on {arch} never commits or waits"


def test_half_forward_uses_tensor_cores():
    sass = _per_function(_dump("--dump-sass"), r"\s*Function : (\S+)")
    for arch in ARCHS:
        for kernel in MMA_FORWARD_KERNELS:
            for dtype in ("__half", "__nv_bfloat16"):
                kernels = {name: text for (a, name), text in sass.items()
                           if a == arch and kernel + "<" + dtype in name}
                assert kernels, f"no {dtype} {kernel} for {arch}"
                for name, text in kernels.items():
                    assert "HMMA" in text, f"{name} on {arch} has no HMMA instruction"


def test_half_backward_uses_tensor_cores_and_no_shuffles():
    sass = _per_function(_dump("--dump-sass"), r"\s*Function : (\S+)")
    for arch in ARCHS:
        for kernel in MMA_BACKWARD_KERNELS:
            found = {name: text for (a, name), text in sass.items()
                     if a == arch and re.search(kernel + r"<(__half|__nv_bfloat16),", name)}
            assert len(found) == 12, (f"expected 2 dtypes x 3 head-dim tiles of {kernel}, plain and general, "
                                      f"on {arch}, found {sorted(found)}")
            for name, text in found.items():
                assert "HMMA" in text, f"{name} on {arch} has no HMMA instruction"
                assert re.search(r"LDGSTS\S*\.128", text), f"{name} on {arch} has no 16-byte cp.async"
                shuffles = len(re.findall(r"\bSHFL\.", text))
                assert shuffles <= MMA_BACKWARD_SHUFFLES, f"{name} on {arch}: {shuffles} SHFL instructions"


def test_float_tiles_are_exact_fp32_fma():
    """The float32 instantiations of the tiled kernels multiply on FMA (exact fp32: no HMMA, which
    TF32 would be), take their tiles through cp.async, and shuffle only to exchange P in P V."""
    sass = _per_function(_dump("--dump-sass"), r"\s*Function : (\S+)")
    for arch in ARCHS:
        for kernel, tiles in FLOAT_TILE_REGISTERS.items():
            found = {name: text for (a, name), text in sass.items() if a == arch and kernel + "<float," in name}
            expected = len(tiles) * (2 if kernel in GENERAL_KERNELS else 1)  # plain and general
            assert len(found) == expected, f"expected {expected} float instantiations of {kernel} on {arch}"
            for name, text in found.items():
                assert "HMMA" not in text, f"{name} on {arch} uses tensor cores"
                assert "FFMA" in text, f"{name} on {arch} has no FFMA instruction"
                assert re.search(r"LDGSTS\S*\.128", text), f"{name} on {arch} has no 16-byte cp.async"
                assert re.search(r"LDS\.128", text), f"{name} on {arch} has no 16-byte shared load"
                shuffles = len(re.findall(r"\bSHFL\.", text))
                budgets = GENERAL_FLOAT_TILE_SHUFFLES if ", true>" in name else FLOAT_TILE_SHUFFLES
                budget = budgets[kernel][int(re.search(r"<float, (\d+)", name).group(1))]
                assert shuffles <= budget, f"{name} on {arch}: {shuffles} SHFL instructions, budget {budget}"


def test_tf32_tiles_use_tensor_cores():
    """The TF32 instantiations (float32 inputs under allow_tf32) multiply on tensor cores
    (HMMA ... TF32) and take their tiles through cp.async."""
    sass = _per_function(_dump("--dump-sass"), r"\s*Function : (\S+)")
    for arch in ARCHS:
        for kernel, tiles in FLOAT_TILE_REGISTERS.items():
            found = {name: text for (a, name), text in sass.items() if a == arch and f"{kernel}<{TF32_TILES}," in name}
            expected = len(tiles) * (2 if kernel in GENERAL_KERNELS else 1)  # plain and general
            assert len(found) == expected, f"expected {expected} TF32 instantiations of {kernel} on {arch}"
            for name, text in found.items():
                assert re.search(r"HMMA\.1688\.F32\.TF32", text), f"{name} on {arch} has no TF32 HMMA"
                assert re.search(r"LDGSTS\S*\.128", text), f"{name} on {arch} has no 16-byte cp.async"
