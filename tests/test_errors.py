"""Bad input raises a clear Python exception (never a crash or a silent wrong result); empty input
returns empty output."""

import pytest
import torch

from longformer_ext import longformer_attention, ops


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
    "half on cpu": (lambda q, k, v: longformer_attention(q.half(), k.half(), v.half(), 2), RuntimeError, "float16"),
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


@pytest.mark.parametrize("shape", [(2, 2, 0, 4), (0, 2, 10, 4), (2, 0, 10, 4), (2, 2, 10, 0)])
def test_empty_inputs_return_empty(shape):
    q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))
    gm = torch.zeros(shape[0], shape[2], dtype=torch.bool)
    out = longformer_attention(q, k, v, 3, global_attention_mask=gm, dilation=1)
    assert out.shape == q.shape
    out.sum().backward()
    assert q.grad.shape == q.shape


def test_cuda_tensors_without_cuda_kernels_say_so():
    from longformer_ext import attention
    if "cuda" in attention._KERNEL_DEVICES:
        pytest.skip("this build has CUDA kernels")
    q, k, v = _qkv(device="meta")
    with pytest.raises(NotImplementedError, match="no kernels for meta"):
        longformer_attention(q, k, v, 2)
