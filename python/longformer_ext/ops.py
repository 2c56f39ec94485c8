"""Typed wrappers of ``torch.ops.longformer``, with their fake (meta) and autograd registrations.

Every ``[B, H, N, D]`` result of the ops is a view of a contiguous ``[B, N, H, D]`` tensor; the
fake implementations below reproduce those strides exactly (``opcheck`` compares them).
"""

from typing import Optional, Sequence

import torch
from torch import Tensor

from ._loader import load_library

load_library()

_ops = torch.ops.longformer


def _empty_heads(like: Tensor) -> Tensor:
    b, h, n, d = like.shape
    return like.new_empty((b, n, h, d)).permute(0, 2, 1, 3)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _lse_like(q: Tensor) -> Tensor:
    return q.new_empty(q.shape[:3], dtype=_accumulation_dtype(q.dtype))


# --------------------------------------------------------------------------------------------
# Wrappers


def banded_attn(
    q: Tensor, k: Tensor, v: Tensor, window_left: int, window_right: int, dilation: Sequence[int],
    attention_mask: Optional[Tensor], global_attention_mask: Optional[Tensor], causal: bool, scale: float,
    global_q: Optional[Tensor] = None, global_k: Optional[Tensor] = None, global_v: Optional[Tensor] = None, *,
    q_offset: int = -1, cu_seqlens: Optional[Tensor] = None, softcap: float = 0.0,
    alibi_slopes: Optional[Tensor] = None, sinks: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Every row: local rows over their band plus the global keys, global rows over every real key
    (with ``global_q/k/v`` when given, all three or none), padding rows 0; and every row's lse
    (differentiable). The general op's arguments (docs/design.md §2.2): ``k, v`` may have fewer heads
    and more positions than ``q``; ``q_offset`` -1 means ``Nk - Nq``; ``softcap`` 0 means none;
    ``alibi_slopes`` and ``sinks`` are ``[H]`` in the accumulation dtype.

    float32 products may run as TF32 on CUDA tensor cores when PyTorch allows TF32 matmuls
    (``torch.backends.cuda.matmul.allow_tf32``, also set by ``torch.set_float32_matmul_precision``),
    read here at each call (``torch.compile`` guards on it); exact float32 otherwise."""
    return _ops.banded_attn(q, k, v, window_left, window_right, list(dilation), attention_mask,
                            global_attention_mask, causal, scale, global_q, global_k, global_v,
                            torch.backends.cuda.matmul.allow_tf32, q_offset, cu_seqlens, softcap, alibi_slopes, sinks)


def banded_matmul_qk(q: Tensor, k: Tensor, window_left: int, window_right: int, dilation: Sequence[int],
                     fill: float = float("-inf")) -> Tensor:
    """``scores[b, h, i, t] = q_i . k_j`` with ``j = i + (t - left) * dilation[h]``; ``fill`` off the sequence."""
    return _ops.banded_matmul_qk(q, k, window_left, window_right, list(dilation), fill)


def banded_matmul_pv(p: Tensor, v: Tensor, window_left: int, window_right: int, dilation: Sequence[int]) -> Tensor:
    """``out_i = sum_t p[i, t] v_j``, skipping slots whose key is off the sequence."""
    return _ops.banded_matmul_pv(p, v, window_left, window_right, list(dilation))


def banded_matmul_pv_transposed(p: Tensor, x: Tensor, window_left: int, window_right: int,
                                dilation: Sequence[int]) -> Tensor:
    """``out_j = sum over (i, t) with i + (t - left) * dilation = j of p[i, t] x_i``."""
    return _ops.banded_matmul_pv_transposed(p, x, window_left, window_right, list(dilation))


# --------------------------------------------------------------------------------------------
# Fake implementations


@torch.library.register_fake("longformer::banded_attn")
def _(q, k, v, window_left, window_right, dilation, attention_mask, global_attention_mask, causal, scale,
      global_q=None, global_k=None, global_v=None, allow_tf32=False, q_offset=-1, cu_seqlens=None, softcap=0.0,
      alibi_slopes=None, sinks=None):
    return _empty_heads(q), _lse_like(q)


@torch.library.register_fake("longformer::banded_attn_backward")
def _(grad_out, q, k, v, out, lse, window_left, window_right, dilation, attention_mask, global_attention_mask,
      causal, scale, global_q=None, global_k=None, global_v=None, allow_tf32=False, q_offset=-1, cu_seqlens=None,
      softcap=0.0, alibi_slopes=None, sinks=None, grad_lse=None):
    # Without global projections their gradients are in grad_q/k/v and these are empty.
    projection_grads = [_empty_heads(t) if global_q is not None else q.new_empty((0,)) for t in (q, k, k)]
    grad_sinks = q.new_empty((q.shape[1] if sinks is not None else 0,), dtype=_accumulation_dtype(q.dtype))
    return (_empty_heads(q), _empty_heads(k), _empty_heads(k), *projection_grads, grad_sinks)


@torch.library.register_fake("longformer::banded_matmul_qk")
def _(q, k, window_left, window_right, dilation, fill):
    return q.new_empty((*q.shape[:3], window_left + window_right + 1))


@torch.library.register_fake("longformer::banded_matmul_pv")
def _(p, v, window_left, window_right, dilation):
    return _empty_heads(v)


@torch.library.register_fake("longformer::banded_matmul_pv_transposed")
def _(p, x, window_left, window_right, dilation):
    return _empty_heads(x)


# --------------------------------------------------------------------------------------------
# Autograd


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _banded_attn_setup(ctx, inputs, output):
    (q, k, v, window_left, window_right, dilation, attention_mask, global_attention_mask, causal, scale,
     *optional) = inputs
    defaults = [None, None, None, False, -1, None, 0.0, None, None]
    global_q, global_k, global_v, allow_tf32, q_offset, cu_seqlens, softcap, alibi_slopes, sinks = \
        list(optional) + defaults[len(optional):]
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, attention_mask, global_attention_mask, global_q, global_k, global_v,
                          cu_seqlens, alibi_slopes, sinks)
    ctx.args = (window_left, window_right, dilation, causal, scale, allow_tf32, q_offset, softcap)
    # An unused output's gradient arrives as None rather than zeros: an lse nobody reads costs nothing.
    ctx.set_materialize_grads(False)


def _banded_attn_backward(ctx, grad_out, grad_lse):
    (q, k, v, out, lse, attention_mask, global_attention_mask, global_q, global_k, global_v, cu_seqlens, alibi_slopes,
     sinks) = ctx.saved_tensors
    window_left, window_right, dilation, causal, scale, allow_tf32, q_offset, softcap = ctx.args
    grad_out = torch.zeros_like(out) if grad_out is None else _last_dim_contiguous(grad_out)
    dq, dk, dv, dgq, dgk, dgv, dsinks = _ops.banded_attn_backward(
        grad_out, q, k, v, out, lse, window_left, window_right, dilation, attention_mask, global_attention_mask,
        causal, scale, global_q, global_k, global_v, allow_tf32, q_offset, cu_seqlens, softcap, alibi_slopes, sinks,
        grad_lse)
    if global_q is None:
        dgq = dgk = dgv = None
    if sinks is None:
        dsinks = None
    return (dq, dk, dv, None, None, None, None, None, None, None, dgq, dgk, dgv, None, None, None, None, None,
            dsinks)


torch.library.register_autograd("longformer::banded_attn", _banded_attn_backward, setup_context=_banded_attn_setup)


def _banded_setup(ctx, inputs, output):
    a, b, window_left, window_right, dilation = inputs[:5]
    ctx.save_for_backward(a, b)
    ctx.args = (window_left, window_right, dilation)


def _qk_backward(ctx, grad):
    q, k = ctx.saved_tensors
    grad = grad.contiguous()
    return (_ops.banded_matmul_pv(grad, k, *ctx.args), _ops.banded_matmul_pv_transposed(grad, q, *ctx.args),
            None, None, None, None)


def _pv_backward(ctx, grad):
    p, v = ctx.saved_tensors
    grad = _last_dim_contiguous(grad)
    return (_ops.banded_matmul_qk(grad, v, *ctx.args, 0.0), _ops.banded_matmul_pv_transposed(p, grad, *ctx.args),
            None, None, None)


def _pv_transposed_backward(ctx, grad):
    p, x = ctx.saved_tensors
    grad = _last_dim_contiguous(grad)
    return (_ops.banded_matmul_qk(x, grad, *ctx.args, 0.0), _ops.banded_matmul_pv(p, grad, *ctx.args),
            None, None, None)


torch.library.register_autograd("longformer::banded_matmul_qk", _qk_backward, setup_context=_banded_setup)
torch.library.register_autograd("longformer::banded_matmul_pv", _pv_backward, setup_context=_banded_setup)
torch.library.register_autograd("longformer::banded_matmul_pv_transposed", _pv_transposed_backward,
                                setup_context=_banded_setup)
