"""Seeded sweep of the fused CPU kernels against the dense float64 oracle, forward and backward."""

import os
import subprocess
import sys

import pytest
import torch

from conftest import (CPU_DTYPES, HALF_PRECISION, Case, assert_close_to_oracle, differentiable_inputs, make_inputs,
                      sweep_cases)
from longformer_ext import longformer_attention, ops
from longformer_ext.reference import dense_attention


def _oracle_inputs(tensors, kwargs):
    """Leaf float64 copies of the inputs, so the oracle's gradients are exact."""
    copies = [t.detach().double().requires_grad_() for t in tensors]
    oracle_kwargs = dict(kwargs)
    for name, t in zip(("global_q", "global_k", "global_v"), copies[3:]):
        oracle_kwargs[name] = t
    return copies, oracle_kwargs


@pytest.mark.parametrize("case", sweep_cases(), ids=str)
def test_matches_oracle(case):
    q, k, v, kwargs = make_inputs(case)
    tensors = differentiable_inputs(q, k, v, kwargs)
    out = longformer_attention(q, k, v, case.window, **kwargs)
    assert out.shape == q.shape and out.dtype == q.dtype

    copies, oracle_kwargs = _oracle_inputs(tensors, kwargs)
    expected = dense_attention(*copies[:3], case.window, **oracle_kwargs)
    assert_close_to_oracle(out, expected, case.dtype, "output")
    assert torch.isfinite(out).all()

    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(case.seed + 1)).to(case.dtype)
    grads = torch.autograd.grad(out, tensors, grad)
    expected_grads = torch.autograd.grad(expected, copies, grad.double())
    names = ["q", "k", "v", "global_q", "global_k", "global_v"]
    for name, g, eg in zip(names, grads, expected_grads):
        assert torch.isfinite(g).all(), f"grad {name} has non-finite values"
        assert_close_to_oracle(g, eg, case.dtype, f"grad {name}")


def test_default_instruction_set_matches_oracle():
    """The kernels built without vector extensions (picked on CPUs without AVX2) pass a sweep too;
    ATEN_CPU_CAPABILITY=default selects them in a fresh process."""
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default", LONGFORMER_SWEEP_COUNT="24")
    probe = "import torch; assert torch.backends.cpu.get_cpu_capability() == 'DEFAULT'"
    subprocess.run([sys.executable, "-c", probe], env=env, check=True)
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             f"{__file__}::test_matches_oracle"], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.parametrize("dtype", [torch.float32, *HALF_PRECISION])
@pytest.mark.parametrize("window", [(270, 260), (350, 300)], ids=["one-full-block", "two-blocks"])
def test_wide_band_over_many_tiles_matches_oracle(dtype, window):
    """A tile's band as one block of almost 640 keys (the most one block holds), or wider and split in
    two blocks, over sequences of dozens of tiles, so the forward's ring of packed key panels wraps and
    its window of value rows (heads split from one projection are not back to back) slides many times;
    a stale panel or a misplaced row would be read. With dilation (strided key sequences) and globals
    inside the band; no padding, which would hide the sequence's tail."""
    case = Case(batch=2, heads=2, seqlen=2600, dim=64, window=window, dilation=[1, 3], globals="many",
                dtype=dtype, layout="head_split", seed=11)
    q, k, v, kwargs = make_inputs(case)
    with torch.no_grad():
        out = longformer_attention(q, k, v, case.window, **kwargs)
        copies, oracle_kwargs = _oracle_inputs([q, k, v], kwargs)
        expected = dense_attention(*copies[:3], case.window, **oracle_kwargs)
    assert_close_to_oracle(out, expected, dtype, "output")


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("window,dilation", [((3, 2), [1, 2, 3]), ((0, 5), [2]), ((40, 40), [1])])
def test_banded_matmuls_match_dense_products(dtype, window, dilation):
    """The unfused banded products against dense float64 matrices built from the band: slot t of row i
    is key j = i + (t - left) * dilation[h]; qk writes `fill` where j is off the sequence, pv skips it."""
    b, h, n, d = 2, 3, 37, 24
    left, right = window
    gen = torch.Generator().manual_seed(3)
    q, k, x = (torch.randn(b, n, h, d, generator=gen).to(dtype).transpose(1, 2) for _ in range(3))
    p = torch.randn(b, h, n, left + right + 1, generator=gen).to(dtype)
    dil = torch.tensor(dilation * h if len(dilation) == 1 else dilation)[:, None, None]
    j = torch.arange(n)[None, :, None] + (torch.arange(left + right + 1)[None, None, :] - left) * dil  # [H, N, W]
    inside = ((j >= 0) & (j < n)).expand(b, h, n, -1)
    dense = torch.zeros(b, h, n, n, dtype=torch.float64).scatter_add_(
        3, j.clamp(0, n - 1).expand(b, h, n, -1), p.double() * inside)  # dense[i, j] = p[i, t]

    band = ops.banded_matmul_qk(q, k, left, right, dilation, -1000.0)
    scores = torch.gather(q.double() @ k.double().transpose(-1, -2), 3, j.clamp(0, n - 1).expand(b, h, n, -1))
    assert_close_to_oracle(band[inside], scores[inside], dtype, "qk")
    assert (band[~inside] == -1000.0).all()
    assert_close_to_oracle(ops.banded_matmul_pv(p, x, left, right, dilation), dense @ x.double(), dtype, "pv")
    assert_close_to_oracle(ops.banded_matmul_pv_transposed(p, x, left, right, dilation),
                           dense.transpose(-1, -2) @ x.double(), dtype, "pv_transposed")
