"""torch.compile(fullgraph=True) and torch.export through the ops: no graph breaks, same results."""

import torch

from longformer_ext import longformer_attention


def _inputs(n, seed=0, b=2, h=2, d=8):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, n, h * d, generator=gen).view(b, n, h, d).transpose(1, 2).requires_grad_()
               for _ in range(3))
    am = torch.ones(b, n, dtype=torch.int64)
    am[1, n - 3:] = 0
    gm = torch.zeros(b, n, dtype=torch.bool)
    gm[:, 0] = True
    gm[0, n // 2] = True
    return q, k, v, am, gm


def attention(q, k, v, am, gm):
    return longformer_attention(q, k, v, (4, 3), dilation=[1, 2], attention_mask=am, global_attention_mask=gm)


def test_compile_fullgraph_varying_length():
    torch._dynamo.reset()
    compiled = torch.compile(attention, fullgraph=True, dynamic=True)
    for n in (37, 64, 101):
        q, k, v, am, gm = _inputs(n, seed=n)
        out = compiled(q, k, v, am, gm)
        expected = attention(q, k, v, am, gm)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        grads = torch.autograd.grad(out.square().sum(), (q, k, v))
        expected_grads = torch.autograd.grad(expected.square().sum(), (q, k, v))
        for g, e in zip(grads, expected_grads):
            torch.testing.assert_close(g, e, rtol=0, atol=0)


class Block(torch.nn.Module):
    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)

    def forward(self, x, am, gm):
        b, n, c = x.shape
        q, k, v = (t.view(b, n, self.heads, c // self.heads).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        out = longformer_attention(q, k, v, 3, attention_mask=am, global_attention_mask=gm)
        return out.transpose(1, 2).reshape(b, n, c)


def test_export_module():
    torch.manual_seed(0)
    module = Block().eval()
    x = torch.randn(2, 40, 16)
    am = torch.ones(2, 40, dtype=torch.int64)
    gm = torch.zeros(2, 40, dtype=torch.bool)
    gm[:, 0] = True
    n = torch.export.Dim("n", min=2, max=4096)
    exported = torch.export.export(module, (x, am, gm), dynamic_shapes=({1: n}, {1: n}, {1: n}))
    for length in (40, 77):
        x2, am2, gm2 = torch.randn(2, length, 16), torch.ones(2, length, dtype=torch.int64), gm[:, :1].expand(
            2, length).clone()
        gm2[:, 1:] = False
        torch.testing.assert_close(exported.module()(x2, am2, gm2), module(x2, am2, gm2), rtol=0, atol=0)
