"""Longformer attention on CPU: ours against what a user would pick instead, in one process, same inputs.

Implementations (docs/design.md §6):
  ours   longformer_ext.longformer_attention (fused banded + global ops)
  hf     Hugging Face's LongformerSelfAttention core: its chunked band matmuls, global-key columns and
         global rows, called without the q/k/v projections (our inputs already are q, k, v)
  flex   torch.compile'd flex_attention with a block mask of the same band + global pattern
         (forward only: flex_attention has no CPU backward)
  sdpa   dense scaled_dot_product_attention with a boolean [N, N] band + global mask (where it fits)

Shapes: fp32, B=1, H=12, D=64, one-sided window w=256 (HF attention_window=512); G global tokens spread
evenly over the sequence, the first token included. Every global token attends to every key and is
attended to by every query, which is the same pattern in all four implementations.

Figures per (N, G, implementation), forward and forward+backward:
  * median wall time over a few repeats after an untimed warm-up call (fewer repeats for slow calls);
    the forward runs under torch.no_grad() (inference), forward+backward computes the gradients of
    out.sum() with respect to q, k, v;
  * useful GFLOP/s = 4 * N * (2w + 1 + G) * D * H / time (x3 for forward+backward), the same numerator
    for every implementation, so it ranks them by time while staying comparable across N;
  * that rate as a fraction of the machine's fp32 GEMM rate (torch.mm of 2048 x 2048, measured at start);
  * peak extra memory: growth of the process's peak RSS during the warm-up call (peak_extra_rss_mb);
  * max |out - ours|, to show the comparison is apples to apples.

    python bench/bench_attention.py                # N in 1024 ... 16384, G in 0 1 64
    python bench/bench_attention.py --quick        # smoke run: N up to 4096, fewer repeats
    python bench/bench_attention.py --seqlens 2048 --globals 0 --no-flex --no-backward
"""

import argparse
import ctypes
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import longformer_ext
from longformer_ext import longformer_attention

B, H, D = 1, 12, 64
WINDOW = 256  # one-sided: 2 * WINDOW + 1 band keys per query; Hugging Face's attention_window = 2 * WINDOW
DEFAULT_SEQLENS = [1024, 2048, 4096, 8192, 16384]
DEFAULT_GLOBALS = [0, 1, 64]
DENSE_MAX_N = 8192  # the dense [N, N] mask (and the dense compute) beyond this is not worth running
DENSE_MAX_BYTES = 4e9

IMPLS = ["ours", "hf", "flex", "sdpa"]


# --------------------------------------------------------------------------------------------------
# Inputs


@dataclass
class Inputs:
    """q, k, v as [B, N, H*D] tensors (what a projection produces) and the token roles."""
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    global_mask: Optional[torch.Tensor]  # [B, N] bool, None when G = 0
    attention_mask: Optional[torch.Tensor] = None  # [B, N] bool, True = real token; None = no padding

    @property
    def n(self) -> int:
        return self.q.shape[1]

    def requiring_grad(self) -> "Inputs":
        """Fresh leaves with requires_grad, for forward+backward."""
        q, k, v = (t.detach().requires_grad_() for t in (self.q, self.k, self.v))
        return Inputs(q, k, v, self.global_mask, self.attention_mask)


def global_positions(n: int, g: int) -> torch.Tensor:
    """g positions spread evenly over [0, n), the first token included."""
    return torch.arange(g) * n // g


def make_inputs(n: int, g: int, seed: int = 0, heads: int = H) -> Inputs:
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, n, heads * D, generator=gen) for _ in range(3))
    global_mask = None
    if g > 0:
        global_mask = torch.zeros(B, n, dtype=torch.bool)
        global_mask[:, global_positions(n, g)] = True
    return Inputs(q, k, v, global_mask)


def split_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, N, H*D] -> [B, H, N, D] as a view (no copy): the layout our op and SDPA take."""
    b, n, e = x.shape
    return x.view(b, n, e // D, D).transpose(1, 2)


# --------------------------------------------------------------------------------------------------
# Implementations: each takes Inputs and returns the output as [B, H, N, D].


def run_ours(x: Inputs) -> torch.Tensor:
    return longformer_attention(split_heads(x.q), split_heads(x.k), split_heads(x.v), WINDOW,
                                attention_mask=x.attention_mask, global_attention_mask=x.global_mask)


def make_hf_layer(heads: int = H):
    """A LongformerSelfAttention whose helpers we call; its projection weights are never used."""
    from transformers import LongformerConfig
    from transformers.models.longformer.modeling_longformer import LongformerSelfAttention

    config = LongformerConfig(hidden_size=heads * D, num_attention_heads=heads, attention_window=[2 * WINDOW],
                              attention_probs_dropout_prob=0.0)
    return LongformerSelfAttention(config, layer_id=0).eval()


@dataclass
class HFMasks:
    """What LongformerModel/LongformerEncoder compute once per model forward and hand to every layer."""
    attention_mask: torch.Tensor  # [B, N] float: -10000 padding, 0 local, +10000 global
    is_index_masked: torch.Tensor
    is_index_global_attn: torch.Tensor
    is_global_attn: bool


def hf_masks(x: Inputs) -> HFMasks:
    real = torch.ones(B, x.n, dtype=torch.bool) if x.attention_mask is None else x.attention_mask.bool()
    glob = torch.zeros(B, x.n, dtype=torch.bool) if x.global_mask is None else x.global_mask.bool()
    # HF's encoding (LongformerModel._merge_to_attention_mask + get_extended_attention_mask): 0 padding,
    # 1 local, 2 global, then (m - 1) * 10000. A padding token that is global is padding, as in ours.
    merged = torch.where(real, 1.0 + glob.float(), 0.0)
    mask = (merged - 1.0) * 10000.0
    return HFMasks(mask, mask < 0, mask > 0, bool((mask > 0).any()))


def _hf_global_rows(layer, q, k, v, masks: HFMasks, max_num_global, global_idx, local_global_idx,
                    local_no_global_idx):
    """LongformerSelfAttention._compute_global_attn_output_from_hidden, transcribed line by line with
    the global projections removed: the global queries are the rows of (already scaled) q at the global
    positions and the keys/values are k, v. q, k, v: [B, N, H, D]. Returns [B, H, G_max, D]."""
    b, n, heads, d = k.shape
    global_q = q.new_zeros(b, max_num_global, heads, d)
    global_q[local_global_idx] = q[global_idx]
    global_q = global_q.transpose(1, 2).reshape(b * heads, max_num_global, d)
    keys = k.transpose(1, 2).reshape(b * heads, n, d)
    values = v.transpose(1, 2).reshape(b * heads, n, d)

    scores = torch.bmm(global_q, keys.transpose(1, 2)).view(b, heads, max_num_global, n)
    scores = scores.transpose(1, 2)
    scores[local_no_global_idx[0], local_no_global_idx[1], :, :] = torch.finfo(scores.dtype).min
    scores = scores.transpose(1, 2)
    scores = scores.masked_fill(masks.is_index_masked[:, None, None, :], torch.finfo(scores.dtype).min)
    scores = scores.view(b * heads, max_num_global, n)
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).type_as(scores)
    return torch.bmm(probs, values).view(b, heads, max_num_global, d)


def hf_core(layer, x: Inputs, masks: HFMasks) -> torch.Tensor:
    """LongformerSelfAttention.forward from the projections on (eval mode: no dropout, no head mask):
    chunked band scores (_sliding_chunks_query_key_matmul, which applies _mask_invalid_locations),
    the band mask, the global-key columns, the softmax, the chunked probs @ v, and the global rows."""
    b, n, e = x.q.shape
    heads, d, w = layer.num_heads, layer.head_dim, layer.one_sided_attn_window_size
    q = (x.q / math.sqrt(d)).view(b, n, heads, d)  # HF scales q before the band matmul
    k = x.k.view(b, n, heads, d)
    v = x.v.view(b, n, heads, d)

    scores = layer._sliding_chunks_query_key_matmul(q, k, w)
    # Band keys that are padding or global get -inf (global keys come back as separate columns).
    remove = (masks.attention_mask != 0)[:, :, None, None]
    float_mask = remove.type_as(q).masked_fill(remove, torch.finfo(q.dtype).min)
    scores += layer._sliding_chunks_query_key_matmul(float_mask.new_ones(float_mask.size()), float_mask, w)

    if masks.is_global_attn:
        max_num_global, global_idx, local_global_idx, local_no_global_idx = \
            layer._get_global_attn_indices(masks.is_index_global_attn)
        global_key_scores = layer._concat_with_global_key_attn_probs(
            query_vectors=q, key_vectors=k, max_num_global_attn_indices=max_num_global,
            is_index_global_attn_nonzero=global_idx, is_local_index_global_attn_nonzero=local_global_idx,
            is_local_index_no_global_attn_nonzero=local_no_global_idx)
        scores = torch.cat((global_key_scores, scores), dim=-1)

    probs = F.softmax(scores, dim=-1, dtype=torch.float32)
    probs = torch.masked_fill(probs, masks.is_index_masked[:, :, None, None], 0.0).type_as(scores)

    if masks.is_global_attn:
        out = layer._compute_attn_output_with_global_indices(
            value_vectors=v, attn_probs=probs, max_num_global_attn_indices=max_num_global,
            is_index_global_attn_nonzero=global_idx, is_local_index_global_attn_nonzero=local_global_idx)
        global_out = _hf_global_rows(layer, q, k, v, masks, max_num_global, global_idx, local_global_idx,
                                     local_no_global_idx)
        # Overwrite the rows of global queries, as HF does ([B, N, H, D] here instead of [N, B, H*D]).
        out[global_idx] = global_out[local_global_idx[0], :, local_global_idx[1]]
    else:
        out = layer._sliding_chunks_matmul_attn_probs_value(probs, v, w)
    return out.transpose(1, 2)  # [B, N, H, D] -> [B, H, N, D]


def band_global_mask(n: int, global_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Bool [N, N]: |i - j| <= w, or i global, or j global (no padding in this benchmark)."""
    pos = torch.arange(n)
    allowed = (pos[:, None] - pos[None, :]).abs() <= WINDOW
    if global_mask is not None:
        g = global_mask[0]
        allowed = allowed | g[:, None] | g[None, :]
    return allowed


def dense_fits(n: int) -> bool:
    # The bool mask plus a float copy of it that the CPU kernel may make; the CPU SDPA kernel itself is
    # flash-style (blocked), so it does not hold [N, N] scores.
    return n <= DENSE_MAX_N and n * n * 5 <= DENSE_MAX_BYTES


def run_sdpa(x: Inputs, mask: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(split_heads(x.q), split_heads(x.k), split_heads(x.v), attn_mask=mask)


_compiled_flex = None


def make_flex_block_mask(n: int, global_mask: Optional[torch.Tensor]):
    from torch.nn.attention.flex_attention import create_block_mask

    g = torch.zeros(n, dtype=torch.bool) if global_mask is None else global_mask[0].clone()

    def band_or_global(b, h, q_idx, kv_idx):
        return ((q_idx - kv_idx).abs() <= WINDOW) | g[q_idx] | g[kv_idx]

    return create_block_mask(band_or_global, None, None, n, n, device="cpu")


def run_flex(x: Inputs, block_mask) -> torch.Tensor:
    global _compiled_flex
    if _compiled_flex is None:
        from torch.nn.attention.flex_attention import flex_attention
        # dynamic=False: one specialised kernel per N, as a user with fixed shapes would get (the
        # mask's global vector is a graph input, so G needs no recompile). Past dynamo's default of 8
        # recompiles flex would silently fall back to eager; the higher limit covers long --seqlens.
        torch._dynamo.config.recompile_limit = 64
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex(split_heads(x.q), split_heads(x.k), split_heads(x.v), block_mask=block_mask)


# --------------------------------------------------------------------------------------------------
# Measurement


_libc = ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None


def _vm_hwm_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def peak_extra_rss_mb(fn: Callable[[], object]) -> Optional[float]:
    """Growth of the process's peak resident set size during one call of fn (its result included).

    Linux keeps the peak RSS as VmHWM in /proc/self/status; writing "5" to /proc/self/clear_refs resets
    that high-water mark to the current RSS, so VmHWM after the call minus VmHWM right after the reset
    is the peak extra memory of this call alone. Before the reset, gc + malloc_trim hand freed heap
    pages back to the kernel, so that the call cannot reuse pages that still count as resident (which
    would hide its allocations). Returns None where /proc is not available."""
    try:
        gc.collect()
        if _libc is not None:
            _libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _vm_hwm_kb()
        result = fn()
        after = _vm_hwm_kb()
        del result
        return (after - before) / 1024
    except OSError:
        return None


def _machine_busy_s() -> float:
    """CPU seconds spent by everything on this (virtual) machine, all CPUs, since boot."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values) - idle) / os.sysconf("SC_CLK_TCK")


class OtherLoad:
    """Share of the machine's CPUs used by other processes (other containers included) while timing.
    The machine has 2 cores; anything else running makes our figures slow and noisy, so each
    measurement records it (machine-wide busy time minus this process's CPU time)."""

    def __enter__(self):
        self.wall, self.busy, self.own = time.perf_counter(), _machine_busy_s(), sum(os.times()[:2])
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self.wall
        other = (_machine_busy_s() - self.busy) - (sum(os.times()[:2]) - self.own)
        self.fraction = max(0.0, other / (wall * (os.cpu_count() or 1)))


def time_calls(fn: Callable[[], object], warm_s: float, budget_s: float, min_reps: int,
               max_reps: int) -> tuple[float, int, float]:
    """Median seconds of fn (already warmed up, which took warm_s), the number of timed repeats (they
    fill about budget_s, within [min_reps, max_reps], so slow calls get fewer), and the other
    processes' share of the CPUs meanwhile."""
    reps = max(min_reps, min(max_reps, int(budget_s / max(warm_s, 1e-6))))
    times = []
    with OtherLoad() as load:
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(times), reps, load.fraction


def cpu_busy_fraction(seconds: float = 1.0) -> float:
    """Share of the CPUs busy with other work while this process sleeps."""
    with OtherLoad() as load:
        time.sleep(seconds)
    return load.fraction


def gemm_gflops(n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        torch.mm(a, b)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    return 2 * n ** 3 / statistics.median(times) / 1e9


def useful_gflop(n: int, g: int) -> float:
    """Forward useful work: QK^T and PV over the band and the global keys, 2 flops per multiply-add."""
    return 4 * n * (2 * WINDOW + 1 + g) * D * H * B / 1e9


def forward_call(impl: Callable[[Inputs], torch.Tensor], x: Inputs) -> Callable[[], torch.Tensor]:
    def call():
        with torch.no_grad():
            return impl(x)
    return call


def forward_backward_call(impl: Callable[[Inputs], torch.Tensor], x: Inputs) -> Callable[[], object]:
    xg = x.requiring_grad()

    def call():
        out = impl(xg)
        # autograd.grad instead of .backward(): fresh gradients every call, nothing accumulates.
        return out, torch.autograd.grad(out.sum(), (xg.q, xg.k, xg.v))
    return call


def measure(call: Callable[[], object], work_gflop: float, gemm: Optional[float], budget_s: float,
            min_reps: int, max_reps: int) -> dict:
    """Warm-up call (untimed; its peak memory is the figure: a first call's peak RSS growth matches
    later calls' within a few MB, and every implementation has run a forward before), then timed
    repeats."""
    start = time.perf_counter()
    peak_mb = peak_extra_rss_mb(call)
    warm_s = time.perf_counter() - start
    seconds, reps, other_load = time_calls(call, warm_s, budget_s, min_reps, max_reps)
    rate = work_gflop / seconds
    return {"ms": seconds * 1e3, "reps": reps, "gflops": rate, "frac_gemm": None if gemm is None else rate / gemm,
            "peak_mb": peak_mb, "other_load": other_load}


def short_error(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"error: {type(e).__name__}: {msg[:120]}"


# --------------------------------------------------------------------------------------------------
# One (N, G) point


def bench_point(n: int, g: int, args, gemm: float, hf_layer) -> list[dict]:
    x = make_inputs(n, g, seed=n + g)
    masks = hf_masks(x)
    work = useful_gflop(n, g)
    budget, min_reps, max_reps = (1.0, 1, 5) if args.quick else (4.0, 3, 15)

    impls: dict[str, Callable[[Inputs], torch.Tensor]] = {
        "ours": run_ours,
        "hf": lambda x_: hf_core(hf_layer, x_, masks),
    }
    skipped: dict[str, str] = {}
    first_out: dict[str, torch.Tensor] = {}  # outputs of the first calls, for the check against ours
    setup_s: dict[str, float] = {}
    if args.no_flex:
        skipped["flex"] = "skip (--no-flex)"
    else:
        try:
            start = time.perf_counter()
            block_mask = make_flex_block_mask(n, x.global_mask)
            impls["flex"] = lambda x_: run_flex(x_, block_mask)
            with torch.no_grad():  # first call compiles; timed apart from the warm figures
                first_out["flex"] = run_flex(x, block_mask)
            setup_s["flex"] = time.perf_counter() - start
        except Exception as e:  # noqa: BLE001 - a failing alternative must not stop the benchmark
            skipped["flex"] = short_error(e)
    if dense_fits(n):
        dense_mask = band_global_mask(n, x.global_mask)
        impls["sdpa"] = lambda x_: run_sdpa(x_, dense_mask)
    else:
        skipped["sdpa"] = f"skip (N > {DENSE_MAX_N})"

    with torch.no_grad():
        reference = run_ours(x)

    rows = []
    for name in IMPLS:
        row = {"n": n, "g": g, "impl": name, "useful_gflop_fwd": work}
        if name in skipped:
            row.update(fwd=skipped[name], fwd_bwd=skipped[name], max_abs_diff_vs_ours=None)
            rows.append(row)
            continue
        impl = impls[name]
        if name in setup_s:
            row["compile_s"] = setup_s[name]
        try:
            out = first_out.pop(name) if name in first_out else forward_call(impl, x)()
            row["max_abs_diff_vs_ours"] = (out - reference).abs().max().item()
            del out
            row["fwd"] = measure(forward_call(impl, x), work, gemm, budget, min_reps, max_reps)
        except Exception as e:  # noqa: BLE001
            row.update(fwd=short_error(e), max_abs_diff_vs_ours=row.get("max_abs_diff_vs_ours"))
        if args.no_backward:
            row["fwd_bwd"] = "skip (--no-backward)"
        elif name == "flex":
            row["fwd_bwd"] = "n/a (flex_attention has no CPU backward)"
        else:
            try:
                row["fwd_bwd"] = measure(forward_backward_call(impl, x), 3 * work, gemm, budget, min_reps, max_reps)
            except Exception as e:  # noqa: BLE001
                row["fwd_bwd"] = short_error(e)
        rows.append(row)
        print(f"  N={n:<6} G={g:<3} {name:<5} fwd {_cell_ms(row['fwd']):>10}  fwd+bwd {_cell_ms(row['fwd_bwd']):>10}",
              file=sys.stderr, flush=True)
    return rows


# --------------------------------------------------------------------------------------------------
# Output


NOISY = 0.10  # other processes' CPU share above which a time is flagged in the table


def _cell_ms(m) -> str:
    if not isinstance(m, dict):
        return m
    return f"{m['ms']:.1f}" + ("*" if m["other_load"] > NOISY else "")


def _cells(m) -> list[str]:
    if not isinstance(m, dict):
        return [m, "", "", ""]
    peak = "n/a" if m["peak_mb"] is None else f"{m['peak_mb']:.0f}"
    return [_cell_ms(m), f"{m['gflops']:.1f}", f"{100 * m['frac_gemm']:.0f}%", peak]


def _speedup(rows: list[dict], row: dict, key: str) -> str:
    ours = next(r for r in rows if r["n"] == row["n"] and r["g"] == row["g"] and r["impl"] == "ours")
    if not (isinstance(ours[key], dict) and isinstance(row[key], dict)):
        return ""
    return f"{row[key]['ms'] / ours[key]['ms']:.2f}x"


def markdown_table(rows: list[dict]) -> str:
    head = ["N", "G", "impl",
            "fwd ms", "fwd GFLOP/s", "fwd % GEMM", "fwd peak MB", "fwd time / ours",
            "fwd+bwd ms", "fwd+bwd GFLOP/s", "fwd+bwd % GEMM", "fwd+bwd peak MB", "fwd+bwd time / ours",
            "max |out - ours|"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        diff = r.get("max_abs_diff_vs_ours")
        cells = ([str(r["n"]), str(r["g"]), r["impl"]]
                 + _cells(r["fwd"]) + [_speedup(rows, r, "fwd")]
                 + _cells(r["fwd_bwd"]) + [_speedup(rows, r, "fwd_bwd")]
                 + ["" if diff is None else f"{diff:.1e}"])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine_info(gemm: float) -> dict:
    import transformers
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "longformer_ext": longformer_ext.__version__, "python": platform.python_version(),
            "gemm_fp32_gflops": gemm}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seqlens", type=int, nargs="+", default=None, help=f"default {DEFAULT_SEQLENS}")
    p.add_argument("--globals", type=int, nargs="+", default=DEFAULT_GLOBALS, help="global token counts")
    p.add_argument("--quick", action="store_true", help="smoke run: N up to 4096, fewer repeats")
    p.add_argument("--no-flex", action="store_true", help="skip flex_attention (its compile takes a while)")
    p.add_argument("--no-backward", action="store_true", help="forward only")
    p.add_argument("--json", type=Path, default=Path(__file__).resolve().parent / "out" / "attention.json")
    args = p.parse_args(argv)
    if args.seqlens is None:
        args.seqlens = [n for n in DEFAULT_SEQLENS if n <= 4096] if args.quick else DEFAULT_SEQLENS
    bad = [n for n in args.seqlens if n % (2 * WINDOW)]
    if bad:
        p.error(f"Hugging Face's chunked core needs N to be a multiple of {2 * WINDOW}; got {bad}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(0)
    start = time.perf_counter()
    busy_before = cpu_busy_fraction()
    with OtherLoad() as gemm_load:
        gemm = gemm_gflops()
    info = machine_info(gemm)
    info.update(cpu_busy_before=busy_before, gemm_other_load=gemm_load.fraction)
    if busy_before > 0.1:
        print(f"# WARNING: {100 * busy_before:.0f}% of the CPUs were busy with other work before the run; "
              "figures will be slow and noisy", flush=True)
    print(f"# {info['cpu']}, {info['torch_threads']} threads, torch {info['torch']}, "
          f"transformers {info['transformers']}; fp32 GEMM (2048^3): {gemm:.1f} GFLOP/s", flush=True)
    hf_layer = make_hf_layer()

    rows = []
    for n in args.seqlens:
        for g in args.globals:
            rows.extend(bench_point(n, g, args, gemm, hf_layer))

    config = {"B": B, "H": H, "D": D, "dtype": "float32", "window_one_sided": WINDOW,
              "hf_attention_window": 2 * WINDOW, "seqlens": args.seqlens, "globals": args.globals,
              "quick": args.quick, "flops_formula": "fwd: 4*N*(2w+1+G)*D*H*B; fwd+bwd: 3x that",
              "hf": "LongformerSelfAttention core without q/k/v/global projections",
              "fwd": "torch.no_grad()", "fwd_bwd": "autograd.grad(out.sum(), (q, k, v))",
              "peak_mb": "growth of VmHWM during one warm call (clear_refs 5 reset)"}
    print()
    print(f"B={B} H={H} D={D} fp32, one-sided window {WINDOW} (HF attention_window {2 * WINDOW}); "
          f"G global tokens; fp32 GEMM {gemm:.1f} GFLOP/s; time / ours > 1 means ours is faster; "
          f"* = other processes used > {100 * NOISY:.0f}% of the CPUs while timing (slow, noisy)")
    print()
    print(markdown_table(rows))
    elapsed = time.perf_counter() - start
    info["cpu_busy_after"] = cpu_busy_fraction()
    print(f"\ntotal {elapsed:.0f} s; CPUs busy with other work: {100 * busy_before:.0f}% before the run, "
          f"{100 * info['cpu_busy_after']:.0f}% after")

    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"machine": info, "config": config, "results": rows,
                                     "elapsed_s": elapsed}, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
