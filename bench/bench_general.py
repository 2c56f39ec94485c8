"""The general sliding-window op on CPU: three non-Longformer use cases against the best peer here.

Cases (docs/design.md §2.2), fp32, inputs as contiguous [B, H, N, D]:
  gqa     Mistral-like layer: B=1, H=32 query heads on H_kv=8 KV heads, N=4096, D=64, causal window
          (256, 0). Peers: dense scaled_dot_product_attention with a boolean [N, N] band mask
          (enable_gqa=True), and torch.compile'd flex_attention with a sliding-window causal block
          mask (enable_gqa=True).
  decode  one new token against a KV cache: q [1, 32, 1, 128], k, v [1, 8, 4097, 128], window
          (4096, 0) causal, so the query (at position 4096, the default q_offset) sees all 4097
          keys. Peers: SDPA without a mask (the whole cache is visible; enable_gqa=True), compiled
          flex_attention with the same window as a block mask. Forward only. Each timed call steps
          through --layers (default 4) separate caches of 34 MB each, as a decoder's layers do, so
          that no call finds its K and V in a CPU cache the previous call left warm; the figure is
          the time per (token, layer).
  packed  ModernBERT-like local layer over 8 sequences of seeded random lengths in [256, 2048],
          H=12, D=64, window (64, 64). Ours on the packed tokens (B=1, cu_seqlens) against ours on
          the padded [8, H, max_len, D] batch with attention_mask, SDPA on the padded batch with a
          band + key-padding mask, and compiled flex_attention on the packed tokens with a
          band + same-sequence block mask (the usual way to run packed sequences with flex).

flex_attention has no CPU backward in torch 2.13; the script asks torch (eagerly, on a tiny input)
and records its error, so a torch that adds one gets its backward timed. A flex that fails to build
its mask or compile is recorded the same way and the run goes on.

Timing: two untimed calls per (implementation, pass) first: one whose result is checked against
ours, one that records the peak extra memory (growth of the process's peak RSS during the call,
bench_attention.peak_extra_rss_mb); flex's block mask and compile come before, timed apart
(setup_s, in the JSON). Then --rounds rounds, each timing every implementation once, the order
rotated each round so none always follows the same neighbour; the table gives the median over
rounds. Forward under torch.no_grad(); forward+backward returns the
gradients w.r.t. q, k, v for one fixed random output gradient (zero on padding rows, so padded and
packed runs differentiate the same function of the real tokens). Sanity: max |difference| from
ours (packed, for the packed case) of the output and of the gradients, over real tokens.

Load: the 1-minute load average before and after the run goes into the JSON and the caption, and
each timing records the share of the CPUs other processes used meanwhile (bench_attention.OtherLoad);
* in the table marks an implementation whose median of that share over the rounds exceeded 10%.

    python bench/bench_general.py                 # about 4 minutes on 2 shared cores
    python bench/bench_general.py --rounds 5 --cases gqa decode
    python bench/bench_general.py --quick         # smoke run: small shapes, one round (~30 s)

Writes bench/results/general.json (--json to change) and prints a markdown table.
"""

import argparse
import functools
import itertools
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_attention as ba  # noqa: E402  (machine description, other-load, peak-memory, error helpers)

from longformer_ext import longformer_attention  # noqa: E402

BUSY = 0.10  # other processes' CPU share above which a time is starred (as in the other scripts)
CASES = ["gqa", "decode", "packed"]

Tensors = tuple[torch.Tensor, ...]


@dataclass
class Impl:
    """One implementation of a case.

    fn maps (q, k, v) to the output; inputs are the (q, k, v) sets it runs on (several for decode,
    one per layer's cache; the first set is the one checked against ours); to_common maps its
    output and gradients to ours' layout (the packed tokens for the padded runs); grad_out is the
    output gradient in its own layout. backward_error says why its forward+backward is not timed."""
    name: str
    fn: Callable[..., torch.Tensor]
    inputs: list[Tensors]
    to_common: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
    grad_out: Optional[torch.Tensor] = None
    backward_error: Optional[str] = None
    setup_s: Optional[float] = None


@dataclass
class Case:
    name: str
    description: str
    impls: list[Impl]
    errors: dict[str, str] = field(default_factory=dict)  # implementations that could not be set up
    calls_per_timing: int = 1  # passes over every input set per timed call (decode: many, it is fast)
    backward: bool = True
    details: dict = field(default_factory=dict)  # goes into the JSON as it is


# --------------------------------------------------------------------------------------------------
# flex_attention


_flex = None


def compiled_flex():
    global _flex
    if _flex is None:
        from torch.nn.attention.flex_attention import flex_attention
        # One specialised kernel per case's shape (dynamic=False), as a user with fixed shapes gets.
        _flex = torch.compile(flex_attention, dynamic=False)
    return _flex


@functools.cache
def flex_backward_error() -> Optional[str]:
    """Why flex_attention cannot differentiate on CPU (torch's own error), or None if it can.

    Asked of the eager function on a tiny input: a failed call of the compiled one would leave
    dynamo running every later flex call of the process eagerly (seen with torch 2.13), about 10x
    slower than compiled."""
    from torch.nn.attention.flex_attention import flex_attention

    leaves = [torch.randn(1, 1, 128, 16, requires_grad=True) for _ in range(3)]
    try:
        torch.autograd.grad(flex_attention(*leaves).sum(), leaves)
    except Exception as e:  # noqa: BLE001
        return ba.short_error(e)
    return None


def add_flex(case: Case, mask_mod, q_len: int, kv_len: int, inputs: list[Tensors], **kwargs) -> None:
    """Builds the block mask and compiles flex on the first input set (timed together as setup_s);
    appends the implementation to the case, or records why it could not be set up."""
    from torch.nn.attention.flex_attention import create_block_mask

    try:
        start = time.perf_counter()
        block_mask = create_block_mask(mask_mod, None, None, q_len, kv_len, device="cpu")
        flex = compiled_flex()

        def fn(q, k, v):
            return flex(q, k, v, block_mask=block_mask, **kwargs)

        with torch.no_grad():
            fn(*inputs[0])
        setup_s = time.perf_counter() - start
    except Exception as e:  # noqa: BLE001 - a peer that fails must not stop the benchmark
        case.errors["flex (compiled)"] = ba.short_error(e)
        return
    # flex runs on ours' inputs (packed, not padded), so it takes ours' output gradient.
    case.impls.append(Impl("flex (compiled)", fn, inputs, grad_out=case.impls[0].grad_out, setup_s=setup_s,
                           backward_error=flex_backward_error() if case.backward else None))


# --------------------------------------------------------------------------------------------------
# Cases


def randn(*shape, gen) -> torch.Tensor:
    return torch.randn(*shape, generator=gen)


def gqa_case(args) -> Case:
    n = 1024 if args.quick else 4096
    h, h_kv, d, left = 32, 8, 64, 256
    gen = torch.Generator().manual_seed(1)
    qkv = (randn(1, h, n, d, gen=gen), randn(1, h_kv, n, d, gen=gen), randn(1, h_kv, n, d, gen=gen))
    grad_out = randn(1, h, n, d, gen=gen)
    pos = torch.arange(n)
    band = (pos[:, None] >= pos[None, :]) & (pos[:, None] - pos[None, :] <= left)  # True = attend

    case = Case("gqa", f"B=1 H={h} H_kv={h_kv} N={n} D={d}, causal window ({left}, 0)", [
        Impl("ours", lambda q, k, v: longformer_attention(q, k, v, (left, 0), causal=True), [qkv],
             grad_out=grad_out),
        Impl("SDPA, dense band mask", lambda q, k, v: F.scaled_dot_product_attention(
            q, k, v, attn_mask=band, enable_gqa=True), [qkv], grad_out=grad_out),
    ])
    if not args.no_flex:
        add_flex(case, lambda b, hh, qi, ki: (qi >= ki) & (qi - ki <= left), n, n, [qkv], enable_gqa=True)
    return case


def decode_case(args) -> Case:
    cached = 1024 if args.quick else 4096
    h, h_kv, d, layers = 32, 8, 128, args.layers
    nk = cached + 1  # the cache plus the new token's own key
    gen = torch.Generator().manual_seed(2)
    q = randn(1, h, 1, d, gen=gen)
    inputs = [(q, randn(1, h_kv, nk, d, gen=gen), randn(1, h_kv, nk, d, gen=gen)) for _ in range(layers)]

    case = Case("decode", f"q [1, {h}, 1, {d}], k/v [1, {h_kv}, {nk}, {d}] x {layers} layers' caches, "
                          f"causal window ({cached}, 0)",
                [Impl("ours", lambda q_, k, v: longformer_attention(q_, k, v, (cached, 0), causal=True), inputs),
                 Impl("SDPA, no mask (all keys visible)",
                      lambda q_, k, v: F.scaled_dot_product_attention(q_, k, v, enable_gqa=True), inputs)],
                calls_per_timing=args.decode_steps, backward=False)
    if not args.no_flex:
        # The query sits at key position nk - 1 (ours' default q_offset); flex indexes it as 0.
        offset = nk - 1
        add_flex(case, lambda b, hh, qi, ki: (ki <= qi + offset) & (qi + offset - ki <= cached), 1, nk, inputs,
                 enable_gqa=True)
    return case


def packed_case(args) -> Case:
    h, d, w = 12, 64, 64
    count, low, high = (4, 64, 512) if args.quick else (8, 256, 2048)
    gen = torch.Generator().manual_seed(3)
    lengths = torch.randint(low, high + 1, (count,), generator=gen).tolist()
    total, longest = sum(lengths), max(lengths)
    starts = [0] + list(itertools.accumulate(lengths))
    cu_seqlens = torch.tensor(starts, dtype=torch.int32)

    packed = tuple(randn(1, h, total, d, gen=gen) for _ in range(3))
    grad_packed = randn(1, h, total, d, gen=gen)
    real = torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None]  # [S, L], True = real token

    def pad(t: torch.Tensor) -> torch.Tensor:
        """[1, H, total, D] packed -> [S, H, L, D], zeros after each sequence's end."""
        out = t.new_zeros(count, h, longest, d)
        for s, n in enumerate(lengths):
            out[s, :, :n] = t[0, :, starts[s]:starts[s] + n]
        return out

    def unpad(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t[s:s + 1, :, :n] for s, n in enumerate(lengths)], dim=2)

    padded = tuple(pad(t) for t in packed)
    pos = torch.arange(longest)
    # Band and real keys. A padding query past the band of every real key has no key left: CPU SDPA
    # outputs 0 for such rows, and their output gradient is 0 here, so they do not touch the result.
    sdpa_mask = (((pos[:, None] - pos[None, :]).abs() <= w)[None] & real[:, None, :])[:, None]

    case = Case("packed", f"{count} sequences, lengths {lengths} ({total} tokens, padded to {longest}), "
                          f"H={h} D={d}, window ({w}, {w})", [
        Impl("ours, packed (cu_seqlens)",
             lambda q, k, v: longformer_attention(q, k, v, w, cu_seqlens=cu_seqlens), [packed],
             grad_out=grad_packed),
        Impl("ours, padded (attention_mask)",
             lambda q, k, v: longformer_attention(q, k, v, w, attention_mask=real), [padded],
             to_common=unpad, grad_out=pad(grad_packed)),
        Impl("SDPA, padded, band + padding mask",
             lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask), [padded],
             to_common=unpad, grad_out=pad(grad_packed)),
    ], details={"lengths": lengths})
    if not args.no_flex:
        seq_id = torch.repeat_interleave(torch.arange(count), torch.tensor(lengths))
        add_flex(case, lambda b, hh, qi, ki: (seq_id[qi] == seq_id[ki]) & ((qi - ki).abs() <= w), total, total,
                 [packed])
    return case


# --------------------------------------------------------------------------------------------------
# Measurement


def forward_call(fn: Callable[..., torch.Tensor], inputs: list[Tensors], steps: int) -> Callable[[], torch.Tensor]:
    """steps passes over the input sets; returns the last output."""
    def call():
        with torch.no_grad():
            for _ in range(steps):
                for qkv in inputs:
                    out = fn(*qkv)
        return out
    return call


def forward_backward_call(impl: Impl) -> Callable[[], Tensors]:
    leaves = [t.detach().requires_grad_() for t in impl.inputs[0]]

    def call():
        out = impl.fn(*leaves)
        # autograd.grad rather than .backward(): fresh gradients each call, nothing accumulates.
        return (out, *torch.autograd.grad(out, leaves, impl.grad_out))
    return call


def max_abs_diff(impl: Impl, result: Union[torch.Tensor, Tensors], reference: Union[torch.Tensor, Tensors]):
    """Max |impl - ours| over the output, or over the output and each gradient, in ours' layout."""
    if isinstance(result, torch.Tensor):
        return (impl.to_common(result) - reference).abs().max().item()
    return [(impl.to_common(a) - b).abs().max().item() for a, b in zip(result, reference)]


def run_pass(case: Case, mode: str, rounds: int) -> list[dict]:
    """Two untimed calls per implementation (the check against ours, then one that records the peak
    memory), then the alternating rounds; one row per implementation, ours (case.impls[0]) first."""
    impls = [i for i in case.impls if mode == "fwd" or i.backward_error is None]
    calls_per_timing = case.calls_per_timing * len(impls[0].inputs) if mode == "fwd" else 1
    calls = {i.name: forward_call(i.fn, i.inputs, case.calls_per_timing) if mode == "fwd"
             else forward_backward_call(i) for i in impls}

    # Checked on the first input set (for decode, the first layer's cache).
    first = {i.name: forward_call(i.fn, i.inputs[:1], 1)() if mode == "fwd" else calls[i.name]() for i in impls}
    reference = first[impls[0].name]
    peaks = {name: ba.peak_extra_rss_mb(call) for name, call in calls.items()}

    times = {name: [] for name in calls}
    loads = {name: [] for name in calls}
    for r in range(rounds):
        names = list(calls)
        for name in names[r % len(names):] + names[:r % len(names)]:
            with ba.OtherLoad() as load:
                start = time.perf_counter()
                calls[name]()
                seconds = time.perf_counter() - start
            times[name].append(seconds / calls_per_timing)
            loads[name].append(load.fraction)
        print(f"#   {case.name} {mode} round {r + 1}: " +
              ", ".join(f"{name} {1e3 * times[name][-1]:.3g} ms" for name in calls), file=sys.stderr, flush=True)

    ours_ms = 1e3 * statistics.median(times[impls[0].name])
    rows = []
    for impl in impls:
        diff = max_abs_diff(impl, first[impl.name], reference)
        median_ms = 1e3 * statistics.median(times[impl.name])
        rows.append({"case": case.name, "pass": mode, "impl": impl.name,
                     "median_ms": median_ms, "time_vs_ours": median_ms / ours_ms,
                     "times_ms": [1e3 * t for t in times[impl.name]], "other_load": loads[impl.name],
                     "calls_per_timing": calls_per_timing, "peak_extra_mb": peaks[impl.name],
                     "max_abs_diff_out": diff if mode == "fwd" else diff[0],
                     "max_abs_diff_grads": None if mode == "fwd" else dict(zip(("dq", "dk", "dv"), diff[1:])),
                     "setup_s": impl.setup_s})
    # Implementations that could not run this pass still get a row, saying why.
    for name, error in case.errors.items():
        rows.append({"case": case.name, "pass": mode, "impl": name, "error": error})
    if mode == "fwd+bwd":
        rows += [{"case": case.name, "pass": mode, "impl": i.name, "error": i.backward_error}
                 for i in case.impls if i.backward_error is not None]
    return rows


# --------------------------------------------------------------------------------------------------
# Output


def _ms(value: float) -> str:
    return f"{value:.3f}" if value < 10 else f"{value:.1f}" if value < 100 else f"{value:.0f}"


def markdown_table(result: dict) -> str:
    descriptions = {c["name"]: c["description"] for c in result["cases"]}
    lines = ["| case | pass | implementation | median ms | time / ours | peak MB | max abs diff out | "
             "max abs diff dq, dk, dv |", "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        case = r["case"] if r["case"] != "decode" else "decode (ms per token and layer)"
        if "error" in r:
            lines.append(f"| {case} | {r['pass']} | {r['impl']} | not run: {r['error']} | | | | |")
            continue
        star = "*" if statistics.median(r["other_load"]) > BUSY else ""
        peak = "-" if r["peak_extra_mb"] is None else f"{r['peak_extra_mb']:.0f}"
        grads = "" if r["max_abs_diff_grads"] is None else \
            ", ".join(f"{v:.1e}" for v in r["max_abs_diff_grads"].values())
        lines.append(f"| {case} | {r['pass']} | {r['impl']} | {_ms(r['median_ms'])}{star} | "
                     f"{r['time_vs_ours']:.2f}x | {peak} | {r['max_abs_diff_out']:.1e} | {grads} |")
    lines.append("")
    lines += [f"* {name}: {text}" for name, text in descriptions.items()]
    return "\n".join(lines)


def caption(result: dict) -> str:
    m = result["machine"]
    return (f"CPU: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads, torch {m['torch']}; "
            f"fp32; median of {result['rounds']} alternating rounds after a warm-up; time / ours > 1: ours is "
            f"faster (ours = ours packed in the packed case); * = other processes used > {100 * BUSY:.0f}% "
            f"of the CPUs while timing (median over rounds); 1-minute load average "
            f"{m['loadavg_1min_before']:.2f} before the run, {m['loadavg_1min_after']:.2f} after.")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", nargs="+", choices=CASES, default=CASES)
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per (case, pass); default 3")
    p.add_argument("--layers", type=int, default=4, help="separate KV caches a decode call steps through")
    p.add_argument("--decode-steps", type=int, default=25,
                   help="passes over the layers' caches per timed decode call; default 25")
    p.add_argument("--quick", action="store_true", help="smoke run: small shapes, one round, few decode steps")
    p.add_argument("--no-flex", action="store_true", help="skip flex_attention (each compile takes a while)")
    p.add_argument("--json", type=Path, default=Path(__file__).resolve().parent / "results" / "general.json")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.decode_steps = 1, 3
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    load_before = os.getloadavg()[0]
    machine = {**ba.machine_info(ba.gemm_gflops()), "loadavg_1min_before": load_before}
    print(f"# {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}; "
          f"1-minute load average {load_before:.2f}", file=sys.stderr, flush=True)

    builders = {"gqa": gqa_case, "decode": decode_case, "packed": packed_case}
    rows, cases = [], []
    for name in args.cases:
        case = builders[name](args)
        cases.append({"name": case.name, "description": case.description, **case.details,
                      "setup_s": {i.name: i.setup_s for i in case.impls if i.setup_s is not None}})
        for mode in ("fwd", "fwd+bwd") if case.backward else ("fwd",):
            rows += run_pass(case, mode, args.rounds)
        del case  # its inputs and masks (up to a few hundred MB) before the next case is built

    machine["loadavg_1min_after"] = os.getloadavg()[0]
    result = {"benchmark": "bench/bench_general.py", "machine": machine, "rounds": args.rounds,
              "quick": args.quick, "decode_layers": args.layers, "decode_steps": args.decode_steps,
              "dtype": "float32", "cases": cases, "rows": rows, "elapsed_s": time.perf_counter() - start}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))

    print(caption(result) + "\n")
    print(markdown_table(result))
    print(f"\ntotal {result['elapsed_s']:.0f} s; results: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
