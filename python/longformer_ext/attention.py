"""``longformer_attention``: the public entry point, composed of the fused ops."""

from typing import Optional, Union

import torch
from torch import Tensor

from . import ops
from ._args import Dilation, Window, check_general_attention_args


# Device types this build has kernels for, looked up once (a lookup inside the function would be a
# torch.compile graph break).
_KERNEL_DEVICES = frozenset(
    device for device in ("cpu", "cuda")
    if torch._C._dispatch_has_kernel_for_dispatch_key("longformer::banded_attn", device.upper()))


def longformer_attention(
    q: Tensor, k: Tensor, v: Tensor, window: Window, *, dilation: Dilation = 1,
    attention_mask: Optional[Tensor] = None, global_attention_mask: Optional[Tensor] = None,
    global_q: Optional[Tensor] = None, global_k: Optional[Tensor] = None, global_v: Optional[Tensor] = None,
    causal: bool = False, scale: Optional[float] = None, q_offset: Optional[int] = None,
    cu_seqlens: Optional[Tensor] = None, softcap: Optional[float] = None, alibi_slopes: Optional[Tensor] = None,
    sinks: Optional[Tensor] = None, return_lse: bool = False,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Longformer attention: dilated sliding windows plus global tokens, fused, forward and backward,
    and the general sliding-window op around it (docs/design.md §2.2).

    Args:
        q: ``[B, H, Nq, D]``; k, v: ``[B, H_kv, Nk, D]`` with ``H % H_kv == 0`` (grouped KV heads:
            query head ``h`` reads KV head ``h // (H // H_kv)``) and ``Nq <= Nk``. Any strides with a
            contiguous last dimension (a head-split view of a ``[B, N, H*D]`` projection costs no copy).
        window: int ``w`` (one-sided: ``w`` keys on each side) or ``(left, right)``. The band keys of
            the query at position ``p`` in head ``h`` are ``p + t * dilation[h]`` for ``t`` in ``[-left, right]``.
        dilation: int, or ``H`` values (sequence or integer tensor; under ``torch.compile`` pass a
            list, since reading a tensor's values is a graph break).
        attention_mask: ``[B, Nk]`` bool/int, nonzero = real token, 0 = padding. Float rejected.
        global_attention_mask: ``[B, Nk]`` bool/int, nonzero = global token. Float rejected.
        global_q, global_k, global_v: projections used by the rows of global queries, shaped like
            ``q``, ``k``, ``v`` (all three or none; none = use ``q, k, v``).
        causal: no query attends to a key after its position (band, global keys and global rows alike).
        scale: score scale, default ``1 / sqrt(D)``.
        q_offset: key position of query 0, in ``[0, Nk - Nq]``; default ``Nk - Nq`` (the queries are
            the newest positions, as when decoding against a cache).
        cu_seqlens: int32/int64 ``[S + 1]``, rising from 0 to ``N``: ``S`` packed sequences along
            ``N`` (``B == 1``, ``Nq == Nk``); no query sees a key of another sequence.
        softcap: ``c > 0`` caps each scaled score ``s`` to ``c * tanh(s / c)``.
        alibi_slopes: ``[H]`` float: subtracts ``slope[h] * |p - j|`` from the score of key ``j``.
        sinks: ``[H]`` float, learnable: one more logit per row's softmax with a zero value.
        return_lse: also return every row's log-sum-exp ``[B, H, Nq]`` (float32; float64 for float64
            inputs; -inf for rows without keys; a sink counts as a key), differentiable.

    Returns:
        ``[B, H, Nq, D]``, a view of a contiguous ``[B, Nq, H, D]`` tensor (and the lse with
        ``return_lse``). Padding rows are exactly 0; a local row sees its local band keys plus every
        global key (counted once); a global row sees every real key. Softmax and accumulation run in
        float32 (float64 for float64 inputs).
    """
    args = check_general_attention_args(q, k, v, window, dilation, attention_mask, global_attention_mask, global_q,
                                        global_k, global_v, causal, scale, q_offset=q_offset, cu_seqlens=cu_seqlens,
                                        softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks)
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {return_lse!r}")
    if q.device.type not in _KERNEL_DEVICES:
        raise NotImplementedError(
            f"longformer_ext has no kernels for {q.device.type} tensors in this build "
            f"(CPU kernels always; CUDA kernels only in a build against a CUDA torch with nvcc)")
    if not args.has_global_projections:
        global_q = global_k = global_v = None
    accumulation = torch.float64 if q.dtype == torch.float64 else torch.float32
    out, lse = ops.banded_attn(
        q, k, v, args.window_left, args.window_right, args.dilation, attention_mask, global_attention_mask, causal,
        args.scale, global_q, global_k, global_v, q_offset=-1 if q_offset is None else q_offset,
        cu_seqlens=cu_seqlens, softcap=0.0 if args.softcap is None else args.softcap,
        alibi_slopes=None if alibi_slopes is None else alibi_slopes.to(accumulation).contiguous(),
        sinks=None if sinks is None else sinks.to(accumulation).contiguous())
    return (out, lse) if return_lse else out

