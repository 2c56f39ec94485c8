"""ModernBERT at 8K tokens on CPU: transformers' SDPA attention vs ``patch_modernbert``.

A randomly initialised ``ModernBertModel`` (no downloads) with base-sized layers (hidden 768, 12
heads, FFN 1152, local_attention 128, a global layer every 3rd layer) but only 3 layers (one global,
two local), so that a run fits on 2 cores: the unpatched model as transformers sets it up on CPU
(``sdpa``), and a patched copy (its two local layers on longformer_ext's op, the global one still on
SDPA). Same weights, same input (B=1, N=8192, no padding), in one process.

Forward (``torch.no_grad``) and forward+backward (parameter gradients of a fixed random projection of
the last hidden state) are timed in rounds that alternate the two models; the table reports the
median per (model, mode). Before the rounds, one untimed call per (model, mode) warms up and records
the peak extra memory (growth of the process's peak RSS during the call, as bench_attention.py).
Parity at this length: max abs difference of the last hidden states and of the parameter gradients.
Times taken while other processes used more than 10% of the CPUs are starred.

    python bench/bench_modernbert.py                 # ~4 minutes on 2 idle cores
    python bench/bench_modernbert.py --rounds 5 --no-backward
    python bench/bench_modernbert.py --seqlen 1024 --rounds 1   # a quick check that it runs

Writes bench/results/modernbert.json (``--json`` to change) and prints a markdown table.
"""

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_attention as ba  # noqa: E402  (machine description, other-load and peak-memory helpers)

from longformer_ext.integrations.modernbert import patch_modernbert  # noqa: E402

LAYERS = 3
BUSY = 0.1  # other processes' CPU share above which a time is starred


def make_models(n: int, seed: int = 0):
    from transformers import ModernBertConfig, ModernBertModel

    config = ModernBertConfig(hidden_size=768, num_attention_heads=12, intermediate_size=1152,
                              num_hidden_layers=LAYERS, local_attention=128, global_attn_every_n_layers=3,
                              max_position_embeddings=n)
    torch.manual_seed(seed)
    sdpa = ModernBertModel(config).eval()  # eval: dropout off (all ModernBERT dropouts default to 0 anyway)
    patched = patch_modernbert(copy.deepcopy(sdpa))
    assert sdpa.config._attn_implementation == "sdpa", sdpa.config._attn_implementation
    return {"sdpa": sdpa, "patched": patched}


def forward_call(model, ids):
    def call():
        with torch.no_grad():
            return model(ids).last_hidden_state
    return call


def forward_backward_call(model, ids, weights):
    def call():
        model.zero_grad(set_to_none=True)
        out = model(ids).last_hidden_state
        (out * weights).sum().backward()
        return out.detach()
    return call


def timed(call):
    """(seconds, other processes' share of the CPUs meanwhile, result)."""
    with ba.OtherLoad() as load:
        start = time.perf_counter()
        result = call()
        seconds = time.perf_counter() - start
    return seconds, load.fraction, result


def max_grad_diff(reference, other) -> float:
    """Max |difference| over parameter gradients, relative to max(1, max |reference gradient|) per tensor."""
    worst = 0.0
    ours = dict(other.named_parameters())
    for name, p in reference.named_parameters():
        if p.grad is None:
            continue
        scale = max(1.0, p.grad.abs().max().item())
        worst = max(worst, (ours[name].grad - p.grad).abs().max().item() / scale)
    return worst


def _mb(value) -> str:
    return "-" if value is None else f"{value:.0f}"


def markdown_table(result: dict) -> str:
    rows, n = result["rows"], result["config"]["seqlen"]
    lines = ["| N | layers | mode | SDPA ms | patched ms | speedup | SDPA peak MB | patched peak MB |",
             "|---|---|---|---|---|---|---|---|"]
    for mode in ("forward", "forward+backward"):
        cells = {r["model"]: r for r in rows if r["mode"] == mode}
        if not cells:
            continue
        sdpa, ours = cells["sdpa"], cells["patched"]

        def ms(r):
            return f"{1000 * r['median_s']:.0f}{'*' if r['max_other_load'] > BUSY else ''}"

        lines.append(f"| {n} | {result['config']['layer_types_short']} | {mode} | {ms(sdpa)} | {ms(ours)} | "
                     f"{sdpa['median_s'] / ours['median_s']:.2f}x | {_mb(sdpa['peak_extra_mb'])} | "
                     f"{_mb(ours['peak_extra_mb'])} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seqlen", type=int, default=8192, help="tokens (B=1, no padding); default 8192")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per (model, mode); default 3")
    p.add_argument("--no-backward", action="store_true", help="time the forward only")
    p.add_argument("--json", default=str(Path(__file__).resolve().parent / "results" / "modernbert.json"))
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import transformers

    busy_before = ba.cpu_busy_fraction()
    if busy_before > BUSY:
        print(f"# WARNING: {100 * busy_before:.0f}% of the CPUs were busy with other work before the run; "
              "times will be slow and noisy")
    n = args.seqlen
    models = make_models(n)
    ids = torch.randint(5, models["sdpa"].config.vocab_size, (1, n), generator=torch.Generator().manual_seed(1))
    weights = torch.randn(1, n, 768, generator=torch.Generator().manual_seed(2))
    modes = {"forward": lambda m: forward_call(m, ids)}
    if not args.no_backward:
        modes["forward+backward"] = lambda m: forward_backward_call(m, ids, weights)

    rows, outputs = [], {}
    for mode, make_call in modes.items():
        calls = {name: make_call(model) for name, model in models.items()}
        peaks = {}
        for name, call in calls.items():  # warm-up, recording the peak extra memory
            peaks[name] = ba.peak_extra_rss_mb(call)
            print(f"# {mode} {name}: warm-up done, peak extra {_mb(peaks[name])} MB", flush=True)
        times = {name: [] for name in calls}
        loads = {name: [] for name in calls}
        for round_index in range(args.rounds):
            for name, call in calls.items():
                seconds, load, out = timed(call)
                times[name].append(seconds)
                loads[name].append(load)
                outputs[(mode, name)] = out
            print(f"# {mode} round {round_index + 1}: " +
                  ", ".join(f"{name} {1000 * times[name][-1]:.0f} ms" for name in calls), flush=True)
        for name in calls:
            rows.append({"model": name, "mode": mode, "median_s": statistics.median(times[name]),
                         "times_s": times[name], "other_load": loads[name], "max_other_load": max(loads[name]),
                         "peak_extra_mb": peaks[name]})

    parity = {"max_abs_diff_last_hidden_state": (outputs[("forward", "patched")] -
                                                 outputs[("forward", "sdpa")]).abs().max().item()}
    if not args.no_backward:
        parity["max_rel_diff_parameter_grads"] = max_grad_diff(models["sdpa"], models["patched"])

    config = models["sdpa"].config
    result = {
        "benchmark": "bench/bench_modernbert.py",
        "machine": {**ba.machine_info(ba.gemm_gflops()), "cpu_busy_before": busy_before},
        "config": {"hidden_size": config.hidden_size, "num_attention_heads": config.num_attention_heads,
                   "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_hidden_layers,
                   "local_attention": config.local_attention, "layer_types": list(config.layer_types),
                   "layer_types_short": f"{config.layer_types.count('full_attention')} global + "
                                        f"{config.layer_types.count('sliding_attention')} local",
                   "batch": 1, "seqlen": n, "dtype": "float32", "padding": False},
        "rounds": args.rounds,
        "rows": rows,
        "parity": parity,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)

    m = result["machine"]
    print(f"\nCPU: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads; torch {m['torch']}, "
          f"transformers {transformers.__version__}; fp32, B=1, N={n}; median of {args.rounds} alternating rounds "
          f"after a warm-up; * = other processes used > {100 * BUSY:.0f}% of the CPUs meanwhile.\n")
    print(markdown_table(result))
    print(f"\nparity at N={n}: " + ", ".join(f"{k} {v:.2e}" for k, v in parity.items()))
    print(f"results: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
