"""A patched Hugging Face LongformerModel exported to ONNX (longformer_ext.onnx), run in ONNX Runtime on
CPU, against the same model in PyTorch, patched and unpatched. Same weights, same inputs, one process.

Model: random-init LongformerModel, hidden 768, 12 heads, intermediate 3072, attention_window 512
(one-sided 256), like longformer-base but with fewer layers (default 2) to keep the run short; fp32,
eval mode. Input: B=1, N tokens (default 4096), no padding, one global token (<s>, as sequence
classification uses). The ONNX file is exported once at a shorter length (dynamic axes) and run at N.

Timing: one untimed warm-up call each, then rounds of one call per implementation, the order rotated
each round (so drift on a shared machine hits all three alike); medians per implementation, and the
median over rounds of each one's time divided by PyTorch patched's in the same round. PyTorch
runs under torch.inference_mode(); ONNX Runtime with all graph optimisations and as many intra-op
threads as torch uses. Also recorded: max |difference| of last_hidden_state against patched PyTorch.

    python bench/bench_onnx.py                      # N=4096, 2 layers, 7 rounds -> bench/results/onnx.json
    python bench/bench_onnx.py --seqlen 2048 --layers 1 --rounds 3 --out /tmp/onnx.json
"""

import argparse
import contextlib
import copy
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import longformer_ext
import longformer_ext.onnx as lfo
from longformer_ext.integrations.transformers import patch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def build_models(layers: int, seqlen: int):
    from transformers import LongformerConfig, LongformerModel

    config = LongformerConfig(vocab_size=1000, hidden_size=768, num_hidden_layers=layers, num_attention_heads=12,
                              intermediate_size=3072, attention_window=512, max_position_embeddings=seqlen + 2,
                              pad_token_id=1, bos_token_id=0, eos_token_id=2, sep_token_id=2, type_vocab_size=1)
    torch.manual_seed(0)
    unpatched = LongformerModel(config).eval()
    patched = patch(copy.deepcopy(unpatched))
    return unpatched, patched


def make_inputs(seqlen: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 1000, (1, seqlen), generator=gen)
    ids[:, 0] = 0
    attention_mask = torch.ones(1, seqlen, dtype=torch.int64)
    global_attention_mask = torch.zeros(1, seqlen, dtype=torch.int64)
    global_attention_mask[:, 0] = 1
    return dict(input_ids=ids, attention_mask=attention_mask, global_attention_mask=global_attention_mask)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqlen", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--export-seqlen", type=int, default=1024, help="length of the example used for export")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "onnx.json")
    args = parser.parse_args(argv)

    import onnxruntime as ort
    import transformers

    threads = torch.get_num_threads()
    load_before = os.getloadavg()  # the machine may be shared: the load says how much
    unpatched, patched = build_models(args.layers, max(args.seqlen, args.export_seqlen))
    inputs = make_inputs(args.seqlen)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "longformer.onnx"
        example = make_inputs(args.export_seqlen)
        ids = example.pop("input_ids")
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's notes on shared dynamic axes
            lfo.export(patched, (ids,), path, kwargs=example, output_names=["last_hidden_state", "pooler_output"])
        export_s = time.perf_counter() - start
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = {name: t.numpy() for name, t in inputs.items()}

    def run_torch(model):
        with torch.inference_mode():
            return model(**inputs).last_hidden_state

    impls = {
        "onnxruntime (exported patched)": lambda: torch.from_numpy(session.run(["last_hidden_state"], feeds)[0]),
        "pytorch patched": lambda: run_torch(patched),
        "pytorch unpatched (Hugging Face)": lambda: run_torch(unpatched),
    }
    names = list(impls)
    outputs = {name: fn() for name, fn in impls.items()}  # warm-up, and the outputs to compare
    reference = outputs["pytorch patched"]
    diffs = {name: float((out - reference).abs().max()) for name, out in outputs.items()}

    times = {name: [] for name in names}
    for round_index in range(args.rounds):
        order = names[round_index % len(names):] + names[:round_index % len(names)]
        for name in order:
            start = time.perf_counter()
            impls[name]()
            times[name].append(time.perf_counter() - start)
            print(f"round {round_index + 1}/{args.rounds} {name}: {times[name][-1] * 1e3:.0f} ms", file=sys.stderr)

    medians = {name: statistics.median(ts) for name, ts in times.items()}
    # Ratios within a round (calls a few seconds apart) are steadier than ratios of medians when the
    # machine's load changes during the run.
    base = times["pytorch patched"]
    round_ratios = {name: statistics.median(t / b for t, b in zip(ts, base)) for name, ts in times.items()}
    result = {
        "what": "patched LongformerModel exported with longformer_ext.onnx, ONNX Runtime CPU vs PyTorch",
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": threads,
                    "python": platform.python_version(),
                    "loadavg_1min_before_after": [load_before[0], os.getloadavg()[0]]},
        "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__,
                     "transformers": transformers.__version__, "longformer_ext": longformer_ext.__version__},
        "config": {"batch": 1, "seqlen": args.seqlen, "layers": args.layers, "hidden": 768, "heads": 12,
                   "attention_window": 512, "global_tokens": 1, "dtype": "float32", "rounds": args.rounds,
                   "export_seqlen": args.export_seqlen},
        "export_s": export_s,
        "median_s": medians,
        "median_ratio_to_pytorch_patched_per_round": round_ratios,
        "times_s": times,
        "max_abs_diff_vs_pytorch_patched": diffs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"{cpu_model()}, {os.cpu_count()} cores, {threads} threads (1-min load {load_before[0]:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after); B=1, N={args.seqlen}, {args.layers} layers, hidden 768, 12 heads, "
          f"attention_window 512, 1 global token, fp32; median of {args.rounds} alternating rounds")
    print("| implementation | median ms | time / PyTorch patched (median over rounds) "
          "| max abs diff vs PyTorch patched |")
    print("|---|---|---|---|")
    for name in names:
        print(f"| {name} | {medians[name] * 1e3:.0f} | {round_ratios[name]:.2f}x | {diffs[name]:.1e} |")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
