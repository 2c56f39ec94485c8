"""Splitting a sequence into contiguous shards and putting it back together, and the DTensor
wrapping of the sharded call."""

from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .plan import Group, resolve_group


def shard_bounds(total: int, world: int, sizes: Optional[Sequence[int]] = None) -> list[tuple[int, int]]:
    """``[start, end)`` of every rank's shard of ``total`` positions: ``sizes`` when given (they must
    add up to ``total``; zeros allowed), else ``torch.chunk``'s split (the one DTensor's ``Shard``
    uses): ``ceil(total / world)`` per rank, the last ones shorter or empty."""
    if sizes is None:
        step = -(-total // world) if world > 0 else 0
        sizes = [max(0, min(total, (r + 1) * step) - r * step) for r in range(world)]
    sizes = list(sizes)
    if len(sizes) != world or any(not isinstance(s, int) or s < 0 for s in sizes) or sum(sizes) != total:
        raise ValueError(f"shard sizes must be {world} non-negative ints adding up to {total}, got {sizes}")
    starts = [sum(sizes[:r]) for r in range(world)]
    return [(s, s + n) for s, n in zip(starts, sizes)]


def _sequence_dim(x: Tensor, dim: Optional[int]) -> int:
    """``dim``, or by default the sequence dimension of the library's layouts: 2 of a [B, H, N, D]
    tensor, 1 of anything else ([B, N] masks and token ids, [B, N, C] hidden states)."""
    if dim is not None:
        return dim
    return 2 if x.dim() == 4 else 1


def shard(x: Tensor, dim: Optional[int] = None, *, group: Group = None,
          sizes: Optional[Sequence[int]] = None) -> Tensor:
    """This rank's shard (a view) of ``x``, which every rank holds whole, along ``dim`` (default:
    2 of a [B, H, N, D] tensor, else 1), ``shard_bounds``' split or ``sizes``."""
    dim = _sequence_dim(x, dim)
    pg = resolve_group(group)
    start, end = shard_bounds(x.shape[dim], dist.get_world_size(pg), sizes)[dist.get_rank(pg)]
    return x.narrow(dim, start, end - start)


def unshard(x: Tensor, dim: Optional[int] = None, *, group: Group = None) -> Tensor:
    """The whole tensor from every rank's shard along ``dim`` (default as in ``shard``; any lengths,
    empty ones too), on every rank. Not differentiable: for results (the sharded call's gradients
    already reach each shard)."""
    dim = _sequence_dim(x, dim)
    pg = resolve_group(group)
    world = dist.get_world_size(pg)
    length = torch.tensor([x.shape[dim]], dtype=torch.int64, device=x.device)
    lengths = [torch.empty_like(length) for _ in range(world)]
    dist.all_gather(lengths, length, group=pg)
    lengths = [int(n) for n in lengths]
    widest = max(lengths)
    padded = torch.zeros(*x.shape[:dim], widest, *x.shape[dim + 1:], dtype=x.dtype, device=x.device)
    padded.narrow(dim, 0, x.shape[dim]).copy_(x.detach())
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=pg)
    return torch.cat([p.narrow(dim, 0, n) for p, n in zip(parts, lengths)], dim=dim)


def is_dtensor(x) -> bool:
    from torch.distributed.tensor import DTensor
    return isinstance(x, DTensor)


_SEQUENCE_DIMS = {"q": 2, "k": 2, "v": 2, "global_q": 2, "global_k": 2, "global_v": 2, "attention_mask": 1,
                  "global_attention_mask": 1}


def from_dtensors(call: Callable, q, k, v, window, **kwargs):
    """Runs the sharded ``call`` on the local shards of DTensors sharded along the sequence (dimension
    2 of ``[B, H, N, D]``, 1 of the ``[B, N]`` masks) on a one-dimensional mesh, and returns the
    output (and lse) as DTensors sharded the same way. ``sinks`` and ``alibi_slopes`` may be
    replicated DTensors."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    mesh = q.device_mesh
    if mesh.ndim != 1:
        raise ValueError(f"DTensor inputs must live on a one-dimensional mesh (the sequence's), got {mesh.ndim} "
                         f"dimensions; pass local tensors and group=mesh['cp'] instead")
    tensors = {"q": q, "k": k, "v": v, **kwargs}
    local = {}
    for name, value in tensors.items():
        if not isinstance(value, DTensor):
            local[name] = value
            continue
        if value.device_mesh != mesh:
            raise ValueError(f"{name} is a DTensor on another mesh than q's")
        expected = (Shard(_SEQUENCE_DIMS[name]),) if name in _SEQUENCE_DIMS else (Replicate(),)
        if tuple(value.placements) != expected:
            raise ValueError(f"{name} must be a DTensor placed as {expected} (the sequence split over the mesh), "
                             f"got {tuple(value.placements)}")
        local[name] = value.to_local()
    for name in ("k", "v"):
        if not isinstance(tensors[name], DTensor):
            raise TypeError(f"q is a DTensor but {name} is not: pass all of q, k, v as DTensors or none")
    result = call(local.pop("q"), local.pop("k"), local.pop("v"), window, group=mesh, **local)
    b, h, n, d = q.shape  # the global shape
    out = result[0] if isinstance(result, tuple) else result
    wrapped = DTensor.from_local(out, mesh, [Shard(2)], run_check=False, shape=q.shape,
                                 stride=(n * h * d, d, h * d, 1))
    if isinstance(result, tuple):
        lse = DTensor.from_local(result[1], mesh, [Shard(2)], run_check=False, shape=(b, h, n), stride=(h * n, n, 1))
        return wrapped, lse
    return wrapped
