"""Our forward's useful FLOP rate as a fraction of the fp32 GEMM rate, with the two measured in
alternation so that a noisy spell on a shared machine moves both (CPU figures).

bench_scaling.py measures the GEMM rate once at the start of a long run; on a host shared with other
tenants that one figure can be off by a third. Here every forward call is paired with GEMM calls
(best of 3 of a 2048^3 torch.mm) taken just before it, and the median of the per-pair fractions is
reported. fp32, B=1, H=12, D=64, window (256, 256), no global tokens; `contiguous` inputs are
[B, H, N, D], `projection` inputs are [B, N, H * D] split into heads as a view (what bench_*.py time).

    python bench/gemm_fraction.py                  # N = 16384, both layouts
    python bench/gemm_fraction.py --seqlen 4096 --pairs 9
"""

import argparse
import statistics
import time

import torch

from longformer_ext import longformer_attention

H, D, WINDOW = 12, 64, 256


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def inputs(n: int, layout: str):
    if layout == "contiguous":
        return [torch.randn(1, H, n, D) for _ in range(3)]
    return [torch.randn(1, n, H * D).view(1, n, H, D).transpose(1, 2) for _ in range(3)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seqlen", type=int, default=16384)
    parser.add_argument("--pairs", type=int, default=7, help="(GEMM, forward) pairs per layout")
    args = parser.parse_args()

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    gemm_flop = 2 * 2048 ** 3
    useful_flop = 4 * args.seqlen * (2 * WINDOW + 1) * D * H
    print(f"CPU figures: torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, B=1 H={H} "
          f"D={D} N={args.seqlen} window ({WINDOW}, {WINDOW}), no globals")
    with torch.no_grad():
        for layout in ("contiguous", "projection"):
            q, k, v = inputs(args.seqlen, layout)

            def forward():
                return longformer_attention(q, k, v, WINDOW)

            forward()
            torch.mm(a, b)
            fractions = []
            for _ in range(args.pairs):
                gemm = gemm_flop / min(seconds(lambda: torch.mm(a, b)) for _ in range(3))
                t = seconds(forward)
                fractions.append(useful_flop / t / gemm)
                print(f"  {layout:<10} GEMM {gemm / 1e9:6.1f} GFLOP/s  forward {t * 1e3:7.1f} ms "
                      f"{useful_flop / t / 1e9:6.1f} GFLOP/s  {fractions[-1]:.0%} of GEMM", flush=True)
            print(f"{layout}: median {statistics.median(fractions):.0%} of the GEMM rate "
                  f"(range {min(fractions):.0%}-{max(fractions):.0%})", flush=True)


if __name__ == "__main__":
    main()
