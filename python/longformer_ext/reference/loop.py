"""One query at a time, its keys listed straight from the definition: the paper's "loop" variant.
Slow (Python loops over B, H, N); for tiny shapes. Returns float64."""

import math

import torch

from .._args import check_attention_args, token_roles


def _keys_of(i, h, n, args, real, glob, causal):
    if not real[i]:
        return []
    if glob[i]:
        keys = [j for j in range(n) if real[j]]
    else:
        d = args.dilation[h]
        band = (i + t * d for t in range(-args.window_left, args.window_right + 1))
        keys = sorted({j for j in band if 0 <= j < n and real[j] and not glob[j]} | {j for j in range(n) if glob[j]})
    return [j for j in keys if not causal or j <= i]


def loop_attention(q, k, v, window, *, dilation=1, attention_mask=None, global_attention_mask=None,
                   global_q=None, global_k=None, global_v=None, causal=False, scale=None):
    args = check_attention_args(q, k, v, window, dilation, attention_mask, global_attention_mask, global_q,
                                global_k, global_v, causal, scale)
    real, glob = token_roles(q, attention_mask, global_attention_mask)
    real, glob = real.tolist(), glob.tolist()
    q, k, v = (t.double() for t in (q, k, v))
    gq, gk, gv = (t.double() for t in (global_q, global_k, global_v)) if args.has_global_projections else (q, k, v)
    batch, heads, n, dim = q.shape
    out = torch.zeros(batch, heads, n, dim, dtype=torch.float64, device=q.device)
    for b in range(batch):
        for h in range(heads):
            for i in range(n):
                keys = _keys_of(i, h, n, args, real[b], glob[b], causal)
                if not keys:
                    continue
                qq, kk, vv = (gq, gk, gv) if glob[b][i] else (q, k, v)
                scores = [float(qq[b, h, i] @ kk[b, h, j]) * args.scale for j in keys]
                top = max(scores)
                weights = [math.exp(s - top) for s in scores]
                total = sum(weights)
                for w, j in zip(weights, keys):
                    out[b, h, i] += (w / total) * vv[b, h, j]
    return out
