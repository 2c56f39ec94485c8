"""The README demo: Longformer attention on a long input, checked against the float64 oracle, then timed
against Hugging Face's chunked implementation on the same inputs.

    python bench/demo.py                    # ~1-2 minutes on 2 cores
    python bench/demo.py --oracle-heads 12  # check every head against the oracle (needs ~20 GB, slower)

Input: B=1, H=12, N=4096, D=64, fp32, one-sided window 256 (HF attention_window=512), 2 global tokens
(the first token and one in the middle of the text), the last 296 tokens padding. Exits non-zero when
the output or a gradient is off.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_attention as ba  # noqa: E402  (the implementations and the timing helpers)
from longformer_ext.reference import dense_attention  # noqa: E402

N = 4096
PADDING = 296
OUT_TOL = 1e-4   # fp32 kernel vs float64 oracle, max abs error of the output (outputs are O(1))
GRAD_TOL = 1e-4  # same, relative to the largest gradient entry (global keys collect gradient from all rows)


def demo_inputs(seed: int = 0) -> ba.Inputs:
    x = ba.make_inputs(N, 0, seed=seed)
    real = N - PADDING
    x.attention_mask = torch.zeros(ba.B, N, dtype=torch.bool)
    x.attention_mask[:, :real] = True
    x.global_mask = torch.zeros(ba.B, N, dtype=torch.bool)
    x.global_mask[:, [0, real // 2]] = True
    return x


def check_against_oracle(x: ba.Inputs, heads: int) -> bool:
    """Ours (fp32, all heads) forward+backward vs the float64 dense oracle on the first `heads` heads.
    Heads are independent, so a slice of heads is an exact check of those heads; the oracle builds
    [B, heads, N, N] float64 tensors (1.6 GB each for 12 heads), which is why it defaults to 2."""
    xg = x.requiring_grad()
    out = ba.run_ours(xg)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(out, (xg.q, xg.k, xg.v), grad_out)

    def first_heads(t):
        return ba.split_heads(t)[:, :heads]

    start = time.perf_counter()
    q64, k64, v64 = (first_heads(t).detach().double().requires_grad_() for t in (x.q, x.k, x.v))
    ref = dense_attention(q64, k64, v64, ba.WINDOW, attention_mask=x.attention_mask,
                          global_attention_mask=x.global_mask)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), grad_out[:, :heads].double())
    oracle_s = time.perf_counter() - start

    ok = True
    out_err = (out[:, :heads].double() - ref).abs().max().item()
    ok &= out_err <= OUT_TOL
    print(f"oracle check on heads 0..{heads - 1} of {ba.H} (float64 dense oracle, {oracle_s:.0f} s):")
    print(f"  output   max abs error {out_err:.2e}  (tolerance {OUT_TOL:.0e})  {'ok' if out_err <= OUT_TOL else 'FAIL'}")
    for name, g, g_ref in zip(("q", "k", "v"), grads, ref_grads):
        err = (first_heads(g).double() - g_ref).abs().max().item()
        scale = max(1.0, g_ref.abs().max().item())
        good = err <= GRAD_TOL * scale
        ok &= good
        print(f"  grad {name}   max abs error {err:.2e}  (max |grad| {g_ref.abs().max().item():.2f}, "
              f"tolerance {GRAD_TOL:.0e} x max(1, max |grad|))  {'ok' if good else 'FAIL'}")
    padded_rows = out[:, :, N - PADDING:].abs().max().item()
    ok &= padded_rows == 0.0
    print(f"  padding rows max |out| {padded_rows}  {'ok' if padded_rows == 0.0 else 'FAIL'}")
    return ok


def _mb(value) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def time_ours_vs_hf(x: ba.Inputs, budget_s: float) -> bool:
    layer = ba.make_hf_layer()
    masks = ba.hf_masks(x)
    impls = {"ours": ba.run_ours, "hf": lambda x_: ba.hf_core(layer, x_, masks)}
    with torch.no_grad():
        diff = (impls["hf"](x) - impls["ours"](x)).abs().max().item()
    print(f"\nours vs Hugging Face's LongformerSelfAttention core (no projections), same inputs: "
          f"max |out_hf - out_ours| = {diff:.1e}")

    results = {}
    for name, impl in impls.items():
        for mode, make_call in (("fwd", ba.forward_call), ("fwd+bwd", ba.forward_backward_call)):
            results[name, mode] = ba.measure(make_call(impl, x), 1.0, None, budget_s, min_reps=3, max_reps=10)
    other_load = max(r["other_load"] for r in results.values())

    print(f"\nB={ba.B} H={ba.H} N={N} D={ba.D} fp32, window {ba.WINDOW} each side, 2 global tokens, {PADDING} "
          f"padding; {torch.get_num_threads()} threads; median of reps after a warm-up; peak MB = peak RSS "
          f"growth during a call")
    print("| pass | ours ms | HF ms | speed-up | ours peak MB | HF peak MB |")
    print("|---|---|---|---|---|---|")
    for mode in ("fwd", "fwd+bwd"):
        ours, hf = results["ours", mode], results["hf", mode]
        print(f"| {mode} | {ours['ms']:.0f} ({ours['reps']} reps) | {hf['ms']:.0f} ({hf['reps']} reps) | "
              f"{hf['ms'] / ours['ms']:.1f}x | {_mb(ours['peak_mb'])} | {_mb(hf['peak_mb'])} |")
    if other_load > ba.NOISY:
        print(f"WARNING: other processes used up to {100 * other_load:.0f}% of the CPUs while timing; "
              "these times are slow and noisy")
    return diff <= OUT_TOL


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--oracle-heads", type=int, default=2, help="heads checked against the float64 oracle")
    p.add_argument("--budget", type=float, default=3.0, help="seconds of timed repeats per measurement")
    args = p.parse_args(argv)
    if not 1 <= args.oracle_heads <= ba.H:
        p.error(f"--oracle-heads must be in 1..{ba.H}")

    start = time.perf_counter()
    x = demo_inputs()
    ok = check_against_oracle(x, args.oracle_heads)
    ok &= time_ours_vs_hf(x, args.budget)
    print(f"\n{'all checks passed' if ok else 'CHECK FAILED'} ({time.perf_counter() - start:.0f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
