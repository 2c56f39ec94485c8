"""The layout of a sequence sharded over a process group: which positions each rank holds, the
roles of every position (real, global), and where the global tokens are. Built once per batch from
the shards themselves (two small all-gathers) and reusable by every layer, since masks and shard
lengths are the same for all of them."""

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import Tensor

from .._args import check_role_mask

Group = Union[None, dist.ProcessGroup, "torch.distributed.device_mesh.DeviceMesh"]


def resolve_group(group: Group) -> dist.ProcessGroup:
    """A process group from None (the world), a process group, or a one-dimensional DeviceMesh."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("longformer_ext.distributed needs an initialised torch.distributed process group "
                           "(torch.distributed.init_process_group)")
    if group is None:
        return dist.group.WORLD
    if isinstance(group, dist.ProcessGroup):
        return group
    from torch.distributed.device_mesh import DeviceMesh
    if isinstance(group, DeviceMesh):
        if group.ndim != 1:
            raise ValueError(f"a DeviceMesh group must have one dimension (pass mesh['cp'] for a named one), "
                             f"got {group.ndim} dimensions")
        return group.get_group()
    raise TypeError(f"group must be None, a ProcessGroup or a one-dimensional DeviceMesh, got {type(group).__name__}")


@dataclass(frozen=True, eq=False)
class ShardPlan:
    """Layout of one batch's sequence over the ranks of a group (rank r holds positions
    ``bounds[r] = (start, end)``, contiguous and in rank order; a shard may be empty)."""
    group: dist.ProcessGroup
    rank: int
    bounds: tuple[tuple[int, int], ...]
    real: Tensor              # [B, N] bool: not padding
    glob: Tensor              # [B, N] bool: a real global token (a padding token is never global)
    global_positions: Tensor  # [B, G] int64, rising; G is the most global tokens of any batch row
    global_valid: Tensor      # [B, G] bool: slot holds a global token (rows with fewer are padded)

    @property
    def world(self) -> int:
        return len(self.bounds)

    @property
    def start(self) -> int:
        return self.bounds[self.rank][0]

    @property
    def end(self) -> int:
        return self.bounds[self.rank][1]

    @property
    def length(self) -> int:
        """Positions of this rank's shard."""
        return self.end - self.start

    @property
    def total(self) -> int:
        """Positions of the whole sequence."""
        return self.bounds[-1][1]

    @property
    def batch(self) -> int:
        return self.real.shape[0]

    @property
    def global_tokens(self) -> int:
        return self.global_positions.shape[1]

    def owned_slots(self) -> tuple[Tensor, Tensor]:
        """(which global slots this rank holds [B, G] bool, their index in the shard [B, G])."""
        own = self.global_valid & (self.global_positions >= self.start) & (self.global_positions < self.end)
        return own, (self.global_positions - self.start).clamp(0, max(self.length - 1, 0))


_PAD, _REAL, _GLOBAL = 0, 1, 3  # role codes sent between ranks (a padding global token is padding)


def plan(like: Tensor, attention_mask: Optional[Tensor] = None, global_attention_mask: Optional[Tensor] = None, *,
         group: Group = None) -> ShardPlan:
    """The layout of this batch, learnt from every rank's shard: ``like`` is this rank's ``q`` shard
    ``[B, H, n, D]`` or any ``[B, n]`` tensor of it (token ids, a mask), the masks are this rank's
    ``[B, n]`` slices. Every rank of the group must call it (it runs two all-gathers). Pass the
    result as ``plan=`` to every layer's call to skip this step there."""
    if like.dim() not in (2, 4):
        raise ValueError(f"like must be a [B, H, n, D] or [B, n] shard, got shape {tuple(like.shape)}")
    length = like.shape[2] if like.dim() == 4 else like.shape[1]
    return _build_plan(like.shape[0], length, like.device, attention_mask, global_attention_mask, group, ())


def _build_plan(batch: int, length: int, device: torch.device, attention_mask: Optional[Tensor],
                global_attention_mask: Optional[Tensor], group: Group, signature: Sequence[int]) -> ShardPlan:
    """``signature``: integers every rank must agree on (the call's configuration); a rank that differs
    is named in a ValueError raised on every rank, rather than left to mismatch a later collective."""
    pg = resolve_group(group)
    world, rank = dist.get_world_size(pg), dist.get_rank(pg)
    check_role_mask("attention_mask", attention_mask, batch, length, device, "the shard")
    check_role_mask("global_attention_mask", global_attention_mask, batch, length, device, "the shard")
    header = torch.tensor([batch, length, len(signature), *signature], dtype=torch.int64, device=device)
    headers = [torch.empty_like(header) for _ in range(world)]
    dist.all_gather(headers, header, group=pg)
    rows = [h.tolist() for h in headers]
    for other, row in enumerate(rows):
        if row[0] != batch or row[2:] != rows[0][2:]:
            raise ValueError(
                f"ranks disagree on the sharded attention call: rank {other} has batch {row[0]} and configuration "
                f"{row[3:]}, rank 0 has batch {rows[0][0]} and {rows[0][3:]} (window, dilation, causal, heads and "
                f"head size must be the same on every rank)")
    lengths = [row[1] for row in rows]
    starts = [sum(lengths[:r]) for r in range(world)]
    bounds = tuple((s, s + n) for s, n in zip(starts, lengths))

    real = torch.ones(batch, length, dtype=torch.bool, device=device) if attention_mask is None else attention_mask != 0
    glob = torch.zeros_like(real) if global_attention_mask is None else (global_attention_mask != 0) & real
    codes = torch.full((batch, max(lengths)), _PAD, dtype=torch.uint8, device=device)
    codes[:, :length] = torch.where(glob, _GLOBAL, torch.where(real, _REAL, _PAD)).to(torch.uint8)
    gathered = [torch.empty_like(codes) for _ in range(world)]
    dist.all_gather(gathered, codes, group=pg)
    full = torch.cat([g[:, :n] for g, n in zip(gathered, lengths)], dim=1)
    real_full, glob_full = full != _PAD, full == _GLOBAL

    total = bounds[-1][1]
    positions = torch.arange(total, device=device).expand(batch, total)
    order = torch.where(glob_full, positions, positions + total).sort(dim=1).values  # global positions first
    count = int(glob_full.sum(1).max()) if total > 0 else 0
    slots = order[:, :count]
    valid = slots < total
    return ShardPlan(pg, rank, bounds, real_full, glob_full, torch.where(valid, slots, 0), valid)
