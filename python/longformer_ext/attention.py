"""``longformer_attention``: the public entry point, composed of the fused ops."""

from typing import Optional

import torch
from torch import Tensor

from . import ops
from ._args import Dilation, Window, check_attention_args


# Device types this build has kernels for, looked up once (a lookup inside the function would be a
# torch.compile graph break).
_KERNEL_DEVICES = frozenset(
    device for device in ("cpu", "cuda")
    if torch._C._dispatch_has_kernel_for_dispatch_key("longformer::banded_attn", device.upper()))


def longformer_attention(
    q: Tensor, k: Tensor, v: Tensor, window: Window, *, dilation: Dilation = 1,
    attention_mask: Optional[Tensor] = None, global_attention_mask: Optional[Tensor] = None,
    global_q: Optional[Tensor] = None, global_k: Optional[Tensor] = None, global_v: Optional[Tensor] = None,
    causal: bool = False, scale: Optional[float] = None,
) -> Tensor:
    """Longformer attention: dilated sliding windows plus global tokens, fused, forward and backward.

    Args:
        q, k, v: ``[B, H, N, D]``, any strides with a contiguous last dimension (a head-split view
            of a ``[B, N, H*D]`` projection costs no copy).
        window: int ``w`` (one-sided: ``w`` keys on each side) or ``(left, right)``. The band keys of
            query ``i`` in head ``h`` are ``i + t * dilation[h]`` for ``t`` in ``[-left, right]``.
        dilation: int, or ``H`` values (sequence or integer tensor; under ``torch.compile`` pass a
            list, since reading a tensor's values is a graph break).
        attention_mask: ``[B, N]`` bool/int, nonzero = real token, 0 = padding. Float rejected.
        global_attention_mask: ``[B, N]`` bool/int, nonzero = global token. Float rejected.
        global_q, global_k, global_v: ``[B, H, N, D]`` projections used by the rows of global
            queries (all three or none; none = use ``q, k, v``).
        causal: no query attends to a key ``j > i`` (band, global keys and global rows alike).
        scale: score scale, default ``1 / sqrt(D)``.

    Returns:
        ``[B, H, N, D]``, a view of a contiguous ``[B, N, H, D]`` tensor. Padding rows are exactly 0;
        a local row sees its local band keys plus every global key (counted once); a global row
        sees every real key. Softmax and accumulation run in float32 (float64 for float64 inputs).
    """
    args = check_attention_args(q, k, v, window, dilation, attention_mask, global_attention_mask, global_q,
                                global_k, global_v, causal, scale)
    if q.device.type not in _KERNEL_DEVICES:
        raise NotImplementedError(
            f"longformer_ext has no kernels for {q.device.type} tensors in this build "
            f"(CPU kernels always; CUDA kernels only in a build against a CUDA torch with nvcc)")
    if not args.has_global_projections:
        global_q = global_k = global_v = None
    out, _ = ops.banded_attn(q, k, v, args.window_left, args.window_right, args.dilation, attention_mask,
                             global_attention_mask, causal, args.scale, global_q, global_k, global_v)
    return out
