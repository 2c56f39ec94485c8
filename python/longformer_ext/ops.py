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
) -> tuple[Tensor, Tensor]:
    """Local rows (band + global keys); global and padding rows are 0 with lse = -inf."""
    return _ops.banded_attn(q, k, v, window_left, window_right, list(dilation), attention_mask,
                            global_attention_mask, causal, scale)


def global_attn(
    global_q: Tensor, global_k: Tensor, global_v: Tensor, global_attention_mask: Tensor,
    attention_mask: Optional[Tensor], causal: bool, scale: float, out: Tensor,
) -> tuple[Tensor, Tensor]:
    """A copy of ``out`` whose global rows attend to every real key with the global projections."""
    return _ops.global_attn(global_q, global_k, global_v, global_attention_mask, attention_mask, causal, scale, out)


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
def _(q, k, v, window_left, window_right, dilation, attention_mask, global_attention_mask, causal, scale):
    return _empty_heads(q), _lse_like(q)


@torch.library.register_fake("longformer::banded_attn_backward")
def _(grad_out, q, k, v, out, lse, window_left, window_right, dilation, attention_mask, global_attention_mask,
      causal, scale):
    return _empty_heads(q), _empty_heads(q), _empty_heads(q)


@torch.library.register_fake("longformer::global_attn")
def _(global_q, global_k, global_v, global_attention_mask, attention_mask, causal, scale, out):
    return _empty_heads(global_q), _lse_like(global_q)


@torch.library.register_fake("longformer::global_attn_backward")
def _(grad_out, global_q, global_k, global_v, out, lse, global_attention_mask, attention_mask, causal, scale):
    return _empty_heads(global_q), _empty_heads(global_q), _empty_heads(global_q), _empty_heads(global_q)


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
    q, k, v, window_left, window_right, dilation, attention_mask, global_attention_mask, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, attention_mask, global_attention_mask)
    ctx.args = (window_left, window_right, dilation, causal, scale)
    ctx.mark_non_differentiable(lse)


def _banded_attn_backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, attention_mask, global_attention_mask = ctx.saved_tensors
    window_left, window_right, dilation, causal, scale = ctx.args
    dq, dk, dv = _ops.banded_attn_backward(_last_dim_contiguous(grad_out), q, k, v, out, lse, window_left,
                                           window_right, dilation, attention_mask, global_attention_mask, causal,
                                           scale)
    return dq, dk, dv, None, None, None, None, None, None, None


torch.library.register_autograd("longformer::banded_attn", _banded_attn_backward, setup_context=_banded_attn_setup)


def _global_attn_setup(ctx, inputs, output):
    global_q, global_k, global_v, global_attention_mask, attention_mask, causal, scale, _out_in = inputs
    out, lse = output
    ctx.save_for_backward(global_q, global_k, global_v, out, lse, global_attention_mask, attention_mask)
    ctx.args = (causal, scale)
    ctx.mark_non_differentiable(lse)


def _global_attn_backward(ctx, grad_out, _grad_lse):
    global_q, global_k, global_v, out, lse, global_attention_mask, attention_mask = ctx.saved_tensors
    causal, scale = ctx.args
    dq, dk, dv, grad_in = _ops.global_attn_backward(_last_dim_contiguous(grad_out), global_q, global_k, global_v,
                                                    out, lse, global_attention_mask, attention_mask, causal, scale)
    return dq, dk, dv, None, None, None, None, grad_in


torch.library.register_autograd("longformer::global_attn", _global_attn_backward, setup_context=_global_attn_setup)


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
