"""The dense float64 oracle: builds the [B, H, Nq, Nk] set of allowed (query, key) pairs from the
definition (docs/design.md §2, and the general op of §2.2) and runs a masked softmax. Returns float64.

The §2.2 arguments (grouped KV heads, queries inside a longer key sequence, packed sequences,
softcap, ALiBi, sinks, the lse) are the oracle's ahead of the kernels: ``longformer_attention``
takes the §2 ones."""

import torch

from .._args import check_general_attention_args, cu_seqlens_bounds, token_roles
from .._softmax import masked_logsumexp, masked_softmax


def allowed_pairs(q, window_left, window_right, dilation, real, glob, causal, *, q_positions=None, sequence=None):
    """Bool [B, H, Nq, Nk] pairs (query at key position p, key j) for local rows and for global rows.
    `real`, `glob` are [B, Nk] key roles; `q_positions` [Nq] the queries' key positions (default
    0, 1, ...: Nq = Nk); `sequence` [Nk] the packed sequence of each position."""
    device = real.device
    keys = torch.arange(real.shape[1], device=device)
    if q_positions is None:
        q_positions = torch.arange(q.shape[2], device=device)
    offset = keys[None, :] - q_positions[:, None]  # j - p
    d = torch.tensor(dilation, device=device)[:, None, None]
    in_band = (offset % d == 0) & (offset >= -window_left * d) & (offset <= window_right * d)  # [H, Nq, Nk]
    local_key = (real & ~glob)[:, None, None, :]
    global_key = glob[:, None, None, :]
    local_rows = (in_band[None] & local_key) | global_key
    global_rows = real[:, None, None, :].expand_as(local_rows)
    keep = torch.ones_like(offset, dtype=torch.bool)
    if causal:
        keep = keep & (offset <= 0)
    if sequence is not None:  # a query sees only its own sequence's keys (band and global keys alike)
        keep = keep & (sequence[q_positions][:, None] == sequence[None, :])
    return local_rows & keep, global_rows & keep


def _masked_attention(q, k, v, allowed, scale, softcap, bias, sinks):
    """(out, lse) of the masked softmax over `allowed` keys (plus one sink logit per head when given)."""
    scores = (q @ k.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if bias is not None:
        scores = scores + bias
    if sinks is not None:  # the sink is one more logit in every row's softmax, always allowed, with a zero value
        scores = torch.cat([scores, sinks.double()[None, :, None, None].expand(*scores.shape[:-1], 1)], dim=-1)
        allowed = torch.cat([allowed, torch.ones_like(allowed[..., :1])], dim=-1)
    probs = masked_softmax(scores, allowed)[..., :k.shape[2]]  # without the sink's column
    return probs @ v, masked_logsumexp(scores, allowed)


def dense_attention(q, k, v, window, *, dilation=1, attention_mask=None, global_attention_mask=None,
                    global_q=None, global_k=None, global_v=None, causal=False, scale=None, q_offset=None,
                    cu_seqlens=None, softcap=None, alibi_slopes=None, sinks=None, return_lse=False):
    """Longformer attention by definition, in float64: out [B, H, Nq, D] (and lse [B, H, Nq] with
    `return_lse`: -inf for rows without a key, a sink counting as one; padding rows -inf)."""
    args = check_general_attention_args(q, k, v, window, dilation, attention_mask, global_attention_mask, global_q,
                                        global_k, global_v, causal, scale, q_offset=q_offset, cu_seqlens=cu_seqlens,
                                        softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks)
    n_queries, n_keys = q.shape[2], k.shape[2]
    real, glob = token_roles(k, attention_mask, global_attention_mask)  # roles of the key positions
    positions = args.q_offset + torch.arange(n_queries, device=q.device)
    sequence = None
    if args.cu_seqlens is not None:
        bounds = cu_seqlens_bounds(args.cu_seqlens, n_keys)
        lengths = torch.tensor([b - a for a, b in zip(bounds, bounds[1:])], device=q.device)
        sequence = torch.repeat_interleave(torch.arange(len(lengths), device=q.device), lengths)
    local_allowed, global_allowed = allowed_pairs(q, args.window_left, args.window_right, args.dilation, real, glob,
                                                  causal, q_positions=positions, sequence=sequence)
    bias = None
    if args.alibi_slopes is not None:
        distance = (torch.arange(n_keys, device=q.device)[None, :] - positions[:, None]).abs().double()
        bias = -args.alibi_slopes.double()[:, None, None] * distance  # [H, Nq, Nk]
    group = q.shape[1] // args.heads_kv if args.heads_kv else 1

    def heads(t):  # query head h reads KV head h // group
        return t.double().repeat_interleave(group, dim=1)

    q64, k64, v64 = q.double(), heads(k), heads(v)
    if args.has_global_projections:
        gq, gk, gv = global_q.double(), heads(global_k), heads(global_v)
    else:
        gq, gk, gv = q64, k64, v64
    local_out, local_lse = _masked_attention(q64, k64, v64, local_allowed, args.scale, args.softcap, bias, args.sinks)
    global_out, global_lse = _masked_attention(gq, gk, gv, global_allowed, args.scale, args.softcap, bias, args.sinks)
    local_row = (real & ~glob)[:, positions][:, None, :]
    global_row = glob[:, positions][:, None, :]
    out = torch.where(local_row[..., None], local_out, torch.where(global_row[..., None], global_out, 0.0))
    if not return_lse:
        return out
    lse = torch.where(local_row, local_lse, torch.where(global_row, global_lse, float("-inf")))
    return out, lse
