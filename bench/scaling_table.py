"""Renders the compact tables of bench/README.md ("Results on CPU") from a bench_scaling.py JSON file
(default bench/out/scaling.json).

    python bench/scaling_table.py [bench/out/scaling.json] [--full]

Part A: per (N, G), ours' forward ms, useful GFLOP/s, % of the fp32 GEMM rate, peak extra MB and that
over the bytes of q; HF / flex / SDPA forward ms with time / ours; forward+backward ms of ours, HF and
SDPA with time / ours; then ours' linear-scaling ratio. Part B: ours' forward and forward+backward
GFLOP/s (% GEMM) per (dtype, window, dilation) row and (N, G) column. --full adds the detailed Part A
table of bench_attention.py (every implementation, peak MB, max |out - ours|).
"""

import argparse
import json
from pathlib import Path

NOISY = 0.10  # as bench_attention.NOISY: other processes' CPU share above which a time is starred


def _star(m: dict) -> str:
    return "*" if m.get("other_load", 0) > NOISY else ""


def _ms(m) -> str:
    if not isinstance(m, dict):
        return "n/a" if str(m).startswith("n/a") else ("err" if str(m).startswith("error") else "-")
    ms = m["ms"]
    return (f"{ms:.1f}" if ms < 10 else f"{ms:.0f}") + _star(m)


def _ratio(m, ours) -> str:
    if isinstance(m, dict) and isinstance(ours, dict):
        r = m["ms"] / ours["ms"]
        return f" ({r:.1f}x)" if r < 100 else f" ({r:.0f}x)"
    return ""


def _peer(m, ours) -> str:
    return _ms(m) + _ratio(m, ours)


def header(data: dict) -> str:
    m = data["machine"]
    isa = f" ({m['cpu_capability']})" if m.get("cpu_capability") else ""
    return (f"CPU figures: {m['cpu']}, {m['cores']} cores{isa}, torch {m['torch']}; measured fp32 GEMM "
            f"rate {m['gemm_fp32_gflops']:.0f} GFLOP/s (the reference of % GEMM for every dtype). "
            "ms = median; useful GFLOP/s = 4*N*(2w+1+G)*D*H per forward, 3x for forward+backward; "
            "(x) = time / ours (higher: ours is faster); * = other processes used > 10% of the CPUs meanwhile.")


def part_a_table(data: dict) -> str:
    rows = data.get("part_a") or []
    lines = [
        "Part A: fp32, B=1 H=12 D=64, window (256, 256), G global tokens.",
        "",
        "| N | G | ours fwd ms | GFLOP/s | % GEMM | peak MB | peak / \\|q\\| | HF fwd ms | flex fwd ms | SDPA fwd ms "
        "| ours fwd+bwd ms | HF fwd+bwd ms | SDPA fwd+bwd ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for ours in (r for r in rows if r["impl"] == "ours"):
        peers = {r["impl"]: r for r in rows if r["n"] == ours["n"] and r["g"] == ours["g"]}
        f, fb = ours["fwd"], ours["fwd_bwd"]

        def peer(name, key):
            r = peers.get(name)
            return "-" if r is None else _peer(r[key], ours[key])

        if isinstance(f, dict):
            peak = "n/a" if f.get("peak_mb") is None else f"{f['peak_mb']:.0f}"
            over_q = "n/a" if f.get("peak_over_q") is None else f"{f['peak_over_q']:.2f}"
            cells = [_ms(f), f"{f['gflops']:.1f}", f"{100 * f['frac_gemm']:.0f}%", peak, over_q]
        else:
            cells = [_ms(f), "", "", "", ""]
        cells += [peer("hf", "fwd"), peer("flex", "fwd"), peer("sdpa", "fwd"),
                  _ms(fb), peer("hf", "fwd_bwd"), peer("sdpa", "fwd_bwd")]
        lines.append(f"| {ours['n']} | {ours['g']} | " + " | ".join(cells) + " |")
    a = data["config"].get("A", {})
    lines += ["", f"- = not run: HF only N <= {a.get('hf_max_n')}, flex with G > 0 only N <= "
                  f"{a.get('flex_g64_max_n')}, SDPA (dense mask) only N <= {a.get('sdpa_max_n')}"
                  + ("; flex skipped in this run (--no-flex)" if a.get("no_flex") else "")
                  + "; n/a: flex_attention has no CPU backward."]
    scaling = (data.get("derived") or {}).get("ours_fwd_linear_scaling") or []
    if scaling:
        parts = [f"G={s['g']}: {s['time_ratio']:.2f} (linear: {s['linear_ratio']:.0f})" for s in scaling]
        s0 = scaling[0]
        lines += ["", f"Linear scaling, ours' forward time(N={s0['n_large']}) / time(N={s0['n_small']}): "
                      + "; ".join(parts) + "."]
    return "\n".join(lines)


def _rate(m) -> str:
    if not isinstance(m, dict):
        return "err" if str(m).startswith("error") else "-"
    return f"{m['gflops']:.0f} ({100 * m['frac_gemm']:.0f}%){_star(m)}"


def part_b_table(data: dict) -> str:
    rows = data.get("part_b") or []
    cols = sorted({(r["n"], r["g"]) for r in rows})
    keys = []
    for r in rows:
        k = (r["dtype"], r["window"], r["dilation"])
        if k not in keys:
            keys.append(k)
    keys.sort(key=lambda k: (list(dict.fromkeys(r["dtype"] for r in rows)).index(k[0]), k[1], k[2]))
    cell = {(r["dtype"], r["window"], r["dilation"], r["n"], r["g"]): r for r in rows}
    lines = [
        "Part B: ours only, B=1 H=12 D=64, window (w, w), the same dilation in every head. "
        "Cells: forward GFLOP/s (% GEMM) / forward+backward GFLOP/s (% GEMM).",
        "",
        "| dtype | w | dilation | " + " | ".join(f"N={n} G={g}" for n, g in cols) + " |",
        "|---|---|---|" + "---|" * len(cols),
    ]
    for dtype, w, dil in keys:
        cells = []
        for n, g in cols:
            r = cell.get((dtype, w, dil, n, g))
            cells.append("" if r is None else f"{_rate(r['fwd'])} / {_rate(r['fwd_bwd'])}")
        lines.append(f"| {dtype} | {w} | {dil} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render(data: dict, full: bool = False) -> str:
    parts = [header(data)]
    if data.get("part_a"):
        if full:
            import bench_attention as ba  # the detailed table of the comparison benchmark

            parts.append("Part A, every implementation (peak MB: growth of peak RSS during the warm-up call):\n\n"
                         + ba.markdown_table(data["part_a"]))
        parts.append(part_a_table(data))
    if data.get("part_b"):
        parts.append(part_b_table(data))
    return "\n\n".join(parts)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("json", type=Path, nargs="?", default=Path(__file__).resolve().parent / "out" / "scaling.json")
    p.add_argument("--full", action="store_true", help="add the detailed Part A table")
    args = p.parse_args()
    print(render(json.loads(args.json.read_text()), full=args.full))


if __name__ == "__main__":
    main()
