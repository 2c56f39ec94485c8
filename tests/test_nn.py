"""longformer_ext.nn.LongformerSelfAttention: both paths against the dense oracle, the probabilities'
layout, head mask, dropout, and argument errors."""

import pytest
import torch

import longformer_ext
from longformer_ext.nn import LongformerAttentionProbs, LongformerSelfAttention
from longformer_ext.reference import dense_attention

C, H = 24, 3
D = C // H


pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def _module(seed=0, **kwargs):
    torch.manual_seed(seed)
    if "attention_window" not in kwargs:
        kwargs.setdefault("window", 2)
    return LongformerSelfAttention(C, H, **kwargs)


def _masks(b, n, kind, gen):
    attention_mask = global_attention_mask = None
    if kind in ("padding", "mixed"):
        lengths = torch.tensor([n, n - 4, n - 1][:b])
        attention_mask = (torch.arange(n)[None] < lengths[:, None]).to(torch.int64)
    if kind in ("globals", "mixed"):
        glob = torch.zeros(b, n, dtype=torch.bool)
        glob[0, [0, n // 2, n - 1]] = True  # rows with different numbers of global tokens,
        if b > 1:
            glob[1, 3] = True               # one of them on a padding token in "mixed"
            glob[1, n - 2] = True
        global_attention_mask = glob
    return attention_mask, global_attention_mask


def _oracle(module, x, attention_mask, global_attention_mask, head_mask=None):
    """The module's function from the float64 oracle applied to its own projections."""
    b, n, _ = x.shape

    def heads(linear):
        return linear(x).double().view(b, n, H, D).transpose(1, 2)

    q, k, v = heads(module.query), heads(module.key), heads(module.value)
    glob = {}
    if global_attention_mask is not None:
        glob = dict(global_q=heads(module.query_global), global_k=heads(module.key_global),
                    global_v=heads(module.value_global))
    out = dense_attention(q, k, v, module.window, dilation=module.dilation, attention_mask=attention_mask,
                          global_attention_mask=global_attention_mask, causal=module.causal, **glob)
    if head_mask is not None:
        out = out * head_mask.double().view(1, -1, 1, 1)
    return out.transpose(1, 2).reshape(b, n, C)


CASES = [
    dict(window=2), dict(window=(3, 1)), dict(attention_window=4), dict(window=2, dilation=[1, 2, 3]),
    dict(window=(3, 0), causal=True), dict(window=(2, 1), dilation=2, causal=True), dict(window=20),
]


@pytest.mark.parametrize("kind", ["none", "globals", "padding", "mixed"])
@pytest.mark.parametrize("config", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_both_paths_match_oracle(config, kind):
    module = _module(**config)
    gen = torch.Generator().manual_seed(1)
    b, n = 2, 13
    x = torch.randn(b, n, C, generator=gen)
    attention_mask, global_attention_mask = _masks(b, n, kind, gen)
    expected = _oracle(module, x, attention_mask, global_attention_mask)
    fused = module(x, attention_mask, global_attention_mask)
    unfused, probs = module(x, attention_mask, global_attention_mask, output_attentions=True)
    torch.testing.assert_close(fused.double(), expected, atol=2e-5, rtol=0)
    torch.testing.assert_close(unfused.double(), expected, atol=2e-5, rtol=0)
    assert isinstance(probs, LongformerAttentionProbs)


@pytest.mark.parametrize("kind", ["globals", "mixed"])
def test_unfused_gradients_match_fused(kind):
    module = _module(window=(2, 3), dilation=[1, 2, 1])
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 17, C, generator=gen, requires_grad=True)
    attention_mask, global_attention_mask = _masks(2, 17, kind, gen)
    weight = torch.randn(2, 17, C, generator=gen)
    grads = []
    for output_attentions in (False, True):
        module.zero_grad()
        x.grad = None
        out = module(x, attention_mask, global_attention_mask, output_attentions=output_attentions)
        out = out[0] if output_attentions else out
        (out * weight).sum().backward()
        grads.append([x.grad.clone()] + [p.grad.clone() for p in module.parameters()])
    for fused_grad, unfused_grad in zip(*grads):
        torch.testing.assert_close(unfused_grad, fused_grad, atol=1e-5, rtol=1e-5)


def test_probabilities_layout_rebuilds_the_output():
    """Scattering band / global-key / global-row probabilities into a dense [N, N] matrix and
    multiplying by the values gives the output: the documented layout is the one computed."""
    module = _module(window=(2, 1), dilation=[1, 2, 3])
    gen = torch.Generator().manual_seed(3)
    b, n = 2, 11
    x = torch.randn(b, n, C, generator=gen)
    attention_mask, global_attention_mask = _masks(b, n, "mixed", gen)
    out, probs = module(x, attention_mask, global_attention_mask, output_attentions=True)
    left, right = module.window
    dense = torch.zeros(b, H, n, n)
    for hh in range(H):
        for i in range(n):
            for t in range(left + right + 1):
                j = i + (t - left) * module.dilation[hh]
                if 0 <= j < n:
                    dense[:, hh, i, j] += probs.band[:, hh, i, t]
                else:
                    assert (probs.band[:, hh, i, t] == 0).all()
    glob_rows = torch.zeros(b, H, n, n)
    for bb in range(b):
        for g, pos in enumerate(probs.global_index[bb].tolist()):
            if pos < 0:
                assert (probs.global_keys[bb, :, :, g] == 0).all() and (probs.global_rows[bb, :, g] == 0).all()
                continue
            dense[bb, :, :, pos] += probs.global_keys[bb, :, :, g]
            glob_rows[bb, :, pos] = probs.global_rows[bb, :, g]
    v = module.value(x).view(b, n, H, D).transpose(1, 2)
    vg = module.value_global(x).view(b, n, H, D).transpose(1, 2)
    rebuilt = (dense @ v + glob_rows @ vg).transpose(1, 2).reshape(b, n, C)
    torch.testing.assert_close(rebuilt, out, atol=1e-5, rtol=0)
    # Every real row sums to 1 (local rows over band + global keys, global rows over all keys).
    real = attention_mask.bool()
    sums = dense.sum(-1) + glob_rows.sum(-1)
    torch.testing.assert_close(sums, real[:, None, :].float().expand(b, H, n), atol=1e-6, rtol=0)
    expected_index = [[0, 5, 10], [3, -1, -1]]  # row 1: its global token at n-2 is padding
    assert probs.global_index.tolist() == expected_index


def test_head_mask_both_paths():
    module = _module(window=3)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 13, C, generator=gen)
    attention_mask, global_attention_mask = _masks(2, 13, "mixed", gen)
    head_mask = torch.tensor([1.0, 0.0, 0.5], requires_grad=True)
    expected = _oracle(module, x, attention_mask, global_attention_mask, head_mask.detach())
    fused = module(x, attention_mask, global_attention_mask, head_mask=head_mask)
    unfused, probs = module(x, attention_mask, global_attention_mask, head_mask=head_mask, output_attentions=True)
    torch.testing.assert_close(fused.double(), expected, atol=2e-5, rtol=0)
    torch.testing.assert_close(unfused.double(), expected, atol=2e-5, rtol=0)
    assert (probs.band[:, 1] == 0).all() and (probs.global_rows[:, 1] == 0).all()
    # The gradient with respect to the head mask (head-importance scores) is the same on both paths.
    grad_fused, = torch.autograd.grad(fused.sum(), head_mask)
    grad_unfused, = torch.autograd.grad(unfused.sum(), head_mask)
    torch.testing.assert_close(grad_unfused, grad_fused, atol=1e-5, rtol=1e-5)
    assert grad_fused[1] != 0


def test_dropout_is_applied_in_training_and_unbiased():
    p = 0.4
    module = _module(window=3, dropout=p)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1, 12, C, generator=gen)
    attention_mask, global_attention_mask = _masks(1, 12, "globals", gen)
    with torch.no_grad():
        module.eval()
        reference = module(x, attention_mask, global_attention_mask)
        module.train()
        torch.manual_seed(0)
        samples = torch.stack([module(x, attention_mask, global_attention_mask) for _ in range(300)])
        # Probabilities returned in training are those after dropout: kept ones scaled by 1/(1-p).
        _, probs = module(x, attention_mask, global_attention_mask, output_attentions=True)
        module.eval()
        _, clean = module(x, attention_mask, global_attention_mask, output_attentions=True)
    assert not torch.allclose(samples[0], reference)  # dropout is not ignored
    mean, std = samples.mean(0), samples.std(0)
    z = (mean - reference).abs() / (std / samples.shape[0] ** 0.5 + 1e-6)
    assert z.max() < 5.5, f"mean over dropout draws is off the eval output by {z.max():.1f} standard errors"
    for dropped, kept in ((probs.band, clean.band), (probs.global_rows, clean.global_rows)):
        nonzero = kept > 0
        zeroed = (dropped[nonzero] == 0).float().mean()
        assert abs(zeroed - p) < 0.08, f"fraction dropped {zeroed:.3f}, expected {p}"
        survivors = dropped[nonzero] != 0
        torch.testing.assert_close(dropped[nonzero][survivors], kept[nonzero][survivors] / (1 - p))


def test_no_dropout_in_eval_and_p0_in_training_is_fused():
    module = _module(window=2, dropout=0.0).train()
    x = torch.randn(2, 9, C)
    torch.testing.assert_close(module(x), module.eval()(x))


def test_fused_path_compiles_fullgraph():
    module = _module(window=(2, 1), dilation=[1, 2, 1]).eval()
    x = torch.randn(2, 11, C)
    attention_mask, global_attention_mask = _masks(2, 11, "mixed", torch.Generator().manual_seed(6))
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, attention_mask, global_attention_mask),
                               module(x, attention_mask, global_attention_mask))


def test_from_projections_shares_modules_and_names():
    linears = [torch.nn.Linear(C, C) for _ in range(6)]
    module = LongformerSelfAttention.from_projections(*linears, num_heads=H, attention_window=6)
    assert module.query is linears[0] and module.value_global is linears[5]
    assert module.window == (3, 3)
    assert sorted(n.split(".")[0] for n in module.state_dict()) == sorted(
        n for name in ("query", "key", "value", "query_global", "key_global", "value_global") for n in (name, name))
    assert longformer_ext.nn.LongformerSelfAttention is LongformerSelfAttention


@pytest.mark.parametrize("kwargs, match", [
    (dict(), "exactly one"),
    (dict(window=2, attention_window=4), "exactly one"),
    (dict(attention_window=5), "even"),
    (dict(attention_window=0), "even"),
    (dict(window=-1), ">= 0"),
    (dict(window=2.5), "window"),
    (dict(window=2, dilation=[1, 2]), "dilation"),
    (dict(window=2, dilation=0), "dilation"),
    (dict(window=2, dropout=1.0), "dropout"),
    (dict(window=2, causal=1), "causal"),
])
def test_bad_constructor_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LongformerSelfAttention(C, H, **kwargs)
    with pytest.raises(ValueError, match="multiple"):
        LongformerSelfAttention(25, H, window=2)


def test_bad_forward_args():
    module = _module()
    x = torch.randn(2, 7, C)
    with pytest.raises(ValueError, match="float"):
        module(x, attention_mask=torch.ones(2, 7))
    with pytest.raises(ValueError, match="float"):
        module(x, global_attention_mask=torch.zeros(2, 7))
    with pytest.raises(ValueError, match=r"\[B, N\]"):
        module(x, attention_mask=torch.ones(2, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="head_mask"):
        module(x, head_mask=torch.ones(4))
    with pytest.raises(ValueError, match="hidden_states"):
        module(torch.randn(2, 7, C + 1))
