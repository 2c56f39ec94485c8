"""The three reference implementations checked against each other on small float64 inputs.

dense (the oracle, [N, N] masks) vs loop (keys listed one query at a time) over the whole semantics;
dense vs chunked (overlapping chunks) over what chunked supports; plus the role properties every
reference must have (padding rows are exactly zero, global rows only see the global projections).
The loop reference runs Python loops over B, H, N: keep its shapes tiny (B, H <= 2, N <= 17 mostly).
"""

import itertools

import pytest
import torch

from longformer_ext.reference import chunked_attention, dense_attention, loop_attention

ATOL = 1e-12
GLOBALS = ["none", "one", "edges", "many", "all"]


pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def make_inputs(batch, heads, n, dim, globals_kind="none", padding=False, projections=False, seed=0):
    """(q, k, v, kwargs) in float64, seeded. Padding is random per row (may pad global tokens too);
    projections without global tokens pass an all-zero global mask (legal: nothing is global)."""
    torch.manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, n, dim, dtype=torch.float64) for _ in range(3))
    kwargs = {}
    if padding:
        kwargs["attention_mask"] = (torch.rand(batch, n) < 0.7).to(torch.int64)
    glob = torch.zeros(batch, n, dtype=torch.bool)
    if globals_kind == "one":
        glob[:, torch.randint(0, n, (1,))] = True
    elif globals_kind == "edges":
        glob[:, 0] = glob[:, -1] = True
    elif globals_kind == "many":  # a different count in each batch row
        glob = torch.rand(batch, n) < 0.3
    elif globals_kind == "all":
        glob[:] = True
    if globals_kind != "none" or projections:
        kwargs["global_attention_mask"] = glob
    if projections:
        for name in ("global_q", "global_k", "global_v"):
            kwargs[name] = torch.randn(batch, heads, n, dim, dtype=torch.float64)
    return q, k, v, kwargs


def assert_same(actual, expected, what):
    assert actual.dtype == torch.float64 and actual.shape == expected.shape, what
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert err <= ATOL, f"{what}: max abs difference {err:.3e}"


# ---------------------------------------------------------------------------------------------------
# dense vs loop: the whole semantics


LOOP_WINDOWS = [0, 1, 3, (2, 0), (0, 2), (1, 4), 25]  # 25: larger than every N below
LOOP_DILATIONS = [(1, 2), ([1, 2], 2), ([1, 2, 3], 3)]  # (dilation, heads)
LOOP_COMBOS = list(itertools.product(GLOBALS, [False, True], [False, True]))  # globals, padding, projections


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("dilation,heads", LOOP_DILATIONS, ids=["d1", "d12", "d123"])
@pytest.mark.parametrize("window", LOOP_WINDOWS, ids=str)
def test_dense_matches_loop(window, dilation, heads, causal):
    batch = 1 if heads > 2 else 2
    for index, (globals_kind, padding, projections) in enumerate(LOOP_COMBOS):
        n = (1, 5, 17)[index % 3]
        q, k, v, kwargs = make_inputs(batch, heads, n, 3, globals_kind, padding, projections, seed=index)
        what = f"N={n} globals={globals_kind} padding={padding} projections={projections}"
        expected = dense_attention(q, k, v, window, dilation=dilation, causal=causal, **kwargs)
        assert_same(loop_attention(q, k, v, window, dilation=dilation, causal=causal, **kwargs), expected, what)


@pytest.mark.parametrize("window,dilation,causal", [(3, [1, 2], False), ((4, 1), [3, 1], True), (2, 5, False)],
                         ids=["w3-d12", "w41-d31-causal", "w2-d5"])
def test_dense_matches_loop_longer(window, dilation, causal):
    for globals_kind in ("none", "many"):
        q, k, v, kwargs = make_inputs(1, 2, 40, 4, globals_kind, True, globals_kind != "none", seed=7)
        expected = dense_attention(q, k, v, window, dilation=dilation, causal=causal, **kwargs)
        assert_same(loop_attention(q, k, v, window, dilation=dilation, causal=causal, **kwargs), expected, globals_kind)


# ---------------------------------------------------------------------------------------------------
# dense vs chunked: symmetric windows, dilation 1, not causal


@pytest.mark.parametrize("n", [1, 5, 8, 17, 40])
@pytest.mark.parametrize("w", [1, 2, 3, 4, 7, 50])
def test_dense_matches_chunked(w, n):
    for index, (globals_kind, padding, projections) in enumerate(LOOP_COMBOS):
        q, k, v, kwargs = make_inputs(2, 3, n, 5, globals_kind, padding, projections, seed=100 + index)
        what = f"globals={globals_kind} padding={padding} projections={projections}"
        assert_same(chunked_attention(q, k, v, w, **kwargs), dense_attention(q, k, v, w, **kwargs), what)
        assert_same(chunked_attention(q, k, v, (w, w), dilation=[1, 1, 1], **kwargs),
                    dense_attention(q, k, v, w, **kwargs), what + " (pair window)")


def test_chunked_head_split_layout_and_float32():
    """A [B, N, H*D] projection viewed as [B, H, N, D] (no copy), and float32 inputs (computed in float64)."""
    torch.manual_seed(3)
    b, n, h, d = 2, 23, 2, 4
    q, k, v = (torch.randn(b, n, h * d).view(b, n, h, d).transpose(1, 2) for _ in range(3))
    glob = torch.rand(b, n) < 0.2
    mask = torch.rand(b, n) < 0.8
    kwargs = dict(attention_mask=mask, global_attention_mask=glob)
    assert_same(chunked_attention(q, k, v, 3, **kwargs), dense_attention(q, k, v, 3, **kwargs), "head split")


def test_chunked_gradients_match_dense():
    q, k, v, kwargs = make_inputs(2, 2, 13, 3, "many", True, True, seed=11)
    names = ["global_q", "global_k", "global_v"]
    inputs = [t.requires_grad_() for t in (q, k, v, *(kwargs[name] for name in names))]
    grad = torch.randn(q.shape, dtype=torch.float64)
    results = []
    for fn in (dense_attention, chunked_attention):
        out = fn(*inputs[:3], 2, **kwargs)
        results.append(torch.autograd.grad(out, inputs, grad))
    for name, g_dense, g_chunked in zip(["q", "k", "v"] + names, *results):
        assert_same(g_chunked, g_dense, f"grad {name}")


@pytest.mark.parametrize("window,dilation,causal", [((2, 1), 1, False), ((0, 3), 1, False), (0, 1, False),
                                                    (2, 2, False), (2, [1, 2], False), (2, 1, True)],
                         ids=["asymmetric", "left0", "zero", "dilation2", "dilation12", "causal"])
def test_chunked_rejects_unsupported(window, dilation, causal):
    q, k, v, _ = make_inputs(1, 2, 8, 4)
    with pytest.raises(NotImplementedError):
        chunked_attention(q, k, v, window, dilation=dilation, causal=causal)


# ---------------------------------------------------------------------------------------------------
# role properties, for every reference


REFERENCES = [(dense_attention, (2, 1)), (loop_attention, (2, 1)), (chunked_attention, 2)]  # chunked: symmetric only
REFERENCE_IDS = ["dense", "loop", "chunked"]


@pytest.mark.parametrize("fn,window", REFERENCES, ids=REFERENCE_IDS)
def test_padding_rows_are_exactly_zero(fn, window):
    q, k, v, kwargs = make_inputs(2, 2, 11, 3, "edges", False, True, seed=5)
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[0, [0, 4, 5]] = False  # position 0 is global and padding: padding wins
    mask[1, :] = False  # a fully padded row: no query has a key
    kwargs["attention_mask"] = mask
    out = fn(q, k, v, window, **kwargs)
    assert torch.isfinite(out).all()
    assert torch.equal(out[0, :, [0, 4, 5]], torch.zeros(2, 3, 3, dtype=torch.float64))
    assert torch.equal(out[1], torch.zeros(2, 11, 3, dtype=torch.float64))
    assert (out[0, :, [1, 2, 3, 6, 10]].abs().sum(-1) > 0).all()  # real rows (10 is global) are not zero


@pytest.mark.parametrize("fn,window", REFERENCES, ids=REFERENCE_IDS)
def test_global_row_depends_only_on_global_projections(fn, window):
    """Row i of a global token reads global_q[i] and global_k/global_v at real keys, nothing else;
    local rows never read global_q/k/v."""
    n, row = 12, 6
    q, k, v, kwargs = make_inputs(1, 2, n, 3, "none", False, True, seed=9)
    glob = torch.zeros(1, n, dtype=torch.bool)
    glob[0, [1, row, 10]] = True
    mask = torch.ones(1, n, dtype=torch.bool)
    mask[0, [3, 11]] = False
    kwargs.update(global_attention_mask=glob, attention_mask=mask)
    base = fn(q, k, v, window, **kwargs)

    def run(**changes):
        new = dict(kwargs)
        tensors = {"q": q, "k": k, "v": v}
        for name, t in changes.items():
            (tensors if name in tensors else new)[name] = t
        return fn(tensors["q"], tensors["k"], tensors["v"], window, **new)

    def moved(t, rows=None):  # t changed at the given positions (all when None)
        rows = slice(None) if rows is None else rows
        t = t.clone()
        t[:, :, rows] += torch.randn_like(t[:, :, rows])
        return t

    others = [j for j in range(n) if j != row]
    global_rows = [1, row, 10]
    local_rows = [0, 2, 4, 5, 7, 8, 9]
    # the local q, k, v do not reach global rows
    out = run(q=moved(q), k=moved(k), v=moved(v))
    assert torch.equal(out[:, :, global_rows], base[:, :, global_rows])
    # global_q at other rows, global_k / global_v at padding keys do not reach row `row`
    out = run(global_q=moved(kwargs["global_q"], others), global_k=moved(kwargs["global_k"], [3, 11]),
              global_v=moved(kwargs["global_v"], [3, 11]))
    assert torch.equal(out[:, :, row], base[:, :, row])
    # ... but global_q at the row itself, and global_k / global_v at a real local key, do
    assert not torch.allclose(run(global_q=moved(kwargs["global_q"], [row]))[:, :, row], base[:, :, row])
    assert not torch.allclose(run(global_k=moved(kwargs["global_k"], [8]))[:, :, row], base[:, :, row])
    assert not torch.allclose(run(global_v=moved(kwargs["global_v"], [8]))[:, :, row], base[:, :, row])
    # local rows do not read the global projections at all
    out = run(global_q=moved(kwargs["global_q"]), global_k=moved(kwargs["global_k"]),
              global_v=moved(kwargs["global_v"]))
    assert torch.equal(out[:, :, local_rows], base[:, :, local_rows])
