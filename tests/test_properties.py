"""Properties that need no oracle: batching, padding content, bitwise-deterministic backward."""

import pytest
import torch

from conftest import HALF_PRECISION, Case, differentiable_inputs, make_inputs
from longformer_ext import longformer_attention


def _batch(n=300, d=16, h=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(3, h, n, d, generator=gen) for _ in range(3))
    am = torch.ones(3, n, dtype=torch.int64)
    am[1, 250:] = 0
    am[2, 17:] = 0
    gm = torch.zeros(3, n, dtype=torch.bool)
    gm[0, [0, 100, 299]] = True  # three globals
    gm[2, [5]] = True            # one, and row 1 none
    return q, k, v, am, gm


@pytest.mark.parametrize("causal", [False, True])
def test_batch_equals_examples_one_by_one(causal):
    q, k, v, am, gm = _batch()
    kw = dict(window=(20, 7), dilation=[1, 2, 3], causal=causal)
    out = longformer_attention(q, k, v, attention_mask=am, global_attention_mask=gm, **kw)
    for b in range(3):
        sl = slice(b, b + 1)
        alone = longformer_attention(q[sl], k[sl], v[sl], attention_mask=am[sl], global_attention_mask=gm[sl], **kw)
        assert torch.equal(out[sl], alone), f"example {b} differs when run alone"


def test_padding_content_does_not_matter():
    q, k, v, am, gm = _batch(seed=1)
    out = longformer_attention(q, k, v, 30, attention_mask=am, global_attention_mask=gm)
    pad = (am == 0)[:, None, :, None]
    noisy = [torch.where(pad, torch.randn_like(t) * 100, t) for t in (q, k, v)]
    out2 = longformer_attention(*noisy, 30, attention_mask=am, global_attention_mask=gm)
    assert torch.equal(out, out2)
    assert torch.equal(out * pad, torch.zeros_like(out)), "padding rows must be exactly zero"


def test_padding_rows_get_zero_gradient():
    q, k, v, am, gm = _batch(seed=2)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = longformer_attention(q, k, v, 30, attention_mask=am, global_attention_mask=gm)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    pad = (am == 0)[:, None, :, None].expand_as(q)
    for g in grads:
        assert torch.equal(g[pad], torch.zeros_like(g[pad]))


@pytest.mark.parametrize("dtype", [torch.float32, *HALF_PRECISION])
def test_backward_is_bitwise_deterministic_across_runs_and_threads(dtype, threads):
    case = Case(batch=2, heads=3, seqlen=777, dim=32, window=(70, 40), dilation=[1, 2, 3], globals="many",
                padding=True, global_projections=True, dtype=dtype, layout="head_split", seed=5)
    q, k, v, kwargs = make_inputs(case)
    tensors = differentiable_inputs(q, k, v, kwargs)
    grad = torch.randn(q.shape).to(dtype)

    def run():
        out = longformer_attention(q, k, v, case.window, **kwargs)
        return [out] + list(torch.autograd.grad(out, tensors, grad))

    reference = run()
    for n_threads in (1, 2, 1, 2):
        torch.set_num_threads(n_threads)
        for a, b in zip(run(), reference):
            assert torch.equal(a, b), f"result changed with {n_threads} thread(s)"
