"""One query at a time, its keys listed straight from the definition: the paper's "loop" variant.
Slow (Python loops over B, H, N); for tiny shapes. Returns float64. It takes the general op's
arguments too (docs/design.md §2.2), written here independently of the dense oracle: a second
opinion on each of them."""

import math

import torch

from .._args import check_general_attention_args, cu_seqlens_bounds, token_roles


def _sequence_of(args, n):
    """The packed sequence of each position (all 0 without cu_seqlens)."""
    seq = [0] * n
    if args.cu_seqlens is not None:
        bounds = cu_seqlens_bounds(args.cu_seqlens, n)
        for s, (a, z) in enumerate(zip(bounds, bounds[1:])):
            seq[a:z] = [s] * (z - a)
    return seq


def _keys_of(p, h, n, args, real, glob, causal, seq):
    """The keys of the query at key position p in head h, ascending."""
    if not real[p]:
        return []
    if glob[p]:
        keys = [j for j in range(n) if real[j]]
    else:
        d = args.dilation[h]
        band = (p + t * d for t in range(-args.window_left, args.window_right + 1))
        keys = sorted({j for j in band if 0 <= j < n and real[j] and not glob[j]} | {j for j in range(n) if glob[j]})
    return [j for j in keys if (not causal or j <= p) and seq[j] == seq[p]]


def loop_attention(q, k, v, window, *, dilation=1, attention_mask=None, global_attention_mask=None,
                   global_q=None, global_k=None, global_v=None, causal=False, scale=None, q_offset=None,
                   cu_seqlens=None, softcap=None, alibi_slopes=None, sinks=None, return_lse=False):
    args = check_general_attention_args(q, k, v, window, dilation, attention_mask, global_attention_mask, global_q,
                                        global_k, global_v, causal, scale, q_offset=q_offset, cu_seqlens=cu_seqlens,
                                        softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks)
    real, glob = token_roles(k, attention_mask, global_attention_mask)
    real, glob = real.tolist(), glob.tolist()
    slopes = None if args.alibi_slopes is None else args.alibi_slopes.tolist()
    sink_logits = None if args.sinks is None else args.sinks.tolist()
    q, k, v = (t.double() for t in (q, k, v))
    gq, gk, gv = (t.double() for t in (global_q, global_k, global_v)) if args.has_global_projections else (q, k, v)
    batch, heads, n_queries, dim = q.shape
    n_keys = k.shape[2]
    group = heads // args.heads_kv if args.heads_kv else 1
    seq = _sequence_of(args, n_keys)
    out = torch.zeros(batch, heads, n_queries, dim, dtype=torch.float64, device=q.device)
    lse = torch.full((batch, heads, n_queries), float("-inf"), dtype=torch.float64, device=q.device)
    for b in range(batch):
        for h in range(heads):
            kv = h // group
            for i in range(n_queries):
                p = args.q_offset + i
                if not real[b][p]:
                    continue  # a padding row: 0, lse -inf
                keys = _keys_of(p, h, n_keys, args, real[b], glob[b], causal, seq)
                qq, kk, vv = (gq, gk, gv) if glob[b][p] else (q, k, v)
                scores = []
                for j in keys:
                    s = float(qq[b, h, i] @ kk[b, kv, j]) * args.scale
                    if args.softcap is not None:
                        s = args.softcap * math.tanh(s / args.softcap)
                    if slopes is not None:
                        s -= slopes[h] * abs(p - j)
                    scores.append(s)
                logits = scores + ([sink_logits[h]] if sink_logits is not None else [])
                if not logits:
                    continue  # no key and no sink
                top = max(logits)
                total = sum(math.exp(s - top) for s in logits)
                lse[b, h, i] = top + math.log(total)
                for s, j in zip(scores, keys):
                    out[b, h, i] += (math.exp(s - top) / total) * vv[b, kv, j]
    return (out, lse) if return_lse else out
