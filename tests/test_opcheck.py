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
@pytest.mark.parametrize("projections", [False, True])
def test_opcheck_attention_ops(dtype, masks, projections):
    gen = torch.Generator().manual_seed(0)
    am, gm = _masks() if masks else (None, None)
    q, k, v = (_heads(gen, dtype, requires_grad=True) for _ in range(3))
    glob = tuple(_heads(gen, dtype, requires_grad=True) for _ in range(3)) if projections else ()
    args = (q, k, v, 2, 1, [1, 2, 1], am, gm, masks, 0.4, *glob)
    torch.library.opcheck(ops.banded_attn, args)
    out, lse = ops.banded_attn(*args)
    grad = _heads(gen, dtype)
    torch.library.opcheck(ops.banded_attn_backward, (grad, q.detach(), k.detach(), v.detach(), out.detach(), lse,
                                                     2, 1, [1, 2, 1], am, gm, masks, 0.4,
                                                     *(t.detach() for t in glob)))


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_opcheck_banded_matmuls(dtype):
    gen = torch.Generator().manual_seed(1)
    q, k = (_heads(gen, dtype, requires_grad=True) for _ in range(2))
    p = torch.randn(2, 3, 11, 4, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    torch.library.opcheck(ops.banded_matmul_qk, (q, k, 2, 1, [1, 3, 2], float("-inf")))
    torch.library.opcheck(ops.banded_matmul_pv, (p, k, 2, 1, [1, 3, 2]))
    torch.library.opcheck(ops.banded_matmul_pv_transposed, (p, q, 2, 1, [2]))


def test_global_rows_are_written_into_the_output_without_a_copy():
    """One op computes local and global rows: the forward allocates one output and copies nothing
    (a separate global-rows op would have to copy the local rows' output to stay functional)."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (_heads(gen, torch.float32, n=64) for _ in range(3))
    am, gm = torch.ones(2, 64, dtype=torch.bool), torch.zeros(2, 64, dtype=torch.bool)
    gm[:, [0, 9]] = True
    with torch.profiler.profile(record_shapes=True) as prof:
        ops.banded_attn(q, k, v, 2, 2, [1], am, gm, False, 0.5)
    events = prof.events()
    assert "longformer::banded_attn" in [e.name for e in events]
    # The masks' conversion to token roles copies [B, N] bytes; nothing else is copied.
    copying = ("aten::copy_", "aten::clone", "aten::masked_fill_")
    copies = [(e.name, e.input_shapes) for e in events
              if e.name in copying and any(len(shape) == 4 for shape in e.input_shapes)]
    assert not copies, copies
