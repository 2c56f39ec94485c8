"""The oracle's general op (docs/design.md §2.2) checked by the reductions that define it, each
against the oracle's own §2 computation (itself checked against the loop reference by
test_reference.py): packed sequences equal each sequence alone; queries inside a longer key
sequence equal the matching rows of the full computation; grouped KV heads equal repeated KV heads
(their gradients summed over the group); the lse of two disjoint key sets merges into the whole;
a sink rescales the row by sigmoid(lse - sink); the arguments that cannot work together raise."""

import random

import pytest
import torch

from longformer_ext.reference import dense_attention

DTYPE = torch.float64


def _heads(b, h, n, d, gen):
    return torch.randn(b, h, n, d, generator=gen, dtype=DTYPE)


def _masks(b, n, gen, padding=True, n_globals=2):
    real = torch.ones(b, n, dtype=torch.bool)
    if padding:
        real[:, n - 2:] = False
    glob = torch.zeros(b, n, dtype=torch.bool)
    for _ in range(n_globals):
        glob[:, int(torch.randint(0, n, (1,), generator=gen))] = True
    return real, glob


def _modes():
    """(window, dilation per head, causal, globals, projections, modifiers) combinations, seeded."""
    rng = random.Random(5)
    for i in range(8):
        window = rng.choice([2, (3, 1), (4, 0), 7])
        yield dict(window=window, dilation=[rng.choice([1, 2, 3]) for _ in range(4)], causal=i % 2 == 1,
                   globals=rng.choice([0, 1, 3]), projections=i % 3 == 0,
                   softcap=rng.choice([None, 1.5]), alibi=i % 4 == 2, sinks=i % 4 == 3)


def _kwargs(mode, gen, b, n, h_kv=4, with_masks=True):
    kw = dict(dilation=mode["dilation"], causal=mode["causal"], softcap=mode["softcap"])
    if with_masks:
        real, glob = _masks(b, n, gen, n_globals=mode["globals"])
        kw.update(attention_mask=real, global_attention_mask=glob if mode["globals"] else None)
        if mode["projections"] and mode["globals"]:
            kw.update(global_q=_heads(b, 4, n, 8, gen), global_k=_heads(b, h_kv, n, 8, gen),
                      global_v=_heads(b, h_kv, n, 8, gen))
    if mode["alibi"]:
        kw["alibi_slopes"] = torch.rand(4, generator=gen, dtype=DTYPE)
    if mode["sinks"]:
        kw["sinks"] = torch.randn(4, generator=gen, dtype=DTYPE)
    return kw


@pytest.mark.parametrize("mode", list(_modes()))
def test_packed_sequences_equal_each_sequence_alone(mode):
    gen = torch.Generator().manual_seed(1)
    bounds = [0, 7, 7, 20, 26]
    n = bounds[-1]
    q, k, v = (_heads(1, 4, n, 8, gen) for _ in range(3))
    kw = _kwargs(mode, gen, 1, n)
    packed, lse = dense_attention(q, k, v, mode["window"], cu_seqlens=torch.tensor(bounds), return_lse=True, **kw)
    for a, z in zip(bounds, bounds[1:]):
        piece = {name: (t[..., a:z, :] if name in ("global_q", "global_k", "global_v") else t[:, a:z])
                 if torch.is_tensor(t) and t.dim() >= 2 else t for name, t in kw.items()}
        alone, alone_lse = dense_attention(q[:, :, a:z], k[:, :, a:z], v[:, :, a:z], mode["window"],
                                           return_lse=True, **piece)
        torch.testing.assert_close(packed[:, :, a:z], alone, rtol=0, atol=1e-12)
        torch.testing.assert_close(lse[:, :, a:z], alone_lse, rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode", list(_modes()))
def test_queries_inside_longer_keys_equal_the_rows_of_the_full_computation(mode):
    gen = torch.Generator().manual_seed(2)
    n = 24
    q, k, v = (_heads(2, 4, n, 8, gen) for _ in range(3))
    kw = _kwargs(mode, gen, 2, n)
    full, full_lse = dense_attention(q, k, v, mode["window"], return_lse=True, **kw)
    rows = {name: t for name, t in kw.items()}
    for start, count, given in [(n - 5, 5, None), (n - 1, 1, None), (6, 9, 6), (0, 4, 0)]:
        part = dict(rows)
        if "global_q" in part:
            part["global_q"] = kw["global_q"][:, :, start:start + count]
        out, lse = dense_attention(q[:, :, start:start + count], k, v, mode["window"], q_offset=given,
                                   return_lse=True, **part)
        torch.testing.assert_close(out, full[:, :, start:start + count], rtol=0, atol=1e-12)
        torch.testing.assert_close(lse, full_lse[:, :, start:start + count], rtol=0, atol=1e-12)


@pytest.mark.parametrize("h_kv", [1, 2])
@pytest.mark.parametrize("mode", list(_modes())[:4])
def test_grouped_kv_heads_equal_repeated_heads_and_sum_their_gradients(mode, h_kv):
    gen = torch.Generator().manual_seed(3)
    n, group = 18, 4 // h_kv
    q = _heads(1, 4, n, 8, gen).requires_grad_()
    k, v = (_heads(1, h_kv, n, 8, gen).requires_grad_() for _ in range(2))
    kw = _kwargs(mode, gen, 1, n, h_kv=h_kv)
    out = dense_attention(q, k, v, mode["window"], **kw)
    kr, vr = (t.detach().repeat_interleave(group, dim=1).requires_grad_() for t in (k, v))
    kw_repeated = {name: (t.repeat_interleave(group, dim=1) if name in ("global_k", "global_v") else t)
                   for name, t in kw.items()}
    repeated = dense_attention(q, kr, vr, mode["window"], **kw_repeated)
    torch.testing.assert_close(out, repeated, rtol=0, atol=1e-12)
    grad = torch.randn(out.shape, generator=gen, dtype=DTYPE)
    gk, gv = torch.autograd.grad(out, (k, v), grad)
    gkr, gvr = torch.autograd.grad(repeated, (kr, vr), grad)
    torch.testing.assert_close(gk, gkr.unflatten(1, (h_kv, group)).sum(2), rtol=0, atol=1e-12)
    torch.testing.assert_close(gv, gvr.unflatten(1, (h_kv, group)).sum(2), rtol=0, atol=1e-12)


@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("h_kv", [4, 2])
def test_lse_merges_two_disjoint_key_sets(softcap, h_kv):
    """With a window over every key, the keys [0, m) and [m, Nk) seen apart merge into all of them:
    out = (e^lse1 out1 + e^lse2 out2) / (e^lse1 + e^lse2), lse = logaddexp(lse1, lse2)."""
    gen = torch.Generator().manual_seed(4)
    nq, nk, m = 5, 20, 8
    q = _heads(2, 4, nq, 8, gen)
    k, v = (_heads(2, h_kv, nk, 8, gen) for _ in range(2))
    kw = dict(q_offset=0, softcap=softcap, return_lse=True)
    whole, whole_lse = dense_attention(q, k, v, nk, **kw)
    first, lse1 = dense_attention(q, k[:, :, :m], v[:, :, :m], nk, **kw)
    second, lse2 = dense_attention(q, k[:, :, m:], v[:, :, m:], nk, **kw)
    lse = torch.logaddexp(lse1, lse2)
    merged = (torch.exp(lse1 - lse)[..., None] * first + torch.exp(lse2 - lse)[..., None] * second)
    torch.testing.assert_close(merged, whole, rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, whole_lse, rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode", list(_modes()))
def test_a_sink_rescales_each_row(mode):
    """out with sink = out without * sigmoid(lse - sink), lse with sink = logaddexp(lse, sink); a
    real row without keys outputs 0 with lse = sink; padding rows stay 0 with lse -inf."""
    gen = torch.Generator().manual_seed(6)
    n = 16
    q, k, v = (_heads(2, 4, n, 8, gen) for _ in range(3))
    kw = _kwargs(dict(mode, sinks=False), gen, 2, n)
    sinks = torch.randn(4, generator=gen, dtype=DTYPE)
    plain, plain_lse = dense_attention(q, k, v, mode["window"], return_lse=True, **kw)
    sunk, sunk_lse = dense_attention(q, k, v, mode["window"], sinks=sinks, return_lse=True, **kw)
    real_row = plain_lse > float("-inf")
    s = sinks[None, :, None].expand_as(plain_lse)
    torch.testing.assert_close(sunk, plain * torch.sigmoid(plain_lse - s)[..., None].nan_to_num(0.0), rtol=0,
                               atol=1e-12)
    torch.testing.assert_close(sunk_lse[real_row], torch.logaddexp(plain_lse, s)[real_row], rtol=0, atol=1e-12)
    padding = ~kw["attention_mask"][:, None, :].expand_as(plain_lse)
    assert torch.all(sunk_lse[padding] == float("-inf")) and torch.all(sunk[padding] == 0)


def test_sinks_softcap_alibi_have_gradients():
    gen = torch.Generator().manual_seed(7)
    q, k, v = (_heads(1, 4, 10, 4, gen).requires_grad_() for _ in range(3))
    sinks = torch.randn(4, generator=gen, dtype=DTYPE).requires_grad_()
    slopes = torch.rand(4, generator=gen, dtype=DTYPE)
    real, glob = _masks(1, 10, gen)

    def f(q, k, v, sinks):
        out, lse = dense_attention(q, k, v, (3, 2), dilation=[1, 2, 1, 3], attention_mask=real,
                                   global_attention_mask=glob, causal=True, softcap=2.0, alibi_slopes=slopes,
                                   sinks=sinks, return_lse=True)
        return out, lse.masked_fill(lse == float("-inf"), 0.0)

    assert torch.autograd.gradcheck(f, (q, k, v, sinks))


def test_alibi_is_the_distance_bias_and_softcap_bounds_the_scores():
    """ALiBi: with one key per row beside the diagonal, scores differ from plain ones by exactly
    -slope * distance (seen through lse); softcap c: |score| < c, so a huge scale saturates."""
    gen = torch.Generator().manual_seed(8)
    q, k, v = (_heads(1, 4, 12, 4, gen) for _ in range(3))
    slopes = torch.tensor([0.5, 1.0, 0.25, 2.0], dtype=DTYPE)
    _, plain = dense_attention(q, k, v, (0, 0), return_lse=True)
    _, biased = dense_attention(q, k, v, (0, 0), alibi_slopes=slopes, return_lse=True)
    torch.testing.assert_close(biased, plain, rtol=0, atol=1e-12)  # the diagonal: distance 0
    _, plain = dense_attention(q, k, v, (2, 0), dilation=[2, 2, 2, 2], causal=True, return_lse=True)
    _, biased = dense_attention(q, k, v, (2, 0), dilation=[2, 2, 2, 2], causal=True, alibi_slopes=slopes,
                                return_lse=True)
    assert torch.all(biased[..., 2:] < plain[..., 2:])  # rows with keys at distance 2 and 4 lose mass
    _, capped = dense_attention(q, k, v, (0, 0), softcap=0.5, scale=1e6, return_lse=True)
    assert torch.all(capped.abs() <= 0.5 + 1e-12)


BAD = {
    "heads not a multiple": (dict(k=(1, 3, 10, 8)), ValueError, "multiple"),
    "fewer keys than queries": (dict(q=(1, 4, 12, 8)), ValueError, "fewer than"),
    "q_offset too large": (dict(q=(1, 4, 6, 8), q_offset=5), ValueError, "q_offset"),
    "cu_seqlens with Nq < Nk": (dict(q=(1, 4, 6, 8), cu_seqlens=[0, 4, 10]), ValueError, "cu_seqlens.*Nq = 6.*Nk"),
    "cu_seqlens with q_offset": (dict(cu_seqlens=[0, 4, 10], q_offset=2), ValueError, "cu_seqlens and q_offset"),
    "cu_seqlens not rising": (dict(cu_seqlens=[0, 6, 4, 10]), ValueError, "rise"),
    "cu_seqlens with B > 1": (dict(q=(2, 4, 10, 8), k=(2, 4, 10, 8), cu_seqlens=[0, 10]), ValueError, "B == 1"),
    "softcap 0": (dict(softcap=0.0), ValueError, "softcap"),
    "sinks per head": (dict(sinks=torch.zeros(3, dtype=DTYPE)), ValueError, "sinks"),
    "mask over the queries": (dict(q=(1, 4, 6, 8), attention_mask=torch.ones(1, 6, dtype=torch.bool)), ValueError,
                              r"\[B, N\] = \[1, 10\]"),
}


@pytest.mark.parametrize("case", BAD.values(), ids=BAD.keys())
def test_general_arguments_that_cannot_work_raise(case):
    changes, error, match = case
    gen = torch.Generator().manual_seed(9)
    q = _heads(*changes.pop("q", (1, 4, 10, 8)), gen)
    k = _heads(*changes.pop("k", (1, 4, 10, 8)), gen)
    if "cu_seqlens" in changes:
        changes["cu_seqlens"] = torch.tensor(changes["cu_seqlens"])
    with pytest.raises(error, match=match):
        dense_attention(q, k, k, 2, **changes)


@pytest.mark.parametrize("mode", list(_modes()))
@pytest.mark.parametrize("layout", ["gqa", "longer keys", "packed"])
def test_loop_reference_agrees_with_the_oracle(mode, layout):
    """The loop reference, written apart from the oracle, on every extension at once."""
    from longformer_ext.reference import loop_attention

    gen = torch.Generator().manual_seed(10)
    n, h_kv = 13, (2 if layout == "gqa" else 4)
    q = _heads(1, 4, n, 4, gen)
    k, v = (_heads(1, h_kv, n, 4, gen) for _ in range(2))
    kw = _kwargs(mode, gen, 1, n, h_kv=h_kv)
    kw["global_q"] = kw["global_q"][..., :4] if "global_q" in kw else None
    kw["global_k"] = kw["global_k"][..., :4] if "global_k" in kw else None
    kw["global_v"] = kw["global_v"][..., :4] if "global_v" in kw else None
    if layout == "longer keys":
        q = q[:, :, 8:]
        kw["global_q"] = kw["global_q"][:, :, 8:] if kw["global_q"] is not None else None
    if layout == "packed":
        kw["cu_seqlens"] = torch.tensor([0, 5, 13])
    expected, expected_lse = dense_attention(q, k, v, mode["window"], return_lse=True, **kw)
    out, lse = loop_attention(q, k, v, mode["window"], return_lse=True, **kw)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, expected_lse, rtol=0, atol=1e-12)
