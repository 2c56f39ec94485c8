"""Tests of the CUDA host emulation (csrc/cuda/emulation/host_cuda.h): the self-test program
tests/emulation/selftest.cpp is compiled with g++ the way kernel sources are (device.h with
-DLONGFORMER_HOST_EMULATION) and each of its cases is run under every thread order.

The build uses AddressSanitizer when it links here (the fiber switches are annotated for it);
LONGFORMER_EMULATION_SANITIZE=0 builds without it, =address,undefined adds UBSan.
"""

import hashlib
import os
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "tests" / "emulation" / "selftest.cpp"
ORDERS = ["forward", "reverse", "shuffle"]
FLAGS = ["-std=c++20", "-O1", "-pthread", "-DLONGFORMER_HOST_EMULATION",
         "-I", str(ROOT / "csrc" / "cuda"), "-I", str(ROOT / "csrc" / "include")]
# UBSan as well would double the compile time; LONGFORMER_EMULATION_SANITIZE=address,undefined asks for it.
SANITIZE_DEFAULT = "address"

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")


@pytest.fixture(scope="module")
def selftest():
    sanitize = os.environ.get("LONGFORMER_EMULATION_SANITIZE", SANITIZE_DEFAULT)
    attempts = [[f"-fsanitize={sanitize}"], []] if sanitize not in ("", "0") else [[]]
    # The build is cached by the hash of its inputs, so a re-run with unchanged sources skips it.
    inputs = [SOURCE, ROOT / "csrc" / "cuda" / "device.h", ROOT / "csrc" / "cuda" / "async_copy.h",
              ROOT / "csrc" / "cuda" / "emulation" / "host_cuda.h"]
    digest = hashlib.sha256()
    for path in inputs:
        digest.update(path.read_bytes())
    errors = []
    for extra in attempts:
        key = hashlib.sha256(digest.digest() + " ".join(FLAGS + extra).encode()).hexdigest()[:16]
        out = Path(tempfile.gettempdir()) / f"longformer_emulation_selftest_{key}"
        if out.exists():
            return out
        partial = out.with_name(out.name + f".{os.getpid()}.tmp")
        proc = subprocess.run(["g++", *FLAGS, *extra, str(SOURCE), "-o", str(partial)],
                              capture_output=True, text=True, timeout=300)
        if proc.returncode == 0:
            os.replace(partial, out)
            return out
        errors.append(proc.stderr[-4000:])
    pytest.fail("building the emulation self-test failed:\n" + "\n".join(errors))


def run(binary, case, order="forward", extra_env=None, args=()):
    env = dict(os.environ, LONGFORMER_EMULATION_ORDER=order, ASAN_OPTIONS="detect_leaks=0",
               UBSAN_OPTIONS="print_stacktrace=1")
    env.pop("LONGFORMER_EMULATION_THREADS", None)
    env.update(extra_env or {})
    proc = subprocess.run([str(binary), case, *args], capture_output=True, text=True, env=env,
                          timeout=60)
    assert proc.returncode == 0, f"{case} ({order}) exited with {proc.returncode}:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    assert "runtime error" not in proc.stderr, proc.stderr  # UBSan
    return proc.stdout.strip()


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("case", ["matmul", "warp", "atomics", "dynamic_shared", "coordinates", "big_block",
                                  "async_copy"])
def test_correct_kernels_pass_in_every_order(selftest, case, order):
    args = ("128",) if case == "matmul" else ()  # 128^3 keeps the sanitized build quick
    out = run(selftest, case, order, args=args)
    assert out.startswith(f"PASS {case}"), out


@pytest.mark.parametrize("order", ["reverse", "shuffle"])
def test_missing_barrier_in_tiled_matmul_gives_wrong_result(selftest, order):
    out = run(selftest, "matmul_missing_barrier", order)
    error = float(out.split("max_error=")[1])
    assert error > 0.1, out


def test_missing_barrier_that_forward_order_hides_is_caught_by_other_orders(selftest):
    # A thread reading its left neighbour's shared slot without a barrier happens to work when
    # threads run in index order; reverse and shuffled orders expose it.
    def wrong(order, seed="0"):
        out = run(selftest, "neighbour_missing_barrier", order, {"LONGFORMER_EMULATION_SEED": seed})
        return int(out.split("wrong=")[1])

    assert wrong("forward") == 0
    assert wrong("reverse") > 200
    assert wrong("shuffle") > 50
    assert wrong("shuffle", "3") == wrong("shuffle", "3")  # seeded: reproducible


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("case", ["async_copy_no_wait", "async_copy_weak_wait", "async_copy_no_barrier"])
def test_cp_async_pipeline_without_its_wait_or_barrier_reads_stale_data(selftest, case, order):
    # cp.async data lands only at the wait that covers it: a pipeline that reads a stage before
    # waiting for it (or waits for too little, or reads other threads' copies without the barrier
    # after their wait) sees the stage's old bytes in every thread order.
    # (Reverse order hides the missing barrier for all but the thread that reads thread 0's copy:
    # its neighbour runs, and waits, first.)
    out = run(selftest, case, order)
    wrong = int(out.split("wrong=")[1])
    assert wrong == 3 if (case, order) == ("async_copy_no_barrier", "reverse") else wrong > 100, out


@pytest.mark.parametrize("order", ORDERS)
def test_divergent_barrier_raises_clear_error(selftest, order):
    out = run(selftest, "divergent_barrier", order)
    assert out.startswith("ERROR divergent_barrier"), out
    assert "divergent __syncthreads()" in out and "100 of 128 threads wait" in out and "28 have exited" in out


@pytest.mark.parametrize("order", ORDERS)
def test_divergent_warp_operation_raises_clear_error(selftest, order):
    out = run(selftest, "divergent_shuffle", order)
    assert out.startswith("ERROR divergent_shuffle"), out
    assert "divergent warp operation" in out


def test_unsupported_mask_is_reported_with_the_thread(selftest):
    out = run(selftest, "partial_mask")
    assert out.startswith("ERROR partial_mask") and "block (0,0,0) thread (" in out and "0xffffffff" in out, out


@pytest.mark.parametrize("order", ORDERS)
def test_reported_failure_is_the_lowest_failing_block(selftest, order):
    # Blocks run on two OS threads; whichever fails first in time, the lowest failing block is named.
    for _ in range(2):
        out = run(selftest, "first_failure", order)
        assert "deadlock in block (7,0,0)" in out, out


def test_bad_order_setting_is_rejected(selftest):
    env = dict(os.environ, LONGFORMER_EMULATION_ORDER="backwards", ASAN_OPTIONS="detect_leaks=0")
    proc = subprocess.run([str(selftest), "coordinates"], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode != 0 and "LONGFORMER_EMULATION_ORDER" in proc.stderr


# ---- half / bfloat16 conversions ---------------------------------------------------------------

def _bits(f):
    return struct.unpack("<I", struct.pack("<f", f))[0]


# Hand-checked IEEE cases (value -> bits), independent of torch: ties to even, overflow, subnormals.
KNOWN_F2H = {
    _bits(1.0): 0x3C00, _bits(-2.0): 0xC000, _bits(65504.0): 0x7BFF, _bits(65519.99): 0x7BFF,
    _bits(65520.0): 0x7C00, _bits(1e6): 0x7C00, _bits(2.0**-14): 0x0400, _bits(2.0**-24): 0x0001,
    _bits(2.0**-25): 0x0000, _bits(1.5 * 2.0**-24): 0x0002, _bits(2.5 * 2.0**-24): 0x0002,
    _bits(1.0 + 2.0**-11): 0x3C00, _bits(1.0 + 3 * 2.0**-11): 0x3C02, 0x80000000: 0x8000,
    0x7F800000: 0x7C00, 0xFF800000: 0xFC00, 0x00000001: 0x0000,
}
KNOWN_F2B = {
    _bits(1.0): 0x3F80, _bits(1.0 + 2.0**-8): 0x3F80, _bits(1.0 + 3 * 2.0**-8): 0x3F82, 0x7F7FFFFF: 0x7F80,
    0x7F7F7FFF: 0x7F7F, 0x00018000: 0x0002, 0x00008000: 0x0000, 0x80000000: 0x8000, 0xFF800000: 0xFF80,
}


def _convert(binary, kind, values):
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.bin", Path(tmp) / "out.bin"
        src.write_bytes(struct.pack(f"<{len(values)}I", *values))
        assert run(binary, "conversions", args=(kind, str(src), str(dst))) == f"CONVERTED {len(values)}"
        data = dst.read_bytes()
    return list(struct.unpack(f"<{len(data) // 4}I", data))


def _is_nan32(b):
    return (b & 0x7F800000) == 0x7F800000 and (b & 0x7FFFFF) != 0


def test_conversions_known_bit_patterns(selftest):
    for kind, table in (("f2h", KNOWN_F2H), ("f2b", KNOWN_F2B)):
        got = _convert(selftest, kind, list(table))
        for (x, want), g in zip(table.items(), got):
            assert g == want, f"{kind} {x:08x}: got {g:04x}, want {want:04x}"
    nan_h, nan_b = _convert(selftest, "f2h", [0x7FC00000]) + _convert(selftest, "f2b", [0xFFC00001])
    assert (nan_h & 0x7C00) == 0x7C00 and nan_h & 0x3FF and (nan_b & 0x7F80) == 0x7F80 and nan_b & 0x7F


def test_conversions_match_torch(selftest):
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(0)
    all16 = torch.arange(65536, dtype=torch.int32)
    # Every half/bfloat16 value widened to float; then float inputs: random bit patterns, every
    # midpoint between neighbouring half values (the ties) and its float neighbours.
    halves = all16.to(torch.int16).view(torch.float16)
    finite = halves[torch.isfinite(halves)].float().unique()
    mids = ((finite[1:].double() + finite[:-1].double()) / 2).float()
    mid_bits = mids.view(torch.int32)
    floats = torch.cat([torch.randint(-2**31, 2**31 - 1, (10000,), generator=gen, dtype=torch.int64).to(torch.int32),
                        mid_bits, mid_bits + 1, mid_bits - 1, finite.view(torch.int32)])
    cases = {
        "h2f": (all16, all16.to(torch.int16).view(torch.float16).float().view(torch.int32)),
        "b2f": (all16, all16.to(torch.int16).view(torch.bfloat16).float().view(torch.int32)),
        "f2h": (floats, floats.view(torch.float32).to(torch.float16).view(torch.int16).to(torch.int32)),
        "f2b": (floats, floats.view(torch.float32).to(torch.bfloat16).view(torch.int16).to(torch.int32)),
    }
    for kind, (inputs, expected) in cases.items():
        width = 0xFFFF if kind[0] == "f" else 0xFFFFFFFF
        ins = [v & 0xFFFFFFFF for v in inputs.tolist()]
        want = [v & width for v in expected.tolist()]
        got = _convert(selftest, kind, ins)
        assert len(got) == len(want)
        if kind[0] == "f":  # NaN payloads differ between implementations: compare NaN-ness only
            nan = lambda b: (b & 0x7C00) == 0x7C00 and (b & 0x3FF) != 0 if kind == "f2h" else \
                (b & 0x7F80) == 0x7F80 and (b & 0x7F) != 0
        else:
            nan = _is_nan32
        bad = [(i, w, g) for i, w, g in zip(ins, want, got) if w != g and not (nan(w) and nan(g))]
        assert not bad, f"{kind}: {len(bad)} mismatches, e.g. " + ", ".join(
            f"{i:08x}: want {w:x} got {g:x}" for i, w, g in bad[:5])
