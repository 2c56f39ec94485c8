"""Renders a compact markdown table from a bench_attention.py JSON file (default bench/results/attention.json)."""

import argparse
import json
from pathlib import Path


def ratio(row, ours, key):
    if isinstance(row.get(key), dict) and isinstance(ours.get(key), dict):
        return f"{row[key]['ms'] / ours[key]['ms']:.1f}x"
    return ""


def render(data: dict) -> str:
    m = data["machine"]
    lines = [
        f"CPU figures: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, fp32, B=1 H=12 D=64, window (256, 256), "
        f"G global tokens; measured fp32 GEMM rate {m['gemm_fp32_gflops']:.0f} GFLOP/s. "
        "ms = median; x = time / ours (higher: ours is faster).",
        "",
        "| N | G | ours fwd ms (GFLOP/s, % GEMM) | HF fwd | flex fwd | SDPA fwd | ours fwd+bwd ms | HF fwd+bwd | SDPA fwd+bwd | ours fwd peak MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    results = data["results"]
    for ours in (r for r in results if r["impl"] == "ours"):
        peers = {r["impl"]: r for r in results if r["n"] == ours["n"] and r["g"] == ours["g"]}

        def peer(name, key):
            r = peers.get(name)
            if r is None or not isinstance(r.get(key), dict):
                return "n/a" if r is not None and str(r.get(key, "")).startswith("n/a") else "-"
            return f"{r[key]['ms']:.0f} ({ratio(r, ours, key)})"

        f = ours["fwd"]
        lines.append(
            f"| {ours['n']} | {ours['g']} | {f['ms']:.0f} ({f['gflops']:.0f}, {100 * f['frac_gemm']:.0f}%) | "
            f"{peer('hf', 'fwd')} | {peer('flex', 'fwd')} | {peer('sdpa', 'fwd')} | {ours['fwd_bwd']['ms']:.0f} | "
            f"{peer('hf', 'fwd_bwd')} | {peer('sdpa', 'fwd_bwd')} | {f['peak_mb']:.0f} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("json", type=Path, nargs="?", default=Path(__file__).resolve().parent / "results" / "attention.json")
    print(render(json.loads(p.parse_args().json.read_text())))


if __name__ == "__main__":
    main()
