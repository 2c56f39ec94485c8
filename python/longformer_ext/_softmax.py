"""The masked softmax of the paths that materialise probabilities (the references and ``nn``'s
unfused path): a softmax over each row's allowed entries, exact zeros elsewhere, and all zeros in a
row with no allowed entry. Written once so that they all treat rows without keys alike and none of
them lets a NaN into the forward or the backward."""

import torch
from torch import Tensor


def _fill_disallowed(scores: Tensor, allowed: Tensor) -> tuple[Tensor, Tensor]:
    """(`scores` with -inf where not allowed, which rows have an allowed entry). A row without one is
    set to 0 instead: all -inf would give NaN (forward and backward), so it gets finite dummy scores
    that the callers then zero out."""
    has_key = allowed.any(-1, keepdim=True)
    return scores.masked_fill(~allowed, float("-inf")).masked_fill(~has_key, 0.0), has_key


def masked_softmax(scores: Tensor, allowed: Tensor) -> Tensor:
    """Softmax of `scores` over the last dimension's entries where `allowed` (bool, broadcast to
    `scores`); exact zeros where not allowed, so a row without allowed entries is all zeros."""
    scores, _ = _fill_disallowed(scores, allowed)
    return torch.softmax(scores, dim=-1).masked_fill(~allowed, 0.0)


def masked_logsumexp(scores: Tensor, allowed: Tensor) -> Tensor:
    """Log-sum-exp of each row's allowed entries of `scores` (the last dimension is reduced); -inf for
    a row without allowed entries, with a zero gradient there."""
    scores, has_key = _fill_disallowed(scores, allowed)
    return torch.logsumexp(scores, dim=-1).masked_fill(~has_key[..., 0], float("-inf"))
