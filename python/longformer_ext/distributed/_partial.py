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


def partial_attention(q: Tensor, q_pos: Tensor, k: Tensor, v: Tensor, k_pos: Tensor, allowed: Tensor,
                      terms: ScoreTerms) -> tuple[Tensor, Tensor]:
    """(out [B, H, M, D], lse [B, H, M]) of the queries over their allowed keys; inputs in the
    accumulation dtype. ``allowed`` [B, M, S] bool; a row without an allowed key gets 0 and -inf."""
    logits, _ = _logits(q, q_pos, k, k_pos, terms)
    allowed = allowed[:, None]
    probs = masked_softmax(logits, allowed)
    b, h, m, _ = q.shape
    heads_kv, keys = k.shape[1], k.shape[2]
    out = torch.einsum("bkgms,bksd->bkgmd", probs.reshape(b, heads_kv, h // heads_kv, m, keys), v)
    return out.reshape(b, h, m, v.shape[-1]), masked_logsumexp(logits, allowed)


def partial_attention_backward(grad_out: Tensor, grad_lse: Optional[Tensor], q: Tensor, q_pos: Tensor, k: Tensor,
                               v: Tensor, k_pos: Tensor, allowed: Tensor, terms: ScoreTerms, out: Tensor,
                               lse: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of this piece, from the merged ``out`` and ``lse`` of the rows (over all their
    keys) and their gradients: probabilities are exp(logit - lse), and every row's delta is
    ``grad_out . out - grad_lse``, the same for every piece of the row."""
    b, h, m, d = q.shape
    heads_kv, group, keys = k.shape[1], h // k.shape[1], k.shape[2]
    logits, capped = _logits(q, q_pos, k, k_pos, terms)
    usable = allowed[:, None] & torch.isfinite(lse)[..., None]
    probs = torch.exp(logits - lse.masked_fill(~torch.isfinite(lse), 0.0)[..., None]).masked_fill(~usable, 0.0)
    delta = (grad_out * out).sum(-1)
    if grad_lse is not None:
        delta = delta - grad_lse
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
