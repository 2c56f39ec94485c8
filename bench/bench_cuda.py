"""GPU benchmark: our CUDA kernels against what a user would pick instead, on the same inputs.

Peers (each where installed and where it fits in memory): flash_attn's sliding window
(`window_size=(left, right)`, half types only, no dilation and no global tokens), compiled
`flex_attention` with the same band (+ global) mask, and dense `scaled_dot_product_attention` with a
boolean band mask. Reports median time (CUDA events), useful TFLOP/s (4 * N * (band + globals) * D
* H forward plus the global rows; 3.5x that for forward+backward, a backward counted as 2.5 forwards)
and peak allocated memory; writes JSON.

    python bench/bench_cuda.py --out bench/results/cuda.json
"""

import argparse
import json
import statistics

import torch

from longformer_ext import longformer_attention


def time_ms(fn, warmup=3, reps=10):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_mb(fn):
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def band_mask(n, left, right, glob, device):
    i = torch.arange(n, device=device)
    offset = i[None, :] - i[:, None]
    band = (offset >= -left) & (offset <= right)
    if glob is not None:
        band = band | glob[None, :] | glob[:, None]
    return band


def implementations(q, k, v, left, right, glob, backward):
    n = q.shape[2]
    impls = {}
    gm = None if glob is None else glob[None].expand(q.shape[0], -1)

    def ours():
        return longformer_attention(q, k, v, (left, right), global_attention_mask=gm)
    impls["longformer_ext"] = ours

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
        impls["flex_attention (compiled)"] = lambda: flex(q, k, v, block_mask=block_mask)
    except Exception as exc:  # flex needs a recent torch and triton; report and go on without it
        print(f"flex_attention unavailable: {exc}")

    if n <= 16384:
        mask = band_mask(n, left, right, glob, q.device)
        impls["SDPA dense band mask"] = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v,
                                                                                             attn_mask=mask)
    if not backward:
        return impls

    def with_backward(fn):
        def run():
            out = fn()
            out.backward(torch.ones_like(out))
        return run
    return {name: with_backward(fn) for name, fn in impls.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16", "float32"])
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--globals", type=int, nargs="+", default=[0, 64])
    parser.add_argument("--out", default="bench/results/cuda.json")
    args = parser.parse_args()
    device = torch.cuda.get_device_name()
    rows = []
    print(f"device: {device}; B=1 H={args.heads} D={args.dim} window=({args.window}, {args.window})")
    print(f"{'dtype':9} {'N':>6} {'G':>3} {'pass':8} {'implementation':28} {'ms':>9} {'TFLOP/s':>8} {'peak MB':>8}")
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for n in args.lengths:
            for n_glob in args.globals:
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
                    for t in (q, k, v):
                        t.requires_grad_(backward)
                    for name, fn in implementations(q, k, v, args.window, args.window, glob, backward).items():
                        try:
                            ms = time_ms(fn)
                            mb = peak_mb(fn)
                        except torch.cuda.OutOfMemoryError:
                            torch.cuda.empty_cache()
                            print(f"{dtype_name:9} {n:6} {n_glob:3} {name}: out of memory")
                            continue
                        except Exception as exc:
                            print(f"{dtype_name:9} {n:6} {n_glob:3} {name}: failed ({type(exc).__name__}: {exc})")
                            continue
                        useful = flops * (3.5 if backward else 1.0)
                        tflops = useful / (ms * 1e-3) / 1e12
                        passes = "fwd+bwd" if backward else "fwd"
                        rows.append(dict(device=device, dtype=dtype_name, seqlen=n, globals=n_glob, passes=passes,
                                         implementation=name, ms=ms, tflops=tflops, peak_mb=mb, heads=args.heads,
                                         dim=args.dim, window=args.window))
                        print(f"{dtype_name:9} {n:6} {n_glob:3} {passes:8} {name:28} {ms:9.3f} {tflops:8.2f} "
                              f"{mb:8.0f}")
                        # Rewritten after every row, so a run cut short keeps what it measured.
                        with open(args.out, "w") as f:
                            json.dump(rows, f, indent=1)
    print(f"wrote {args.out} ({len(rows)} rows)")


if __name__ == "__main__":
    main()
