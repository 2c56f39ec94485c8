"""Properties that need no oracle: batching, padding content (finite and not), bitwise-deterministic
backward."""

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


# One case per dtype and window mode, with and without global tokens and global projections; N = 700
# walks keys in two blocks (the kernels' block limit is 640).
_NONFINITE_PADDING_CASES = [
    Case(batch=2, heads=2, seqlen=150, dim=16, window=9, globals="many", dtype=torch.float32),
    Case(batch=2, heads=2, seqlen=150, dim=13, window=(12, 3), dilation=[1, 2], globals="one",
         global_projections=True, dtype=torch.float64, layout="head_split"),
    Case(batch=2, heads=2, seqlen=150, dim=16, window=(10, 0), causal=True, globals="edges",
         global_projections=True, dtype=torch.bfloat16),
    Case(batch=2, heads=1, seqlen=150, dim=16, window=5, dilation=3, dtype=torch.float16, layout="sliced"),
    Case(batch=2, heads=2, seqlen=700, dim=16, window=(40, 25), dilation=[1, 3], globals="many",
         global_projections=True, dtype=torch.float32, layout="head_split"),
]


@pytest.mark.parametrize("fill", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("case", _NONFINITE_PADDING_CASES, ids=str)
def test_nonfinite_padding_does_not_reach_real_tokens(case, fill):
    # A masked key's probability is exactly 0, but 0 * NaN = NaN: masking alone lets a NaN or inf in
    # a padding token's q, k, v (or global_q, global_k, global_v, or the incoming gradient of its
    # always-zero output) into the outputs and gradients of the real rows whose keys reach it.
    q, k, v, kwargs = make_inputs(case)
    am = torch.ones(case.batch, case.seqlen, dtype=torch.int64)
    am[0, case.seqlen - 37:] = 0           # a padded tail
    am[1, 40:52] = 0                       # a gap with real keys on both sides
    am[1, ::17] = 0                        # and scattered padding
    kwargs["attention_mask"] = am
    if kwargs["global_attention_mask"] is not None:
        kwargs["global_attention_mask"][1, 45] = True  # padding that is also marked global is padding
    pad = (am == 0)[:, None, :, None]
    tensors = differentiable_inputs(q, k, v, kwargs)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(case.seed)).to(case.dtype)

    def run(inputs, grad_out):
        named = dict(zip(("q", "k", "v", "global_q", "global_k", "global_v"), inputs))
        kw = {**kwargs, **{n: t for n, t in named.items() if n.startswith("global_")}}
        out = longformer_attention(named["q"], named["k"], named["v"], case.window, **kw)
        return [out] + list(torch.autograd.grad(out, inputs, grad_out))

    def poisoned(t):  # same strides, padding rows replaced by `fill`
        x = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype).copy_(t.detach())
        return x.masked_fill_(pad, fill)

    finite = run(tensors, grad)
    nonfinite = run([poisoned(t).requires_grad_() for t in tensors], poisoned(grad))
    names = ["out", "grad q", "grad k", "grad v", "grad global_q", "grad global_k", "grad global_v"]
    for name, a, b in zip(names, finite, nonfinite):
        bad_rows = (~torch.isfinite(b)).any(-1).nonzero()[:, 2].unique().tolist()
        assert not bad_rows, f"{name}: non-finite in rows {bad_rows[:10]}{' ...' if len(bad_rows) > 10 else ''}"
        assert torch.equal(a, b), f"{name} depends on the padding content"
        assert torch.equal(b * pad, torch.zeros_like(b)), f"{name}: padding rows must be exactly zero"


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
