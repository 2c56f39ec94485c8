"""Train the paper's character-level Longformer LM on Python's own source files, on CPU, in minutes.

What it does (Beltagy et al. 2020, section 4, scaled down):

1. Text: the top-level ``*.py`` files of this Python's standard library, sorted by name, read as bytes
   (a fixed selection: every 10th file is held out, the others are training text, each side capped).
   ``--text FILE ...`` uses your own files instead (the last 10% of their bytes is held out).
2. Model: ``longformer_ext.models.CharLM``: causal windows ``(w_layer, 0)`` growing with depth,
   dilation on one head of the upper layers, rotary positions.
3. Staged training: each phase doubles the window of every layer and the sequence length and halves
   the learning rate (tokens per step stay constant: the batch halves).
4. Evaluation on the held-out bytes with overlapping windows: each window of ``--eval-context`` bytes
   scores only its last ``--eval-stride`` predictions, so every scored byte sees a long context. The
   bits per character (BPC) are printed next to a bigram count model's (add-one smoothing, counted on
   the training text) on exactly the same predictions.
5. A sample: ``--sample-bytes`` bytes generated greedily after ``--prompt`` (``CharLM.generate``, on a
   window KV cache: each byte costs the same however long the text already is).

    python examples/train_char_lm.py            # the full run: about 8 minutes (7.5 of them training)
    python examples/train_char_lm.py --quick    # seconds; a smoke test

Training runs for ``--budget-s`` seconds split over the phases (``--shares``), so the run keeps to its
time on any machine: a faster or idler one trains on more tokens (each phase prints how many).
``--steps`` fixes the steps per phase instead (the time share still caps them).
"""

import argparse
import math
import os
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from longformer_ext.models import (CharLM, CharLMConfig, decode_bytes, encode_bytes, growing_windows,
                                   upper_layer_dilation)


# --------------------------------------------------------------------------------------------
# Data


def stdlib_corpus(train_bytes: int, heldout_bytes: int) -> tuple[bytes, bytes, str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    # _sysconfigdata* describes this machine's build, not Python code worth modelling
    files = sorted(p for p in root.glob("*.py") if not p.name.startswith("_sysconfigdata"))
    if len(files) < 20:
        raise SystemExit(f"found only {len(files)} .py files in {root}; pass --text FILE ... instead")
    train, heldout, n_train, n_heldout = [], [], 0, 0
    for index, path in enumerate(files):
        data = path.read_bytes()
        if index % 10 == 5:
            if n_heldout < heldout_bytes:
                heldout.append(data)
                n_heldout += len(data)
        elif n_train < train_bytes:
            train.append(data)
            n_train += len(data)
    source = f"{len(train)} training and {len(heldout)} held-out files from {root}"
    return b"".join(train)[:train_bytes], b"".join(heldout)[:heldout_bytes], source


def file_corpus(paths: list[str], train_bytes: int, heldout_bytes: int) -> tuple[bytes, bytes, str]:
    data = b"".join(Path(p).read_bytes() for p in paths)
    cut = int(len(data) * 0.9)
    return data[:cut][:train_bytes], data[cut:][:heldout_bytes], f"{len(paths)} file(s) given with --text"


def bytes_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def random_batch(data: torch.Tensor, batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """``batch`` random slices of ``length + 1`` bytes (inputs and their next-byte targets)."""
    starts = torch.randint(0, len(data) - length - 1, (batch,), generator=gen)
    return torch.stack([data[s:s + length + 1] for s in starts.tolist()])


# --------------------------------------------------------------------------------------------
# Progress bar: tqdm when installed, otherwise a plain one


class PlainBar:
    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.n, self.postfix = total, desc, 0, ""
        self.start = self.last_print = time.perf_counter()
        self.tty = sys.stdout.isatty()

    def set_postfix_str(self, text: str):
        self.postfix = text

    def update(self, n: int = 1):
        self.n += n
        now = time.perf_counter()
        # on a terminal redraw in place; in a log print a line every 10 s (and at the end)
        if self.tty or now - self.last_print >= 10 or self.n == self.total:
            self.last_print = now
            filled = int(30 * self.n / max(self.total, 1))
            line = (f"{self.desc} [{'#' * filled}{'.' * (30 - filled)}] {self.n}/{self.total} "
                    f"{now - self.start:.0f}s {self.postfix}")
            print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", flush=True)

    def close(self):
        if self.tty:
            print(flush=True)


def progress(total: int, desc: str, seconds: bool = False):
    """A bar over ``total`` steps, or over ``total`` seconds (then without a rate, which would read
    "seconds per second")."""
    try:
        from tqdm import tqdm
    except ImportError:
        return PlainBar(total, desc)
    fmt = "{l_bar}{bar}| {n_fmt}/{total_fmt} s{postfix}" if seconds else None
    return tqdm(total=total, desc=desc, dynamic_ncols=True, mininterval=1.0, bar_format=fmt)


# --------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def overlapping_window_nats(model: CharLM, data: torch.Tensor, context: int, stride: int, batch: int = 8):
    """Sum of next-byte cross-entropies (nats) and their count over ``data[1:]``. Window ``k`` holds
    inputs ``data[k*stride : k*stride + context]``; the first window scores all its predictions, each
    later one only its last ``stride`` (the ones no earlier window scored), so that every scored byte
    has at least ``context - stride`` bytes of context (except at the very start)."""
    model.eval()
    windows = []  # (start, length, first scored offset)
    scored_until = 0  # every target index < scored_until + 1 is done
    start = 0
    while scored_until < len(data) - 1:
        length = min(context, len(data) - 1 - start)
        first = scored_until - start  # targets data[start+1+first ...] are new
        windows.append((start, length, first))
        scored_until = start + length
        start += stride
    total, count = 0.0, 0
    bar = progress(len(windows), "eval")
    for i in range(0, len(windows), batch):
        group = windows[i:i + batch]
        # windows of one length batch together; only the last window of the text can be shorter
        for length in sorted({g[1] for g in group}):
            same = [g for g in group if g[1] == length]
            x = torch.stack([data[s:s + length] for s, _, _ in same])
            y = torch.stack([data[s + 1:s + 1 + length] for s, _, _ in same])
            nll = F.cross_entropy(model(x).transpose(1, 2), y, reduction="none")  # [b, length]
            for row, (_, _, first) in enumerate(same):
                total += nll[row, first:].sum().item()
                count += length - first
        bar.update(len(group))
    bar.close()
    return total, count


def bigram_nats(train: torch.Tensor, heldout: torch.Tensor, vocab: int = 256):
    """Add-one smoothed bigram counts from the training text, scored on ``heldout[1:]``."""
    counts = torch.bincount(train[:-1] * vocab + train[1:], minlength=vocab * vocab).view(vocab, vocab).double()
    log_p = ((counts + 1) / (counts + 1).sum(1, keepdim=True)).log()
    return -log_p[heldout[:-1], heldout[1:]].sum().item(), len(heldout) - 1


# --------------------------------------------------------------------------------------------


def choose_threads(own_load: float = 0.0) -> int:
    """The CPUs this process may use (a container or taskset may allow fewer than os.cpu_count())
    minus those other processes keep busy: the kernels split work over OpenMP threads that meet at
    barriers, and a thread whose core is taken stalls all the others (on a busy 2-core machine one
    thread ran a step 4x faster than two). ``own_load``: this process's share of the load average."""
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = max(0.0, os.getloadavg()[0] - own_load) if hasattr(os, "getloadavg") else 0.0
    return max(1, min(available, round(available - busy)))


class ThreadGovernor:
    """Re-chooses the thread count every ``period`` seconds, as other processes come and go. The
    1-minute load average includes this process's own threads; their share is tracked with the same
    exponential decay the kernel uses (time constant 60 s) and subtracted."""

    def __init__(self, fixed: int, period: float = 20.0):
        self.fixed, self.period = fixed, period
        self.last_check = time.perf_counter()
        self.own_load = 0.0
        torch.set_num_threads(fixed or choose_threads())

    def check(self):
        now = time.perf_counter()
        if self.fixed or now - self.last_check < self.period:
            return
        decay = math.exp(-(now - self.last_check) / 60)
        self.last_check = now
        current = torch.get_num_threads()
        self.own_load = self.own_load * decay + current * (1 - decay)
        wanted = choose_threads(self.own_load)
        if wanted != current:
            torch.set_num_threads(wanted)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model and data: a smoke run of a few seconds")
    p.add_argument("--text", nargs="+", help="train on these files instead of the Python standard library")
    p.add_argument("--train-bytes", type=int, default=3_000_000)
    p.add_argument("--heldout-bytes", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=128, help="sequence length of the first phase")
    p.add_argument("--bottom-window", type=int, default=8, help="one-sided window of layer 0 in phase 1")
    p.add_argument("--top-window", type=int, default=32, help="one-sided window of the last layer in phase 1")
    p.add_argument("--phases", type=int, default=3)
    p.add_argument("--shares", type=float, nargs="+", default=[0.5, 0.3, 0.2],
                   help="share of --budget-s for each phase")
    p.add_argument("--steps", type=int, nargs="+",
                   help="steps per phase (one value, or one per phase) instead of running to the time share")
    p.add_argument("--tokens-per-step", type=int, default=4096)
    p.add_argument("--lr", type=float, default=3e-3, help="learning rate of phase 1 (halved every phase)")
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--budget-s", type=float, default=450.0, help="training time (seconds), split over the phases")
    p.add_argument("--eval-context", type=int, default=1024)
    p.add_argument("--eval-stride", type=int, default=512)
    p.add_argument("--prompt", default="def ", help="text the printed sample continues")
    p.add_argument("--sample-bytes", type=int, default=200, help="bytes of the sample (0: no sample)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads (0: the CPUs this process may use minus the load of other processes, "
                        "re-chosen every 20 s)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.quick:
        args.train_bytes, args.heldout_bytes = 200_000, 4_000
        args.dim, args.layers, args.heads, args.seq = 64, 2, 2, 64
        args.bottom_window, args.top_window, args.phases, args.steps = 4, 8, 2, [6, 4]
        args.shares, args.budget_s = [1, 1], 120.0
        args.tokens_per_step, args.warmup, args.eval_context, args.eval_stride = 512, 2, 256, 64
    if args.steps and len(args.steps) == 1:
        args.steps = args.steps * args.phases
    if args.steps and len(args.steps) != args.phases:
        p.error(f"--steps needs 1 or {args.phases} values")
    if len(args.shares) != args.phases or min(args.shares) <= 0:
        p.error(f"--shares needs {args.phases} positive values")
    if args.sample_bytes > 0 and not args.prompt:
        p.error("--prompt must not be empty (the sample continues it)")
    return args


def main(argv=None):
    args = parse_args(argv)
    t0 = time.perf_counter()
    governor = ThreadGovernor(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    if args.text:
        train_raw, heldout_raw, source = file_corpus(args.text, args.train_bytes, args.heldout_bytes)
    else:
        train_raw, heldout_raw, source = stdlib_corpus(args.train_bytes, args.heldout_bytes)
    train, heldout = bytes_tensor(train_raw), bytes_tensor(heldout_raw)
    print(f"text: {len(train):,} training bytes, {len(heldout):,} held-out bytes ({source})")

    config = CharLMConfig(dim=args.dim, layers=args.layers, heads=args.heads,
                          windows=growing_windows(args.layers, args.bottom_window, args.top_window),
                          dilations=upper_layer_dilation(args.layers, args.heads, args.layers // 2, 1))
    model = CharLM(config)
    print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters, {args.layers} layers x "
          f"{args.heads} heads, dim {args.dim}; dilation per layer {model.dilations}; torch threads "
          f"{torch.get_num_threads()}")
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.98), fused=True)

    base_windows = list(config.windows)
    shares = [x / sum(args.shares) for x in args.shares]
    train_start = time.perf_counter()
    for phase in range(args.phases):
        seq = args.seq * 2 ** phase
        model.set_windows([w * 2 ** phase for w in base_windows])
        lr = args.lr / 2 ** phase
        batch = max(1, args.tokens_per_step // seq)
        # a phase runs until its cumulative share of the budget is used (time an earlier phase left
        # unused carries over), or for its step count when --steps is given
        phase_start = time.perf_counter()
        deadline = train_start + args.budget_s * sum(shares[:phase + 1])
        max_steps = args.steps[phase] if args.steps else None
        print(f"phase {phase + 1}/{args.phases}: sequence {seq}, windows {model.windows} (receptive field "
              f"{model.receptive_field()}), lr {lr:.2e}, batch {batch}, "
              + (f"{max_steps} steps" if max_steps else f"until {deadline - train_start:.0f} s"))
        model.train()
        bar = progress(max_steps or max(1, round(deadline - phase_start)), f"phase {phase + 1}", not max_steps)
        smoothed, step, shown = None, 0, 0
        while (max_steps is None or step < max_steps) and time.perf_counter() < deadline:
            for group in optimizer.param_groups:  # linear warm-up at the very start only
                group["lr"] = lr * min(1.0, (step + 1) / args.warmup) if phase == 0 else lr
            governor.check()
            loss = model.loss(random_batch(train, batch, seq, gen))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1
            smoothed = loss.item() if smoothed is None else 0.9 * smoothed + 0.1 * loss.item()
            bar.set_postfix_str(f"step {step}, train bpc {smoothed / math.log(2):.3f}")
            if max_steps:
                bar.update(1)
            else:  # the bar counts seconds
                now = min(bar.total, int(time.perf_counter() - phase_start))
                bar.update(now - shown)
                shown = now
        bar.close()
        note = "" if max_steps is None or step == max_steps else f" (time share used up before {max_steps} steps)"
        print(f"phase {phase + 1}: {step} steps, {step * batch * seq:,} tokens in "
              f"{time.perf_counter() - phase_start:.0f} s{note}; torch threads now {torch.get_num_threads()}")
    train_s = time.perf_counter() - train_start

    eval_start = time.perf_counter()
    nats, count = overlapping_window_nats(model, heldout, args.eval_context, args.eval_stride)
    eval_s = time.perf_counter() - eval_start
    bigram, bigram_count = bigram_nats(train, heldout)
    assert count == bigram_count == len(heldout) - 1, (count, bigram_count)
    print(f"held-out: {count:,} predictions, windows of {args.eval_context} bytes scoring the last "
          f"{args.eval_stride} of each")
    print(f"held-out BPC: char LM {nats / count / math.log(2):.3f} | bigram (add-one) "
          f"{bigram / count / math.log(2):.3f}")

    sample_start = time.perf_counter()
    if args.sample_bytes > 0:
        prompt = encode_bytes(args.prompt)[None]
        text = model.generate(prompt, max_new_tokens=args.sample_bytes)[0]
        print(f"sample ({args.sample_bytes} bytes after the prompt {args.prompt!r}, greedy):")
        print(decode_bytes(text))
    sample_s = time.perf_counter() - sample_start
    print(f"time: {time.perf_counter() - t0:.1f} s total ({train_s:.1f} s training, {eval_s:.1f} s evaluation, "
          f"{sample_s:.1f} s sample)")


if __name__ == "__main__":
    main()
