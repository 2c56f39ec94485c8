"""The CUDA kernel sources, compiled for the host (csrc/cuda/emulation), against the dense oracle.

`torch.ops.longformer_emulated.*` are the CUDA kernels behind the same glue as the CUDA build, run
on CPU tensors by the host emulation of the CUDA execution model (blocks of fibers, barriers, warp
shuffles, emulated tensor-core MMA). This is how the CUDA code is verified on machines without a
GPU; it shows indexing, masking, barrier and fragment-layout bugs, not data races or speed.

Environment: LONGFORMER_EMULATION_COUNT (cases, default 40), LONGFORMER_SEED.
"""

import contextlib
import os
import random
from pathlib import Path

import pytest
import torch

from conftest import Case, assert_close_to_oracle, load_emulation_or_skip, make_inputs
from cuda_cases import HALF_TYPES, random_small_case, same_dtype_reference, small_cases
from longformer_ext import longformer_attention
from longformer_ext.reference import dense_attention
from longformer_ext.testing import cuda_emulation

COUNT = int(os.environ.get("LONGFORMER_EMULATION_COUNT", "40"))
ROOT = Path(__file__).resolve().parents[1]
SEED = int(os.environ.get("LONGFORMER_SEED", "0"))


load_emulation_or_skip()
emu = torch.ops.longformer_emulated


def emulated_attention(q, k, v, window, **kwargs):
    """``longformer_attention`` on the emulated CUDA kernels; its backward must run under
    ``cuda_emulation()`` as well (the callers below hold it around the gradient calls)."""
    with cuda_emulation():
        return longformer_attention(q, k, v, window, **kwargs)


def _tensors(q, k, v, kwargs):
    return [q, k, v] + [kwargs[n] for n in ("global_q", "global_k", "global_v") if n in kwargs]


def _with(tensors, kwargs, convert):
    copies = [convert(t) for t in tensors]
    new_kwargs = dict(kwargs)
    for name, t in zip(("global_q", "global_k", "global_v"), copies[3:]):
        new_kwargs[name] = t
    return copies, new_kwargs


def check_against_oracle(case, q, k, v, kwargs):
    tensors = _tensors(q, k, v, kwargs)
    out = emulated_attention(q, k, v, case.window, **kwargs)
    assert out.shape == q.shape and out.dtype == q.dtype and torch.isfinite(out).all()
    copies, oracle_kwargs = _with(tensors, kwargs, lambda t: t.detach().double().requires_grad_())
    expected = dense_attention(*copies[:3], case.window, **oracle_kwargs)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(case.seed + 1)).to(case.dtype)
    with cuda_emulation():
        grads = torch.autograd.grad(out, tensors, grad)
    expected_grads = torch.autograd.grad(expected, copies, grad.double())
    names = ["output", "grad q", "grad k", "grad v", "grad global_q", "grad global_k", "grad global_v"]
    ours = [out, *grads]
    oracle = [expected, *expected_grads]
    if case.dtype not in HALF_TYPES:
        for name, a, e in zip(names, ours, oracle):
            assert torch.isfinite(a).all(), f"{name} has non-finite values"
            if case.dtype == torch.float32:  # the CUDA issue's bar: float32 within 1e-5
                err = (a.double() - e).abs().max().item() if e.numel() else 0.0
                bound = 1e-5 * (1 + (e.abs().max().item() if e.numel() else 0.0))
                assert err <= bound, f"{name}: max abs error {err:.3e} > {bound:.3e} (float32)"
            else:
                assert_close_to_oracle(a, e, case.dtype, name)
        return
    # Half types: within 2x the error of PyTorch's own computation in that dtype (plus one unit of
    # the dtype's rounding, for when PyTorch happens to be nearly exact).
    ref_copies, ref_kwargs = _with(tensors, kwargs, lambda t: t.detach().clone().requires_grad_())
    reference = same_dtype_reference(*ref_copies[:3], case.window, **ref_kwargs)
    reference_grads = torch.autograd.grad(reference, ref_copies, grad)
    eps = torch.finfo(case.dtype).eps
    for name, a, r, e in zip(names, ours, [reference, *reference_grads], oracle):
        assert torch.isfinite(a).all(), f"{name} has non-finite values"
        err = (a.double() - e).abs().max().item() if e.numel() else 0.0
        ref_err = (r.double() - e).abs().max().item() if e.numel() else 0.0
        bound = 2 * ref_err + eps * (1 + (e.abs().max().item() if e.numel() else 0.0))
        assert err <= bound, f"{name}: error {err:.3e} > {bound:.3e} (PyTorch {case.dtype} error {ref_err:.3e})"


@pytest.mark.parametrize("case", small_cases(COUNT, SEED), ids=str)
def test_emulated_kernels_match_oracle(case):
    check_against_oracle(case, *make_inputs(case))


TILED_TYPES = (*HALF_TYPES, torch.float32)


@pytest.mark.parametrize("dtype", TILED_TYPES)
@pytest.mark.parametrize("forward", ["simt", "mma"])
def test_both_forward_paths(dtype, forward, monkeypatch):
    """The tiled forward (tensor cores for float16/bfloat16, FMA tiles for float32) and the SIMT one
    each meet the bound, in every mode."""
    monkeypatch.setenv("LONGFORMER_CUDA_FORWARD", forward)
    rng = random.Random(7)
    for i in range(6):
        case = random_small_case(rng, 900 + i)
        case.dtype = dtype
        check_against_oracle(case, *make_inputs(case))


# The tiled forward's key-tile paths (banded_attention_forward_mma.cu): band tiles wholly
# inside every row's band with only real local keys (no per-element mask), partial band tiles,
# more global keys than one tile holds (a full global tile and a partial one), causal global tiles.
MMA_TILE_CASES = [
    # (case, leading global tokens, padded length of batch row 1 or None)
    (Case(batch=1, heads=1, seqlen=320, dim=64, window=160, seed=61), 0, None),
    (Case(batch=1, heads=2, seqlen=400, dim=32, window=(150, 90), dilation=[1, 2], seed=62), 70, None),
    (Case(batch=2, heads=1, seqlen=330, dim=64, window=(200, 0), causal=True, seed=63), 70, 250),
    (Case(batch=1, heads=1, seqlen=300, dim=128, window=130, global_projections=True, seed=64), 3, None),
    # head dims 129-256 (16-bit types: the 256 tile, 16-key tiles; float32 and the backward: SIMT)
    (Case(batch=1, heads=1, seqlen=150, dim=200, window=(40, 20), dilation=2, seed=66), 20, None),
]


def _mma_tile_inputs(case, leading_globals, padded_from):
    q, k, v, kwargs = make_inputs(case)
    glob = torch.zeros(case.batch, case.seqlen, dtype=torch.bool)
    glob[:, :leading_globals] = True
    if leading_globals:
        kwargs["global_attention_mask"] = glob
        if case.global_projections:
            gen = torch.Generator().manual_seed(case.seed + 7)
            for name in ("global_q", "global_k", "global_v"):
                kwargs[name] = torch.randn(q.shape, generator=gen).to(case.dtype).requires_grad_()
    if padded_from is not None:
        mask = torch.ones(case.batch, case.seqlen, dtype=torch.int64)
        mask[1, padded_from:] = 0
        kwargs["attention_mask"] = mask
    return q, k, v, kwargs


@pytest.mark.parametrize("dtype", TILED_TYPES)
@pytest.mark.parametrize("index", range(len(MMA_TILE_CASES)))
def test_mma_forward_key_tile_paths(index, dtype, monkeypatch):
    monkeypatch.setenv("LONGFORMER_CUDA_FORWARD", "mma")
    case, leading_globals, padded_from = MMA_TILE_CASES[index]
    case.dtype = dtype
    q, k, v, kwargs = _mma_tile_inputs(case, leading_globals, padded_from)
    check_against_oracle(case, q, k, v, kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("forward", ["simt", "mma"])
@pytest.mark.parametrize("fill", [float("nan"), float("inf")])
def test_non_finite_padding_rows_change_nothing(dtype, forward, fill, monkeypatch):
    """Padding tokens are neither queries nor keys: NaN or inf in their q, k, v (and global
    projections) leaves every output and gradient exactly as with finite padding."""
    monkeypatch.setenv("LONGFORMER_CUDA_FORWARD", forward)
    monkeypatch.setenv("LONGFORMER_CUDA_BACKWARD", forward)
    case = Case(batch=2, heads=2, seqlen=150, dim=32, window=(40, 70), dilation=[1, 2], global_projections=True,
                dtype=dtype, seed=65)
    q, k, v, kwargs = _mma_tile_inputs(case, 5, 90)
    real = kwargs["attention_mask"].bool()[:, None, :, None]
    names = ("global_q", "global_k", "global_v")

    def run(poisoned):
        tensors = [q, k, v] + [kwargs[n] for n in names]
        tensors = [(t.masked_fill(~real, fill) if poisoned else t).detach().requires_grad_() for t in tensors]
        call_kwargs = dict(kwargs, **dict(zip(names, tensors[3:])))
        with cuda_emulation():
            out = longformer_attention(*tensors[:3], case.window, **call_kwargs)
            grads = torch.autograd.grad(out, tensors, torch.ones_like(out))
        return [out, *grads]

    for clean, poisoned in zip(run(False), run(True)):
        assert torch.isfinite(poisoned).all()
        assert torch.equal(clean, poisoned)


@pytest.mark.parametrize("dtype", TILED_TYPES)
@pytest.mark.parametrize("backward", ["simt", "mma"])
def test_both_backward_paths(dtype, backward, monkeypatch):
    """The tiled backward of the local rows (tensor cores for float16/bfloat16 with D <= 128: tiles
    32, 64, 128; FMA tiles for float32 with D <= 128 on the emulated 227 KiB GPU) and the SIMT one
    each meet the bound."""
    monkeypatch.setenv("LONGFORMER_CUDA_BACKWARD", backward)
    rng = random.Random(8)
    for i, dim in enumerate([32, 64, 128, 40, 100, 13]):
        case = random_small_case(rng, 950 + i)
        case.dtype = dtype
        case.dim = dim
        check_against_oracle(case, *make_inputs(case))


# TF32 (opt-in): every operand rounded to 10 mantissa bits (unit roundoff 2^-11) before the
# products; measured here up to 6e-4 of 1 + max |oracle| on outputs and gradients.
TF32_BOUND = 2 * 2.0 ** -10


def _outputs_and_grads(case, q, k, v, kwargs):
    tensors = _tensors(q, k, v, kwargs)
    with cuda_emulation():
        out = longformer_attention(q, k, v, case.window, **kwargs)
        grads = torch.autograd.grad(out, tensors, torch.ones_like(out))
    return [out, *grads]


@contextlib.contextmanager
def _tf32_allowed(how):
    """PyTorch's own switches for TF32 matmuls, restored afterwards."""
    old_flag, old_precision = torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision()
    try:
        if how == "allow_tf32":
            torch.backends.cuda.matmul.allow_tf32 = True
        else:
            torch.set_float32_matmul_precision("high")
        yield
    finally:
        torch.set_float32_matmul_precision(old_precision)
        torch.backends.cuda.matmul.allow_tf32 = old_flag


@pytest.mark.parametrize("how", ["allow_tf32", "matmul_precision"])
def test_tf32_is_opt_in_through_pytorchs_setting(how, monkeypatch):
    """float32 is exact unless PyTorch allows TF32 matmuls; then the tiled kernels (forward and
    backward, local and global rows) run as TF32 within TF32_BOUND of the oracle, and the SIMT
    kernels stay exact (bit for bit)."""
    rng = random.Random(17)
    for i in range(4):
        case = random_small_case(rng, 1700 + i)
        case.dtype, case.dim = torch.float32, [32, 64, 40, 16][i]
        q, k, v, kwargs = make_inputs(case)
        exact = _outputs_and_grads(case, q, k, v, kwargs)
        with _tf32_allowed(how):
            tf32 = _outputs_and_grads(case, q, k, v, kwargs)
        with monkeypatch.context() as m:
            m.setenv("LONGFORMER_CUDA_FORWARD", "simt")
            m.setenv("LONGFORMER_CUDA_BACKWARD", "simt")
            simt_exact = _outputs_and_grads(case, q, k, v, kwargs)
            with _tf32_allowed(how):
                simt_tf32 = _outputs_and_grads(case, q, k, v, kwargs)
        assert not torch.backends.cuda.matmul.allow_tf32
        copies, oracle_kwargs = _with(_tensors(q, k, v, kwargs), kwargs, lambda t: t.detach().double().requires_grad_())
        expected = dense_attention(*copies[:3], case.window, **oracle_kwargs)
        oracle = [expected, *torch.autograd.grad(expected, copies, torch.ones_like(expected))]
        assert any(not torch.equal(a, b) for a, b in zip(exact, tf32)), f"{case}: TF32 changed nothing"
        for a, b, e in zip(tf32, exact, oracle):
            scale = 1 + (e.abs().max().item() if e.numel() else 0.0)
            assert (a.double() - e).abs().max().item() <= TF32_BOUND * scale, f"{case}: TF32 error"
            assert (b.double() - e).abs().max().item() <= 1e-5 * scale, f"{case}: float32 error"
        for a, b in zip(simt_tf32, simt_exact):
            assert torch.equal(a, b), f"{case}: the SIMT kernels changed under TF32"


def test_float32_backward_at_128_needs_a_gpu_with_100_kib_of_shared_memory(monkeypatch):
    """float32 head dims 65-128: the tiled backward (100 KiB of shared memory per block) on a GPU
    that allows it (the emulation's default, 227 KiB as on an H100), SIMT on one that does not
    (LONGFORMER_EMULATION_SHARED_KIB=99, as on sm_86/sm_89), the same bits as forcing SIMT."""
    case = Case(batch=1, heads=2, seqlen=90, dim=100, window=(20, 9), dilation=[1, 2], globals="many",
                padding=True, dtype=torch.float32, seed=19)
    q, k, v, kwargs = make_inputs(case)
    check_against_oracle(case, q, k, v, kwargs)
    tiled = _outputs_and_grads(case, q, k, v, kwargs)
    monkeypatch.setenv("LONGFORMER_EMULATION_SHARED_KIB", "99")
    small_gpu = _outputs_and_grads(case, q, k, v, kwargs)
    monkeypatch.setenv("LONGFORMER_CUDA_BACKWARD", "simt")
    simt = _outputs_and_grads(case, q, k, v, kwargs)
    assert all(torch.equal(a, b) for a, b in zip(small_gpu, simt))
    assert torch.equal(tiled[0], simt[0])  # the forward (66 KiB) is tiled on both
    assert any(not torch.equal(a, b) for a, b in zip(tiled[1:], simt[1:]))


@pytest.mark.parametrize("order", ["reverse", "shuffle"])
def test_thread_order_does_not_matter(order, monkeypatch):
    """Fibers run in reversed or shuffled order between barriers: a missing barrier shows here."""
    monkeypatch.setenv("LONGFORMER_EMULATION_ORDER", order)
    monkeypatch.setenv("LONGFORMER_EMULATION_SEED", "3")
    for case in small_cases(8, seed=SEED + 11):
        check_against_oracle(case, *make_inputs(case))
    # The tiled kernels of the global rows and keys (forward and backward), causal and not, on
    # tensor cores (bfloat16) and on FMA tiles (float32).
    for causal, dtype in [(False, torch.bfloat16), (True, torch.bfloat16), (True, torch.float32)]:
        case = Case(batch=2, heads=2, seqlen=150, dim=32, window=(7, 0) if causal else (7, 5), dilation=[1, 2],
                    globals="many", padding=True, causal=causal, global_projections=causal, dtype=dtype,
                    seed=13 + causal)
        check_against_oracle(case, *make_inputs(case))


def _band_reference(q, k, left, right, dilation):
    """float64 [B, H, N, left + right + 1] of q_i . k_j with j = i + (t - left) * d; NaN where off the sequence."""
    b, h, n, d = q.shape
    width = left + right + 1
    dil = torch.tensor(dilation)[:, None, None]
    j = torch.arange(n)[None, :, None] + (torch.arange(width)[None, None, :] - left) * dil  # [H, N, W]
    valid = (j >= 0) & (j < n)
    gathered = torch.gather(k.double(), 2, j.clamp(0, max(n - 1, 0)).reshape(1, h, n * width, 1).expand(
        b, h, n * width, d)).view(b, h, n, width, d)
    scores = (q.double()[:, :, :, None, :] * gathered).sum(-1)
    return scores.masked_fill(~valid[None], float("nan")), valid, j


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,window,dilation", [((2, 3, 37, 32), (3, 2), [1, 2, 3]), ((1, 2, 64, 40), (0, 5), [2]),
                                                   ((1, 1, 5, 64), (7, 7), [1])])
def test_emulated_banded_matmuls(dtype, shape, window, dilation):
    gen = torch.Generator().manual_seed(5)
    b, h, n, d = shape
    left, right = window
    dil = dilation * h if len(dilation) == 1 else dilation
    q, k, x = (torch.randn(shape, generator=gen).to(dtype) for _ in range(3))
    p = torch.randn(b, h, n, left + right + 1, generator=gen).to(dtype)
    expected, valid, j = _band_reference(q, k, left, right, dil)
    scores = emu.banded_matmul_qk(q, k, left, right, dilation, -1e4)
    tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
    assert torch.allclose(scores.double()[valid.expand_as(scores)], expected[valid.expand_as(expected)], atol=tol,
                          rtol=tol)
    assert (scores[~valid.expand_as(scores)] == -1e4).all()
    # pv_i = sum_t p[i, t] x_j and its transpose, against dense matrices built from the band.
    dense = torch.zeros(b, h, n, n, dtype=torch.float64)
    jj = j.clamp(0, max(n - 1, 0)).expand(b, h, n, -1)
    dense.scatter_add_(3, jj, p.double() * valid[None])
    pv = emu.banded_matmul_pv(p, x, left, right, dilation)
    pvt = emu.banded_matmul_pv_transposed(p, x, left, right, dilation)
    scale = 1 + x.double().abs().max().item() * (left + right + 1)
    assert (pv.double() - dense @ x.double()).abs().max().item() <= tol * scale
    assert (pvt.double() - dense.transpose(-1, -2) @ x.double()).abs().max().item() <= tol * scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_emulated_backward_is_deterministic(dtype, monkeypatch):
    monkeypatch.setenv("LONGFORMER_EMULATION_ORDER", "shuffle")
    case = Case(batch=2, heads=2, seqlen=90, dim=32, window=(9, 4), dilation=[1, 2], globals="many", padding=True,
                dtype=dtype, seed=12)
    results = []
    for seed in ("1", "2"):
        monkeypatch.setenv("LONGFORMER_EMULATION_SEED", seed)
        q, k, v, kwargs = make_inputs(case)
        with cuda_emulation():
            out = longformer_attention(q, k, v, case.window, **kwargs)
            results.append(torch.autograd.grad(out, [q, k, v], torch.ones_like(out)))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_emulated_errors_are_clear():
    q = torch.randn(1, 1, 8, 300)
    with pytest.raises(RuntimeError, match="head dims up to 256"):
        emu.banded_attn(q, q, q, 1, 1, [1], None, None, False, 1.0)
    q = torch.randn(1, 1, 8, 16, dtype=torch.complex64)
    with pytest.raises(RuntimeError, match="float32, float64, float16 and bfloat16"):
        emu.banded_attn(q, q, q, 1, 1, [1], None, None, False, 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_global_rows_split_into_chunks(dtype, causal):
    """Long rows: the keys of a global row are split over several blocks (N = 1100 gives 5 chunks of
    ~220 keys) and combined in chunk order. Batch rows with 3, 20, 45 and 100 global tokens get 5, 4,
    1 and 1 chunks per row (the partial slots per (b, h) are bounded; 100 rows are two row tiles of
    the tensor-core kernel, the second partial), with padding and global projections."""
    b, n, d = 4, 1100, 32
    case = Case(batch=b, heads=1, seqlen=n, dim=d, window=(4, 0) if causal else 4, causal=causal, dtype=dtype,
                seed=31 + causal)
    gen = torch.Generator().manual_seed(case.seed)
    q, k, v, gq, gk, gv = (torch.randn(b, 1, n, d, generator=gen).to(dtype).requires_grad_() for _ in range(6))
    glob = torch.zeros(b, n, dtype=torch.bool)
    for row, count in enumerate([3, 20, 45, 100]):
        glob[row, torch.randperm(n, generator=gen)[:count]] = True
    glob[0, 0] = glob[0, n - 1] = True  # a global row with one key (causal) and one over every key
    attention_mask = torch.ones(b, n, dtype=torch.int64)
    attention_mask[1, 800:] = 0  # padding, some of it under global tokens
    kwargs = dict(dilation=1, attention_mask=attention_mask, global_attention_mask=glob, causal=causal,
                  global_q=gq, global_k=gk, global_v=gv)
    check_against_oracle(case, q, k, v, kwargs)


def test_cuda_emulation_routes_forward_and_backward_to_the_emulated_kernels():
    """Inside cuda_emulation() the real ops' autograd calls the emulated kernels, forward and
    backward; outside it the CPU kernels run."""
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 24, 16, generator=gen).requires_grad_() for _ in range(3))
    glob = torch.zeros(1, 24, dtype=torch.bool)
    glob[0, 3] = True

    def ops_called(emulated):
        with torch.profiler.profile() as prof:
            with cuda_emulation() if emulated else contextlib.nullcontext():
                out = longformer_attention(q, k, v, 3, global_attention_mask=glob)
                out.sum().backward()
        return {e.name for e in prof.events() if e.name.startswith("longformer")}

    attention_ops = {"banded_attn", "banded_attn_backward"}
    assert {f"longformer_emulated::{op}" for op in attention_ops} <= ops_called(emulated=True)
    assert not any(name.startswith("longformer_emulated::") for name in ops_called(emulated=False))
    # A limit of the CUDA glue only (the CPU kernels take any head dim) shows which kernels ran.
    wide = torch.randn(1, 1, 8, 300)
    longformer_attention(wide, wide, wide, 1)
    with cuda_emulation(), pytest.raises(RuntimeError, match="head dims up to 256"):
        longformer_attention(wide, wide, wide, 1)


@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64])
def test_masks_of_every_integer_dtype_and_layout(dtype):
    """The device-side token preparation (token_roles.cu) reads masks of any integer dtype through
    their strides: nonzero is set (256 and -1 included, whose low byte or sign is all that differs),
    a non-contiguous mask equals its contiguous copy, and 700 tokens (3 chunks of 256) keep their
    global positions in order (causal global rows depend on it)."""
    b, n = 2, 700
    gen = torch.Generator().manual_seed(21)
    q, k, v = (torch.randn(b, 1, n, 16, generator=gen) for _ in range(3))
    real = torch.rand(b, n, generator=gen) > 0.1
    glob = torch.rand(b, n, generator=gen) > 0.97
    glob[0, 5] = real[0, 5] = True
    glob[1, 7], real[1, 7] = True, False  # a padding token marked global is padding
    kwargs = dict(dilation=2, causal=True)
    expected = dense_attention(q.double(), k.double(), v.double(), 6, attention_mask=real,
                               global_attention_mask=glob, **kwargs)

    def as_dtype(mask):
        if dtype == torch.bool:
            return mask
        big = 256 if dtype in (torch.int16, torch.int32, torch.int64) else 1
        values = torch.where(torch.arange(n) % 2 == 0, big, -1 if dtype != torch.uint8 else 255)
        return torch.where(mask, values.to(dtype), torch.zeros((), dtype=dtype))

    def strided(mask):  # the same values through a [N, B] buffer: stride 1 along B
        return mask.t().contiguous().t()

    outs = []
    for convert in (as_dtype, lambda m: strided(as_dtype(m))):
        with cuda_emulation():
            outs.append(longformer_attention(q, k, v, 6, attention_mask=convert(real),
                                             global_attention_mask=convert(glob), **kwargs))
    assert torch.equal(outs[0], outs[1])
    assert (outs[0].double() - expected).abs().max().item() < 1e-5


# ATen calls each op's glue (csrc/include/longformer/glue.h with cuda/cuda_backend.h, as in the CUDA build) makes around its
# kernels today, counted below: a ceiling, so that the glue only gets leaner. They allocate the
# outputs, the workspace and the token buffers (token roles and global positions are prepared by
# one kernel, token_roles.cu), zero the gradients, and view [B, N, H, D] storage as [B, H, N, D].
GLUE_ATEN_CALLS = {"banded_attn": 7, "banded_attn_backward": 15, "banded_attn (projections)": 7,
                   "banded_attn_backward (projections)": 21, "banded_matmul_qk": 1}


def test_glue_makes_few_aten_calls_and_copies_nothing_to_the_device():
    gen = torch.Generator().manual_seed(4)
    q, k, v, gq, gk, gv = (torch.randn(1, 2, 64, 16, generator=gen) for _ in range(6))
    real = torch.ones(1, 64, dtype=torch.bool)
    glob = torch.zeros(1, 64, dtype=torch.bool)
    glob[0, 3] = True
    args = (4, 4, [1, 2], real, glob, False, 0.25)
    out, lse = emu.banded_attn(q, k, v, *args)
    calls = {
        "banded_attn": lambda: emu.banded_attn(q, k, v, *args),
        "banded_attn_backward": lambda: emu.banded_attn_backward(out, q, k, v, out, lse, *args),
        "banded_attn (projections)": lambda: emu.banded_attn(q, k, v, *args, gq, gk, gv),
        "banded_attn_backward (projections)": lambda: emu.banded_attn_backward(out, q, k, v, out, lse, *args, gq, gk,
                                                                               gv),
        "banded_matmul_qk": lambda: emu.banded_matmul_qk(q, k, 4, 4, [1, 2], 0.0),
    }
    for name, call in calls.items():
        with torch.profiler.profile() as prof:
            call()
        events = prof.events()
        (op,) = [e for e in events if e.name == f"longformer_emulated::{name.split()[0]}"]
        direct = [e.name for e in events if e.cpu_parent is not None and e.cpu_parent.id == op.id]
        assert all(n.startswith("aten::") for n in direct), direct
        assert len(direct) <= GLUE_ATEN_CALLS[name], f"{name}: {len(direct)} ATen calls: {sorted(direct)}"
    # What would synchronise the stream on a GPU (a host-to-device tensor, a host read) has no place
    # in the CUDA glue: dilations travel by value in the parameter blocks.
    glue = "\n".join(p.read_text() for p in (ROOT / "csrc" / "cuda").glob("*.[ch]*") if p.suffix in (".h", ".cpp"))
    for blocking in ("at::tensor(", ".item<", ".item()", ".cpu()", "cudaMemcpy(", "cudaDeviceSynchronize",
                     "cudaStreamSynchronize"):
        assert blocking not in glue, f"the CUDA glue calls {blocking}"
