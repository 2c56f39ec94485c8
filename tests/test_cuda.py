"""The CUDA kernels on a real GPU: oracle sweep in every dtype, parity with the CPU kernels,
gradcheck, opcheck, torch.compile and determinism. Skipped when there is no GPU or the build has no
CUDA kernels (the same kernel sources are tested on the CPU by test_cuda_emulated.py), unless
LONGFORMER_REQUIRE_CUDA=1 (scripts/gpu_check.sh), which makes that a failure.

LONGFORMER_CUDA_SWEEP_COUNT: random small cases in the oracle sweep (default 60; the GPU script runs
fewer); the four N = 4099 cases always run."""

import os

import pytest
import torch

from conftest import Case, assert_close_to_oracle, make_heads, make_masks
from longformer_ext import longformer_attention
from longformer_ext.reference import dense_attention
from cuda_cases import HALF_TYPES, same_dtype_reference, small_cases

try:
    from longformer_ext import _build_info
    _WITH_CUDA = _build_info.CUDA_MAJOR is not None
except ImportError:
    _WITH_CUDA = False

_REASON = "needs a GPU and a CUDA build of longformer_ext"
if os.environ.get("LONGFORMER_REQUIRE_CUDA") == "1" and not (torch.cuda.is_available() and _WITH_CUDA):
    raise RuntimeError(f"LONGFORMER_REQUIRE_CUDA=1: {_REASON} (GPU visible: {torch.cuda.is_available()}, "
                       f"CUDA build: {_WITH_CUDA})")
pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and _WITH_CUDA), reason=_REASON)


def _inputs(case, device="cuda"):
    gen = torch.Generator().manual_seed(case.seed)
    q, k, v = (make_heads(case, gen) for _ in range(3))
    am, gm = make_masks(case, gen)
    kwargs = dict(dilation=case.dilation, attention_mask=am, global_attention_mask=gm, causal=case.causal)
    if case.global_projections and gm is not None:
        kwargs.update(global_q=make_heads(case, gen), global_k=make_heads(case, gen), global_v=make_heads(case, gen))
    names = ["global_q", "global_k", "global_v"]
    tensors = [q, k, v] + [kwargs[n] for n in names if n in kwargs]
    moved = [t.detach().to(device).requires_grad_() for t in tensors]
    moved_kwargs = {key: (val.to(device) if torch.is_tensor(val) else val) for key, val in kwargs.items()}
    for name, t in zip(names, moved[3:]):
        moved_kwargs[name] = t
    return moved, moved_kwargs


def _replace(tensors, kwargs, convert):
    copies = [convert(t) for t in tensors]
    new_kwargs = {key: val for key, val in kwargs.items()}
    for name, t in zip(["global_q", "global_k", "global_v"], copies[3:]):
        new_kwargs[name] = t
    return copies, new_kwargs


def _run(case, tensors, kwargs):
    out = longformer_attention(*tensors[:3], case.window, **kwargs)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(case.seed + 1)).to(out)
    return out, torch.autograd.grad(out, tensors, grad), grad


def _sweep():
    cases = small_cases(int(os.environ.get("LONGFORMER_CUDA_SWEEP_COUNT", "60")), seed=21)
    big = [Case(batch=2, heads=4, seqlen=4099, dim=d, window=(256, 128), dilation=[1, 2, 1, 4], globals="many",
                padding=True, dtype=dt, seed=40 + i) for i, (d, dt) in enumerate(
                    [(64, torch.float16), (128, torch.bfloat16), (64, torch.float32), (32, torch.float16)])]
    return cases + big


@pytest.mark.parametrize("case", _sweep(), ids=str)
def test_cuda_matches_oracle(case):
    _check_against_oracle(case)


@pytest.mark.parametrize("backward", ["simt", "mma"])
@pytest.mark.parametrize("dim", [64, 128])
def test_cuda_both_half_backward_paths(backward, dim, monkeypatch):
    """The tensor-core backward (local rows, global keys, global rows; the default) and the SIMT one
    it replaced."""
    monkeypatch.setenv("LONGFORMER_CUDA_BACKWARD", backward)
    _check_against_oracle(Case(batch=2, heads=2, seqlen=1537, dim=dim, window=(200, 70), dilation=[1, 3],
                               globals="many", padding=True, causal=dim == 128, dtype=torch.bfloat16, seed=77))


@pytest.mark.parametrize("path", ["simt", "mma", "tf32"])
@pytest.mark.parametrize("dim", [64, 128])
def test_cuda_float32_paths(path, dim, monkeypatch):
    """float32 on the FMA tiles (the default; backward tiled for D <= 64), on SIMT, and as TF32 when
    PyTorch allows it (within 2 * 2^-10 of 1 + max |oracle|, the bound of test_cuda_emulated.py)."""
    if path == "simt":
        monkeypatch.setenv("LONGFORMER_CUDA_FORWARD", "simt")
        monkeypatch.setenv("LONGFORMER_CUDA_BACKWARD", "simt")
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", path == "tf32")
    case = Case(batch=2, heads=2, seqlen=1537, dim=dim, window=(200, 70), dilation=[1, 3], globals="many",
                padding=True, causal=dim == 128, global_projections=dim == 64, dtype=torch.float32, seed=79)
    if path != "tf32":
        _check_against_oracle(case)
        return
    tensors, kwargs = _inputs(case)
    out, grads, grad = _run(case, tensors, kwargs)
    cpu, cpu_kwargs = _replace(tensors, kwargs, lambda t: t.detach().cpu().double().requires_grad_())
    cpu_kwargs = {key: (val.cpu() if torch.is_tensor(val) else val) for key, val in cpu_kwargs.items()}
    expected = dense_attention(*cpu[:3], case.window, **cpu_kwargs)
    for a, e in zip([out, *grads], [expected, *torch.autograd.grad(expected, cpu, grad.cpu().double())]):
        assert (a.cpu().double() - e).abs().max().item() <= 2 * 2.0 ** -10 * (1 + e.abs().max().item())


@pytest.mark.parametrize("path", ["simt", "mma"])
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_global_rows_in_chunks(path, causal, monkeypatch):
    """Global rows whose keys are split over blocks: 3, 20, 45 and 100 global tokens per batch row
    (5, 4, 1 and 1 chunks at N = 1100; 100 rows are two row tiles), padding under some of them,
    global projections; forward and backward on tensor cores (mma) or SIMT."""
    monkeypatch.setenv("LONGFORMER_CUDA_FORWARD", path)
    monkeypatch.setenv("LONGFORMER_CUDA_BACKWARD", path)
    b, n = 4, 1100
    case = Case(batch=b, heads=2, seqlen=n, dim=64, window=(4, 0) if causal else 4, causal=causal, globals="many",
                global_projections=True, dtype=torch.bfloat16, seed=81 + causal)
    tensors, kwargs = _inputs(case)
    gen = torch.Generator().manual_seed(case.seed)
    glob = torch.zeros(b, n, dtype=torch.bool)
    for row, count in enumerate([3, 20, 45, 100]):
        glob[row, torch.randperm(n, generator=gen)[:count]] = True
    attention_mask = torch.ones(b, n, dtype=torch.int64)
    attention_mask[1, 800:] = 0
    kwargs.update(attention_mask=attention_mask.cuda(), global_attention_mask=glob.cuda())
    _check_against_oracle(case, (tensors, kwargs))


def _check_against_oracle(case, inputs=None):
    tensors, kwargs = inputs if inputs is not None else _inputs(case)
    out, grads, grad = _run(case, tensors, kwargs)
    assert out.is_cuda and out.shape == tensors[0].shape and torch.isfinite(out).all()
    cpu, cpu_kwargs = _replace(tensors, kwargs, lambda t: t.detach().cpu().double().requires_grad_())
    cpu_kwargs = {key: (val.cpu() if torch.is_tensor(val) else val) for key, val in cpu_kwargs.items()}
    expected = dense_attention(*cpu[:3], case.window, **cpu_kwargs)
    expected_grads = torch.autograd.grad(expected, cpu, grad.cpu().double())
    if case.dtype not in HALF_TYPES:
        assert_close_to_oracle(out.cpu(), expected, case.dtype, "output")
        for g, eg in zip(grads, expected_grads):
            assert_close_to_oracle(g.cpu(), eg, case.dtype, "grad")
        return
    ref, ref_kwargs = _replace(tensors, kwargs, lambda t: t.detach().clone().requires_grad_())
    ref_out = same_dtype_reference(*ref[:3], case.window, **ref_kwargs)
    ref_grads = torch.autograd.grad(ref_out, ref, grad)
    eps = torch.finfo(case.dtype).eps
    for a, r, e in zip([out, *grads], [ref_out, *ref_grads], [expected, *expected_grads]):
        err = (a.double().cpu() - e).abs().max().item()
        ref_err = (r.double().cpu() - e).abs().max().item()
        assert err <= 2 * ref_err + eps * (1 + e.abs().max().item()), (err, ref_err)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cuda_matches_cpu_kernels(dtype):
    case = Case(batch=2, heads=3, seqlen=777, dim=64, window=(40, 17), dilation=[1, 2, 3], globals="many",
                padding=True, global_projections=True, dtype=dtype, seed=5)
    gpu, gpu_kwargs = _inputs(case)
    cpu, cpu_kwargs = _inputs(case, "cpu")
    out, grads, _ = _run(case, gpu, gpu_kwargs)
    cpu_out, cpu_grads, _ = _run(case, cpu, cpu_kwargs)
    for a, b in zip([out, *grads], [cpu_out, *cpu_grads]):
        assert_close_to_oracle(a.cpu(), b, dtype, "CUDA vs CPU")


def test_cuda_gradcheck():
    case = Case(batch=1, heads=2, seqlen=19, dim=8, window=(3, 2), dilation=[1, 2], globals="edges", padding=True,
                global_projections=True, dtype=torch.float64, seed=3)
    tensors, kwargs = _inputs(case)
    names = ["global_q", "global_k", "global_v"]

    def f(*ts):
        kw = dict(kwargs)
        kw.update(zip(names, ts[3:]))
        return longformer_attention(*ts[:3], case.window, **kw)

    assert torch.autograd.gradcheck(f, tensors, eps=1e-6, atol=1e-7)


def test_cuda_opcheck():
    ops = torch.ops.longformer
    gen = torch.Generator().manual_seed(0)

    def heads(dtype=torch.float32):
        return torch.randn(2, 11, 15, generator=gen).view(2, 11, 3, 5).transpose(1, 2).to("cuda", dtype)

    am = torch.tensor([[1] * 11, [1] * 8 + [0] * 3], device="cuda")
    gm = torch.zeros(2, 11, dtype=torch.bool, device="cuda")
    gm[0, 0] = gm[1, 3] = gm[1, 7] = True
    for dtype in (torch.float32, torch.float16):
        q, k, v, gq, gk, gv = (heads(dtype).requires_grad_() for _ in range(6))
        grad = heads(dtype)
        for glob in ((), (gq, gk, gv)):
            args = (q, k, v, 2, 1, [1, 2, 1], am, gm, bool(glob), 0.4, *glob)
            torch.library.opcheck(ops.banded_attn, args)
            out, lse = ops.banded_attn(*args)
            torch.library.opcheck(ops.banded_attn_backward, (grad, q.detach(), k.detach(), v.detach(), out.detach(),
                                                             lse, 2, 1, [1, 2, 1], am, gm, bool(glob), 0.4,
                                                             *(t.detach() for t in glob)))
        p = torch.randn(2, 3, 11, 4, generator=gen).to("cuda", dtype).requires_grad_()
        torch.library.opcheck(ops.banded_matmul_qk, (q, k, 2, 1, [1, 3, 2], float("-inf")))
        torch.library.opcheck(ops.banded_matmul_pv, (p, k, 2, 1, [1, 3, 2]))
        torch.library.opcheck(ops.banded_matmul_pv_transposed, (p, q, 2, 1, [2]))


def test_cuda_compile_fullgraph():
    case = Case(batch=2, heads=2, seqlen=300, dim=64, window=(32, 32), dilation=[1, 2], globals="many",
                padding=True, dtype=torch.float16, seed=9)
    tensors, kwargs = _inputs(case)

    def f(q, k, v):
        return longformer_attention(q, k, v, case.window, **kwargs)

    compiled = torch.compile(f, fullgraph=True)
    assert torch.equal(compiled(*tensors[:3]), f(*tensors[:3]))


def test_cuda_backward_is_deterministic():
    case = Case(batch=2, heads=4, seqlen=2048, dim=64, window=(128, 128), dilation=[1, 1, 2, 4], globals="many",
                padding=True, dtype=torch.bfloat16, seed=13)
    results = []
    for _ in range(2):
        tensors, kwargs = _inputs(case)
        results.append(_run(case, tensors, kwargs)[1])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_cuda_launches_on_the_current_stream_and_device():
    """The glue launches on the caller's current stream (torch's stable accelerator API): inputs made
    on a side stream are read after they are written, and the result equals the default stream's;
    with a second GPU, tensors on cuda:1 run there (the device guard)."""
    case = Case(batch=1, heads=4, seqlen=4096, dim=64, window=(256, 256), dilation=[1], globals="one",
                dtype=torch.bfloat16, seed=21)
    tensors, kwargs = _inputs(case)
    expected = longformer_attention(*tensors[:3], case.window, **kwargs)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # keeps the side stream busy: a launch on another stream would race ahead
        q, k, v = (t * 1 for t in tensors[:3])
        out = longformer_attention(q, k, v, case.window, **kwargs)
    side.synchronize()
    assert torch.equal(out, expected)
    if torch.cuda.device_count() > 1:
        moved = {n: (t.to("cuda:1") if torch.is_tensor(t) else t) for n, t in kwargs.items()}
        on_second = longformer_attention(*(t.to("cuda:1") for t in tensors[:3]), case.window, **moved)
        assert on_second.device == torch.device("cuda:1")
        assert torch.equal(on_second.cpu(), expected.cpu())
