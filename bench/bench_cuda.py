"""GPU benchmark: our CUDA kernels against what a user would pick instead, on the same inputs.

Peers (each where installed and where it fits in memory): flash_attn's sliding window
(`window_size=(left, right)`, half types only, no dilation and no global tokens), compiled
`flex_attention` with the same band (+ global) mask, and dense `scaled_dot_product_attention` with a
boolean band mask (up to --sdpa-max-n: the mask is [N, N]). Reports median time (CUDA events), useful
TFLOP/s (4 * N * (band + globals) * D * H forward plus the global rows; 3.5x that for forward+backward,
a backward counted as 2.5 forwards) and peak allocated memory; writes JSON (rewritten after every row)
and, with --markdown, one markdown table at the end.

    python bench/bench_cuda.py --out bench/results/cuda.json
    python bench/bench_cuda.py --quick --markdown --out bench/out/cuda.json   # N 16K/64K, bf16/fp32, fewer reps
    python bench/bench_cuda.py --table bench/results/cuda_h100.json           # only render a JSON as the table
"""

import argparse
import json
import statistics
import time

import torch

PEERS = ["flex_attention (compiled)", "SDPA dense band mask", "flash_attn window"]
SHORT = {PEERS[0]: "flex (compiled)", PEERS[1]: "SDPA band mask", PEERS[2]: "flash_attn window"}
OURS = "longformer_ext"


def measure(fn, warmup=3, reps=10, cell_budget_s=None):
    """Median ms over `reps` timed calls (CUDA events), the peak memory of one call above what was allocated
    before it, and the wall time of the first call (compilation included). With cell_budget_s, fewer timed
    calls (at least 3) where `reps` calls would take longer than that."""
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    first_s = time.perf_counter() - start
    for _ in range(warmup - 1):
        fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    one_s = time.perf_counter() - start
    peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    if cell_budget_s:
        reps = max(3, min(reps, int(cell_budget_s / max(one_s, 1e-6))))
    times = []
    for _ in range(reps):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(begin.elapsed_time(end))
    return statistics.median(times), peak_mb, first_s, reps


def band_mask(n, left, right, glob, device):
    i = torch.arange(n, device=device)
    offset = i[None, :] - i[:, None]
    band = (offset >= -left) & (offset <= right)
    if glob is not None:
        band = band | glob[None, :] | glob[:, None]
    return band


def implementations(q, k, v, left, right, glob, backward, sdpa_max_n=16384):
    # Imported here, so that --help and --table work where the package is not built.
    from longformer_ext import longformer_attention

    n = q.shape[2]
    impls = {}
    gm = None if glob is None else glob[None].expand(q.shape[0], -1)

    def ours():
        return longformer_attention(q, k, v, (left, right), global_attention_mask=gm)
    impls[OURS] = ours

    try:
        from flash_attn import flash_attn_func
        if glob is None and q.dtype in (torch.float16, torch.bfloat16):
            qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
            impls["flash_attn window"] = lambda: flash_attn_func(qt, kt, vt, window_size=(left, right))
    except ImportError:
        pass

    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        # Each configuration compiles its own flex kernel; without a reset dynamo stops recompiling
        # after its recompile limit and silently runs flex unfused (an [N, N] score matrix).
        torch._dynamo.reset()
        g = glob

        def mask_mod(b, h, qi, ki):
            inside = (ki - qi >= -left) & (ki - qi <= right)
            if g is None:
                return inside
            return inside | g[ki] | g[qi]
        block_mask = create_block_mask(mask_mod, None, None, n, n, device=q.device)
        flex = torch.compile(flex_attention)
        impls[PEERS[0]] = lambda: flex(q, k, v, block_mask=block_mask)
    except Exception as exc:  # flex needs a recent torch and triton; report and go on without it
        print(f"flex_attention unavailable: {exc}")

    if n <= sdpa_max_n:
        mask = band_mask(n, left, right, glob, q.device)
        impls[PEERS[1]] = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if not backward:
        return impls

    def with_backward(fn):
        def run():
            out = fn()
            out.backward(torch.ones_like(out))
        return run
    return {name: with_backward(fn) for name, fn in impls.items()}


def _fmt_ms(ms):
    return f"{ms:.3f}" if ms < 10 else f"{ms:.1f}"


def markdown_table(rows):
    """One line per (dtype, N, G, pass): every implementation's ms side by side, ours / flex, and for G > 0 ours /
    ours at G = 0 (same dtype, N and pass)."""
    if not rows:
        return "(no results)"
    first = rows[0]
    names = [p for p in PEERS if any(r["implementation"] == p for r in rows)]
    keys = []
    cells = {}
    for r in rows:
        key = (r["dtype"], r["seqlen"], r["globals"], r["passes"])
        if key not in cells:
            keys.append(key)
            cells[key] = {}
        cells[key][r["implementation"]] = r
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    keys.sort(key=lambda k: (dtypes.index(k[0]), k[1], k[2], k[3] != "fwd"))

    def ms_of(cell):
        if cell is None:
            return None, "—"
        if cell.get("ms") is None:
            return None, cell.get("error", "failed").split(":")[0]
        return cell["ms"], _fmt_ms(cell["ms"])

    env = ", ".join(f"{label} {first[k]}" for k, label in (("capability", ""), ("torch", "torch"), ("cuda", "CUDA"))
                    if first.get(k)).strip()
    lines = [f"GPU: {first['device']}" + (f" ({env})" if env else "") + f"; B=1 H={first['heads']} D={first['dim']} "
             f"window ({first['window']}, {first['window']}); median ms (CUDA events); ours/flex < 1: ours faster",
             "",
             "| dtype | N | G | pass | ours ms | " + " | ".join(f"{SHORT[n]} ms" for n in names) +
             " | ours/flex | ours vs G=0 | ours TFLOP/s | ours peak MB |",
             "|---|---|---|---|---|" + "---|" * len(names) + "---|---|---|---|"]
    for key in keys:
        dtype, n, g, passes = key
        ours_ms, ours_text = ms_of(cells[key].get(OURS))
        peer_text = [ms_of(cells[key].get(p))[1] for p in names]
        flex_ms = ms_of(cells[key].get(PEERS[0]))[0]
        vs_flex = f"{ours_ms / flex_ms:.2f}x" if ours_ms and flex_ms else "—"
        base_ms = ms_of(cells.get((dtype, n, 0, passes), {}).get(OURS))[0] if g else None
        vs_g0 = f"{ours_ms / base_ms:.2f}x" if ours_ms and base_ms else "—"
        ours = cells[key].get(OURS) or {}
        tflops = f"{ours['tflops']:.1f}" if ours.get("tflops") is not None else "—"
        peak = f"{ours['peak_mb']:.0f}" if ours.get("peak_mb") is not None else "—"
        lines.append(f"| {dtype} | {n} | {g} | {passes} | {ours_text} | " + " | ".join(peer_text) +
                     f" | {vs_flex} | {vs_g0} | {tflops} | {peak} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=None,
                        help="sequence lengths (default 4096 16384 65536; --quick: 16384 65536)")
    parser.add_argument("--dtypes", nargs="+", default=None,
                        help="default bfloat16 float16 float32; --quick: bfloat16 float32")
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--globals", type=int, nargs="+", default=[0, 64])
    parser.add_argument("--passes", nargs="+", choices=["fwd", "fwd+bwd"], default=["fwd", "fwd+bwd"])
    parser.add_argument("--sdpa-max-n", type=int, default=16384,
                        help="dense SDPA only up to this N (its mask is [N, N]); 0: no SDPA")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls before timing (default 3; --quick: 1)")
    parser.add_argument("--reps", type=int, default=10, help="timed calls per cell (the median is reported)")
    parser.add_argument("--cell-budget-s", type=float, default=None,
                        help="fewer timed calls (at least 3) where --reps would take longer (--quick: 1.0)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no new configuration after this many seconds (the rest is listed as skipped; "
                             "the first one always runs)")
    parser.add_argument("--quick", action="store_true", help="N 16K/64K, bf16/fp32, 1 warm-up, ~1 s per cell")
    parser.add_argument("--markdown", action="store_true", help="print one markdown table at the end")
    parser.add_argument("--table", metavar="JSON", help="only print the markdown table of an earlier run's JSON")
    parser.add_argument("--out", default="bench/results/cuda.json")
    args = parser.parse_args()
    if args.table:
        with open(args.table) as f:
            print(markdown_table(json.load(f)))
        return
    if args.lengths is None:
        args.lengths = [16384, 65536] if args.quick else [4096, 16384, 65536]
    if args.dtypes is None:
        args.dtypes = ["bfloat16", "float32"] if args.quick else ["bfloat16", "float16", "float32"]
    if args.warmup is None:
        args.warmup = 1 if args.quick else 3
    if args.cell_budget_s is None and args.quick:
        args.cell_budget_s = 1.0
    if not torch.cuda.is_available():
        raise SystemExit("bench_cuda.py: no CUDA GPU visible (torch.cuda.is_available() is False)")
    device = torch.cuda.get_device_name()
    capability = "sm_%d%d" % torch.cuda.get_device_capability()
    started = time.perf_counter()
    rows = []
    skipped = []
    print(f"device: {device} ({capability}), torch {torch.__version__}, CUDA {torch.version.cuda}; "
          f"B=1 H={args.heads} D={args.dim} window=({args.window}, {args.window})")
    print(f"{'dtype':9} {'N':>6} {'G':>3} {'pass':8} {'implementation':28} {'ms':>9} {'TFLOP/s':>8} {'peak MB':>8} "
          f"{'first s':>7} {'reps':>4}", flush=True)
    # Length outermost: a run cut short by --budget-s has the shorter lengths in every dtype.
    for n in args.lengths:
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            for n_glob in args.globals:
                # The first configuration always runs.
                if args.budget_s is not None and rows and time.perf_counter() - started > args.budget_s:
                    skipped.append(f"{dtype_name} N={n} G={n_glob}")
                    continue
                gen = torch.Generator(device="cuda").manual_seed(0)
                q, k, v = (torch.randn(1, args.heads, n, args.dim, device="cuda", dtype=dtype, generator=gen)
                           for _ in range(3))
                glob = None
                if n_glob:
                    glob = torch.zeros(n, dtype=torch.bool, device="cuda")
                    glob[torch.linspace(0, n - 1, n_glob, device="cuda").long()] = True
                band = 2 * args.window + 1
                flops = 4 * n * (band + n_glob) * args.dim * args.heads + 4 * n_glob * n * args.dim * args.heads
                for backward in (False, True):
                    passes = "fwd+bwd" if backward else "fwd"
                    if passes not in args.passes:
                        continue
                    for t in (q, k, v):
                        t.requires_grad_(backward)
                    row = dict(device=device, capability=capability, torch=torch.__version__, cuda=torch.version.cuda,
                               dtype=dtype_name, seqlen=n, globals=n_glob, passes=passes, heads=args.heads,
                               dim=args.dim, window=args.window, tf32=torch.backends.cuda.matmul.allow_tf32)
                    impls = implementations(q, k, v, args.window, args.window, glob, backward, args.sdpa_max_n)
                    for name, fn in impls.items():
                        try:
                            ms, mb, first_s, reps = measure(fn, args.warmup, args.reps, args.cell_budget_s)
                        except torch.cuda.OutOfMemoryError:
                            torch.cuda.empty_cache()
                            print(f"{dtype_name:9} {n:6} {n_glob:3} {passes:8} {name}: out of memory", flush=True)
                            rows.append(dict(row, implementation=name, ms=None, error="OOM"))
                            continue
                        except Exception as exc:
                            message = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
                            print(f"{dtype_name:9} {n:6} {n_glob:3} {passes:8} {name}: failed ({message})", flush=True)
                            rows.append(dict(row, implementation=name, ms=None, error=f"failed: {message}"))
                            continue
                        useful = flops * (3.5 if backward else 1.0)
                        tflops = useful / (ms * 1e-3) / 1e12
                        rows.append(dict(row, implementation=name, ms=ms, tflops=tflops, peak_mb=mb,
                                         first_call_s=first_s, reps=reps))
                        print(f"{dtype_name:9} {n:6} {n_glob:3} {passes:8} {name:28} {ms:9.3f} {tflops:8.2f} "
                              f"{mb:8.0f} {first_s:7.1f} {reps:4}", flush=True)
                        # Rewritten after every row, so a run cut short keeps what it measured.
                        with open(args.out, "w") as f:
                            json.dump(rows, f, indent=1)
                impls = None
                del q, k, v, glob
                torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    print(f"wrote {args.out} ({len(rows)} rows) in {time.perf_counter() - started:.0f} s")
    if skipped:
        print(f"skipped (over --budget-s {args.budget_s:.0f} s): " + "; ".join(skipped))
    if args.markdown:
        print()
        print(markdown_table(rows))


if __name__ == "__main__":
    main()
