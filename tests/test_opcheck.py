"""torch.library.opcheck on every op: schema, fake (meta) sizes and strides, autograd registration,
AOT dispatch."""

import pytest
import torch

import longformer_ext  # noqa: F401  (loads the ops)
from conftest import CPU_DTYPES

ops = torch.ops.longformer


def _heads(gen, dtype, b=2, h=3, n=11, d=5, requires_grad=False):
    return torch.randn(b, n, h * d, generator=gen, dtype=torch.float64).to(dtype).view(b, n, h, d).transpose(
        1, 2).requires_grad_(requires_grad)


def _masks():
    am = torch.tensor([[1] * 11, [1] * 8 + [0] * 3])
    gm = torch.zeros(2, 11, dtype=torch.bool)
    gm[0, 0] = gm[1, [3, 7]] = True
    return am, gm


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("masks", [False, True])
def test_opcheck_attention_ops(dtype, masks):
    gen = torch.Generator().manual_seed(0)
    am, gm = _masks() if masks else (None, None)
    q, k, v = (_heads(gen, dtype, requires_grad=True) for _ in range(3))
    args = (q, k, v, 2, 1, [1, 2, 1], am, gm, False, 0.4)
    torch.library.opcheck(ops.banded_attn, args)
    out, lse = ops.banded_attn(*args)
    grad = _heads(gen, dtype)
    torch.library.opcheck(ops.banded_attn_backward, (grad, q.detach(), k.detach(), v.detach(), out.detach(), lse,
                                                     2, 1, [1, 2, 1], am, gm, False, 0.4))
    if gm is None:
        return
    gargs = (q, k, v, gm, am, True, 0.4, out.detach().requires_grad_())
    torch.library.opcheck(ops.global_attn, gargs)
    new_out, glse = ops.global_attn(*gargs)
    torch.library.opcheck(ops.global_attn_backward, (grad, q.detach(), k.detach(), v.detach(), new_out.detach(),
                                                     glse, gm, am, True, 0.4))


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_opcheck_banded_matmuls(dtype):
    gen = torch.Generator().manual_seed(1)
    q, k = (_heads(gen, dtype, requires_grad=True) for _ in range(2))
    p = torch.randn(2, 3, 11, 4, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    torch.library.opcheck(ops.banded_matmul_qk, (q, k, 2, 1, [1, 3, 2], float("-inf")))
    torch.library.opcheck(ops.banded_matmul_pv, (p, k, 2, 1, [1, 3, 2]))
    torch.library.opcheck(ops.banded_matmul_pv_transposed, (p, q, 2, 1, [2]))
