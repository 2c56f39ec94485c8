"""Validation and normalisation of the public attention arguments, and the token roles the masks give,
shared by the fused function, the reference implementations and the ``nn`` modules so that all of
them accept and reject the same inputs and read the masks alike."""

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
    dilation: list[int]  # one entry per query head
    scale: float
    has_global_projections: bool
    # The general op's extensions (docs/design.md §2.2); the defaults are §2 unchanged.
    heads_kv: int = 0               # KV heads (H for plain attention)
    q_offset: int = 0               # key position of query 0 (Nk - Nq unless given)
    cu_seqlens: Optional[Tensor] = None     # packed sequences' boundaries, [S + 1] (cu_seqlens_bounds reads them)
    softcap: Optional[float] = None
    alibi_slopes: Optional[Tensor] = None   # [H]
    sinks: Optional[Tensor] = None          # [H]


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


def _check_heads(name: str, t, like: Optional[Tensor], shape: Optional[tuple] = None) -> None:
    """A [B, H, N, D] floating tensor with a contiguous last dimension, with the dtype and device of
    `like` and its shape (or `shape`, when given)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must be [B, H, N, D], got shape {tuple(t.shape)}")
    if like is not None:
        want = tuple(like.shape) if shape is None else shape
        if tuple(t.shape) != want:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but expected {want}" if shape is not None else
                             f"{name} has shape {tuple(t.shape)} but q has {tuple(like.shape)}")
        if t.dtype != like.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {like.dtype}")
        if t.device != like.device:
            raise ValueError(f"{name} is on {t.device} but q is on {like.device}")
    if not (t.dtype.is_floating_point):
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if t.numel() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last dimension (stride 1), got strides {t.stride()}; "
                         "call .contiguous() or project into a [B, N, H*D] tensor and view it")


def check_role_mask(name: str, mask, batch: int, n: int, device: torch.device, owner: str) -> None:
    """A [B, N] = [batch, n] bool/integer mask of token roles (nonzero = set), or None, on `device`, the
    device of the tensor named `owner` in the message. Wrong types raise TypeError, wrong shapes and
    devices ValueError."""
    if mask is None:
        return
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a Tensor or None, got {type(mask).__name__}")
    if mask.is_floating_point() or mask.is_complex():
        raise TypeError(f"{name} must be bool or integer (nonzero = set), got {mask.dtype}; additive float masks "
                        "(e.g. Hugging Face's -10000/0/+10000) are rejected so they cannot be misread (for Hugging "
                        "Face models use longformer_ext.integrations.transformers.patch)")
    if tuple(mask.shape) != (batch, n):
        raise ValueError(f"{name} must be [B, N] = [{batch}, {n}], got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"{name} is on {mask.device} but {owner} is on {device}")


def _check_per_head(name: str, t, q: Tensor) -> Optional[Tensor]:
    if t is None:
        return None
    if not isinstance(t, Tensor) or not t.is_floating_point() or tuple(t.shape) != (q.shape[1],):
        raise ValueError(f"{name} must be a floating-point [H] = [{q.shape[1]}] tensor, got "
                         f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
    if t.device != q.device:
        raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    return t


def _check_cu_seqlens(cu_seqlens, q: Tensor, k: Tensor, q_offset) -> Optional[Tensor]:
    """A 1-d int32/int64 [S + 1] tensor rising from 0 to N, for B == 1 and Nq == Nk, without q_offset. Its
    values are checked here in eager mode only (reading them is a graph break under torch.compile, where the
    op checks them itself)."""
    if cu_seqlens is None:
        return None
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32, torch.int64) \
            or cu_seqlens.numel() < 2:
        raise TypeError(f"cu_seqlens must be a 1-d int32 or int64 tensor [S + 1] with S >= 1, got {cu_seqlens!r}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but q is on {q.device}")
    if q.shape[0] != 1:
        raise ValueError(f"cu_seqlens packs the sequences along N and needs B == 1, got B = {q.shape[0]}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"cu_seqlens needs as many queries as keys, but q has Nq = {q.shape[2]} and k has "
                         f"Nk = {k.shape[2]} (queries inside a longer key sequence cannot be packed)")
    if q_offset not in (None, 0):
        raise ValueError(f"cu_seqlens and q_offset = {q_offset} cannot be combined: with cu_seqlens the queries "
                         "are the whole packed sequence")
    if not torch.compiler.is_compiling():
        cu_seqlens_bounds(cu_seqlens, k.shape[2])
    return cu_seqlens


def cu_seqlens_bounds(cu_seqlens: Tensor, n: int) -> list[int]:
    """The packed sequences' bounds as ints, checked: rising from 0 to ``n``, never decreasing."""
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != n or any(a > b for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"cu_seqlens must rise from 0 to N = {n} (never decreasing), got {bounds}")
    return bounds


def check_general_attention_args(q, k, v, window, dilation, attention_mask, global_attention_mask, global_q, global_k,
                                 global_v, causal, scale, *, q_offset=None, cu_seqlens=None, softcap=None,
                                 alibi_slopes=None, sinks=None) -> AttentionArgs:
    """The arguments of the general op (docs/design.md §2.2): k, v (and global_k, global_v) may have
    H_kv heads (H % H_kv == 0) and Nk >= Nq keys; masks are over the keys, [B, Nk]."""
    _check_heads("q", q, None)
    _check_heads("k", k, None)
    b, h, nq, d = q.shape
    _, h_kv, nk, _ = k.shape
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k has shape {tuple(k.shape)} but q has {tuple(q.shape)}: B and D must match")
    if (h_kv == 0 and h != 0) or (h_kv != 0 and h % h_kv != 0):
        raise ValueError(f"k has shape {tuple(k.shape)}: q has H = {h} heads, which must be a multiple of k's "
                         f"H_kv = {h_kv}")
    if nk < nq:
        raise ValueError(f"k has shape {tuple(k.shape)}: Nk = {nk} keys, fewer than q's Nq = {nq} queries")
    _check_heads("k", k, q, tuple(k.shape))
    _check_heads("v", v, q, tuple(k.shape))
    given = [x is not None for x in (global_q, global_k, global_v)]
    if any(given) and not all(given):
        raise ValueError("global_q, global_k and global_v must be given together (or none of them)")
    if all(given):
        if global_attention_mask is None:
            raise ValueError("global_q/global_k/global_v were given without a global_attention_mask: "
                             "there would be no global token to use them")
        _check_heads("global_q", global_q, q)
        _check_heads("global_k", global_k, q, tuple(k.shape))
        _check_heads("global_v", global_v, q, tuple(k.shape))
    check_role_mask("attention_mask", attention_mask, b, nk, q.device, "q")
    check_role_mask("global_attention_mask", global_attention_mask, b, nk, q.device, "q")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    left, right = window_pair(window)
    dilations = per_head_dilation(dilation, h)
    if scale is None:
        scale = 1.0 / math.sqrt(d) if d > 0 else 1.0
    elif not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite float or None, got {scale!r}")
    bounds = _check_cu_seqlens(cu_seqlens, q, k, q_offset)
    if q_offset is None:
        q_offset = nk - nq
    elif not _is_int(q_offset) or not 0 <= q_offset <= nk - nq:
        raise ValueError(f"q_offset must be an int in [0, Nk - Nq] = [0, {nk - nq}], got {q_offset!r}")
    if softcap is not None and (not isinstance(softcap, (int, float)) or isinstance(softcap, bool) or
                                not math.isfinite(softcap) or softcap <= 0):
        raise ValueError(f"softcap must be a finite float > 0 or None, got {softcap!r}")
    return AttentionArgs(left, right, dilations, float(scale), all(given), h_kv, q_offset, bounds,
                         None if softcap is None else float(softcap), _check_per_head("alibi_slopes", alibi_slopes, q),
                         _check_per_head("sinks", sinks, q))


def check_attention_args(q, k, v, window, dilation, attention_mask, global_attention_mask, global_q, global_k,
                         global_v, causal, scale) -> AttentionArgs:
    """The arguments of Longformer attention (docs/design.md §2): k, v like q."""
    _check_heads("q", q, None)
    _check_heads("k", k, q)
    _check_heads("v", v, q)
    return check_general_attention_args(q, k, v, window, dilation, attention_mask, global_attention_mask, global_q,
                                        global_k, global_v, causal, scale)


def token_roles(q: Tensor, attention_mask: Optional[Tensor], global_attention_mask: Optional[Tensor]):
    """(real, global) bool [B, N] masks; a padding token is never global."""
    b, _, n, _ = q.shape
    real = torch.ones(b, n, dtype=torch.bool, device=q.device) if attention_mask is None else attention_mask != 0
    glob = torch.zeros_like(real) if global_attention_mask is None else (global_attention_mask != 0) & real
    return real, glob
