"""The dense float64 oracle: builds the [B, H, N, N] set of allowed (query, key) pairs from the
definition (docs/design.md §2) and runs a masked softmax. Returns float64."""

import torch

from .._args import check_attention_args, token_roles


def allowed_pairs(q, window_left, window_right, dilation, real, glob, causal):
    """Bool [B, H, N, N] pairs (query i, key j) for local rows and for global rows."""
    n = q.shape[2]
    pos = torch.arange(n, device=q.device)
    offset = pos[None, :] - pos[:, None]  # j - i
    d = torch.tensor(dilation, device=q.device)[:, None, None]
    in_band = (offset % d == 0) & (offset >= -window_left * d) & (offset <= window_right * d)  # [H, N, N]
    local_key = (real & ~glob)[:, None, None, :]
    global_key = glob[:, None, None, :]
    local_rows = (in_band[None] & local_key) | global_key
    global_rows = real[:, None, None, :].expand_as(local_rows)
    if causal:
        not_future = offset <= 0
        local_rows = local_rows & not_future
        global_rows = global_rows & not_future
    return local_rows, global_rows


def _masked_attention(q, k, v, allowed, scale):
    scores = (q @ k.transpose(-1, -2)) * scale
    has_key = allowed.any(-1, keepdim=True)
    # Rows without keys get finite dummy scores and are zeroed afterwards, so no NaN reaches grads.
    scores = torch.where(allowed, scores, float("-inf"))
    scores = torch.where(has_key, scores, 0.0)
    probs = torch.softmax(scores, dim=-1) * allowed
    return probs @ v


def dense_attention(q, k, v, window, *, dilation=1, attention_mask=None, global_attention_mask=None,
                    global_q=None, global_k=None, global_v=None, causal=False, scale=None):
    args = check_attention_args(q, k, v, window, dilation, attention_mask, global_attention_mask, global_q,
                                global_k, global_v, causal, scale)
    real, glob = token_roles(q, attention_mask, global_attention_mask)
    local_allowed, global_allowed = allowed_pairs(q, args.window_left, args.window_right, args.dilation, real, glob,
                                                  causal)
    q, k, v = (t.double() for t in (q, k, v))
    if args.has_global_projections:
        gq, gk, gv = (t.double() for t in (global_q, global_k, global_v))
    else:
        gq, gk, gv = q, k, v
    local_out = _masked_attention(q, k, v, local_allowed, args.scale)
    global_out = _masked_attention(gq, gk, gv, global_allowed, args.scale)
    local_row = (real & ~glob)[:, None, :, None]
    global_row = glob[:, None, :, None]
    return torch.where(local_row, local_out, torch.where(global_row, global_out, 0.0))
