"""The halo: the keys and values a rank's band needs from other ranks, ``left * max(dilation)``
positions before its shard and ``right * max(dilation)`` after it (none after it when causal),
clipped to the sequence. One ``all_to_all_single`` moves every rank's halo at once, whatever the
number of ranks it spans (a halo wider than a neighbour's shard reaches further ranks); the same
exchange with the split sizes swapped returns the halo's gradients to their owners."""

from dataclasses import dataclass

import torch
import torch.distributed._functional_collectives as funcol
from torch import Tensor

from .plan import ShardPlan


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    lo, hi = max(a[0], b[0]), min(a[1], b[1])
    return (lo, max(lo, hi))


@dataclass(frozen=True)
class HaloLayout:
    """Positions ``[key_start, key_end)`` this rank's band reads: its shard plus ``left_rows``
    before and ``right_rows`` after it; and the split sizes of the exchange."""
    key_start: int
    key_end: int
    left_rows: int
    right_rows: int
    send: tuple[tuple[int, int], ...]  # per destination rank: shard-relative rows [lo, hi) it needs from us
    receive: tuple[int, ...]           # per source rank: rows we get from it (rank order = position order)

    @property
    def send_sizes(self) -> list[int]:
        return [hi - lo for lo, hi in self.send]


def _needed(bounds: tuple[int, int], reach_left: int, reach_right: int, total: int) -> tuple[tuple[int, int], ...]:
    """The halo ranges of a shard: before it and after it; none for an empty shard (no queries)."""
    start, end = bounds
    if start == end:
        return ()
    return ((max(0, start - reach_left), start), (end, min(total, end + reach_right)))


def halo_layout(plan: ShardPlan, reach_left: int, reach_right: int) -> HaloLayout:
    """The halo of ``plan.rank`` for a band that reaches ``reach_left`` positions back and
    ``reach_right`` forward, and what every rank sends every other."""
    total, me = plan.total, plan.bounds[plan.rank]
    needs = [_needed(b, reach_left, reach_right, total) for b in plan.bounds]
    send = []
    for dest in range(plan.world):
        rows = (me[0], me[0])
        if dest != plan.rank:
            for need in needs[dest]:
                lo, hi = _overlap(need, me)
                if hi > lo:
                    rows = (lo, hi)
        send.append((rows[0] - me[0], rows[1] - me[0]))
    mine = needs[plan.rank]
    receive = tuple(sum(max(0, _overlap(need, src)[1] - _overlap(need, src)[0]) for need in mine) if r != plan.rank
                    else 0 for r, src in enumerate(plan.bounds))
    left = mine[0][1] - mine[0][0] if mine else 0
    right = mine[1][1] - mine[1][0] if mine else 0
    return HaloLayout(me[0] - left, me[1] + right, left, right, tuple(send), receive)


def _rows_first(x: Tensor) -> Tensor:
    """[B, H, n, D] -> [n, B, H, D], the layout all_to_all_single splits (dimension 0)."""
    return x.permute(2, 0, 1, 3)


def exchange_halo(layout: HaloLayout, plan: ShardPlan, k: Tensor, v: Tensor) -> Tensor:
    """Starts the exchange of ``[k | v]`` rows; returns the (asynchronous) received rows
    ``[left + right, B, H_kv, 2 D]``, in position order. ``unpack_halo`` splits them."""
    pieces = [torch.cat([_rows_first(k[:, :, lo:hi]), _rows_first(v[:, :, lo:hi])], dim=-1) for lo, hi in layout.send]
    return funcol.all_to_all_single(torch.cat(pieces).contiguous(), list(layout.receive), layout.send_sizes,
                                    plan.group)


def unpack_halo(received: Tensor, layout: HaloLayout) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(left k, left v, right k, right v), each ``[B, H_kv, rows, D]``."""
    rows = funcol.wait_tensor(received).permute(1, 2, 0, 3)
    d = rows.shape[-1] // 2
    left, right = rows[:, :, :layout.left_rows], rows[:, :, layout.left_rows:]
    return left[..., :d], left[..., d:], right[..., :d], right[..., d:]


def return_halo_gradients(layout: HaloLayout, plan: ShardPlan, left_dk: Tensor, left_dv: Tensor, right_dk: Tensor,
                          right_dv: Tensor) -> Tensor:
    """Starts sending the halo's gradients back to the ranks that own those rows (the exchange
    reversed); returns the (asynchronous) gradients of this shard's rows that other ranks read,
    ``[sum of send sizes, B, H_kv, 2 D]`` in destination-rank order (``add_returned_gradients``)."""
    rows = torch.cat([torch.cat([_rows_first(left_dk), _rows_first(left_dv)], dim=-1),
                      torch.cat([_rows_first(right_dk), _rows_first(right_dv)], dim=-1)])
    return funcol.all_to_all_single(rows.contiguous(), layout.send_sizes, list(layout.receive), plan.group)


def add_returned_gradients(returned: Tensor, layout: HaloLayout, dk: Tensor, dv: Tensor) -> None:
    """Adds the gradients other ranks computed for this shard's rows into ``dk, dv`` [B, H_kv, n, D]."""
    rows = funcol.wait_tensor(returned).permute(1, 2, 0, 3)
    d = dk.shape[-1]
    offset = 0
    for lo, hi in layout.send:
        part = rows[:, :, offset:offset + hi - lo]
        dk[:, :, lo:hi] += part[..., :d].to(dk.dtype)
        dv[:, :, lo:hi] += part[..., d:].to(dv.dtype)
        offset += hi - lo
