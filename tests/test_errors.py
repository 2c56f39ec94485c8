"""Bad input raises a clear Python exception (never a crash or a silent wrong result); empty input
and rows without keys give the oracle's output and gradients."""

import pytest
import torch

from conftest import CPU_DTYPES, assert_close_to_oracle
from longformer_ext import longformer_attention, ops
from longformer_ext.reference import dense_attention


def _qkv(b=2, h=2, n=10, d=4, **kw):
    return [torch.randn(b, h, n, d, **kw) for _ in range(3)]


BAD_CALLS = {
    "k shape": (lambda q, k, v: longformer_attention(q, k[:, :, :5], v, 2), ValueError, "k has shape"),
    "v dtype": (lambda q, k, v: longformer_attention(q, k, v.double(), 2), TypeError, "dtype"),
    "3-d q": (lambda q, k, v: longformer_attention(q[0], k[0], v[0], 2), ValueError, r"\[B, H, N, D\]"),
    "int q": (lambda q, k, v: longformer_attention(q.long(), k.long(), v.long(), 2), TypeError, "floating"),
    "last dim strided": (lambda q, k, v: longformer_attention(q.transpose(2, 3), k.transpose(2, 3),
                                                              v.transpose(2, 3), 2), ValueError, "contiguous"),
    "negative window": (lambda q, k, v: longformer_attention(q, k, v, -1), ValueError, "window"),
    "negative right": (lambda q, k, v: longformer_attention(q, k, v, (2, -3)), ValueError, "window"),
    "window triple": (lambda q, k, v: longformer_attention(q, k, v, (1, 2, 3)), TypeError, "window"),
    "float window": (lambda q, k, v: longformer_attention(q, k, v, 2.5), TypeError, "window"),
    "dilation 0": (lambda q, k, v: longformer_attention(q, k, v, 2, dilation=0), ValueError, "dilation"),
    "dilation length": (lambda q, k, v: longformer_attention(q, k, v, 2, dilation=[1, 2, 3]), ValueError, "heads"),
    "dilation float tensor": (lambda q, k, v: longformer_attention(q, k, v, 2, dilation=torch.tensor([1.0, 2.0])),
                              TypeError, "dilation"),
    "mask shape": (lambda q, k, v: longformer_attention(q, k, v, 2, attention_mask=torch.ones(2, 9, dtype=torch.int64)),
                   ValueError, r"\[B, N\]"),
    "float mask": (lambda q, k, v: longformer_attention(q, k, v, 2, attention_mask=torch.ones(2, 10)),
                   TypeError, "float"),
    "float global mask": (lambda q, k, v: longformer_attention(q, k, v, 2, global_attention_mask=torch.zeros(2, 10)),
                          TypeError, "float"),
    "additive HF mask": (lambda q, k, v: longformer_attention(
        q, k, v, 2, attention_mask=torch.full((2, 10), -10000.0)), TypeError, "additive"),
    "only global_q": (lambda q, k, v: longformer_attention(q, k, v, 2, global_q=q,
                                                          global_attention_mask=torch.ones(2, 10, dtype=torch.bool)),
                      ValueError, "together"),
    "projections without mask": (lambda q, k, v: longformer_attention(q, k, v, 2, global_q=q, global_k=k, global_v=v),
                                 ValueError, "global_attention_mask"),
    "global_q shape": (lambda q, k, v: longformer_attention(
        q, k, v, 2, global_q=q[:1], global_k=k, global_v=v, global_attention_mask=torch.ones(2, 10, dtype=torch.bool)),
        ValueError, "global_q"),
    "causal not bool": (lambda q, k, v: longformer_attention(q, k, v, 2, causal=1), TypeError, "causal"),
    "scale nan": (lambda q, k, v: longformer_attention(q, k, v, 2, scale=float("nan")), TypeError, "scale"),
    "meta device mask": (lambda q, k, v: longformer_attention(
        q, k, v, 2, attention_mask=torch.ones(2, 10, dtype=torch.bool, device="meta")), ValueError, "is on meta"),
    "float8 on cpu": (lambda q, k, v: longformer_attention(*(t.to(torch.float8_e4m3fn) for t in (q, k, v)), 2),
                      RuntimeError, "float32, float64, float16 and bfloat16, got Float8_e4m3fn"),
}


@pytest.mark.parametrize("name", BAD_CALLS)
def test_bad_input_raises(name):
    call, exc, match = BAD_CALLS[name]
    with pytest.raises(exc, match=match):
        call(*_qkv())


# The ops check their inputs too (RuntimeError from C++), for callers that skip the Python wrapper.
BAD_OP_CALLS = {
    "dilation length": lambda q, k, v: ops.banded_attn(q, k, v, 1, 1, [1, 2, 3], None, None, False, 1.0),
    "dilation zero": lambda q, k, v: ops.banded_attn(q, k, v, 1, 1, [0], None, None, False, 1.0),
    "negative window": lambda q, k, v: ops.banded_attn(q, k, v, -1, 1, [1], None, None, False, 1.0),
    "float mask": lambda q, k, v: ops.banded_attn(q, k, v, 1, 1, [1], torch.ones(2, 10), None, False, 1.0),
    "mask shape": lambda q, k, v: ops.banded_attn(q, k, v, 1, 1, [1], None, torch.ones(3, 10, dtype=torch.bool),
                                                  False, 1.0),
    "shape mismatch": lambda q, k, v: ops.banded_attn(q, k[:1], v, 1, 1, [1], None, None, False, 1.0),
    "strided last dim": lambda q, k, v: ops.banded_attn(q, k, v.transpose(2, 3).contiguous().transpose(2, 3)[..., ::2],
                                                        1, 1, [1], None, None, False, 1.0),
    "band shape": lambda q, k, v: ops.banded_matmul_pv(torch.randn(2, 2, 10, 4), v, 1, 1, [1]),
    "lse dtype": lambda q, k, v: torch.ops.longformer.banded_attn_backward(q, q, k, v, q, torch.zeros(2, 2, 10, dtype=torch.float64),
                                                          1, 1, [1], None, None, False, 1.0),
}


@pytest.mark.parametrize("name", BAD_OP_CALLS)
def test_bad_op_input_raises(name):
    with pytest.raises(RuntimeError, match="longformer"):
        BAD_OP_CALLS[name](*_qkv())


EMPTY_SHAPES = {"N=0": (2, 2, 0, 4), "B=0": (0, 2, 10, 4), "H=0": (2, 0, 10, 4), "D=0": (2, 2, 10, 0)}
GRAD_NAMES = ("q", "k", "v", "global_q", "global_k", "global_v")


def _projection_heads(shape, dtype, gen):
    """A [B, H, N, D] view of a [B, N, H * D] projection, as a model passes it."""
    b, h, n, d = shape
    return torch.randn(b, n, h, d, generator=gen).to(dtype).transpose(1, 2).requires_grad_()


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("shape", EMPTY_SHAPES.values(), ids=EMPTY_SHAPES.keys())
def test_empty_inputs_return_empty(shape, causal, dtype):
    """No token, batch row or head (N, B or H = 0), or no features (D = 0), with padding, global tokens
    and their own projections: the output is the oracle's (an empty [B, H, N, D] in q's dtype, laid out
    as the contiguous [B, N, H, D] every result is a view of), and the backward reaches q, k, v and
    the three global projections with the oracle's gradients, each of its input's shape and dtype."""
    b, h, n, d = shape
    gen = torch.Generator().manual_seed(0)
    tensors = [_projection_heads(shape, dtype, gen) for _ in GRAD_NAMES]
    attention_mask = torch.ones(b, n, dtype=torch.int64)
    global_attention_mask = torch.zeros(b, n, dtype=torch.bool)
    if n:
        attention_mask[:, -2:] = 0
        global_attention_mask[:, [0, 3]] = True
    kwargs = dict(dilation=1, attention_mask=attention_mask, global_attention_mask=global_attention_mask,
                  causal=causal)
    out = longformer_attention(*tensors[:3], (3, 2), **dict(zip(GRAD_NAMES[3:], tensors[3:])), **kwargs)
    copies = [t.detach().double().requires_grad_() for t in tensors]
    expected = dense_attention(*copies[:3], (3, 2), **dict(zip(GRAD_NAMES[3:], copies[3:])), **kwargs)
    assert out.shape == expected.shape == shape and out.dtype == dtype
    assert out.stride() == torch.empty(b, n, h, d).transpose(1, 2).stride(), "not a view of [B, N, H, D]"
    assert torch.equal(out.double(), expected)

    grad_out = torch.randn(shape, generator=gen).to(dtype)
    grads = torch.autograd.grad(out, tensors, grad_out)  # raises if the backward misses an input
    expected_grads = torch.autograd.grad(expected, copies, grad_out.double(), allow_unused=True,
                                         materialize_grads=True)
    for name, g, eg in zip(GRAD_NAMES, grads, expected_grads):
        assert g.shape == shape and g.dtype == dtype, f"grad {name}: {g.dtype} {tuple(g.shape)}"
        assert torch.equal(g.double(), eg), f"grad {name}"


@pytest.mark.parametrize("shape", EMPTY_SHAPES.values(), ids=EMPTY_SHAPES.keys())
def test_empty_inputs_to_the_ops(shape):
    """The ops themselves on empty input. lse is [B, H, N] in the accumulation dtype, never NaN (with
    D = 0 it is not empty). The band of banded_matmul_qk is [B, H, N, left + right + 1], which with
    D = 0 is not empty either: 0 for every key in the sequence (an empty dot product), `fill` off it;
    the pv products give empty results of their operand's shape, and the gradient of the band
    through them is zero (empty with the other shapes)."""
    b, h, n, d = shape
    left, right, fill = 2, 1, -5.0
    gen = torch.Generator().manual_seed(1)
    q, k, v = (_projection_heads(shape, torch.float32, gen) for _ in range(3))
    gm = torch.zeros(b, n, dtype=torch.bool)
    out, lse = ops.banded_attn(q, k, v, left, right, [1], None, gm, False, 1.0)
    assert out.shape == shape and lse.shape == (b, h, n) and lse.dtype == torch.float32
    assert not lse.isnan().any()

    band = ops.banded_matmul_qk(q, k, left, right, [1], fill)
    j = torch.arange(n)[:, None] + torch.arange(-left, right + 1)[None, :]  # key of slot t of row i
    inside = (j >= 0) & (j < n)
    keys = k.detach().double()[:, :, j.clamp(0, max(n - 1, 0))]  # [B, H, N, W, D]
    dots = (q.detach().double()[:, :, :, None, :] * keys).sum(-1)
    expected = torch.where(inside, dots, torch.tensor(fill, dtype=torch.float64))
    assert band.shape == (b, h, n, left + right + 1) and torch.equal(band.double(), expected)

    p = torch.randn(b, h, n, left + right + 1, generator=gen).requires_grad_()
    pv = ops.banded_matmul_pv(p, v, left, right, [1])
    pvt = ops.banded_matmul_pv_transposed(p, q, left, right, [1])
    assert pv.shape == pvt.shape == shape
    grads = torch.autograd.grad((band, pv, pvt), (q, k, v, p),
                                (torch.randn(band.shape, generator=gen), torch.randn(shape, generator=gen),
                                 torch.randn(shape, generator=gen)))
    for name, g, like in zip("qkvp", grads, (q, k, v, p)):
        assert g.shape == like.shape, f"grad {name}"
    # Every entry of the band gradient is a sum of products over D (0) or over empty rows/tokens.
    assert torch.equal(grads[3], torch.zeros_like(p)), "grad p"


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_rows_without_keys_give_zeros(dtype):
    """Batch row 0 is all padding, so none of its queries has a key (its global tokens are padding
    too); row 1 has 4 real tokens, one of them global. Row 0's output and every gradient there are
    exactly 0 (never NaN from a softmax over nothing); row 1 matches the oracle."""
    b, h, n, d = 2, 2, 10, 4
    gen = torch.Generator().manual_seed(2)
    tensors = [_projection_heads((b, h, n, d), dtype, gen) for _ in GRAD_NAMES]
    attention_mask = torch.zeros(b, n, dtype=torch.int64)
    attention_mask[1, :4] = 1
    global_attention_mask = torch.zeros(b, n, dtype=torch.bool)
    global_attention_mask[:, [2, 7]] = True
    kwargs = dict(attention_mask=attention_mask, global_attention_mask=global_attention_mask)
    out = longformer_attention(*tensors[:3], 3, **dict(zip(GRAD_NAMES[3:], tensors[3:])), **kwargs)
    copies = [t.detach().double().requires_grad_() for t in tensors]
    expected = dense_attention(*copies[:3], 3, **dict(zip(GRAD_NAMES[3:], copies[3:])), **kwargs)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert_close_to_oracle(out, expected, dtype, "output")

    grad_out = torch.randn(out.shape, generator=gen).to(dtype)
    grads = torch.autograd.grad(out, tensors, grad_out)
    expected_grads = torch.autograd.grad(expected, copies, grad_out.double())
    for name, g, eg in zip(GRAD_NAMES, grads, expected_grads):
        assert torch.equal(g[0], torch.zeros_like(g[0])), f"grad {name} of the all-padding row"
        assert_close_to_oracle(g, eg, dtype, f"grad {name}")


def test_cuda_tensors_without_cuda_kernels_say_so():
    from longformer_ext import attention
    if "cuda" in attention._KERNEL_DEVICES:
        pytest.skip("this build has CUDA kernels")
    q, k, v = _qkv(device="meta")
    with pytest.raises(NotImplementedError, match="no kernels for meta"):
        longformer_attention(q, k, v, 2)


def test_too_many_heads_or_a_huge_dilation_are_refused():
    """The per-head dilations travel by value in the kernels' parameter blocks (256 heads at most)."""
    q = torch.randn(1, 257, 4, 2)
    with pytest.raises(RuntimeError, match="at most 256 heads"):
        ops.banded_attn(q, q, q, 1, 1, [1], None, None, False, 1.0)
    with pytest.raises(RuntimeError, match="at most 256 heads"):
        ops.banded_matmul_qk(q, q, 1, 1, [1])
    q = torch.randn(1, 256, 4, 2)
    assert ops.banded_attn(q, q, q, 1, 1, [1], None, None, False, 1.0)[0].shape == q.shape
    with pytest.raises(RuntimeError, match=r"dilation must be in \[1, 2\^31\)"):
        ops.banded_attn(q, q, q, 1, 1, [2 ** 31], None, None, False, 1.0)
