"""Attention between a set of queries and a few keys at explicit positions, as a partial result to
be merged by log-sum-exp: the pieces of a sharded call that are not a band.

Two such pieces exist per rank: the local rows against the global tokens' keys (many queries, few
keys), and the global rows against the rank's own keys (few queries, many keys). Both are
``O(rows * keys)`` with one side small (the number of global tokens), so they are written in
PyTorch, in the accumulation dtype, with their backward by hand: the sharded call's backward runs
them with the *merged* output and lse, as a flash-style backward does, so each piece returns the
exact gradient of its keys without knowing the other pieces."""

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .._softmax import masked_logsumexp, masked_softmax


@dataclass(frozen=True)
class ScoreTerms:
    """What turns ``q . k`` into a logit (docs/design.md §2.2): scale, softcap, ALiBi."""
    scale: float
    softcap: Optional[float]
    alibi_slopes: Optional[Tensor]  # [H], accumulation dtype


def _grouped(q: Tensor, heads_kv: int) -> Tensor:
    """[B, H, M, D] -> [B, H_kv, H / H_kv, M, D]: query head h reads KV head h // (H / H_kv)."""
    b, h, m, d = q.shape
    return q.reshape(b, heads_kv, h // heads_kv, m, d)


def _logits(q: Tensor, q_pos: Tensor, k: Tensor, k_pos: Tensor, terms: ScoreTerms) -> tuple[Tensor, Optional[Tensor]]:
    """(logits [B, H, M, S], tanh of the capped scores or None). q_pos [B, M], k_pos [B, S]."""
    b, h, m, _ = q.shape
    scores = torch.einsum("bkgmd,bksd->bkgms", _grouped(q, k.shape[1]), k).reshape(b, h, m, k.shape[2])
    scores = scores * terms.scale
    capped = None
    if terms.softcap is not None:
        capped = torch.tanh(scores / terms.softcap)
        scores = terms.softcap * capped
    if terms.alibi_slopes is not None:
        distance = (q_pos[:, :, None] - k_pos[:, None, :]).abs().to(scores.dtype)  # [B, M, S]
        scores = scores - terms.alibi_slopes[None, :, None, None] * distance[:, None]
    return scores, capped


# Query-key pairs per head in one block: bounds the [B, H, rows, keys] temporaries (about 64 MiB
# each in float32 at B * H = 16), however long the shard.
_PAIRS_PER_BLOCK = 1 << 20
_KEYS_PER_BLOCK = 4096


def _blocks(total: int, size: int):
    return [(start, min(total, start + size)) for start in range(0, total, size)]


def _block_shape(rows: int, keys: int) -> tuple[int, int]:
    key_block = max(1, min(keys, _KEYS_PER_BLOCK))
    return max(1, min(rows, _PAIRS_PER_BLOCK // key_block)), key_block


def merge_partials(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """Exact merge of two softmaxes over disjoint key sets; a row empty in both stays 0 and -inf."""
    lse = torch.logaddexp(lse_a, lse_b)
    finite = torch.isfinite(lse)
    safe = torch.where(finite, lse, 0.0)
    weight_a = torch.where(finite, torch.exp(lse_a - safe), 0.0)[..., None]
    weight_b = torch.where(finite, torch.exp(lse_b - safe), 0.0)[..., None]
    return weight_a * out_a + weight_b * out_b, lse


def _block_attention(q, q_pos, k, v, k_pos, allowed, terms):
    logits, _ = _logits(q, q_pos, k, k_pos, terms)
    allowed = allowed[:, None]
    probs = masked_softmax(logits, allowed)
    b, h, m, _ = q.shape
    heads_kv, keys = k.shape[1], k.shape[2]
    out = torch.einsum("bkgms,bksd->bkgmd", probs.reshape(b, heads_kv, h // heads_kv, m, keys), v)
    return out.reshape(b, h, m, v.shape[-1]), masked_logsumexp(logits, allowed)


def partial_attention(q: Tensor, q_pos: Tensor, k: Tensor, v: Tensor, k_pos: Tensor, allowed: Tensor,
                      terms: ScoreTerms) -> tuple[Tensor, Tensor]:
    """(out [B, H, M, D], lse [B, H, M]) of the queries over their allowed keys; inputs in the
    accumulation dtype. ``allowed`` [B, M, S] bool; a row without an allowed key gets 0 and -inf.
    Computed in blocks of rows and keys (the key blocks merged by lse)."""
    b, h, m, _ = q.shape
    out = q.new_zeros(b, h, m, v.shape[-1])
    lse = q.new_full((b, h, m), float("-inf"))
    row_block, key_block = _block_shape(m, k.shape[2])
    for r0, r1 in _blocks(m, row_block):
        for c0, c1 in _blocks(k.shape[2], key_block):
            part = _block_attention(q[:, :, r0:r1], q_pos[:, r0:r1], k[:, :, c0:c1], v[:, :, c0:c1], k_pos[:, c0:c1],
                                    allowed[:, r0:r1, c0:c1], terms)
            out[:, :, r0:r1], lse[:, :, r0:r1] = merge_partials(out[:, :, r0:r1], lse[:, :, r0:r1], *part)
    return out, lse


def partial_attention_backward(grad_out: Tensor, grad_lse: Optional[Tensor], q: Tensor, q_pos: Tensor, k: Tensor,
                               v: Tensor, k_pos: Tensor, allowed: Tensor, terms: ScoreTerms, out: Tensor,
                               lse: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of this piece, from the merged ``out`` and ``lse`` of the rows (over all their
    keys) and their gradients: probabilities are exp(logit - lse), and every row's delta is
    ``grad_out . out - grad_lse``, the same for every piece of the row. In blocks, like the forward."""
    delta = (grad_out * out).sum(-1)
    if grad_lse is not None:
        delta = delta - grad_lse
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    row_block, key_block = _block_shape(q.shape[2], k.shape[2])
    for r0, r1 in _blocks(q.shape[2], row_block):
        for c0, c1 in _blocks(k.shape[2], key_block):
            block_dq, block_dk, block_dv = _block_backward(
                grad_out[:, :, r0:r1], delta[:, :, r0:r1], q[:, :, r0:r1], q_pos[:, r0:r1], k[:, :, c0:c1],
                v[:, :, c0:c1], k_pos[:, c0:c1], allowed[:, r0:r1, c0:c1], terms, lse[:, :, r0:r1])
            dq[:, :, r0:r1] += block_dq
            dk[:, :, c0:c1] += block_dk
            dv[:, :, c0:c1] += block_dv
    return dq, dk, dv


def _block_backward(grad_out, delta, q, q_pos, k, v, k_pos, allowed, terms, lse):
    b, h, m, d = q.shape
    heads_kv, group, keys = k.shape[1], h // k.shape[1], k.shape[2]
    logits, capped = _logits(q, q_pos, k, k_pos, terms)
    usable = allowed[:, None] & torch.isfinite(lse)[..., None]
    probs = torch.exp(logits - lse.masked_fill(~torch.isfinite(lse), 0.0)[..., None]).masked_fill(~usable, 0.0)
    grouped_probs = probs.reshape(b, heads_kv, group, m, keys)
    grouped_grad_out = _grouped(grad_out, heads_kv)
    dv = torch.einsum("bkgms,bkgmd->bksd", grouped_probs, grouped_grad_out)
    dp = torch.einsum("bkgmd,bksd->bkgms", grouped_grad_out, v).reshape(b, h, m, keys)
    ds = probs * (dp - delta[..., None])
    if capped is not None:
        ds = ds * (1 - capped * capped)
    ds = ds * terms.scale
    grouped_ds = ds.reshape(b, heads_kv, group, m, keys)
    dq = torch.einsum("bkgms,bksd->bkgmd", grouped_ds, k).reshape(b, h, m, d)
    dk = torch.einsum("bkgms,bkgmd->bksd", grouped_ds, _grouped(q, heads_kv))
    return dq, dk, dv
