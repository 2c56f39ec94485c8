"""Validation and normalisation of the public attention arguments, shared by the fused function
and the reference implementations so that all of them accept and reject the same inputs."""

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

Window = Union[int, Sequence[int]]
Dilation = Union[int, Sequence[int], Tensor]


@dataclass(frozen=True)
class AttentionArgs:
    window_left: int
    window_right: int
    dilation: list[int]  # one entry per head
    scale: float
    has_global_projections: bool


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def window_pair(window: Window) -> tuple[int, int]:
    """An int ``w`` is one-sided, ``(w, w)``; a pair is ``(left, right)``; both must be >= 0."""
    if _is_int(window):
        pair = (window, window)
    elif isinstance(window, (tuple, list)) and len(window) == 2 and all(_is_int(w) for w in window):
        pair = (window[0], window[1])
    else:
        raise TypeError(f"window must be an int (one-sided) or a pair of ints (left, right), got {window!r}")
    if pair[0] < 0 or pair[1] < 0:
        raise ValueError(f"window sides must be >= 0, got {pair}")
    return pair


def per_head_dilation(dilation: Dilation, heads: int) -> list[int]:
    """An int, or one value per head (sequence or integer tensor); every value >= 1."""
    if isinstance(dilation, Tensor):
        if dilation.is_floating_point() or dilation.is_complex() or dilation.dim() > 1:
            raise TypeError(f"a dilation tensor must be a 0-d or 1-d integer tensor, got {dilation.dtype} "
                            f"with shape {tuple(dilation.shape)}")
        dilation = dilation.tolist()
    if _is_int(dilation):
        values = [dilation] * heads
    elif isinstance(dilation, (tuple, list)) and all(_is_int(d) for d in dilation):
        values = list(dilation)
        if len(values) != heads:
            raise ValueError(f"dilation has {len(values)} entries but there are H = {heads} heads")
    else:
        raise TypeError(f"dilation must be an int, a sequence of H ints or an integer tensor, got {dilation!r}")
    if any(d < 1 for d in values):
        raise ValueError(f"dilation must be >= 1 for every head, got {values}")
    return values


def _check_heads(name: str, t, like: Optional[Tensor]) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must be [B, H, N, D], got shape {tuple(t.shape)}")
    if like is not None:
        if t.shape != like.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but q has {tuple(like.shape)}")
        if t.dtype != like.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {like.dtype}")
        if t.device != like.device:
            raise ValueError(f"{name} is on {t.device} but q is on {like.device}")
    if not (t.dtype.is_floating_point):
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if t.numel() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last dimension (stride 1), got strides {t.stride()}; "
                         "call .contiguous() or project into a [B, N, H*D] tensor and view it")


def _check_mask(name: str, mask: Optional[Tensor], q: Tensor) -> None:
    if mask is None:
        return
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a Tensor or None, got {type(mask).__name__}")
    if mask.is_floating_point() or mask.is_complex():
        raise TypeError(f"{name} must be bool or integer (nonzero = set), got {mask.dtype}; additive float masks "
                        "(e.g. Hugging Face's -10000/+10000) are rejected so they cannot be misread")
    if tuple(mask.shape) != (q.shape[0], q.shape[2]):
        raise ValueError(f"{name} must be [B, N] = [{q.shape[0]}, {q.shape[2]}], got {tuple(mask.shape)}")
    if mask.device != q.device:
        raise ValueError(f"{name} is on {mask.device} but q is on {q.device}")


def check_attention_args(q, k, v, window, dilation, attention_mask, global_attention_mask, global_q, global_k,
                         global_v, causal, scale) -> AttentionArgs:
    _check_heads("q", q, None)
    _check_heads("k", k, q)
    _check_heads("v", v, q)
    given = [x is not None for x in (global_q, global_k, global_v)]
    if any(given) and not all(given):
        raise ValueError("global_q, global_k and global_v must be given together (or none of them)")
    if all(given):
        if global_attention_mask is None:
            raise ValueError("global_q/global_k/global_v were given without a global_attention_mask: "
                             "there would be no global token to use them")
        for name, t in (("global_q", global_q), ("global_k", global_k), ("global_v", global_v)):
            _check_heads(name, t, q)
    _check_mask("attention_mask", attention_mask, q)
    _check_mask("global_attention_mask", global_attention_mask, q)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    left, right = window_pair(window)
    dilations = per_head_dilation(dilation, q.shape[1])
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] > 0 else 1.0
    elif not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite float or None, got {scale!r}")
    return AttentionArgs(left, right, dilations, float(scale), all(given))


def token_roles(q: Tensor, attention_mask: Optional[Tensor], global_attention_mask: Optional[Tensor]):
    """(real, global) bool [B, N] masks; a padding token is never global."""
    b, _, n, _ = q.shape
    real = torch.ones(b, n, dtype=torch.bool, device=q.device) if attention_mask is None else attention_mask != 0
    glob = torch.zeros_like(real) if global_attention_mask is None else (global_attention_mask != 0) & real
    return real, glob
