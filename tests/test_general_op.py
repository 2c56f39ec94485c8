"""The general sliding-window op (docs/design.md §2.2) on the fused CPU kernels: a seeded sweep of
every general argument, alone and combined with dilation, causal and asymmetric windows, global
tokens (with and without projections) and padding, against the float64 oracle (outputs, lse and
every gradient, the sinks' among them), on the CPU kernels and (a subset) on the CUDA kernels through
the host emulation; the reductions that define the arguments, on the kernels;
gradcheck, opcheck, torch.compile and torch.export with the new arguments; errors. (That the lse
merges two disjoint key sets exactly is the oracle's property, tests/test_reference_general.py; the
sweep holds the kernels' lse to the oracle's.)

LONGFORMER_GENERAL_SWEEP_COUNT sets the sweep's size (default 80), LONGFORMER_SEED its seed."""

import os
import random

import pytest
import torch

from conftest import SEED, TOLERANCE, assert_close_to_oracle, load_emulation_or_skip
from longformer_ext import longformer_attention
from longformer_ext.reference import dense_attention
from longformer_ext.testing import cuda_emulation

SWEEP_COUNT = int(os.environ.get("LONGFORMER_GENERAL_SWEEP_COUNT", "80"))
FEATURES = ("gqa", "q_offset", "cu_seqlens", "softcap", "alibi", "sinks", "lse")


def _draw_case(index):
    """One random case: each general feature on with probability 1/3 (every feature alone in the
    first cases), over random windows, dilations, roles, dtypes and layouts."""
    rng = random.Random(SEED * 100003 + index)
    if index < len(FEATURES):
        features = {FEATURES[index]}
    else:
        features = {f for f in FEATURES if rng.random() < 1 / 3}
    packed = "cu_seqlens" in features
    h = rng.choice([2, 4, 6])
    h_kv = rng.choice([d for d in range(1, h) if h % d == 0]) if "gqa" in features else h
    nk = rng.choice([1, 5, 17, 40, 97, 150])
    nq = nk if packed else (rng.randint(1, nk) if "q_offset" in features else nk)
    left, right = rng.choice([(0, 0), (1, 1), (3, 2), (5, 0), (2, 7), (16, 16), (200, 3)])
    return dict(
        index=index, features=features, b=1 if packed else rng.choice([1, 2, 3]), h=h, h_kv=h_kv, nq=nq, nk=nk,
        d=rng.choice([1, 8, 16, 33]), window=(left, right), dilation=[rng.choice([1, 1, 2, 3]) for _ in range(h)],
        causal=rng.random() < 0.4, globals=rng.choice(["none", "none", "some", "many"]),
        projections=rng.random() < 0.3, padding=rng.random() < 0.5,
        q_offset=rng.choice([None, "explicit"]) if "q_offset" in features else None,
        dtype=rng.choice([torch.float32, torch.float32, torch.float64, torch.bfloat16, torch.float16]),
        head_split=rng.random() < 0.5, seed=rng.randrange(1 << 30), rng=rng)


def _case_id(c):
    return (f"{c['index']}-{'+'.join(sorted(c['features'])) or 'plain'}-B{c['b']}H{c['h']}/{c['h_kv']}"
            f"-N{c['nq']}/{c['nk']}-w{c['window']}{'-causal' if c['causal'] else ''}-g{c['globals']}"
            f"{'-proj' if c['projections'] else ''}{'-pad' if c['padding'] else ''}-{str(c['dtype'])[6:]}")


def _heads(b, h, n, d, dtype, gen, head_split):
    if head_split:  # a head-split view of a [B, N, H * D] projection: rows H * D apart
        return torch.randn(b, n, h * d, generator=gen).to(dtype).view(b, n, h, d).transpose(1, 2)
    return torch.randn(b, h, n, d, generator=gen).to(dtype)


def _build(c):
    """Inputs of case c: (q, k, v, window, kwargs), the differentiable leaves and their names."""
    gen = torch.Generator().manual_seed(c["seed"])
    rng, b, nk, dtype = c["rng"], c["b"], c["nk"], c["dtype"]
    q = _heads(b, c["h"], c["nq"], c["d"], dtype, gen, c["head_split"])
    k, v = (_heads(b, c["h_kv"], nk, c["d"], dtype, gen, c["head_split"]) for _ in range(2))
    kw = dict(dilation=c["dilation"], causal=c["causal"])
    features = c["features"]
    if "cu_seqlens" in features:
        cuts = sorted(rng.randint(0, nk) for _ in range(rng.randint(0, 4)))
        kw["cu_seqlens"] = torch.tensor([0, *cuts, nk], dtype=rng.choice([torch.int32, torch.int64]))
    if c["q_offset"] == "explicit":
        kw["q_offset"] = rng.randint(0, nk - c["nq"])
    if c["padding"]:
        kw["attention_mask"] = torch.rand(b, nk, generator=gen) > 0.2
    if c["globals"] != "none":
        kw["global_attention_mask"] = torch.rand(b, nk, generator=gen) < (0.1 if c["globals"] == "some" else 0.5)
        if c["projections"]:
            kw["global_q"] = _heads(b, c["h"], c["nq"], c["d"], dtype, gen, False)
            kw["global_k"], kw["global_v"] = (_heads(b, c["h_kv"], nk, c["d"], dtype, gen, False) for _ in range(2))
    if "softcap" in features:
        kw["softcap"] = rng.choice([0.5, 2.0, 20.0])
    if "alibi" in features:
        kw["alibi_slopes"] = torch.rand(c["h"], generator=gen)
    if "sinks" in features:  # a learnable [H] parameter, float32 or the inputs' dtype
        kw["sinks"] = (torch.randn(c["h"], generator=gen) * 2).to(rng.choice([torch.float32, dtype]))
    names = ["q", "k", "v"] + [n for n in ("global_q", "global_k", "global_v", "sinks") if n in kw]
    leaves = [q, k, v] + [kw[n] for n in names[3:]]
    return q, k, v, c["window"], kw, names, [t.requires_grad_() for t in leaves]


def _oracle(q, k, v, window, kw, names):
    """The oracle on float64 leaf copies: (out, lse, leaves)."""
    copies = [t.detach().double().requires_grad_() for t in [q, k, v] + [kw[n] for n in names[3:]]]
    okw = dict(kw, **dict(zip(names[3:], copies[3:])))
    out, lse = dense_attention(*copies[:3], window, return_lse=True, **okw)
    return out, lse, copies


def _lse_loss_weights(lse, gen):
    """Random weights for lse in the loss, 0 where lse is -inf (no gradient can flow there)."""
    return torch.randn(lse.shape, generator=gen, dtype=torch.float64) * torch.isfinite(lse)


CASES = [_draw_case(i) for i in range(SWEEP_COUNT)]


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_general_op_matches_oracle(case):
    _check_against_oracle(case)


# The CUDA kernels through the host emulation (slow: a subset of the cases, on their own seeds).
EMULATED_CASES = [_draw_case(10_000 + i) for i in range(SWEEP_COUNT // 2)]


@pytest.mark.parametrize("case", EMULATED_CASES, ids=_case_id)
def test_emulated_cuda_general_op_matches_oracle(case):
    load_emulation_or_skip()
    with cuda_emulation():  # forward and backward both on the emulated kernels
        _check_against_oracle(case)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("path", ["mma", "simt"])
def test_emulated_grouped_kv_heads_on_both_cuda_paths(dtype, path, monkeypatch):
    """Grouped KV heads with no other general argument run on the tiled CUDA kernels, one slice of
    query heads per group member (csrc/cuda/kv_group_slices.h), and on the SIMT kernels as one call:
    both against the oracle, with per-head dilations that differ inside each group, global rows
    (with and without projections), padding, causal windows and the lse's gradient."""
    load_emulation_or_skip()
    monkeypatch.setenv("LONGFORMER_CUDA_FORWARD", path)
    monkeypatch.setenv("LONGFORMER_CUDA_BACKWARD", path)
    shapes = [(4, 2, [1, 2, 3, 1], False, False), (6, 2, [2, 1, 1, 3, 1, 2], True, True), (4, 1, [1, 3, 2, 1], True, False)]
    for i, (h, h_kv, dilation, projections, causal) in enumerate(shapes):
        case = dict(index=i, features={"gqa", "lse"}, b=2, h=h, h_kv=h_kv, nq=70, nk=70, d=16, window=(5, 3),
                    dilation=dilation, causal=causal, globals="some", projections=projections, padding=True,
                    q_offset=None, dtype=dtype, head_split=True, seed=500 + i, rng=random.Random(i))
        with cuda_emulation():
            _check_against_oracle(case)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("path", ["mma", "simt"])
def test_emulated_softcap_on_both_cuda_forwards(dtype, path, monkeypatch):
    """softcap on the tiled CUDA forward (local rows; global rows written whole and, at N = 600,
    split into chunks) and on the SIMT one, against the oracle (the backward on
    the default path); with grouped KV heads (the slices of query heads), and with sinks."""
    load_emulation_or_skip()
    monkeypatch.setenv("LONGFORMER_CUDA_FORWARD", path)
    shapes = [(2, 2, 70, {"softcap", "lse"}, False), (4, 2, 70, {"softcap", "gqa"}, True),
              (2, 2, 600, {"softcap"}, True), (4, 1, 90, {"softcap", "sinks", "gqa"}, False)]
    for i, (h, h_kv, n, features, causal) in enumerate(shapes):
        case = dict(index=i, features=features, b=2, h=h, h_kv=h_kv, nq=n, nk=n, d=40, window=(4, 2),
                    dilation=[1, 2, 1, 3][:h], causal=causal, globals="some", projections=i % 2 == 0, padding=True,
                    q_offset=None, dtype=dtype, head_split=True, seed=700 + i, rng=random.Random(50 + i))
        with cuda_emulation():
            _check_against_oracle(case)


# The general op on the tiled CUDA kernels (padded head dims 32, 64 and 128): each argument, alone
# and combined, forward and backward, with dilation, causal windows, global tokens and padding.
TILED_GENERAL_CASES = [
    # features, batch, heads / KV heads, Nq / Nk, head dim, window, causal, dilation
    ({"q_offset"}, 2, (4, 4), (60, 150), 40, (6, 3), False, [1, 2, 3, 1]),
    ({"q_offset", "gqa", "lse"}, 2, (4, 2), (70, 150), 24, (9, 0), True, [1, 2, 1, 3]),
    ({"cu_seqlens"}, 1, (4, 4), (150, 150), 40, (7, 5), False, [1, 3, 2, 1]),
    ({"cu_seqlens", "gqa", "softcap"}, 1, (4, 1), (150, 150), 32, (12, 0), True, [2, 1, 1, 3]),
    ({"softcap", "alibi", "lse"}, 2, (4, 4), (90, 90), 72, (5, 8), False, [1, 2, 1, 2]),
    ({"sinks", "alibi"}, 2, (4, 4), (90, 90), 16, (10, 0), True, [3, 1, 2, 1]),
    ({"sinks", "q_offset", "softcap"}, 2, (4, 4), (33, 120), 40, (200, 3), False, [1, 1, 2, 2]),
    ({"cu_seqlens", "softcap", "alibi", "sinks", "lse"}, 1, (4, 4), (160, 160), 28, (16, 16), False, [1, 2, 3, 1]),
    ({"gqa", "sinks", "alibi", "lse"}, 2, (6, 2), (80, 80), 40, (7, 0), True, [1, 2, 3, 2, 1, 1]),
    ({"gqa", "sinks", "q_offset", "softcap"}, 2, (4, 2), (50, 130), 8, (20, 20), False, [2, 1, 1, 3]),
    # global rows whose keys are split over chunks (N = 600), combined with their sink by SIMT
    ({"sinks", "alibi", "q_offset", "lse"}, 1, (2, 2), (300, 600), 40, (8, 8), False, [1, 2]),
    ({"sinks", "softcap", "cu_seqlens"}, 1, (2, 2), (600, 600), 32, (8, 8), False, [1, 2]),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("index", range(len(TILED_GENERAL_CASES)))
def test_emulated_general_op_on_the_tiled_cuda_kernels(index, dtype, monkeypatch):
    """Every general argument on the tiled CUDA kernels (csrc/cuda/*_mma.cu, their kGeneral
    instantiations) and on the SIMT ones, forward and backward, against the oracle. In bfloat16 the
    two paths must also differ bitwise (the tiled kernels round P to 16 bits), which shows the
    tiled kernels ran rather than declining the call to SIMT."""
    load_emulation_or_skip()
    features, b, (h, h_kv), (nq, nk), d, window, causal, dilation = TILED_GENERAL_CASES[index]
    results = {}
    for path in ("mma", "simt"):
        monkeypatch.setenv("LONGFORMER_CUDA_FORWARD", path)
        monkeypatch.setenv("LONGFORMER_CUDA_BACKWARD", path)
        case = dict(index=index, features=features, b=b, h=h, h_kv=h_kv, nq=nq, nk=nk, d=d, window=window,
                    dilation=dilation, causal=causal, globals="some", projections=index % 2 == 1, padding=True,
                    q_offset="explicit" if "q_offset" in features and index % 2 == 0 else None, dtype=dtype,
                    head_split=index % 3 == 0, seed=900 + index, rng=random.Random(90 + index))
        with cuda_emulation():
            results[path] = _check_against_oracle(case)
    if dtype == torch.bfloat16:
        (out_mma, grads_mma), (out_simt, grads_simt) = results["mma"], results["simt"]
        assert not torch.equal(out_mma, out_simt), "the tiled forward did not run"
        assert not torch.equal(grads_mma[0], grads_simt[0]), "the tiled backward did not run"


def _has_cuda_kernels():
    try:
        from longformer_ext import _build_info
    except ImportError:
        return False
    return torch.cuda.is_available() and _build_info.CUDA_MAJOR is not None


@pytest.mark.skipif(not _has_cuda_kernels(), reason="needs a GPU and a CUDA build of longformer_ext")
@pytest.mark.parametrize("case", EMULATED_CASES, ids=_case_id)
def test_cuda_general_op_matches_oracle(case):
    _check_against_oracle(case, device="cuda")


def _to_device(device, q, k, v, kw, names, leaves):
    """The case's inputs on `device`, its differentiable ones as new leaves there."""
    moved = {name: t.detach().to(device).requires_grad_() for name, t in zip(names, leaves)}
    kw = {key: moved.get(key, val.to(device)) if torch.is_tensor(val) else val for key, val in kw.items()}
    return moved["q"], moved["k"], moved["v"], kw, [moved[name] for name in names]


def _check_against_oracle(case, device="cpu"):
    q, k, v, window, kw, names, leaves = _build(case)
    if device != "cpu":
        q, k, v, kw, leaves = _to_device(device, q, k, v, kw, names, leaves)
    with_lse = "lse" in case["features"] or "sinks" in case["features"]
    result = longformer_attention(q, k, v, window, return_lse=with_lse, **kw)
    out, lse = result if with_lse else (result, None)
    expected, expected_lse, copies = _oracle(q, k, v, window, kw, names)
    dtype = case["dtype"]
    assert out.shape == q.shape and out.dtype == dtype and out.transpose(1, 2).is_contiguous()
    assert_close_to_oracle(out, expected, dtype, "output")

    gen = torch.Generator().manual_seed(case["seed"] + 1)
    grad = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    loss, expected_loss = (out.double() * grad).sum(), (expected * grad).sum()
    if with_lse:
        assert lse.shape == q.shape[:3] and lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert torch.equal(torch.isinf(lse), torch.isinf(expected_lse)), "lse: -inf rows differ"
        finite = torch.isfinite(expected_lse)
        assert_close_to_oracle(lse[finite], expected_lse[finite], torch.float32 if dtype != torch.float64 else dtype,
                               "lse")
        weights = _lse_loss_weights(expected_lse, gen)
        loss = loss + (torch.where(finite, lse.double(), 0.0) * weights).sum()
        expected_loss = expected_loss + (torch.where(finite, expected_lse, 0.0) * weights).sum()
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    expected_grads = torch.autograd.grad(expected_loss, copies, allow_unused=True)
    for name, g, eg in zip(names, grads, expected_grads):
        assert g is not None and g.shape == eg.shape, f"grad {name}: missing or misshapen"
        assert torch.isfinite(g).all(), f"grad {name} has non-finite values"
        # A sink's gradient sums over every row of its head (B * Nq of them), each row's term
        # carrying its own rounding: the bound grows with the square root of their number.
        # Its gradient comes back in its own dtype, which may be coarser than the inputs'.
        tol = max(TOLERANCE[dtype], TOLERANCE[g.dtype]) * (
            max(1.0, (q.shape[0] * q.shape[2]) ** 0.5) if name == "sinks" else 1.0)
        err = (g.double() - eg).abs().max().item() if eg.numel() else 0.0
        assert err <= tol * (1 + eg.abs().max().item()), f"grad {name}: max abs error {err:.3e} ({dtype})"
    return out, grads


# ---------------------------------------------------------------------------------------------
# The reductions that define the arguments, on the kernels (float32)


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_packed_sequences_equal_each_sequence_alone():
    bounds = [0, 9, 9, 40, 47]
    h, d, n = 4, 16, bounds[-1]
    q, k, v = (_rand(1, h, n, d, seed=s) for s in range(3))
    glob = torch.zeros(1, n, dtype=torch.bool)
    glob[0, [3, 20, 45]] = True
    kw = dict(dilation=[1, 2, 3, 1], causal=False, softcap=3.0, sinks=_rand(h, seed=5))
    packed = longformer_attention(q, k, v, (5, 3), cu_seqlens=torch.tensor(bounds), global_attention_mask=glob, **kw)
    for a, z in zip(bounds, bounds[1:]):
        if a == z:
            continue
        alone = longformer_attention(q[:, :, a:z], k[:, :, a:z], v[:, :, a:z], (5, 3),
                                     global_attention_mask=glob[:, a:z], **kw)
        torch.testing.assert_close(packed[:, :, a:z], alone, rtol=1e-5, atol=1e-6)


def test_queries_inside_longer_keys_equal_the_last_rows():
    h, d, nk, nq = 4, 8, 60, 7
    q, k, v = (_rand(2, h, nk, d, seed=s) for s in range(3))
    glob = torch.zeros(2, nk, dtype=torch.bool)
    glob[:, [2, 30]] = True
    kw = dict(dilation=[1, 2, 1, 4], causal=True, global_attention_mask=glob, alibi_slopes=_rand(h, seed=4).abs())
    full, full_lse = longformer_attention(q, k, v, (6, 0), return_lse=True, **kw)
    last, last_lse = longformer_attention(q[:, :, -nq:], k, v, (6, 0), return_lse=True, **kw)
    torch.testing.assert_close(last, full[:, :, -nq:], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(last_lse, full_lse[:, :, -nq:], rtol=1e-5, atol=1e-6)
    middle = longformer_attention(q[:, :, 20:20 + nq], k, v, (6, 0), q_offset=20, **kw)
    torch.testing.assert_close(middle, full[:, :, 20:20 + nq], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("nq", [1, 3, 30])
def test_grouped_heads_sharing_tiles_match_oracle(nq):
    """A KV group's query heads with one dilation share their tiles in the CPU forward (8 heads: 8
    queries of each per tile): one query (decoding), a few, and several tiles' worth, with padding,
    global keys, ALiBi and sinks (per head, so per row of a shared tile), against the oracle."""
    h, h_kv, d, nk = 16, 2, 8, 41
    gen = torch.Generator().manual_seed(nq)
    q = torch.randn(2, h, nq, d, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(2, h_kv, nk, d, generator=gen, dtype=torch.float64) for _ in range(2))
    real = torch.rand(2, nk, generator=gen) > 0.1
    glob = torch.zeros(2, nk, dtype=torch.bool)
    glob[:, [4, 20]] = True
    kw = dict(dilation=[2] * 8 + [1] * 8, causal=True, attention_mask=real, global_attention_mask=glob,
              alibi_slopes=torch.rand(h, generator=gen, dtype=torch.float64),
              sinks=torch.randn(h, generator=gen, dtype=torch.float64))
    out, lse = longformer_attention(q, k, v, (9, 0), return_lse=True, **kw)
    expected, expected_lse = dense_attention(q, k, v, (9, 0), return_lse=True, **kw)
    assert_close_to_oracle(out, expected, torch.float64, "output")
    assert torch.equal(torch.isinf(lse), torch.isinf(expected_lse))
    finite = torch.isfinite(expected_lse)
    assert_close_to_oracle(lse[finite], expected_lse[finite], torch.float64, "lse")


def test_grouped_kv_heads_equal_repeated_heads_with_gradients_summed():
    h, h_kv, d, n = 6, 2, 8, 45
    q = _rand(2, h, n, d, seed=0).requires_grad_()
    k, v = (_rand(2, h_kv, n, d, seed=s).requires_grad_() for s in (1, 2))
    glob = torch.zeros(2, n, dtype=torch.bool)
    glob[:, [0, 17]] = True
    kw = dict(dilation=[1, 2, 3, 1, 2, 3], global_attention_mask=glob)
    out = longformer_attention(q, k, v, 4, **kw)
    k_rep, v_rep = (t.detach().repeat_interleave(h // h_kv, dim=1).requires_grad_() for t in (k, v))
    expected = longformer_attention(q.detach(), k_rep, v_rep, 4, **kw)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    grad = _rand(*out.shape, seed=9)
    dk, dv = torch.autograd.grad(out, (k, v), grad)
    dk_rep, dv_rep = torch.autograd.grad(expected, (k_rep, v_rep), grad)
    torch.testing.assert_close(dk, dk_rep.view(2, h_kv, h // h_kv, n, d).sum(2), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dv, dv_rep.view(2, h_kv, h // h_kv, n, d).sum(2), rtol=1e-5, atol=1e-6)
    # The group sums run in a fixed order: the backward is bitwise repeatable.
    again = torch.autograd.grad(longformer_attention(q, k, v, 4, **kw), (k, v), grad)
    assert torch.equal(again[0], dk) and torch.equal(again[1], dv)


# ---------------------------------------------------------------------------------------------
# gradcheck, opcheck, compile, export


def test_gradcheck_every_general_argument():
    gen = torch.Generator().manual_seed(2)
    b, h, h_kv, nq, nk, d = 1, 4, 2, 5, 9, 3
    q = torch.randn(b, h, nq, d, generator=gen, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(b, h_kv, nk, d, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    sinks = torch.randn(h, generator=gen, dtype=torch.float64, requires_grad=True)
    glob = torch.zeros(b, nk, dtype=torch.bool)
    glob[0, [1, 7]] = True

    def f(q, k, v, sinks):
        out, lse = longformer_attention(q, k, v, (2, 1), dilation=[1, 2, 1, 3], global_attention_mask=glob,
                                        q_offset=3, softcap=1.5, alibi_slopes=torch.tensor([0.1, 0.2, 0.3, 0.4],
                                                                                           dtype=torch.float64),
                                        sinks=sinks, return_lse=True)
        return out, lse

    torch.autograd.gradcheck(f, (q, k, v, sinks))


def test_gradcheck_packed_sequences():
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 10, 3, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))

    def f(q, k, v):
        return longformer_attention(q, k, v, (2, 2), dilation=[1, 2], causal=True,
                                    cu_seqlens=torch.tensor([0, 4, 10], dtype=torch.int32), return_lse=True)

    torch.autograd.gradcheck(f, (q, k, v))


def test_opcheck_with_general_arguments():
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(2, 4, 6, 8, generator=gen, requires_grad=True)
    k, v = (torch.randn(2, 2, 11, 8, generator=gen, requires_grad=True) for _ in range(2))
    glob = torch.zeros(2, 11, dtype=torch.bool)
    glob[:, 7] = True
    sinks = torch.randn(4, generator=gen, requires_grad=True)
    slopes = torch.rand(4, generator=gen)
    args = (q, k, v, 3, 0, [1, 2, 1, 1], None, glob, True, 0.3, None, None, None, False, 2, None, 1.5, slopes,
            sinks)
    torch.library.opcheck(torch.ops.longformer.banded_attn, args)
    out, lse = torch.ops.longformer.banded_attn(*args)
    backward_args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), 3, 0,
                     [1, 2, 1, 1], None, glob, True, 0.3, None, None, None, False, 2, None, 1.5, slopes,
                     sinks.detach(), torch.randn_like(lse))
    torch.library.opcheck(torch.ops.longformer.banded_attn_backward, backward_args)
    qp, kp, vp = (torch.randn(1, 2, 13, 4, generator=gen, requires_grad=True) for _ in range(3))
    packed = (qp, kp, vp, 2, 2, [1, 2], None, None, False, 0.5, None, None, None, False, -1,
              torch.tensor([0, 5, 13]), 0.0, None, None)
    torch.library.opcheck(torch.ops.longformer.banded_attn, packed)


def _decode_step(q, k, v, sinks, cu):
    out, lse = longformer_attention(q, k, v, (8, 0), dilation=[1, 2, 1, 2], causal=True, softcap=5.0, sinks=sinks,
                                    return_lse=True)
    packed = longformer_attention(k.repeat_interleave(2, dim=1)[:1], k[:1], v[:1], 3, cu_seqlens=cu)
    return out, lse, packed


def test_compile_fullgraph_dynamic_with_general_arguments():
    torch._dynamo.reset()
    compiled = torch.compile(_decode_step, fullgraph=True, dynamic=True)
    sinks = _rand(4, seed=1).requires_grad_()
    for nk, cut in ((20, 7), (33, 12), (50, 31)):
        q = _rand(2, 4, 3, 8, seed=nk).requires_grad_()
        k, v = (_rand(2, 2, nk, 8, seed=nk + s).requires_grad_() for s in (1, 2))
        cu = torch.tensor([0, cut, nk])
        got, expected = compiled(q, k, v, sinks, cu), _decode_step(q, k, v, sinks, cu)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=0, atol=0)
        loss = lambda r: r[0].square().sum() + r[1].sum() + r[2].square().sum()  # noqa: E731
        grads = torch.autograd.grad(loss(got), (q, k, v, sinks))
        expected_grads = torch.autograd.grad(loss(expected), (q, k, v, sinks))
        for g, e in zip(grads, expected_grads):
            torch.testing.assert_close(g, e, rtol=0, atol=0)


class _GroupedDecoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.sinks = torch.nn.Parameter(torch.zeros(4))

    def forward(self, q, k, v):
        return longformer_attention(q, k, v, (6, 0), causal=True, sinks=self.sinks, softcap=4.0,
                                    alibi_slopes=torch.full((4,), 0.25))


def test_export_with_general_arguments():
    module = _GroupedDecoder().eval()
    nk = torch.export.Dim("nk", min=4, max=4096)
    q, k, v = _rand(1, 4, 2, 8, seed=0), _rand(1, 2, 30, 8, seed=1), _rand(1, 2, 30, 8, seed=2)
    exported = torch.export.export(module, (q, k, v), dynamic_shapes=(None, {2: nk}, {2: nk}))
    for length in (30, 51):
        k2, v2 = _rand(1, 2, length, 8, seed=length), _rand(1, 2, length, 8, seed=length + 1)
        torch.testing.assert_close(exported.module()(q, k2, v2), module(q, k2, v2), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Errors


def _call(q=(1, 4, 10, 8), k=(1, 4, 10, 8), **kw):
    return longformer_attention(torch.randn(*q), torch.randn(*k), torch.randn(*k), 2, **kw)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(k=(1, 3, 10, 8)), ValueError, "multiple of k's H_kv = 3"),
    (dict(q=(1, 4, 12, 8)), ValueError, "k has shape .*Nk = 10 keys, fewer than q's Nq = 12"),
    (dict(q=(1, 4, 4, 8), q_offset=7), ValueError, r"q_offset must be an int in \[0, Nk - Nq\] = \[0, 6\]"),
    (dict(q=(1, 4, 4, 8), cu_seqlens=torch.tensor([0, 10])), ValueError, "cu_seqlens needs as many queries"),
    (dict(q=(2, 4, 10, 8), k=(2, 4, 10, 8), cu_seqlens=torch.tensor([0, 10])), ValueError, "B == 1"),
    (dict(cu_seqlens=torch.tensor([0, 6, 4, 10])), ValueError, "rise from 0 to N = 10"),
    (dict(cu_seqlens=torch.tensor([0.0, 10.0])), TypeError, "int32 or int64"),
    (dict(cu_seqlens=torch.tensor([0, 10]), q_offset=2), ValueError, "cu_seqlens and q_offset"),
    (dict(softcap=0.0), ValueError, "softcap must be a finite float > 0"),
    (dict(sinks=torch.zeros(3)), ValueError, r"sinks must be a floating-point \[H\] = \[4\]"),
    (dict(alibi_slopes=torch.zeros(4, dtype=torch.int64)), ValueError, "alibi_slopes must be a floating-point"),
    (dict(return_lse=1), TypeError, "return_lse must be a bool"),
])
def test_bad_general_arguments_raise(kwargs, error, match):
    with pytest.raises(error, match=match):
        _call(**kwargs)


def test_op_checks_packed_bounds_itself():
    """The op checks cu_seqlens' values on its own (longformer_attention skips that under compile)."""
    q = torch.randn(1, 2, 10, 4)
    with pytest.raises(RuntimeError, match="cu_seqlens must rise from 0 to N = 10"):
        torch.ops.longformer.banded_attn(q, q, q, 1, 1, [1], None, None, False, 0.5, None, None, None, False, -1,
                                         torch.tensor([0, 12, 10]), 0.0, None, None)
    with pytest.raises(RuntimeError, match="sinks must be Float for BFloat16 inputs"):
        qb = q.bfloat16()
        torch.ops.longformer.banded_attn(qb, qb, qb, 1, 1, [1], None, None, False, 0.5, None, None, None, False,
                                         -1, None, 0.0, None, torch.zeros(2, dtype=torch.bfloat16))
