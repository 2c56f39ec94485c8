"""Longformer attention over a sequence sharded along N across the ranks of a process group.

Each rank holds a contiguous shard of q, k, v (and the masks). A local row needs its band, which
may reach into other ranks' shards (the halo, ``halo.py``), plus every global token's key; a
global row needs every key of the sequence. So each call

1. gathers the global tokens' queries, keys and values (one all-reduce of zero-filled slots),
2. starts the halo exchange (one all-to-all) and meanwhile runs the band kernel on the rows whose
   band stays inside the shard, then on the rows next to the edges,
3. computes the local rows against the global keys (``_partial.py``) and merges both by lse,
4. computes every global row against this rank's keys and merges the ranks' parts by their lse
   (an all-gather of the lse, an all-reduce of the weighted outputs): the owner keeps the rows.

The band kernel is the op itself (``torch.ops.longformer.banded_attn``) with ``q_offset`` placing
the queries inside a longer key range; the global tokens are masked out of its keys, so every key
is counted by exactly one piece. The backward is one function that issues its collectives in the
same order on every rank, whatever that rank's shard holds (an empty shard included): letting
autograd schedule several collectives' backwards can pair different collectives on different ranks
and deadlock.
"""

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.distributed._functional_collectives as funcol
from torch import Tensor

from .._args import AttentionArgs, Dilation, Window, check_general_attention_args
from ._partial import ScoreTerms, merge_partials, partial_attention, partial_attention_backward
from .halo import (HaloLayout, add_returned_gradients, exchange_halo, halo_layout, return_halo_gradients,
                   unpack_halo)
from .plan import Group, ShardPlan, _build_plan

_ops = torch.ops.longformer
# all_gather_single is all_gather_tensor's newer name (torch >= 2.12), which warns on the old one.
_all_gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor


@dataclass(frozen=True)
class _Call:
    """Everything about one call that is not a differentiable tensor."""
    plan: ShardPlan
    layout: HaloLayout
    args: AttentionArgs
    causal: bool
    reach_left: int   # left * max(dilation)
    reach_right: int  # right * max(dilation), 0 when causal
    terms: ScoreTerms
    return_lse: bool

    @property
    def has_globals(self) -> bool:
        """Whether the batch has a global token (the same answer on every rank)."""
        return self.plan.global_tokens > 0

    @property
    def kernel_args(self) -> tuple:
        a = self.args
        return (a.window_left, a.window_right, a.dilation)

    def segments(self) -> list[tuple[bool, int, int, int, int]]:
        """The band kernel's calls: (needs the halo, first row, end row, first key, end key), in
        absolute positions; the rows next to a halo come first, so that their gradients can be sent
        back while the interior is computed. An empty shard has none."""
        s, e = self.plan.start, self.plan.end
        if s == e:
            return []
        left_end = min(e, s + self.reach_left) if self.layout.left_rows else s
        right_start = max(s, e - self.reach_right) if self.layout.right_rows else e
        if left_end >= right_start:
            pieces = [(True, s, e)]
        else:
            pieces = [(True, s, left_end), (True, right_start, e), (False, left_end, right_start)]
        return [(halo, u, w, max(self.layout.key_start, u - self.reach_left),
                 min(self.layout.key_end, w + self.reach_right)) for halo, u, w in pieces if w > u]


def _accumulation(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _key_range(lo: int, hi: int, call: _Call, left: Tensor, local: Tensor, right: Tensor) -> Tensor:
    """Keys (or values) of positions [lo, hi) from the left halo, the shard and the right halo: a
    view of the shard when the range lies inside it."""
    s, e = call.plan.start, call.plan.end
    key_start = call.layout.key_start
    pieces = []
    if lo < s:
        pieces.append(left[:, :, lo - key_start:min(hi, s) - key_start])
    if hi > s and lo < e:
        pieces.append(local[:, :, max(lo, s) - s:min(hi, e) - s])
    if hi > e:
        pieces.append(right[:, :, max(lo, e) - e:hi - e])
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2)


def _band_keys(plan: ShardPlan, lo: int, hi: int) -> Tensor:
    """[B, hi - lo] keys of positions [lo, hi) the band kernel may read: real tokens that are not
    global (the global keys are another piece), which also makes global and padding rows empty rows
    of the kernel. Only the range is computed: the plan's masks span the whole sequence."""
    return (plan.real[:, lo:hi] & ~plan.glob[:, lo:hi]).contiguous()


def _slots(x: Tensor, own: Tensor, index: Tensor) -> Tensor:
    """[B, H, n, D] -> [B, G, H * D]: the rows of the global slots this rank owns, zeros elsewhere."""
    b, h, _, d = x.shape
    rows = x.transpose(1, 2).reshape(b, x.shape[2], h * d)
    if rows.shape[1] == 0:
        return rows.new_zeros(b, own.shape[1], h * d)
    picked = rows.gather(1, index[:, :, None].expand(-1, -1, h * d))
    return torch.where(own[:, :, None], picked, torch.zeros_like(picked))


def _unslot(x: Tensor, heads: int) -> Tensor:
    """[B, G, H * D] -> [B, H, G, D]."""
    b, g, width = x.shape
    return x.reshape(b, g, heads, width // heads).transpose(1, 2)


def _put_slots(x: Tensor, values: Tensor, own: Tensor, index: Tensor, accumulate: bool) -> Tensor:
    """``x`` [B, H, n, D] with the owned slots' ``values`` [B, H, G, D] written (or added) at their rows.
    Slots this rank does not own go to a scratch row, so no row is written twice."""
    b, h, n, d = x.shape
    padded = torch.cat([x, x.new_zeros(b, h, 1, d)], dim=2)
    target = torch.where(own, index, n)[:, None, :, None].expand(b, h, -1, d)
    values = values.to(x.dtype)
    padded = padded.scatter_add(2, target, values) if accumulate else padded.scatter(2, target, values)
    return padded[:, :, :n]


def _positions(call: _Call, device) -> Tensor:
    plan = call.plan
    return torch.arange(plan.start, plan.end, device=device).expand(plan.batch, plan.length)


def _local_rows_allowed(call: _Call, q_pos: Tensor) -> Tensor:
    """[B, n, G]: which global keys each local row sees (causal: those not after it)."""
    plan = call.plan
    rows = _band_keys(plan, plan.start, plan.end)
    allowed = rows[:, :, None] & plan.global_valid[:, None, :]
    if call.causal:
        allowed = allowed & (plan.global_positions[:, None, :] <= q_pos[:, :, None])
    return allowed


def _global_rows_allowed(call: _Call, k_pos: Tensor) -> Tensor:
    """[B, G, n]: which of this rank's keys each global row sees (every real one; causal: not after it)."""
    plan = call.plan
    allowed = plan.global_valid[:, :, None] & plan.real[:, None, plan.start:plan.end]
    if call.causal:
        allowed = allowed & (k_pos[:, None, :] <= plan.global_positions[:, :, None])
    return allowed


def _merge_over_ranks(call: _Call, out: Tensor, lse: Tensor, sinks: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """The global rows' parts of every rank merged: (out [B, H, G, D], lse [B, H, G]), the sink
    counted once. Two collectives: an all-gather of the lse, an all-reduce of the weighted outputs."""
    lses = _all_gather(lse[None].contiguous(), 0, call.plan.group)
    total = torch.logsumexp(funcol.wait_tensor(lses), dim=0)
    if sinks is not None:
        total = torch.logaddexp(total, sinks[None, :, None].expand_as(total))
    finite = torch.isfinite(total)
    weight = torch.where(finite, torch.exp(lse - torch.where(finite, total, 0.0)), 0.0)
    merged = funcol.wait_tensor(funcol.all_reduce((weight[..., None] * out).contiguous(), "sum", call.plan.group))
    return merged, total


def _band_forward(call: _Call, q: Tensor, k: Tensor, v: Tensor, received: Tensor, sinks, alibi_slopes):
    """The band kernel over this shard's rows, interior rows first (while the halo travels);
    returns (out [B, H, n, D], lse [B, H, n], the halo as unpacked)."""
    plan, args = call.plan, call.args
    band, halo = {}, None
    for needs_halo, u, w, lo, hi in sorted(call.segments(), key=lambda seg: seg[0]):
        if needs_halo and halo is None:
            halo = unpack_halo(received, call.layout)
        left_k, left_v, right_k, right_v = halo if halo is not None else (None,) * 4
        band[u] = _ops.banded_attn(
            q[:, :, u - plan.start:w - plan.start], _key_range(lo, hi, call, left_k, k, right_k),
            _key_range(lo, hi, call, left_v, v, right_v), *call.kernel_args, _band_keys(plan, lo, hi), None,
            call.causal, args.scale, None, None, None, torch.backends.cuda.matmul.allow_tf32, u - lo, None,
            args.softcap or 0.0, alibi_slopes, sinks)
    if halo is None:
        halo = unpack_halo(received, call.layout)  # every rank waits for its exchange, even with no rows
    order = sorted(band)
    if not order:
        b, h, n, d = q.shape
        return q.new_zeros(b, h, n, d), q.new_zeros(b, h, n, dtype=_accumulation(q.dtype)), halo
    return torch.cat([band[u][0] for u in order], dim=2), torch.cat([band[u][1] for u in order], dim=2), halo


class _ShardedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, call: _Call, q, k, v, global_q, global_k, global_v, sinks, alibi_slopes):
        plan = call.plan
        acc = _accumulation(q.dtype)
        h, d, heads_kv = q.shape[1], q.shape[3], k.shape[1]
        projections = global_q is not None
        own, index = plan.owned_slots()
        # Every rank's plan has the same number of global tokens: all skip their collectives alike.
        if call.has_globals:  # 1. the global tokens' query (for the global rows), key and value (for the local rows)
            slots = funcol.all_reduce(
                torch.cat([_slots(global_q if projections else q, own, index), _slots(k, own, index),
                           _slots(v, own, index)], dim=-1).contiguous(), "sum", plan.group)
        # 2. the halo in flight while the interior rows run
        out, lse, halo = _band_forward(call, q, k, v, exchange_halo(call.layout, plan, k, v), sinks, alibi_slopes)
        global_query = global_key = global_value = rows_out = rows_lse = None
        if call.has_globals:
            # 3. local rows against the global keys
            gathered = funcol.wait_tensor(slots).to(acc)
            global_query = _unslot(gathered[..., :h * d], h)
            global_key = _unslot(gathered[..., h * d:(h + heads_kv) * d], heads_kv)
            global_value = _unslot(gathered[..., (h + heads_kv) * d:], heads_kv)
            positions = _positions(call, q.device)
            out_g, lse_g = partial_attention(q.to(acc), positions, global_key, global_value, plan.global_positions,
                                             _local_rows_allowed(call, positions), call.terms)
            out, lse = merge_partials(out.to(acc), lse, out_g, lse_g)
            # 4. global rows against this rank's keys, merged over the ranks
            rows_out, rows_lse = partial_attention(
                global_query, plan.global_positions, (global_k if projections else k).to(acc),
                (global_v if projections else v).to(acc), positions, _global_rows_allowed(call, positions),
                call.terms)
            rows_out, rows_lse = _merge_over_ranks(call, rows_out, rows_lse, sinks)
            rows_out = rows_out.to(q.dtype)
            out = _put_slots(out, rows_out, own, index, accumulate=False)
            lse = _put_slots(lse[..., None], rows_lse[..., None], own, index, accumulate=False)[..., 0]
        result = out.to(q.dtype).transpose(1, 2).contiguous().transpose(1, 2)  # [B, n, H, D] in memory, as the op's

        ctx.call = call
        ctx.save_for_backward(q, k, v, global_q, global_k, global_v, sinks, alibi_slopes, *halo, global_query,
                              global_key, global_value, result, lse, rows_out, rows_lse)
        return result, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        call: _Call = ctx.call
        plan, layout, args = call.plan, call.layout, call.args
        (q, k, v, global_q, global_k, global_v, sinks, alibi_slopes, left_k, left_v, right_k, right_v, global_query,
         global_key, global_value, out, lse, rows_out, rows_lse) = ctx.saved_tensors
        acc = _accumulation(q.dtype)
        b, h, n, d = q.shape
        heads_kv = k.shape[1]
        projections = global_q is not None
        if not call.return_lse:
            grad_lse = None
        own, index = plan.owned_slots()
        if call.has_globals:  # B1: the global rows' output gradients, from their owners to every rank
            grad_rows_in = [_slots(grad_out, own, index).to(acc)]  # the G rows only, then converted
            if grad_lse is not None:
                grad_rows_in.append(_slots(grad_lse[..., None], own, index).to(acc))
            grad_rows = funcol.all_reduce(torch.cat(grad_rows_in, dim=-1).contiguous(), "sum", plan.group)

        # local rows: the band (rows next to a halo first), their halo gradients sent back meanwhile
        local_rows = _band_keys(plan, plan.start, plan.end)[:, None, :, None]
        grad_local = torch.where(local_rows, grad_out, 0).contiguous()
        out_local = torch.where(local_rows, out, 0)
        grad_lse_local = None if grad_lse is None else torch.where(local_rows[..., 0], grad_lse, 0).contiguous()
        dq = torch.zeros(b, h, n, d, dtype=acc, device=q.device)
        dk_ext = torch.zeros(b, heads_kv, layout.key_end - layout.key_start, d, dtype=acc, device=q.device)
        dv_ext = torch.zeros_like(dk_ext)
        dsinks = None if sinks is None else torch.zeros_like(sinks)
        returned = None
        for needs_halo, u, w, lo, hi in sorted(call.segments(), key=lambda seg: not seg[0]):
            if not needs_halo and returned is None:
                returned = _send_back(layout, plan, dk_ext, dv_ext)  # B2
            rows = slice(u - plan.start, w - plan.start)
            seg_dq, seg_dk, seg_dv, _, _, _, seg_dsinks = _ops.banded_attn_backward(
                grad_local[:, :, rows], q[:, :, rows], _key_range(lo, hi, call, left_k, k, right_k),
                _key_range(lo, hi, call, left_v, v, right_v), out_local[:, :, rows], lse[:, :, rows],
                *call.kernel_args, _band_keys(plan, lo, hi), None, call.causal, args.scale, None, None, None,
                torch.backends.cuda.matmul.allow_tf32, u - lo, None, args.softcap or 0.0, alibi_slopes, sinks,
                None if grad_lse_local is None else grad_lse_local[:, :, rows])
            dq[:, :, rows] += seg_dq.to(acc)
            dk_ext[:, :, lo - layout.key_start:hi - layout.key_start] += seg_dk.to(acc)
            dv_ext[:, :, lo - layout.key_start:hi - layout.key_start] += seg_dv.to(acc)
            if dsinks is not None:
                dsinks += seg_dsinks
        if returned is None:
            returned = _send_back(layout, plan, dk_ext, dv_ext)  # B2
        dk = dk_ext[:, :, layout.left_rows:layout.left_rows + n].clone()
        dv = dv_ext[:, :, layout.left_rows:layout.left_rows + n].clone()
        dgq = dgk = dgv = None
        if call.has_globals:
            dq, dk, dv, dgq, dgk, dgv = _global_backward(
                call, grad_local, grad_lse_local, out_local, lse, grad_rows, q, k, v, global_q, global_k, global_v,
                sinks, dsinks, global_query, global_key, global_value, rows_out, rows_lse, dq, dk, dv)
        add_returned_gradients(returned, layout, dk, dv)
        if projections and dgq is not None:
            dgq, dgk, dgv = dgq.to(global_q.dtype), dgk.to(global_k.dtype), dgv.to(global_v.dtype)
        elif projections:  # no global token at all: the global projections get zero gradients
            dgq, dgk, dgv = torch.zeros_like(global_q), torch.zeros_like(global_k), torch.zeros_like(global_v)
        return (None, dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dgq, dgk, dgv, dsinks, None)


def _global_backward(call: _Call, grad_local, grad_lse_local, out_local, lse, grad_rows, q, k, v, global_q, global_k,
                     global_v, sinks, dsinks, global_query, global_key, global_value, rows_out, rows_lse, dq, dk, dv):
    """The global-token pieces' gradients (the local rows' against the global keys, the global
    rows'), with B3, the all-reduce of the global slots' q/k/v gradients to their owners. Adds into
    ``dq, dk, dv`` (and ``dsinks``); returns them with the global projections' gradients (None
    without projections)."""
    plan = call.plan
    acc = dq.dtype
    h, d, heads_kv = q.shape[1], q.shape[3], k.shape[1]
    projections = global_q is not None
    own, index = plan.owned_slots()
    positions = _positions(call, q.device)
    # local rows against the global keys
    dq_g, dk_slots, dv_slots = partial_attention_backward(
        grad_local.to(acc), grad_lse_local, q.to(acc), positions, global_key, global_value, plan.global_positions,
        _local_rows_allowed(call, positions), call.terms, out_local.to(acc), lse)
    dq = dq + dq_g
    # global rows against this rank's keys, from the merged rows
    grad_rows = funcol.wait_tensor(grad_rows)
    grad_rows_out = _unslot(grad_rows[..., :h * d], h)
    grad_rows_lse = _unslot(grad_rows[..., h * d:], h)[..., 0] if grad_rows.shape[-1] > h * d else None
    dq_rows, dk_own, dv_own = partial_attention_backward(
        grad_rows_out, grad_rows_lse, global_query, plan.global_positions, (global_k if projections else k).to(acc),
        (global_v if projections else v).to(acc), positions, _global_rows_allowed(call, positions), call.terms,
        rows_out.to(acc), rows_lse)
    if dsinks is not None:  # the global rows' share of the sinks' gradient, counted by their owners
        delta = (grad_rows_out * rows_out.to(acc)).sum(-1)
        if grad_rows_lse is not None:
            delta = delta - grad_rows_lse
        counted = own[:, None, :] & torch.isfinite(rows_lse)
        share = torch.exp(sinks[None, :, None] - torch.where(counted, rows_lse, 0.0)) * delta
        dsinks -= torch.where(counted, share, 0.0).sum(dim=(0, 2))
    # B3: the global slots' query, key and value gradients, summed over the ranks for their owners
    summed = funcol.wait_tensor(funcol.all_reduce(
        torch.cat([_to_slots(dq_rows), _to_slots(dk_slots), _to_slots(dv_slots)], dim=-1).contiguous(), "sum",
        plan.group))
    dq_rows = _unslot(summed[..., :h * d], h)
    dk = _put_slots(dk, _unslot(summed[..., h * d:(h + heads_kv) * d], heads_kv), own, index, accumulate=True)
    dv = _put_slots(dv, _unslot(summed[..., (h + heads_kv) * d:], heads_kv), own, index, accumulate=True)
    if projections:
        return dq, dk, dv, _put_slots(torch.zeros_like(dq), dq_rows, own, index, accumulate=True), dk_own, dv_own
    dq = _put_slots(dq, dq_rows, own, index, accumulate=True)
    return dq, dk + dk_own, dv + dv_own, None, None, None


def _to_slots(x: Tensor) -> Tensor:
    """[B, H, G, D] -> [B, G, H * D]."""
    b, h, g, d = x.shape
    return x.transpose(1, 2).reshape(b, g, h * d)


def _send_back(layout: HaloLayout, plan: ShardPlan, dk_ext: Tensor, dv_ext: Tensor) -> Tensor:
    """B2: the halo's gradients to their owners (the halo rows are complete once the rows next to the edges ran)."""
    left, right = layout.left_rows, dk_ext.shape[2] - layout.right_rows
    return return_halo_gradients(layout, plan, dk_ext[:, :, :left], dv_ext[:, :, :left], dk_ext[:, :, right:],
                                 dv_ext[:, :, right:])


def _signature(args: AttentionArgs, causal: bool, q: Tensor, k: Tensor, projections: bool) -> tuple[int, ...]:
    """The configuration every rank must share, as integers (compared by the plan's all-gather)."""
    dtypes = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
    code = dtypes.index(q.dtype) if q.dtype in dtypes else len(dtypes)
    return (args.window_left, args.window_right, int(causal), q.shape[1], k.shape[1], q.shape[3], code,
            int(projections), *args.dilation)


def longformer_attention(
    q: Tensor, k: Tensor, v: Tensor, window: Window, *, dilation: Dilation = 1,
    attention_mask: Optional[Tensor] = None, global_attention_mask: Optional[Tensor] = None,
    global_q: Optional[Tensor] = None, global_k: Optional[Tensor] = None, global_v: Optional[Tensor] = None,
    causal: bool = False, scale: Optional[float] = None, q_offset: Optional[int] = None,
    cu_seqlens: Optional[Tensor] = None, softcap: Optional[float] = None, alibi_slopes: Optional[Tensor] = None,
    sinks: Optional[Tensor] = None, return_lse: bool = False, group: Group = None, plan: Optional[ShardPlan] = None,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """``longformer_ext.longformer_attention`` on this rank's shard of a sequence split along N over
    a process group: the result equals the single-process call's rows of this shard, and so do the
    gradients (of every input; a replicated ``sinks`` gets this shard's rows' share, to be summed
    over the ranks like any replicated parameter's gradient).

    Every tensor is this rank's shard: ``q, k, v`` (and ``global_q/k/v``) ``[B, H, n, D]`` with
    ``n`` this rank's positions, masks ``[B, n]``; shards are contiguous, in rank order, of any
    lengths (an empty one too). DTensors sharded on dimension 2 (masks: dimension 1) of a
    one-dimensional mesh are accepted and the output is one too. Every rank of ``group`` (default:
    the world; a ProcessGroup or a one-dimensional DeviceMesh) must make the same calls, in the same
    order, with the same configuration.

    ``plan`` (``longformer_ext.distributed.plan``) is the layout of the batch; without it each call
    learns it (two small all-gathers, which also check that every rank passed the same
    configuration). Pass one to skip that, and under ``torch.compile``. ``q_offset`` and
    ``cu_seqlens`` are not supported here (queries and keys are the same positions).
    """
    from .sharding import from_dtensors, is_dtensor

    if is_dtensor(q):
        return from_dtensors(longformer_attention, q, k, v, window, dilation=dilation, attention_mask=attention_mask,
                             global_attention_mask=global_attention_mask, global_q=global_q, global_k=global_k,
                             global_v=global_v, causal=causal, scale=scale, q_offset=q_offset, cu_seqlens=cu_seqlens,
                             softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks, return_lse=return_lse,
                             plan=plan)
    if q_offset is not None:
        raise NotImplementedError("q_offset is not supported by the sharded call: each rank's queries and keys are "
                                  "the same positions (its shard)")
    if cu_seqlens is not None:
        raise NotImplementedError("cu_seqlens (packed sequences) is not supported by the sharded call; shard a "
                                  "padded batch instead")
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"k has {k.shape[2]} positions but q has {q.shape[2]}: a rank's q, k and v are the same "
                         f"shard of the sequence")
    args = check_general_attention_args(q, k, v, window, dilation, attention_mask, global_attention_mask, global_q,
                                        global_k, global_v, causal, scale, softcap=softcap,
                                        alibi_slopes=alibi_slopes, sinks=sinks)
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {return_lse!r}")
    projections = args.has_global_projections
    if plan is None:
        plan = _build_plan(q.shape[0], q.shape[2], q.device, attention_mask, global_attention_mask, group,
                           _signature(args, causal, q, k, projections))
    else:
        _check_plan(plan, q, attention_mask, global_attention_mask)
    reach_left = args.window_left * max(args.dilation, default=1)
    reach_right = 0 if causal else args.window_right * max(args.dilation, default=1)
    acc = _accumulation(q.dtype)
    alibi = None if alibi_slopes is None else alibi_slopes.to(acc).contiguous()
    sink_values = None if sinks is None else sinks.to(acc).contiguous()
    call = _Call(plan, halo_layout(plan, reach_left, reach_right), args, causal, reach_left, reach_right,
                 ScoreTerms(args.scale, args.softcap, alibi), return_lse)
    if not projections:
        global_q = global_k = global_v = None
    out, lse = _ShardedAttention.apply(call, q, k, v, global_q, global_k, global_v, sink_values, alibi)
    return (out, lse) if return_lse else out


def _check_plan(plan: ShardPlan, q: Tensor, attention_mask: Optional[Tensor],
                global_attention_mask: Optional[Tensor]) -> None:
    """A plan must describe this shard; in eager mode its masks must be the ones given."""
    if not isinstance(plan, ShardPlan):
        raise TypeError(f"plan must come from longformer_ext.distributed.plan, got {type(plan).__name__}")
    if plan.batch != q.shape[0] or plan.length != q.shape[2] or plan.real.device != q.device:
        raise ValueError(f"the plan describes a shard of batch {plan.batch} and {plan.length} positions on "
                         f"{plan.real.device}, but q has shape {tuple(q.shape)} on {q.device}")
    if torch.compiler.is_compiling():
        return
    real = plan.real[:, plan.start:plan.end]
    given_real = torch.ones_like(real) if attention_mask is None else attention_mask != 0
    given_glob = (torch.zeros_like(real) if global_attention_mask is None else global_attention_mask != 0) & given_real
    if not torch.equal(real, given_real) or not torch.equal(plan.glob[:, plan.start:plan.end], given_glob):
        raise ValueError("attention_mask / global_attention_mask differ from the masks the plan was built from: "
                         "build a new plan for this batch")
