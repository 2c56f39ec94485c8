"""torch.autograd.gradcheck in float64 on tiny shapes: the fused ops and the banded primitives."""

import pytest
import torch

from longformer_ext import longformer_attention, ops

CONFIGS = [
    dict(window=2),
    dict(window=(1, 3), dilation=[1, 2]),
    dict(window=(2, 0), causal=True, dilation=2),
    dict(window=1, globals=True),
    dict(window=(3, 1), globals=True, padding=True, dilation=[2, 1]),
    dict(window=2, globals=True, padding=True, causal=True, projections=True),
    dict(window=20, globals=True, projections=True),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_gradcheck_longformer_attention(cfg):
    gen = torch.Generator().manual_seed(0)
    b, h, n, d = 2, 2, 9, 3
    make = lambda: torch.randn(b, h, n, d, dtype=torch.float64, generator=gen, requires_grad=True)
    q, k, v = make(), make(), make()
    kwargs = dict(dilation=cfg.get("dilation", 1), causal=cfg.get("causal", False))
    if cfg.get("globals"):
        g = torch.zeros(b, n, dtype=torch.bool)
        g[0, [0, 4]] = True
        g[1, [8]] = True
        kwargs["global_attention_mask"] = g
    if cfg.get("padding"):
        kwargs["attention_mask"] = torch.tensor([[1] * n, [1] * 6 + [0] * 3])
    inputs = [q, k, v]
    if cfg.get("projections"):
        inputs += [make(), make(), make()]

    def fn(*ts):
        extra = dict(zip(("global_q", "global_k", "global_v"), ts[3:]))
        return longformer_attention(ts[0], ts[1], ts[2], cfg["window"], **kwargs, **extra)

    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("window,dilation", [((2, 1), [1]), ((0, 3), [2, 1]), ((1, 1), [3])])
def test_gradcheck_banded_matmuls(window, dilation):
    gen = torch.Generator().manual_seed(1)
    b, h, n, d = 1, 2, 7, 3
    width = window[0] + window[1] + 1
    a = torch.randn(b, h, n, d, dtype=torch.float64, generator=gen, requires_grad=True)
    x = torch.randn(b, h, n, d, dtype=torch.float64, generator=gen, requires_grad=True)
    p = torch.randn(b, h, n, width, dtype=torch.float64, generator=gen, requires_grad=True)
    # qk writes its fill value (not a function of the inputs) off the sequence: use 0 for gradcheck.
    assert torch.autograd.gradcheck(lambda s, t: ops.banded_matmul_qk(s, t, *window, dilation, 0.0), (a, x))
    assert torch.autograd.gradcheck(lambda s, t: ops.banded_matmul_pv(s, t, *window, dilation), (p, x))
    assert torch.autograd.gradcheck(lambda s, t: ops.banded_matmul_pv_transposed(s, t, *window, dilation), (p, a))
