"""The overlapping-chunks ("sliding chunks") algorithm of the Longformer paper, in plain PyTorch.

Local rows never build an [N, N] matrix: the sequence is cut into chunks of 2w rows with stride w,
each chunk's queries meet each chunk's keys in one matmul, and the diagonals of those products are
rearranged into a band [N, 2w + 1] (column t is key i + t - w). Global keys are extra columns in
front of the band. Rows of global queries are computed densely and scattered over the local result.
Only a symmetric window (w, w) with w >= 1, dilation 1 and causal=False are supported (as in
allenai's and Hugging Face's chunked modes). Any N works: the sequence is padded internally to a
multiple of 2w with padding keys. Returns float64; written for tests, not for speed.
"""

import torch
import torch.nn.functional as F

from .._args import check_attention_args, token_roles
from .._softmax import masked_softmax


def _skew(prod, w):
    """[.., 2w, 2w] (row a, column b) -> [.., 2w, 2w + 1] with out[a, t] = prod[a, a + t - w], 0 where
    a + t - w falls outside the chunk. Padding each row to 4w + 1 columns and re-reading the buffer with
    one more element per row shifts row a left by a, so diagonals become columns."""
    rows = prod.shape[-1]
    padded = F.pad(prod, (w, w + 1))  # column x holds b = x - w; zeros around
    flat = F.pad(padded.flatten(-2), (0, rows))  # room for the extra element per row
    return flat.view(*prod.shape[:-2], rows, 4 * w + 2)[..., : 2 * w + 1]


def _banded_qk(q, k, w):
    """q, k [M, n, D] with n a multiple of 2w -> band [M, n, 2w + 1]: band[i, t] = q[i] . k[i + t - w],
    0 in slots whose key is outside the sequence (the caller masks those)."""
    m, n, _ = q.shape
    chunks = n // w - 1  # overlapping chunks of 2w rows, stride w; blocks of w rows: chunks + 1
    qc = q.unfold(1, 2 * w, w).transpose(-1, -2)  # [M, C, 2w, D], views: no copy
    kc = k.unfold(1, 2 * w, w).transpose(-1, -2)
    diag = _skew(qc @ kc.transpose(-1, -2), w)  # [M, C, 2w, 2w + 1], one matmul per chunk pair
    # Block c (rows c*w .. c*w + w - 1) is the top half of chunk c and the bottom half of chunk c - 1.
    # The top half sees all its right-side keys (diagonal included) inside the chunk, the bottom half
    # all its left-side keys; so each block takes its right side from chunk c and its left side from
    # chunk c - 1. The first block has no previous chunk and the last no own chunk: they take the
    # partial halves they have, and the missing slots are keys outside the sequence (masked later).
    band = q.new_zeros(m, chunks + 1, w, 2 * w + 1)
    band[:, :chunks, :, w:] = diag[:, :, :w, w:]
    band[:, chunks, :, w:] = diag[:, chunks - 1, w:, w:]
    band[:, 1:, :, :w] = diag[:, :, w:, :w]
    band[:, 0, :, :w] = diag[:, 0, :w, :w]
    return band.view(m, n, 2 * w + 1)


def _banded_pv(probs, v, w):
    """probs [M, n, 2w + 1] (band layout), v [M, n, D] -> [M, n, D]: sum_t probs[i, t] v[i + t - w].
    Slots whose key is outside the sequence must hold exact zeros."""
    m, n, _ = probs.shape
    blocks = n // w
    # Block c of w rows reads the 3w values starting w before it; row r's slot t is value r + t of that
    # window. Shifting row r right by r ("pad and diagonalize": pad w columns, drop the last w
    # elements of the flattened block, read rows of 3w) turns the band into a dense [w, 3w] block.
    band = probs.view(m, blocks, w, 2 * w + 1)
    dense = F.pad(band, (0, w)).flatten(-2)[..., : 3 * w * w].view(m, blocks, w, 3 * w)
    windows = F.pad(v, (0, 0, w, w)).unfold(1, 3 * w, w)  # [M, blocks, D, 3w]; the zero rows meet p = 0
    return (dense @ windows.transpose(-1, -2)).reshape(m, n, v.shape[-1])


def _take_rows(t, index):
    """t [B, H, N, D], index [B, x] -> t[b, :, index[b, s]] as [B, H, x, D]."""
    b, h, _, d = t.shape
    return t.gather(2, index[:, None, :, None].expand(b, h, index.shape[1], d))


def chunked_attention(q, k, v, window, *, dilation=1, attention_mask=None, global_attention_mask=None,
                      global_q=None, global_k=None, global_v=None, causal=False, scale=None):
    args = check_attention_args(q, k, v, window, dilation, attention_mask, global_attention_mask, global_q,
                                global_k, global_v, causal, scale)
    w = args.window_left
    if w != args.window_right or w < 1:
        raise NotImplementedError(f"chunked_attention supports only a symmetric window (w, w) with w >= 1, "
                                  f"got ({args.window_left}, {args.window_right}); use dense_attention")
    if any(d != 1 for d in args.dilation):
        raise NotImplementedError(f"chunked_attention supports only dilation 1, got {args.dilation}; "
                                  "use dense_attention")
    if causal:
        raise NotImplementedError("chunked_attention does not support causal=True; use dense_attention")
    real, glob = token_roles(q, attention_mask, global_attention_mask)
    q, k, v = (t.double() for t in (q, k, v))
    gq, gk, gv = (t.double() for t in (global_q, global_k, global_v)) if args.has_global_projections else (q, k, v)
    b, h, n, dim = q.shape

    # Global slots: the global positions of each batch row in increasing order, then filler slots
    # (non-global positions, never used) up to x = the largest global count in the batch.
    count = glob.sum(1)
    x = int(count.max()) if b > 0 else 0
    slot = torch.argsort((~glob).to(torch.uint8), dim=1, stable=True)[:, :x]  # [B, x]
    slot_used = torch.arange(x, device=q.device)[None, :] < count[:, None]  # [B, x]

    # Local rows, on a sequence padded to a multiple of 2w (>= one chunk pair); the padded positions
    # are padding keys, so they drop out of the band like any other padding.
    padded_n = max(1, -(-n // (2 * w))) * 2 * w
    pad = padded_n - n
    qp, kp, vp = (F.pad(t, (0, 0, 0, pad)).reshape(b * h, padded_n, dim) for t in (q, k, v))
    band_key = F.pad(real & ~glob, (0, pad), value=False)  # real, non-global keys may sit in the band
    band_allowed = F.pad(band_key, (w, w), value=False).unfold(1, 2 * w + 1, 1)  # [B, n', 2w+1], 0 <= j < n'
    band_scores = _banded_qk(qp, kp, w).view(b, h, padded_n, 2 * w + 1)
    global_scores = qp.view(b, h, padded_n, dim) @ _take_rows(k, slot).transpose(-1, -2)  # local q, k
    scores = torch.cat([global_scores, band_scores], -1) * args.scale  # [B, H, n', x + 2w + 1]
    allowed = torch.cat([slot_used[:, None, None, :].expand(b, 1, padded_n, x), band_allowed[:, None]], -1)
    probs = masked_softmax(scores, allowed)  # one softmax over [globals | band]: each key counted once
    band_out = _banded_pv(probs[..., x:].reshape(b * h, padded_n, 2 * w + 1), vp, w)
    local_out = (probs[..., :x] @ _take_rows(v, slot) + band_out.view(b, h, padded_n, dim))[:, :, :n]

    # Global rows: dense, with the global projections, over every real key; then written over the
    # local result at the global positions (the filler slots land on non-global rows, ignored below).
    global_probs = masked_softmax(_take_rows(gq, slot) @ gk.transpose(-1, -2) * args.scale,
                                  real[:, None, None, :].expand(b, 1, x, n))
    global_out = torch.zeros_like(q).scatter(2, slot[:, None, :, None].expand(b, h, x, dim), global_probs @ gv)

    local_row = (real & ~glob)[:, None, :, None]
    return torch.where(glob[:, None, :, None], global_out, torch.where(local_row, local_out, 0.0))
