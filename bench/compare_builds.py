"""Two builds of the op library, timed against each other on the same CPU cases, alternating.

Each build is a Python path for ``longformer_ext`` plus the op library to load (a checkout's
``python/`` and a build tree's ``_longformer_ops.so``, say of the commit before a change and after
it). The builds run in turn in fresh worker processes, ``--rounds`` times each, so drifting load on a
shared machine hits both alike; a worker times every case (median of its repeats after a warm-up
call) and the table gives the median over rounds per build, and after/before.

Cases (B=1, H=12, D=64, window 256 a side; G global tokens spread over the sequence):
  forward fp32 / bf16 at N=4096, forward+backward fp32 at N=4096, the global path (G=64) forward and
  forward+backward, the per-call cost of longformer_attention at N=64 and of the op itself
  (torch.ops.longformer.banded_attn, B=H=1, N=D=8) in microseconds, where the glue dominates.

    python bench/compare_builds.py --build before=/tmp/old/python:/tmp/old_ops.so \\
        --build after=python:build/torch-2.13.0+cpu/_longformer_ops.so --rounds 5
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CASES = {  # name: (N, G, dtype, backward, repeats)
    "forward fp32 N=4096": (4096, 0, "float32", False, 7),
    "forward bf16 N=4096": (4096, 0, "bfloat16", False, 5),
    "fwd+bwd fp32 N=4096": (4096, 0, "float32", True, 5),
    "forward fp32 N=4096 G=64": (4096, 64, "float32", False, 7),
    "fwd+bwd fp32 N=4096 G=64": (4096, 64, "float32", True, 5),
    "per call fp32 N=64 (us)": (64, 0, "float32", False, 2000),
    "op call N=8 (us)": (8, 0, "float32", False, 5000),
}


def worker() -> None:
    import torch

    from longformer_ext import longformer_attention

    torch.manual_seed(0)
    times = {}
    for name, (n, g, dtype, backward, repeats) in CASES.items():
        heads, dim = (1, 8) if name.startswith("op call") else (12, 64)
        q, k, v = (torch.randn(1, heads, n, dim, dtype=getattr(torch, dtype), requires_grad=backward)
                   for _ in range(3))
        glob = None
        if g:
            glob = torch.zeros(1, n, dtype=torch.bool)
            glob[0, torch.linspace(0, n - 1, g).long()] = True

        def call():
            if name.startswith("op call"):  # the op alone: the C++ glue and the dispatcher
                torch.ops.longformer.banded_attn(q, k, v, 2, 2, [1], None, None, False, 0.125)
            elif backward:
                longformer_attention(q, k, v, 256, global_attention_mask=glob).sum().backward()
            else:
                with torch.no_grad():
                    longformer_attention(q, k, v, 256, global_attention_mask=glob)

        call()
        if name.endswith("(us)"):  # many calls per sample: one is a few microseconds
            samples = []
            for _ in range(5):
                start = time.perf_counter()
                for _ in range(repeats):
                    call()
                samples.append((time.perf_counter() - start) / repeats * 1e6)
        else:
            samples = []
            for _ in range(repeats):
                start = time.perf_counter()
                call()
                samples.append((time.perf_counter() - start) * 1e3)
        times[name] = statistics.median(samples)
    print(json.dumps(times))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--build", action="append", required=True, metavar="NAME=PYTHONPATH:LIBRARY",
                   help="a build to time (give two: the first is the baseline)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", help="also write every round's figures here")
    args = p.parse_args()
    builds = []
    for spec in args.build:
        name, paths = spec.split("=", 1)
        python_path, library = paths.split(":", 1)
        builds.append((name, python_path, library))
    results = {name: {case: [] for case in CASES} for name, _, _ in builds}
    for _ in range(args.rounds):
        for name, python_path, library in builds:
            env = dict(os.environ, PYTHONPATH=python_path, LONGFORMER_LIBRARY=library)
            out = subprocess.run([sys.executable, __file__, "--worker"], env=env, capture_output=True, text=True,
                                 check=True)
            for case, value in json.loads(out.stdout.strip().splitlines()[-1]).items():
                results[name][case].append(value)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    base = builds[0][0]
    header = f"| case (ms unless noted) | " + " | ".join(n for n, _, _ in builds) + " | " + " | ".join(
        f"{n}/{base}" for n, _, _ in builds[1:]) + " |"
    print(header)
    print("|" + "---|" * (1 + 2 * len(builds) - 1))
    for case in CASES:
        medians = [statistics.median(results[n][case]) for n, _, _ in builds]
        ratios = [f"{m / medians[0]:.3f}" for m in medians[1:]]
        print(f"| {case} | " + " | ".join(f"{m:.2f}" for m in medians) + " | " + " | ".join(ratios) + " |")
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        worker()
    else:
        sys.exit(main())
