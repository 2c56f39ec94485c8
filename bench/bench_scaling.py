"""Longformer attention on CPU, scaling sweep: how time and memory grow with N, ours against its peers
(Part A), and how close our kernels get to the machine's GEMM rate over windows, dilations, global
counts and dtypes (Part B).

Part A (scaling vs peers): fp32, B=1, H=12, D=64, window (256, 256), G in {0, 64},
  N in {1024, 2048, 4096, 8192, 16384, 32768, 65536}; implementations as in bench_attention.py:
    ours   longformer_ext.longformer_attention
    hf     Hugging Face's LongformerSelfAttention core (only N <= --hf-max-n, default 16384: it needs
           ~3 GB at 16K and grows linearly, plus ~10x ours' time)
    flex   torch.compile'd flex_attention with a block mask of the band + global pattern, forward only
           (no CPU backward); for G=64 only N <= --flex-g64-max-n (default 16384), as it takes ~19 s per
           call at 16K there (dense global rows/columns) and ~4x that per doubling after
    sdpa   dense scaled_dot_product_attention with a boolean [N, N] mask, where it fits (N <= 8192)
  forward (under torch.no_grad) and forward+backward (gradients of out.sum() w.r.t. q, k, v; ours, hf,
  sdpa). Past N = 16384 the flex block mask is built chunk by chunk of query rows (the same block mask
  torch's create_block_mask makes, without its dense [N, N] int64 intermediate, 34 GB at 64K).

Part B (ours only, coverage): N in {4096, 16384}, one-sided windows {32, 64, 128, 256, 512},
  dilation {1, 2, 4} (all heads), G {0, 1, 64}, fp32 and bf16, forward and forward+backward; each cell
  gets about 1 s of timed calls (1 to 3 repeats after the warm-up call).

Figures: median wall time after an untimed warm-up call; useful GFLOP/s = 4 * N * (2w + 1 + G) * D * H
forward (3x for forward+backward); that rate as a fraction of the machine's fp32 GEMM rate (torch.mm
2048^3, measured at start; the reference for bf16 too: this AVX2 CPU has no bf16 arithmetic, and
torch's own bf16 mm runs far below it, see machine.gemm_bf16_gflops_512 in the JSON); peak extra
memory = growth of the process's peak RSS (VmHWM, reset through /proc/self/clear_refs) during the
warm-up call, and that divided by the bytes of q (B*H*N*D*element size).

Derived: ours' forward time(N=65536) / time(N=16384) for G=0 and G=64 (linear scaling: ~4; with a
smaller --max-n, the largest N against N/4, or against the smallest N), and ours' forward peak / |q|.

Output: JSON (--json, default bench/out/scaling.json), the markdown tables of scaling_table.py on
stdout, and a PNG (--png, default bench/out/scaling.png): forward ms and forward peak MB against N,
log-log, one line per implementation, G=0 solid, G=64 dashed (needs matplotlib; skipped without it).

    python bench/bench_scaling.py                       # everything (roughly 30 min on 2 idle cores)
    python bench/bench_scaling.py --part A --no-flex    # scaling vs hf/sdpa only
    python bench/bench_scaling.py --quick               # smoke run: A up to 4096, a small B at 4096
    python bench/bench_scaling.py --quick --no-flex --max-n 2048
"""

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_attention as ba  # noqa: E402  (inputs, implementations, measurement helpers)
import scaling_table  # noqa: E402  (the markdown tables, shared with scaling_table.py)
from longformer_ext import longformer_attention  # noqa: E402

HERE = Path(__file__).resolve().parent

A_SEQLENS = [1024, 2048, 4096, 8192, 16384, 32768, 65536]
A_GLOBALS = [0, 64]
A_IMPLS = ["ours", "hf", "flex", "sdpa"]
HF_MAX_N = 16384
FLEX_G64_MAX_N = 16384
FLEX_EAGER_MASK_MAX_N = 16384  # above: the block mask is built in chunks of query rows

B_SEQLENS = [4096, 16384]
B_WINDOWS = [32, 64, 128, 256, 512]
B_DILATIONS = [1, 2, 4]
B_GLOBALS = [0, 1, 64]
B_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
B_BUDGET = (1.0, 1, 3)  # seconds of timed calls per cell, min and max repeats

QUICK_A_MAX_N = 4096
QUICK_B = {"seqlens": [4096], "windows": [64, 256], "dilations": [1, 2], "globals": [0, 64]}


def useful_gflop(n: int, window: int, g: int, heads: int = ba.H, d: int = ba.D) -> float:
    """Forward useful work: QK^T and PV over the 2w + 1 band keys and the G global keys of every query."""
    return 4 * n * (2 * window + 1 + g) * d * heads * ba.B / 1e9


def q_bytes(n: int, element_size: int) -> int:
    return ba.B * ba.H * n * ba.D * element_size


def _with_peak_over_q(m, qb: int):
    if isinstance(m, dict) and m.get("peak_mb") is not None:
        m["peak_over_q"] = m["peak_mb"] * 2 ** 20 / qb
    return m


def keep_first(call: Callable[[], torch.Tensor]):
    """A call that also keeps its first result (the warm-up call's, inside measure), so the check against
    ours costs no extra call. Keeping it alive does not change the warm-up call's peak (the result is
    counted there anyway)."""
    kept: dict[str, torch.Tensor] = {}

    def wrapped():
        out = call()
        kept.setdefault("out", out)
        return out
    return wrapped, kept


# --------------------------------------------------------------------------------------------------
# flex block mask for large N


def make_flex_block_mask_chunked(n: int, global_mask: Optional[torch.Tensor], rows: int = 512):
    """The block mask make_flex_block_mask builds, built `rows` query rows at a time: create_block_mask
    materialises the [N, N] mask (and an int64 |q - kv| of the same shape: 34 GB at N = 65536), this
    holds one [rows, N] slab at a time and reduces it to blocks with torch's own helpers."""
    from torch.nn.attention import flex_attention as fa

    block = fa._DEFAULT_SPARSE_BLOCK_SIZE
    rows = max(block, rows // block * block)
    g = torch.zeros(n, dtype=torch.bool) if global_mask is None else global_mask[0].clone()

    def band_or_global(b, h, q_idx, kv_idx):
        return ((q_idx - kv_idx).abs() <= ba.WINDOW) | g[q_idx] | g[kv_idx]

    partial, full = [], []
    for q0 in range(0, n, rows):
        def shifted(b, h, q_idx, kv_idx, q0=q0):
            return band_or_global(b, h, q_idx + q0, kv_idx)

        slab = fa.create_mask(shifted, 1, 1, min(rows, n - q0), n, device="cpu")
        p, f = fa._convert_mask_to_block_mask(slab, block, block, separate_full_blocks=True)
        partial.append(p)
        full.append(f)
        del slab
    return fa._create_sparse_block_from_block_mask((torch.cat(partial, 2), torch.cat(full, 2)), band_or_global,
                                                   (n, n), block, block)


def flex_block_mask(n: int, global_mask: Optional[torch.Tensor]):
    if n <= FLEX_EAGER_MASK_MAX_N:
        return ba.make_flex_block_mask(n, global_mask)
    return make_flex_block_mask_chunked(n, global_mask)


# --------------------------------------------------------------------------------------------------
# Part A


def part_a_point(n: int, g: int, args, gemm: float, hf_layer) -> list[dict]:
    x = ba.make_inputs(n, g, seed=n + g)
    work = useful_gflop(n, ba.WINDOW, g)
    qb = q_bytes(n, 4)
    budget, min_reps, max_reps = (1.0, 1, 5) if args.quick else (4.0, 3, 15)

    impls: dict[str, Callable[[ba.Inputs], torch.Tensor]] = {"ours": ba.run_ours}
    skipped: dict[str, str] = {}
    first_out: dict[str, torch.Tensor] = {}
    setup_s: dict[str, float] = {}
    if n <= args.hf_max_n:
        masks = ba.hf_masks(x)
        impls["hf"] = lambda x_: ba.hf_core(hf_layer, x_, masks)
    else:
        skipped["hf"] = f"skip (N > {args.hf_max_n})"
    if args.no_flex:
        skipped["flex"] = "skip (--no-flex)"
    elif g > 0 and n > args.flex_g64_max_n:
        skipped["flex"] = f"skip (G > 0 and N > {args.flex_g64_max_n}: too slow)"
    else:
        impls["flex"] = None  # set up in the loop below, after ours and HF are measured

    def set_up_flex():
        """Block mask and compile (the first call; kept apart from the warm figures). Done right
        before flex is measured: at 64K building the mask takes a minute and gigabytes, which must
        not disturb the other implementations' timings."""
        try:
            start = time.perf_counter()
            block_mask = flex_block_mask(n, x.global_mask)
            impls["flex"] = lambda x_: ba.run_flex(x_, block_mask)
            with torch.no_grad():
                first_out["flex"] = ba.run_flex(x, block_mask)
            setup_s["flex"] = time.perf_counter() - start
        except Exception as e:  # noqa: BLE001 - a failing alternative must not stop the sweep
            skipped["flex"] = ba.short_error(e)

    if ba.dense_fits(n):
        dense_mask = ba.band_global_mask(n, x.global_mask)
        impls["sdpa"] = lambda x_: ba.run_sdpa(x_, dense_mask)
    else:
        skipped["sdpa"] = f"skip (N > {ba.DENSE_MAX_N})"

    rows = []
    reference = None
    for name in A_IMPLS:
        row = {"n": n, "g": g, "impl": name, "useful_gflop_fwd": work, "q_bytes": qb, "max_abs_diff_vs_ours": None}
        if name == "flex" and name not in skipped:
            set_up_flex()
        if name in skipped:
            row.update(fwd=skipped[name], fwd_bwd=skipped[name])
            rows.append(row)
            continue
        impl = impls[name]
        if name in setup_s:
            row["compile_s"] = setup_s[name]
        try:
            call, kept = keep_first(ba.forward_call(impl, x))
            row["fwd"] = _with_peak_over_q(ba.measure(call, work, gemm, budget, min_reps, max_reps), qb)
            out = first_out.pop(name, None)
            out = kept.pop("out") if out is None else out
            if name == "ours":
                reference = out
            elif reference is not None:
                row["max_abs_diff_vs_ours"] = (out - reference).abs().max().item()
            del out, call, kept
        except Exception as e:  # noqa: BLE001
            row["fwd"] = ba.short_error(e)
        if args.no_backward:
            row["fwd_bwd"] = "skip (--no-backward)"
        elif name == "flex":
            row["fwd_bwd"] = "n/a (flex_attention has no CPU backward)"
        else:
            try:
                row["fwd_bwd"] = _with_peak_over_q(
                    ba.measure(ba.forward_backward_call(impl, x), 3 * work, gemm, budget, min_reps, max_reps), qb)
            except Exception as e:  # noqa: BLE001
                row["fwd_bwd"] = ba.short_error(e)
        rows.append(row)
        print(f"  A N={n:<6} G={g:<3} {name:<5} fwd {ba._cell_ms(row['fwd']):>10}  "
              f"fwd+bwd {ba._cell_ms(row['fwd_bwd']):>10}", file=sys.stderr, flush=True)
    for row in rows:
        if row["impl"] in skipped:
            print(f"  A N={n:<6} G={g:<3} {row['impl']:<5} {row['fwd']}", file=sys.stderr, flush=True)
    del x, reference, impls, first_out
    gc.collect()
    return rows


def linear_scaling(rows: list[dict], g: int) -> Optional[dict]:
    """Ours' forward time at the largest N against N/4 (65536 vs 16384 in the full sweep), or against
    the smallest N measured when N/4 is not there."""
    ms = {r["n"]: r["fwd"]["ms"] for r in rows if r["impl"] == "ours" and r["g"] == g and isinstance(r["fwd"], dict)}
    if len(ms) < 2:
        return None
    large = max(ms)
    small = large // 4 if large // 4 in ms else min(ms)
    ratio = ms[large] / ms[small]
    return {"g": g, "n_small": small, "n_large": large, "ms_small": ms[small], "ms_large": ms[large],
            "time_ratio": ratio, "linear_ratio": large / small, "ratio_over_linear": ratio / (large / small)}


def derived_a(rows: list[dict]) -> dict:
    scaling = [s for s in (linear_scaling(rows, g) for g in sorted({r["g"] for r in rows})) if s is not None]
    peak = [{"n": r["n"], "g": r["g"], "peak_mb": r["fwd"]["peak_mb"], "q_mb": r["q_bytes"] / 2 ** 20,
             "peak_over_q": r["fwd"].get("peak_over_q")}
            for r in rows if r["impl"] == "ours" and isinstance(r["fwd"], dict)]
    return {"ours_fwd_linear_scaling": scaling, "ours_fwd_peak_over_q": peak}


# --------------------------------------------------------------------------------------------------
# Part B


def part_b(args, gemm: float, cfg: dict) -> list[dict]:
    rows = []
    for n in cfg["seqlens"]:
        for g in cfg["globals"]:
            base = ba.make_inputs(n, g, seed=n + g)
            for dtype_name in cfg["dtypes"]:
                dtype = B_DTYPES[dtype_name]
                x = ba.Inputs(*(t.to(dtype) for t in (base.q, base.k, base.v)), base.global_mask)
                qb = q_bytes(n, x.q.element_size())
                for w in cfg["windows"]:
                    for dil in cfg["dilations"]:
                        def impl(x_, w=w, dil=dil):
                            return longformer_attention(ba.split_heads(x_.q), ba.split_heads(x_.k),
                                                        ba.split_heads(x_.v), w, dilation=dil,
                                                        global_attention_mask=x_.global_mask)
                        work = useful_gflop(n, w, g)
                        row = {"n": n, "g": g, "window": w, "dilation": dil, "dtype": dtype_name,
                               "useful_gflop_fwd": work, "q_bytes": qb}
                        for key, call, flop in (("fwd", lambda: ba.forward_call(impl, x), work),
                                                ("fwd_bwd", lambda: ba.forward_backward_call(impl, x), 3 * work)):
                            if key == "fwd_bwd" and args.no_backward:
                                row[key] = "skip (--no-backward)"
                                continue
                            try:
                                row[key] = _with_peak_over_q(ba.measure(call(), flop, gemm, *B_BUDGET), qb)
                            except Exception as e:  # noqa: BLE001
                                row[key] = ba.short_error(e)
                        rows.append(row)
                        print(f"  B {dtype_name} N={n:<6} G={g:<3} w={w:<4} dil={dil} fwd {_rate(row['fwd']):>16}  "
                              f"fwd+bwd {_rate(row['fwd_bwd']):>16}", file=sys.stderr, flush=True)
                del x
            del base
            gc.collect()
    return rows


def _rate(m) -> str:
    if not isinstance(m, dict):
        return m
    return f"{m['gflops']:.1f} GF/s {100 * m['frac_gemm']:.0f}%" + ("*" if m["other_load"] > ba.NOISY else "")


def bf16_gemm_gflops(n: int = 512) -> Optional[float]:
    """torch.mm in bf16 on this CPU (one warm-up, one timed call: it is slow here)."""
    try:
        a, b = torch.randn(n, n, dtype=torch.bfloat16), torch.randn(n, n, dtype=torch.bfloat16)
        torch.mm(a, b)
        start = time.perf_counter()
        torch.mm(a, b)
        return 2 * n ** 3 / (time.perf_counter() - start) / 1e9
    except Exception:  # noqa: BLE001
        return None


# --------------------------------------------------------------------------------------------------
# Plot


IMPL_STYLE = {"ours": ("C0", "o"), "hf": ("C1", "s"), "flex": ("C2", "^"), "sdpa": ("C3", "D")}


def plot(data: dict, path: Path) -> Optional[str]:
    """Two log-log panels against N: forward ms and forward peak extra MB; one line per implementation,
    G=0 solid, G=64 (any G > 0) dashed; a dotted grey line of slope 1 (time or memory proportional to N)
    through ours' first point. Returns a reason when nothing was written."""
    rows = data.get("part_a") or []
    if not rows:
        return "no Part A results to plot"
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.lines import Line2D
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib)"

    m = data["machine"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.6))
    panels = [("ms", "forward time (ms, median)"), ("peak_mb", "forward peak extra memory (MB, peak RSS growth)")]
    gs = sorted({r["g"] for r in rows})
    for ax, (key, label) in zip(axes, panels):
        for impl in A_IMPLS:
            color, marker = IMPL_STYLE[impl]
            for g in gs:
                pts = sorted((r["n"], r["fwd"][key]) for r in rows
                             if r["impl"] == impl and r["g"] == g and isinstance(r["fwd"], dict)
                             and r["fwd"].get(key) is not None and r["fwd"][key] > 0)
                if pts:
                    ax.plot(*zip(*pts), color=color, marker=marker, markersize=4,
                            linestyle="-" if g == 0 else "--", linewidth=1.6)
        ours = sorted((r["n"], r["fwd"][key]) for r in rows if r["impl"] == "ours" and r["g"] == gs[0]
                      and isinstance(r["fwd"], dict) and r["fwd"].get(key) and r["fwd"][key] > 0)
        if len(ours) >= 2:
            (n0, y0), n1 = ours[0], ours[-1][0]
            ax.plot([n0, n1], [y0 * 0.7, y0 * 0.7 * n1 / n0], color="0.6", linestyle=":", linewidth=1.2)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("sequence length N")
        ax.set_ylabel(label)
        ax.set_title(label.split(" (")[0])
        ax.grid(True, which="both", alpha=0.3)
        ns = sorted({r["n"] for r in rows})
        ax.set_xticks(ns)
        ax.set_xticklabels([f"{n // 1024}K" if n >= 1024 else str(n) for n in ns])
        ax.xaxis.set_minor_formatter(NullFormatter())
    handles = [Line2D([], [], color=IMPL_STYLE[i][0], marker=IMPL_STYLE[i][1], label=i) for i in A_IMPLS
               if any(r["impl"] == i and isinstance(r["fwd"], dict) for r in rows)]
    handles += [Line2D([], [], color="k", linestyle="-" if g == 0 else "--", label=f"G={g}") for g in gs]
    handles.append(Line2D([], [], color="0.6", linestyle=":", label="slope 1 (proportional to N)"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=9, frameon=False)
    isa = f", {m['cpu_capability']}" if m.get("cpu_capability") else ""
    fig.suptitle(f"Longformer attention forward on CPU ({m['cpu']}, {m['cores']} cores{isa}, torch {m['torch']}): "
                 f"fp32, B=1 H=12 D=64, window (256, 256)", fontsize=11)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# --------------------------------------------------------------------------------------------------
# Main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=["A", "B", "both"], default="both")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: A up to N={QUICK_A_MAX_N} with fewer repeats; B at N=4096, windows 64 256, "
                        "dilation 1 2, G 0 64")
    p.add_argument("--max-n", type=int, default=None,
                   help="largest N: Part A stops there, Part B's N values above it become it")
    p.add_argument("--no-flex", action="store_true", help="skip flex_attention (one compile per N)")
    p.add_argument("--no-backward", action="store_true", help="forward only")
    p.add_argument("--hf-max-n", type=int, default=HF_MAX_N, help="largest N for Hugging Face's core")
    p.add_argument("--flex-g64-max-n", type=int, default=FLEX_G64_MAX_N,
                   help="largest N for flex with global tokens")
    p.add_argument("--json", type=Path, default=HERE / "out" / "scaling.json")
    p.add_argument("--png", type=Path, default=HERE / "out" / "scaling.png")
    args = p.parse_args(argv)

    max_n = args.max_n if args.max_n is not None else (QUICK_A_MAX_N if args.quick else max(A_SEQLENS))
    args.a_seqlens = [n for n in A_SEQLENS if n <= max_n]
    if args.part != "B" and not args.a_seqlens:
        p.error(f"--max-n {args.max_n} leaves no Part A N (smallest {A_SEQLENS[0]})")
    b = dict(QUICK_B) if args.quick else {"seqlens": B_SEQLENS, "windows": B_WINDOWS, "dilations": B_DILATIONS,
                                          "globals": B_GLOBALS}
    if args.max_n is not None:
        b["seqlens"] = sorted({min(n, args.max_n) for n in b["seqlens"]})
    b["dtypes"] = list(B_DTYPES)
    args.b = b
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(0)
    start = time.perf_counter()
    busy_before = ba.cpu_busy_fraction()
    with ba.OtherLoad() as gemm_load:
        gemm = ba.gemm_gflops()
    info = ba.machine_info(gemm)
    info.update(cpu_busy_before=busy_before, gemm_other_load=gemm_load.fraction,
                cpu_capability=torch.backends.cpu.get_cpu_capability())
    if args.part != "A":
        info["gemm_bf16_gflops_512"] = bf16_gemm_gflops()
    if busy_before > 0.1:
        print(f"# WARNING: {100 * busy_before:.0f}% of the CPUs were busy with other work before the run; "
              "figures will be slow and noisy", flush=True)
    print(f"# {info['cpu']}, {info['torch_threads']} threads, torch {info['torch']}, "
          f"transformers {info['transformers']}; fp32 GEMM (2048^3): {gemm:.1f} GFLOP/s", flush=True)

    config = {"B": ba.B, "H": ba.H, "D": ba.D, "quick": args.quick,
              "flops_formula": "fwd: 4*N*(2w+1+G)*D*H*B; fwd+bwd: 3x that",
              "frac_gemm": "useful GFLOP/s / fp32 torch.mm 2048^3 GFLOP/s (for bf16 too)",
              "fwd": "torch.no_grad()", "fwd_bwd": "autograd.grad(out.sum(), (q, k, v))",
              "peak_mb": "growth of VmHWM during the warm-up call (clear_refs 5 reset)",
              "peak_over_q": "peak_mb / bytes of q (B*H*N*D*element size)"}
    data = {"machine": info, "config": config}
    if args.part != "B":
        config["A"] = {"dtype": "float32", "window": [ba.WINDOW, ba.WINDOW], "seqlens": args.a_seqlens,
                       "globals": A_GLOBALS, "impls": A_IMPLS, "hf_max_n": args.hf_max_n,
                       "flex_g64_max_n": args.flex_g64_max_n, "sdpa_max_n": ba.DENSE_MAX_N,
                       "no_flex": args.no_flex, "budget": "1 s, 1-5 reps" if args.quick else "4 s, 3-15 reps"}
        hf_layer = ba.make_hf_layer()
        rows = []
        for n in args.a_seqlens:
            for g in A_GLOBALS:
                rows.extend(part_a_point(n, g, args, gemm, hf_layer))
        data["part_a"] = rows
        data["derived"] = derived_a(rows)
    if args.part != "A":
        config["B"] = dict(args.b, budget=f"{B_BUDGET[0]} s, {B_BUDGET[1]}-{B_BUDGET[2]} reps")
        data["part_b"] = part_b(args, gemm, args.b)

    data["elapsed_s"] = time.perf_counter() - start
    info["cpu_busy_after"] = ba.cpu_busy_fraction()
    print()
    print(scaling_table.render(data, full=True))
    print(f"\ntotal {data['elapsed_s']:.0f} s; CPUs busy with other work: {100 * busy_before:.0f}% before the run, "
          f"{100 * info['cpu_busy_after']:.0f}% after")

    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(data, indent=2))
    print(f"wrote {args.json}")
    why = plot(data, args.png)
    print(f"wrote {args.png}" if why is None else f"no plot: {why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
