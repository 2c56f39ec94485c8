"""Convert a short RoBERTa into a long Longformer and continue masked-LM pretraining, as the paper does.

Everything is local and small (runs in a minute or two on CPU, nothing is downloaded):

1. a randomly initialised RoBERTa masked LM (byte-level ids, no tokenizer) accepting 128 tokens;
2. converted with ``longformer_ext.convert.to_longformer`` into a Longformer accepting ``--max-pos``
   tokens (position rows copied repeatedly; global projections copied from the local ones);
3. longformer_ext's attention patched in (``longformer_ext.integrations.transformers.patch``) and
   ``--steps`` steps of masked-LM training on Python's own standard-library sources;
4. the local projections re-copied into the global ones (MLM uses no global tokens, so those got no
   gradient), saved with ``save_pretrained``, reloaded with ``load_long_model``, and the reloaded model
   checked to give the same outputs (with a global token, so the global projections are exercised).

    python examples/continue_pretraining.py --steps 40
"""

import argparse
import math
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

from longformer_ext.convert import copy_local_to_global, load_long_model, to_longformer

# Byte-level vocabulary: ids 0-3 are RoBERTa's special tokens, byte b is id b + 4.
BOS, PAD, EOS, MASK = 0, 1, 2, 3
BYTE_OFFSET = 4
VOCAB = 256 + BYTE_OFFSET
SHORT_POSITIONS = 128  # tokens the original (short) model accepts


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="training steps (default 40)")
    parser.add_argument("--max-pos", type=int, default=1024, help="tokens the long model accepts (default 1024)")
    parser.add_argument("--window", type=int, default=64,
                        help="one-sided window (longformer_ext convention; HF attention_window = 2x) (default 64)")
    parser.add_argument("--seq-len", type=int, default=1024, help="training sequence length (default 1024)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--data-bytes", type=int, default=2_000_000, help="bytes of stdlib source to read")
    parser.add_argument("--out", type=Path, default=None, help="save directory (default: a temporary one)")
    parser.add_argument("--no-patch", action="store_true",
                        help="train with Hugging Face's own Longformer attention instead of longformer_ext's")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.seq_len > args.max_pos:
        parser.error("--seq-len must be <= --max-pos")
    return args


def load_text(limit: int) -> torch.Tensor:
    """Python standard-library sources as byte ids, in a fixed order (reproducible)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(stdlib.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= limit:
            break
    if total < 100_000:
        raise SystemExit(f"found only {total} bytes of Python sources under {stdlib}")
    data = torch.frombuffer(bytearray(b"".join(chunks)[:limit]), dtype=torch.uint8)
    return data.long() + BYTE_OFFSET


def sample_batch(data: torch.Tensor, batch: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """Random windows of ``seq_len - 2`` bytes framed by <s> ... </s>."""
    starts = torch.randint(0, data.numel() - seq_len, (batch,), generator=generator)
    body = torch.stack([data[s:s + seq_len - 2] for s in starts.tolist()])
    return torch.cat([torch.full((batch, 1), BOS), body, torch.full((batch, 1), EOS)], dim=1)


def mask_tokens(ids: torch.Tensor, generator: torch.Generator, rate: float = 0.15):
    """BERT/RoBERTa masking: 15% of the byte tokens are predicted; of those 80% -> <mask>, 10% random, 10% kept."""
    labels = ids.clone()
    chosen = (torch.rand(ids.shape, generator=generator) < rate) & (ids >= BYTE_OFFSET)
    labels[~chosen] = -100
    inputs = ids.clone()
    roll = torch.rand(ids.shape, generator=generator)
    inputs[chosen & (roll < 0.8)] = MASK
    random_ids = torch.randint(BYTE_OFFSET, VOCAB, ids.shape, generator=generator)
    swap = chosen & (roll >= 0.8) & (roll < 0.9)
    inputs[swap] = random_ids[swap]
    return inputs, labels


@torch.no_grad()
def mlm_loss(model, batches) -> float:
    model.eval()
    losses = [model(input_ids=inputs, labels=labels).loss.item() for inputs, labels in batches]
    model.train()
    return sum(losses) / len(losses)


def main(argv=None) -> int:
    args = parse_args(argv)
    import transformers
    transformers.logging.set_verbosity_error()  # HF's "padded to a multiple of the window" notices
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)

    data = load_text(args.data_bytes)
    split = int(0.9 * data.numel())
    train_data, held_out = data[:split], data[split:]
    print(f"text: {data.numel()} bytes of Python stdlib sources ({split} train / {data.numel() - split} held out)")

    # 1. The short model: RoBERTa's position table has 2 extra rows (padding_idx + 1 offset).
    config = transformers.RobertaConfig(
        vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
        max_position_embeddings=SHORT_POSITIONS + PAD + 1, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, type_vocab_size=1)
    short = transformers.RobertaForMaskedLM(config)

    # 2. Conversion.
    model = to_longformer(short, max_pos=args.max_pos, window=args.window)
    print(f"converted {type(short).__name__} ({SHORT_POSITIONS} tokens) -> {type(model).__name__} "
          f"({args.max_pos} tokens, attention_window={model.config.attention_window[0]} two-sided = "
          f"{args.window} one-sided)")

    # 3. Our attention in, then masked-LM training.
    if not args.no_patch:
        from longformer_ext.integrations.transformers import patch
        model = patch(model)
    model.train()
    eval_batches = [mask_tokens(sample_batch(held_out, args.batch_size, args.seq_len, generator), generator)
                    for _ in range(2)]
    start_loss = mlm_loss(model, eval_batches)
    print(f"held-out MLM loss before: {start_loss:.3f} nats ({start_loss / math.log(2):.2f} bits/byte)")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / max(1, args.steps // 10)))
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        inputs, labels = mask_tokens(sample_batch(train_data, args.batch_size, args.seq_len, generator), generator)
        loss = model(input_ids=inputs, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % max(1, args.steps // 10) == 0 or step == args.steps:
            elapsed = time.perf_counter() - started
            print(f"step {step:4d}/{args.steps}  loss {loss.item():.3f}  {elapsed:6.1f} s", flush=True)
    end_loss = mlm_loss(model, eval_batches)
    print(f"held-out MLM loss after:  {end_loss:.3f} nats ({end_loss / math.log(2):.2f} bits/byte)")

    # 4. Global projections <- local ones (the paper's recipe), save, reload, compare.
    layers = copy_local_to_global(model)
    print(f"re-copied local -> global projections in {layers} layers")
    model.eval()
    probe = sample_batch(held_out, 2, args.seq_len, generator)
    attention_mask = torch.ones_like(probe)
    attention_mask[1, args.seq_len // 2:] = 0  # padding in the second row
    probe[1, args.seq_len // 2:] = PAD
    global_mask = torch.zeros_like(probe)
    global_mask[:, 0] = 1  # <s> as a global token, so the global projections are used
    with torch.no_grad():
        before = model(input_ids=probe, attention_mask=attention_mask, global_attention_mask=global_mask).logits

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out if args.out is not None else Path(tmp) / "long-roberta"
        model.save_pretrained(out)
        reloaded = load_long_model(out, patch=not args.no_patch).eval()
        with torch.no_grad():
            after = reloaded(input_ids=probe, attention_mask=attention_mask, global_attention_mask=global_mask).logits
    real = attention_mask.bool()
    diff = (before - after)[real].abs().max().item()
    print(f"saved to {out if args.out is not None else '(temporary directory)'}; reloaded "
          f"{type(reloaded).__name__}{'' if args.no_patch else ' (patched)'}: max |logits difference| = {diff:.2e}")
    if diff > 1e-5:
        print("FAIL: the reloaded model's outputs differ", file=sys.stderr)
        return 1
    if not end_loss < start_loss:
        print("FAIL: the held-out loss did not go down", file=sys.stderr)
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
