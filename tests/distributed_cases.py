"""Multi-process checks of longformer_ext.distributed: the cases, and the worker every rank runs.

Each rank builds the whole problem from a seed, runs the single-process op on it, runs the sharded
op on its shard, and reports the largest differences of its output rows and of every gradient
(the replicated sinks' gradient summed over the ranks). Processes start on gloo through a file://
rendezvous in a temporary directory (no ports) with a short collective timeout, so a broken
collective fails a test instead of hanging it."""

import faulthandler
import hashlib
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

TIMEOUT_S = int(os.environ.get("LONGFORMER_DISTRIBUTED_TIMEOUT", "60"))


@dataclass
class ShardCase:
    name: str
    world: int
    seqlen: int = 48
    window: object = 4
    dilation: object = 1
    causal: bool = False
    globals: tuple = (0, 17)        # global positions of batch row 0; row 1 gets each + 1, plus one in its padding
    padding: int = 5                # padding tokens at the end of batch row 1
    projections: bool = False
    sizes: Optional[list] = None    # shard sizes; default: torch.chunk's split
    heads: int = 2
    heads_kv: int = 0               # 0: heads
    dim: int = 8
    dtype: str = "float64"
    softcap: Optional[float] = None
    alibi: bool = False
    sinks: bool = False
    return_lse: bool = False
    seed: int = 0
    extra: dict = field(default_factory=dict)


def _cases() -> list:
    c = ShardCase
    return [
        c("p2_basic", 2),
        c("p2_float32", 2, dilation=[1, 2], dtype="float32"),
        c("p2_no_globals", 2, window=6, dilation=[2, 1], globals=(), padding=0),
        c("p2_asym_projections", 2, window=(5, 2), dilation=[1, 2], projections=True),
        c("p2_projections_without_global_tokens", 2, globals=(), padding=0, projections=True),
        c("p2_general", 2, heads=4, heads_kv=2, dilation=[1, 2, 1, 3], softcap=2.0, alibi=True, sinks=True,
          return_lse=True, projections=True),
        c("p3_uneven_causal_projections", 3, seqlen=50, window=(5, 0), dilation=[1, 3], causal=True,
          projections=True, globals=(0, 16, 33)),
        c("p3_causal_symmetric", 3, seqlen=50, window=3, dilation=[1, 2], causal=True, globals=(2, 40)),
        c("p3_empty_shard", 3, sizes=[20, 0, 28], window=3, globals=(19, 20)),
        c("p3_globals_on_edges", 3, sizes=[16, 16, 16], window=3, dilation=[1, 2], globals=(0, 15, 16, 31, 47),
          padding=0),
        c("p3_causal_general", 3, seqlen=50, window=(6, 0), causal=True, heads=4, heads_kv=1, sinks=True,
          alibi=True, return_lse=True, dilation=[1, 1, 2, 2]),
        c("p3_bfloat16_projections_padding", 3, seqlen=50, window=(5, 3), dilation=[1, 2], projections=True,
          dtype="bfloat16", globals=(0, 24)),
        c("p4_multihop", 4, seqlen=48, window=8, dilation=[1, 3], globals=(5, 30)),
        c("p4_custom_sizes_multihop", 4, seqlen=60, sizes=[30, 3, 18, 9], window=5, dilation=[2, 1],
          globals=(1, 31, 58)),
        c("p4_empty_first_and_last", 4, seqlen=40, sizes=[0, 20, 20, 0], window=4, causal=True, globals=(3,),
          projections=True),
        c("p4_float32_general", 4, seqlen=64, window=(6, 3), dilation=[1, 2], dtype="float32", softcap=3.0,
          sinks=True, projections=True, globals=(0, 20, 41)),
    ]


CASES = {case.name: case for case in _cases()}


def _inputs(case: ShardCase):
    """Whole-sequence inputs (as leaves), masks, keyword arguments and output seeds for a case."""
    gen = torch.Generator().manual_seed(case.seed)
    dtype = getattr(torch, case.dtype)
    b, h, n, d = 2, case.heads, case.seqlen, case.dim
    h_kv = case.heads_kv or h

    def heads(count):  # [B, H, N, D] as the head split of a [B, N, H * D] projection
        return torch.randn(b, n, count, d, generator=gen, dtype=torch.float64).to(dtype).transpose(1, 2)

    tensors = {"q": heads(h), "k": heads(h_kv), "v": heads(h_kv)}
    if case.projections:
        tensors.update(global_q=heads(h), global_k=heads(h_kv), global_v=heads(h_kv))
    if case.sinks:
        tensors["sinks"] = torch.randn(h, generator=gen, dtype=torch.float64).to(dtype)
    attention_mask = torch.ones(b, n, dtype=torch.bool)
    if case.padding:
        attention_mask[1, n - case.padding:] = False
    glob = torch.zeros(b, n, dtype=torch.bool)
    for p in case.globals:
        glob[0, p] = True
        glob[1, min(p + 1, n - 1)] = True
    if case.padding:
        glob[1, n - 1] = True  # a padding token marked global counts as padding
    kwargs = {"window": case.window, "dilation": case.dilation, "causal": case.causal, "softcap": case.softcap,
              "return_lse": case.return_lse}
    if case.alibi:
        kwargs["alibi_slopes"] = torch.rand(h, generator=gen, dtype=torch.float64) * 0.5
    seeds = {"out": torch.randn(b, h, n, d, generator=gen, dtype=torch.float64),
             "lse": torch.randn(b, h, n, generator=gen, dtype=torch.float64)}
    return tensors, attention_mask, glob if case.globals or case.padding or case.projections else None, kwargs, seeds


def _loss(result, seeds, rows: slice):
    out, lse = result if isinstance(result, tuple) else (result, None)
    loss = (out.double() * seeds["out"][:, :, rows]).sum()
    if lse is not None:
        finite = torch.isfinite(lse)
        loss = loss + torch.where(finite, lse.double(), 0.0).mul(seeds["lse"][:, :, rows]).sum()
    return loss, out, lse


def run_case(case: ShardCase, plan_once: bool = False) -> dict:
    """Largest |sharded - single process| of this rank's output, lse and gradients."""
    from longformer_ext import distributed as lfd
    from longformer_ext import longformer_attention

    rank, world = dist.get_rank(), dist.get_world_size()
    tensors, attention_mask, glob, kwargs, seeds = _inputs(case)
    leaves = {name: t.detach().requires_grad_() for name, t in tensors.items()}
    window = kwargs.pop("window")
    full = longformer_attention(leaves["q"], leaves["k"], leaves["v"], window, attention_mask=attention_mask,
                                global_attention_mask=glob, **{n: t for n, t in leaves.items() if n not in ("q", "k", "v")},
                                **kwargs)
    loss, full_out, full_lse = _loss(full, seeds, slice(None))
    loss.backward()

    start, end = lfd.shard_bounds(case.seqlen, world, case.sizes)[rank]
    rows = slice(start, end)
    local = {name: (t.detach() if name == "sinks" else t.detach()[:, :, rows]).clone().requires_grad_()
             for name, t in tensors.items()}
    masks = {"attention_mask": attention_mask[:, rows],
             "global_attention_mask": None if glob is None else glob[:, rows]}
    extra = {}
    if plan_once:
        extra["plan"] = lfd.plan(local["q"], masks["attention_mask"], masks["global_attention_mask"])
    sharded = lfd.longformer_attention(local["q"], local["k"], local["v"], window, **masks,
                                       **{n: t for n, t in local.items() if n not in ("q", "k", "v")}, **kwargs, **extra)
    loss, out, lse = _loss(sharded, seeds, rows)
    loss.backward()

    def diff(a, b):
        """max |a - b| (equal infinities count as equal); in half precision relative to 1 + max |b|,
        as tests/conftest.py's tolerances are."""
        if a.numel() == 0:
            return 0.0
        a, b = a.double(), b.double()
        both_inf = torch.isinf(a) & torch.isinf(b) & (a.sign() == b.sign())
        err = torch.where(both_inf, 0.0, (a - b).abs()).max().item()
        if case.dtype in ("bfloat16", "float16"):
            err /= 1.0 + b[torch.isfinite(b)].abs().max().item()
        return err

    results = [out] + ([] if lse is None else [lse]) + [t.grad for t in local.values() if t.grad is not None]
    digest = hashlib.sha256(b"".join(t.detach().double().contiguous().numpy().tobytes() for t in results))
    errors = {"out": diff(out, full_out[:, :, rows]), "rows": end - start, "digest": digest.hexdigest()}
    if lse is not None:
        errors["lse"] = diff(lse, full_lse[:, :, rows])
    for name, t in local.items():
        grad = t.grad if t.grad is not None else torch.zeros_like(t)
        if name == "sinks":
            grad = grad.clone()
            dist.all_reduce(grad)
            errors["grad_sinks"] = diff(grad, leaves[name].grad)
        else:
            errors[f"grad_{name}"] = diff(grad, leaves[name].grad[:, :, rows])
    return errors


def init(rank: int, world: int, rendezvous: str, timeout_s: int = TIMEOUT_S) -> None:
    faulthandler.dump_traceback_later(timeout_s * 3, exit=True)  # a hang prints every stack, then exits
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))


def finish() -> None:
    """Ends a worker once its report is written: with torch 2.13 and 2.14 a process that ran
    functional collectives on gloo sometimes aborts in interpreter teardown after its work is done
    (examples/sharded_char_lm_step.py), which would fail the spawn of a finished check."""
    dist.destroy_process_group()
    faulthandler.cancel_dump_traceback_later()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def worker(rank: int, world: int, rendezvous: str, names: list, results: str) -> None:
    """Runs the named cases on this rank; writes {case: errors} to ``results``/rank<r>.json. The
    first case runs twice: its output and gradients must be bitwise equal (their digests; a fixed
    number of ranks gives a deterministic result)."""
    init(rank, world, rendezvous)
    report = {}
    for i, name in enumerate(names):
        report[name] = run_case(CASES[name], plan_once=i % 2 == 1)
    report["repeat"] = run_case(CASES[names[0]], plan_once=False)["digest"] == report[names[0]]["digest"]
    with open(os.path.join(results, f"rank{rank}.json"), "w") as f:
        json.dump({"report": report, "cases": {n: asdict(CASES[n]) for n in names}}, f)
    finish()


def compile_worker(rank: int, world: int, rendezvous: str, results: str) -> None:
    """A sharded layer (projection + sharded attention, plan built outside) under
    torch.compile(fullgraph=True): output and input gradient equal eager's and the single-process op's."""
    from longformer_ext import distributed as lfd
    from longformer_ext import longformer_attention

    init(rank, world, rendezvous)
    torch.manual_seed(0)
    b, h, n, d = 1, 2, 40, 8
    x = torch.randn(b, n, h * d)
    proj = torch.nn.Linear(h * d, 3 * h * d)
    glob = torch.zeros(b, n, dtype=torch.bool)
    glob[:, 3] = True

    def heads(y):
        q, k, v = proj(y).view(b, y.shape[1], 3, h, d).unbind(2)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def layer(y, plan, mask):
        return lfd.longformer_attention(*heads(y), 4, dilation=[1, 2], global_attention_mask=mask, plan=plan)

    full_x = x.clone().requires_grad_()
    full = longformer_attention(*heads(full_x), 4, dilation=[1, 2], global_attention_mask=glob)
    full.sum().backward()
    start, end = lfd.shard_bounds(n, world)[rank]
    local_x = x[:, start:end].clone().requires_grad_()
    plan = lfd.plan(local_x.view(b, 1, end - start, h * d), None, glob[:, start:end])
    compiled = torch.compile(layer, fullgraph=True)
    out = compiled(local_x, plan, glob[:, start:end])
    out.sum().backward()
    report = {"out": (out - full[:, :, start:end]).abs().max().item(),
              "grad_x": (local_x.grad - full_x.grad[:, start:end]).abs().max().item()}
    with open(os.path.join(results, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    finish()


def dtensor_worker(rank: int, world: int, rendezvous: str, results: str) -> None:
    """DTensor inputs sharded on the sequence: the output is a DTensor sharded the same way whose
    full tensor equals the single-process result; the gradients reach the DTensor leaves."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from longformer_ext import distributed as lfd
    from longformer_ext import longformer_attention

    init(rank, world, rendezvous)
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("cp",))
    gen = torch.Generator().manual_seed(1)
    b, h, n, d = 2, 2, 37, 8  # 37 over 3 ranks: torch.chunk's uneven split
    q, k, v = (torch.randn(b, h, n, d, generator=gen, dtype=torch.float64) for _ in range(3))
    glob = torch.zeros(b, n, dtype=torch.bool)
    glob[:, [2, 20]] = True
    seed = torch.randn(b, h, n, d, generator=gen, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    full = longformer_attention(*leaves, 3, dilation=[1, 2], global_attention_mask=glob)
    (full * seed).sum().backward()
    dq, dk, dv = (distribute_tensor(t, mesh, [Shard(2)]).requires_grad_() for t in (q, k, v))
    out = lfd.longformer_attention(dq, dk, dv, 3, dilation=[1, 2],
                                   global_attention_mask=distribute_tensor(glob, mesh, [Shard(1)]))
    (out * distribute_tensor(seed, mesh, [Shard(2)])).sum().backward()
    # the helpers: any split (an empty shard too) and back
    sizes = [5, 0, 32] if world == 3 else None
    pieces = lfd.shard(q, sizes=sizes)  # the sequence dimension by default
    whole = lfd.unshard(pieces)
    mask_pieces = lfd.shard(glob, sizes=sizes)
    report = {"sharded_on_sequence": tuple(out.placements) == (Shard(2),), "shape": list(out.shape),
              "unshard": torch.equal(whole, q) and torch.equal(lfd.unshard(mask_pieces), glob),
              "shard_rows": pieces.shape[2],
              "out": (out.full_tensor() - full).abs().max().item(),
              "grads": max((t.grad.full_tensor() - leaf.grad).abs().max().item()
                           for t, leaf in zip((dq, dk, dv), leaves))}
    with open(os.path.join(results, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    finish()


def misuse_worker(rank: int, world: int, rendezvous: str, results: str) -> None:
    """Two broken programs must fail fast, never hang: (1) ranks passing different windows get a
    ValueError naming the problem, on every rank; (2) a rank that skips a call leaves the others'
    first collective to time out (the process group's timeout) with an error."""
    import time

    from longformer_ext import distributed as lfd

    timeout = 5
    init(rank, world, rendezvous, timeout_s=timeout)
    q = torch.randn(1, 2, 10, 8, dtype=torch.float64)
    report = {}
    try:
        lfd.longformer_attention(q, q, q, 3 if rank == 0 else 4)
        report["mismatch"] = "no error"
    except ValueError as e:
        report["mismatch"] = str(e)
    plan = lfd.plan(q)
    if rank == 0:
        started = time.monotonic()
        try:
            lfd.longformer_attention(q, q, q, 3, plan=plan)
            report["skipped"] = "no error"
        except RuntimeError as e:
            report["skipped"] = type(e).__name__
        report["seconds"] = time.monotonic() - started
    else:
        time.sleep(2 * timeout)  # this rank never makes the call
    with open(os.path.join(results, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    faulthandler.cancel_dump_traceback_later()
    os._exit(0)  # the process group is broken; destroying it could wait on the dead collective
