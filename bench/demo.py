"""The README demo, in two parts, on a 4K-token input on CPU.

1. Longformer attention alone, checked against the float64 oracle, then timed against Hugging Face's
   chunked implementation on the same inputs (q, k, v given; no projections).
2. The drop-in: a randomly initialised Hugging Face `LongformerModel` (no downloads) with a base-sized
   layer shape, run as it is and after `longformer_ext.integrations.transformers.patch`; last hidden
   states and parameter gradients compared, forward and forward+backward timed.

    python bench/demo.py                    # ~3 minutes on 2 idle cores (longer on a busy machine)
    python bench/demo.py --oracle-heads 12  # check every head against the oracle (needs ~20 GB, slower)
    python bench/demo.py --model-layers 0   # part 1 only

Part 1 input: B=1, H=12, N=4096, D=64, fp32, one-sided window 256 (HF attention_window=512), 2 global
tokens (the first token and one in the middle of the text), the last 296 tokens padding.
Part 2 model: hidden 768, 12 heads, FFN 3072, attention_window 512 (HF's two-sided count), 2 layers,
vocab 50265, max_position_embeddings 4098; input: B=1, N=4096, <s> global, the last 296 tokens padding.
Exits non-zero when an output or a gradient is off.
"""

import argparse
import copy
import os
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


# --------------------------------------------------------------------------------------------------
# Part 2: the Hugging Face drop-in on a whole model

MODEL_VOCAB = 50265  # RoBERTa's vocabulary, as in allenai/longformer-base-4096 (<s> = 0, <pad> = 1, </s> = 2)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def make_hf_model(layers: int):
    """A randomly initialised LongformerModel with the per-layer shape of longformer-base-4096, in eval
    mode (dropout off, so both models compute the same function)."""
    from transformers import LongformerConfig, LongformerModel

    config = LongformerConfig(
        vocab_size=MODEL_VOCAB, hidden_size=768, num_attention_heads=12, intermediate_size=3072,
        num_hidden_layers=layers, attention_window=2 * ba.WINDOW,  # HF's two-sided count: 512
        max_position_embeddings=N + 2,  # RoBERTa-style positions start after the padding index 1
        pad_token_id=1, bos_token_id=0, eos_token_id=2)
    torch.manual_seed(0)
    # No pooler: the loss below reads only the hidden states, so the pooler would get no gradient.
    return LongformerModel(config, add_pooling_layer=False).eval()


def model_inputs(seed: int = 0) -> dict:
    """<s> text </s> then padding, as a tokenizer would make it; <s> is the global token (the
    classification recipe of the paper). N = 4096 is a multiple of attention_window, so unpatched
    Hugging Face pads nothing further and both models see the same tokens."""
    gen = torch.Generator().manual_seed(seed)
    real = N - PADDING
    input_ids = torch.full((1, N), 1, dtype=torch.long)  # <pad>
    input_ids[0, 1:real - 1] = torch.randint(3, MODEL_VOCAB, (real - 2,), generator=gen)
    input_ids[0, 0], input_ids[0, real - 1] = 0, 2
    attention_mask = torch.zeros(1, N, dtype=torch.long)
    attention_mask[0, :real] = 1
    global_attention_mask = torch.zeros(1, N, dtype=torch.long)
    global_attention_mask[0, 0] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "global_attention_mask": global_attention_mask}


def drop_in_model(layers: int, reps: int, train_reps: int) -> bool:
    """Unpatched Hugging Face model vs `patch(deepcopy(model))`: outputs and gradients compared, then
    forward (no_grad) and forward+backward timed, median of the timed repeats after an untimed call
    (the call whose result is checked)."""
    import transformers

    from longformer_ext.integrations.transformers import patch

    transformers.logging.set_verbosity_error()  # keep the demo's output to the figures
    hf = make_hf_model(layers)
    ours = patch(copy.deepcopy(hf))  # same weights; patch() swaps the attention in place
    models = {"hf": hf, "ours": ours}
    inputs = model_inputs()
    # Loss = a fixed random projection of the last hidden states, not their plain sum: each layer ends
    # in a LayerNorm whose weight is 1 at initialisation, and the sum of a normalised vector is 0 whatever
    # the input, so a plain sum would give zero gradients (rounding noise) below the last LayerNorm and
    # the gradient check would compare nothing. Same cost as the sum (one multiply).
    projection = torch.randn(1, N, 768, generator=torch.Generator().manual_seed(1))
    params = {name: dict(m.named_parameters()) for name, m in models.items()}

    def forward(name):
        def call():
            with torch.no_grad():
                return models[name](**inputs).last_hidden_state
        return call

    def forward_backward(name):
        names, tensors = zip(*params[name].items())

        def call():
            loss = (models[name](**inputs).last_hidden_state * projection).sum()
            # autograd.grad: fresh gradients of every parameter each call, nothing accumulates.
            return dict(zip(names, torch.autograd.grad(loss, tensors)))
        return call

    print(f"\n--- Drop-in: transformers {transformers.__version__} LongformerModel, random init, {layers} layers, "
          f"hidden 768, 12 heads, FFN 3072, attention_window {2 * ba.WINDOW}; input B=1 N={N}, <s> global, "
          f"{PADDING} padding; fp32, eval mode")
    print("unpatched vs longformer_ext.integrations.transformers.patch(copy.deepcopy(model))")
    ok = True
    results = {}
    for mode, make_call, timed in (("fwd", forward, reps), ("fwd+bwd", forward_backward, train_reps)):
        checked = {}
        for name in models:
            call = make_call(name)
            start = time.perf_counter()
            checked[name] = call()  # warm-up, and the result compared below
            warm_s = time.perf_counter() - start
            results[name, mode] = ba.time_calls(call, warm_s, 0.0, timed, timed)
        if mode == "fwd":
            # Absolute, like the unit tests' 1e-4: hidden states leave a LayerNorm, so they are O(1).
            diff = (checked["ours"] - checked["hf"]).abs().max().item()
            good = diff <= OUT_TOL
            results["diff", mode] = f"{diff:.1e} (last hidden state, max abs)"
            print(f"  last hidden state: max |ours - hf| = {diff:.2e}  (tolerance {OUT_TOL:.0e})  "
                  f"{'ok' if good else 'FAIL'}")
        else:
            # Every parameter's gradient, relative to max(1, its largest entry), as in
            # tests/test_transformers.py: an embedding or LayerNorm gradient sums thousands of fp32
            # contributions, so its absolute rounding grows with its size.
            errors = {}
            for pname, g_hf in checked["hf"].items():
                scale = max(1.0, g_hf.abs().max().item())
                errors[pname] = (checked["ours"][pname] - g_hf).abs().max().item() / scale
            worst = max(errors, key=errors.get)
            good = errors[worst] <= GRAD_TOL
            results["diff", mode] = f"{errors[worst]:.1e} (worst of {len(errors)} parameter grads, rel.)"
            shown = [worst] + [p for p in ("encoder.layer.0.attention.self.query.weight",
                                           "encoder.layer.0.attention.self.query_global.weight",
                                           "embeddings.word_embeddings.weight") if p != worst]
            for pname in shown:
                print(f"  grad {pname}: max |ours - hf| / max(1, max |hf|) = {errors[pname]:.2e}  "
                      f"(tolerance {GRAD_TOL:.0e}){'  <- worst of all parameters' if pname == worst else ''}")
            print(f"  all {len(errors)} parameter gradients  {'ok' if good else 'FAIL'}")
        if not good:
            print(f"FAIL: the patched model's {mode} does not match the unpatched model", file=sys.stderr)
        ok &= good
        del checked

    other_load = max(results[name, mode][2] for name in models for mode in ("fwd", "fwd+bwd"))
    print(f"\nCPU figures of this machine ({_cpu_name()}, {os.cpu_count()} CPUs visible), "
          f"{torch.get_num_threads()} torch threads; whole model, median of the timed reps after a warm-up "
          "call; fwd under no_grad, fwd+bwd = gradients of every parameter")
    print("| pass | unpatched HF ms | patched ms | speed-up | max difference |")
    print("|---|---|---|---|---|")
    for mode in ("fwd", "fwd+bwd"):
        (hf_s, hf_reps, _), (ours_s, ours_reps, _) = results["hf", mode], results["ours", mode]
        print(f"| {mode} | {hf_s * 1e3:.0f} ({hf_reps} reps) | {ours_s * 1e3:.0f} ({ours_reps} reps) | "
              f"{hf_s / ours_s:.1f}x | {results['diff', mode]} |")
    # Part 1 times attention alone; here the projections, FFN and embeddings (the same code in both
    # models) are in both columns, so the whole-model ratio is smaller than the attention-only one.
    print("(whole-model speed-up: projections, FFN and embeddings run the same code in both models, so it is "
          "smaller than the attention-only speed-up above)")
    if other_load > ba.NOISY:
        print(f"WARNING: other processes used up to {100 * other_load:.0f}% of the CPUs while timing; "
              "these times are slow and noisy")
    return ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--oracle-heads", type=int, default=2, help="heads checked against the float64 oracle")
    p.add_argument("--budget", type=float, default=3.0, help="seconds of timed repeats per measurement")
    p.add_argument("--model-layers", type=int, default=2,
                   help="layers of the Hugging Face model of part 2 (0 skips part 2)")
    p.add_argument("--model-reps", type=int, default=3, help="part 2: timed forward repeats per model")
    p.add_argument("--model-train-reps", type=int, default=2,
                   help="part 2: timed forward+backward repeats per model")
    args = p.parse_args(argv)
    if not 1 <= args.oracle_heads <= ba.H:
        p.error(f"--oracle-heads must be in 1..{ba.H}")
    if args.model_layers < 0 or args.model_reps < 1 or args.model_train_reps < 1:
        p.error("--model-layers must be >= 0, --model-reps and --model-train-reps >= 1")

    start = time.perf_counter()
    x = demo_inputs()
    ok = check_against_oracle(x, args.oracle_heads)
    ok &= time_ours_vs_hf(x, args.budget)
    del x
    if args.model_layers > 0:
        ok &= drop_in_model(args.model_layers, args.model_reps, args.model_train_reps)
    print(f"\n{'all checks passed' if ok else 'CHECK FAILED'} ({time.perf_counter() - start:.0f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
