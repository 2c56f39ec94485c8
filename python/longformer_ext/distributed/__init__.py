"""Longformer attention over a sequence split along N across the ranks of a ``torch.distributed``
process group (context parallelism): each rank holds a contiguous shard and exchanges only a halo
of ``left * max(dilation)`` / ``right * max(dilation)`` keys and values with the ranks around it,
plus the global tokens. Transport is torch.distributed's functional collectives (gloo, NCCL).
docs/distributed.md explains the algorithm and its costs."""

from .attention import longformer_attention
from .plan import ShardPlan, plan
from .sharding import shard, shard_bounds, unshard

__all__ = ["ShardPlan", "longformer_attention", "plan", "shard", "shard_bounds", "unshard"]
