"""Communication per rank of sliding-window attention under context parallelism, computed from formulas.

Nothing here is measured: the script counts, for one attention layer whose sequence of N tokens is
split into P contiguous shards of n = N / P tokens, the bytes each rank RECEIVES in the forward and
in the backward pass, and the extra keys/values it holds beyond its own shard, for four ways to run
a Longformer window (+ global tokens) over the shards:

  halo     longformer_ext.distributed: one all-to-all of the L + R key/value rows next to the shard
           (L = left * max dilation, R = right * max dilation), plus the global tokens' collectives
           (an all-reduce of their q/k/v slots; an all-gather of the global rows' lse and an
           all-reduce of their partial outputs), and the same exchanges reversed in the backward
  ring     K/V blocks passed around all P ranks (torch's context_parallel, ring attention): the global
           rows see every key, so every block has to visit every rank; plus a "window only" ring that
           stops once the band is covered (it cannot serve global tokens)
  ulysses  DeepSpeed-Ulysses: all-to-alls from sequence shards to head shards and back (P <= H_kv)
  gather   all-gather of K/V, reduce-scatter of dK/dV (Llama 3's context parallelism)

Counting conventions (see the functions for each formula):
  * an all-reduce of S elements receives 2 * (P - 1) / P * S elements per rank (ring algorithm:
    reduce-scatter then all-gather); an all-gather receives the P - 1 other ranks' pieces;
  * the halo is counted for the busiest rank (an interior one): L + R rows, whether they come from
    the neighbours or, when n < L or n < R, from several ranks on each side;
  * gradients that accumulate over ranks travel in --grad-bytes (default 4, float32): that is what
    longformer_ext.distributed sends back for the halo (its dK/dV accumulation buffers are float32)
    and what torch's ring sends (_cp_options.convert_to_f32 is True by default); the reduce-scatter
    of the all-gather method is counted the same way. Ulysses' backward all-to-alls move activation
    gradients, counted in --bytes. --grad-bytes 2 counts those gradients in bf16; the global rows'
    lse, partial outputs and their gradients stay float32 (ACC_BYTES), as in the code.

    python3 bench/cp_volumes.py                       # the default sweep (standard library only)
    python3 bench/cp_volumes.py --seqlens 262144 --ranks 4 16 --heads-kv 4 --grad-bytes 2

Writes bench/results/cp_volumes.md (--md) and bench/results/cp_volumes.json (--json), and prints the
markdown tables.

Hand check, N = 128K, P = 8 (n = 16384), H = H_kv = 16, D = 64, L = R = 256, G = 64, bf16, fp32 grads:
  halo forward: k/v halo 512 rows * 16 heads * 64 * 2 (k and v) = 1,048,576 elements * 2 B = 2 MiB;
    global slots all-reduce 64 * (16 + 32) * 64 = 196,608 elements * 2 * 7/8 * 2 B = 672 KiB;
    lse all-gather 7 * 64 * 16 * 4 B = 28 KiB; outputs all-reduce 64 * 16 * 64 * 2 * 7/8 * 4 B = 448 KiB;
    total 2048 + 672 + 28 + 448 = 3196 KiB = 3.1 MiB.
  halo backward: halo gradients 1,048,576 * 4 B = 4 MiB; output-gradient all-reduce 448 KiB; q/k/v slot
    gradient all-reduce 196,608 * 2 * 7/8 * 4 B = 1344 KiB; total 5888 KiB = 5.8 MiB (5.75).
  ring forward: 7 blocks * 16384 rows * 2 * 16 * 64 = 234,881,024 elements * 2 B = 448 MiB; backward
    448 MiB (K/V again) + 234,881,024 * 4 B (dK/dV) = 1344 MiB = 1.3 GiB.
"""

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent

SEQLENS = [131072, 1048576]
RANKS = [8, 64]
HALO_WINDOWS = [64, 256, 1024]
HALO_DILATIONS = [1, 4]
# The global rows' lse, partial outputs and their gradients are float32 (the accumulation dtype of
# longformer_ext.distributed for bf16/fp16/fp32 inputs), whatever --bytes and --grad-bytes say.
ACC_BYTES = 4


@dataclass(frozen=True)
class Setting:
    heads: int        # H, query heads
    heads_kv: int     # H_kv, key/value heads
    head_dim: int     # D
    left: int         # one-sided window sizes, before dilation
    right: int
    dilation: int     # the largest dilation over the heads: it sets how far the band reaches
    num_globals: int     # G, global tokens
    elem_bytes: int       # element size of q, k, v and the output
    grad_bytes: int   # element size of gradients accumulated over ranks

    @property
    def reach_left(self) -> int:
        return self.left * self.dilation

    @property
    def reach_right(self) -> int:
        return self.right * self.dilation


@dataclass
class Row:
    seqlen: int
    ranks: int
    per_rank: int
    method: str
    forward_bytes: Optional[float]   # None: the method cannot run this (N, P)
    backward_bytes: Optional[float]
    extra_kv_bytes: Optional[float]
    note: str = ""


def all_reduce_received(elements: float, ranks: int) -> float:
    """Elements one rank receives in a ring all-reduce of ``elements`` (reduce-scatter + all-gather)."""
    return 2 * (ranks - 1) / ranks * elements


def halo_rows(s: Setting, seqlen: int, ranks: int) -> int:
    """Key/value rows the busiest rank receives: its band's reach on both sides, clipped where the
    sequence ends. For a rank in the middle of a long sequence that is L + R, however many ranks
    those rows come from."""
    n = seqlen // ranks
    return max(min(s.reach_left, r * n) + min(s.reach_right, (ranks - 1 - r) * n) for r in range(ranks))


def kv_row_elements(s: Setting) -> int:
    """Elements of one position's key and value over all KV heads."""
    return 2 * s.heads_kv * s.head_dim


def halo_global_forward_bytes(s: Setting, ranks: int) -> float:
    """The global tokens' forward collectives in longformer_ext.distributed: the all-reduce of the
    zero-filled [G, (H + 2 H_kv) D] q/k/v slots (input dtype), the all-gather of the global rows'
    lse (G * H float32 from each other rank), the all-reduce of their weighted partial outputs
    [G, H D] (float32)."""
    g, h, d = s.num_globals, s.heads, s.head_dim
    slots = all_reduce_received(g * (h + 2 * s.heads_kv) * d, ranks) * s.elem_bytes
    lse = (ranks - 1) * g * h * ACC_BYTES
    outputs = all_reduce_received(g * h * d, ranks) * ACC_BYTES
    return slots + lse + outputs


def halo_global_backward_bytes(s: Setting, ranks: int) -> float:
    """The global tokens' backward collectives: an all-reduce of the global rows' output gradients
    [G, H D] from their owners to every rank, and an all-reduce of the slots' q/k/v gradients
    [G, (H + 2 H_kv) D] back to the owners, both float32. (With return_lse the first one also
    carries G * H lse gradients; not counted.)"""
    g, h, d = s.num_globals, s.heads, s.head_dim
    grad_rows = all_reduce_received(g * h * d, ranks) * ACC_BYTES
    grad_slots = all_reduce_received(g * (h + 2 * s.heads_kv) * d, ranks) * ACC_BYTES
    return grad_rows + grad_slots


def halo_method(s: Setting, seqlen: int, ranks: int) -> Row:
    """longformer_ext.distributed: the halo all-to-all forward, its gradients returned backward."""
    halo = halo_rows(s, seqlen, ranks) * kv_row_elements(s)
    forward = halo * s.elem_bytes + halo_global_forward_bytes(s, ranks)
    backward = halo * s.grad_bytes + halo_global_backward_bytes(s, ranks)
    # the halo's k/v rows, and the global tokens' q/k/v gathered for every rank
    extra = (halo + s.num_globals * (s.heads + 2 * s.heads_kv) * s.head_dim) * s.elem_bytes
    return Row(seqlen, ranks, seqlen // ranks, "halo (longformer_ext.distributed)", forward, backward, extra)


def ring_method(s: Setting, seqlen: int, ranks: int) -> Row:
    """Full ring: every rank's K/V block visits every other rank (P - 1 steps), because the global
    rows need every key. Backward: the blocks go round again and their dK/dV travel with them."""
    n = seqlen // ranks
    block = n * kv_row_elements(s)
    steps = ranks - 1
    # extra memory: 2 blocks, one being computed on while the next arrives
    return Row(seqlen, ranks, n, "ring (K/V blocks passed around all P ranks)", steps * block * s.elem_bytes,
               steps * block * (s.elem_bytes + s.grad_bytes), 2 * block * s.elem_bytes)


def ring_window_steps(s: Setting, seqlen: int, ranks: int) -> int:
    """Steps a ring needs for the band alone: enough whole blocks to cover the reach on each side."""
    n = seqlen // ranks
    return min(ranks - 1, math.ceil(s.reach_left / n) + math.ceil(s.reach_right / n))


def ring_window_method(s: Setting, seqlen: int, ranks: int) -> Row:
    """A ring that stops once the band is covered: whole blocks of n rows, though the band needs only
    L (R) of them, and no global tokens (their rows need every block)."""
    n = seqlen // ranks
    block = n * kv_row_elements(s)
    steps = ring_window_steps(s, seqlen, ranks)
    name = "ring, window only (stops after ceil(L/n) + ceil(R/n) steps; cannot serve global tokens)"
    return Row(seqlen, ranks, n, name,
               steps * block * s.elem_bytes, steps * block * (s.elem_bytes + s.grad_bytes), 2 * block * s.elem_bytes,
               note=f"{steps} steps")


def ulysses_method(s: Setting, seqlen: int, ranks: int) -> Row:
    """Ulysses: q, k, v all-to-all'd from sequence shards to head shards, the output back; each rank
    keeps 1/P of its own share. Backward: the same four all-to-alls reversed (dO in; dQ, dK, dV out).
    The heads must split evenly over the ranks; with the whole sequence per head, global tokens cost
    nothing extra."""
    n = seqlen // ranks
    name = "Ulysses (all-to-all to head shards)"
    if ranks > s.heads_kv:
        return Row(seqlen, ranks, n, name, None, None, None, note="n/a (P > H_kv)")
    if s.heads_kv % ranks or s.heads % ranks:
        return Row(seqlen, ranks, n, name, None, None, None, note="n/a (heads not divisible by P)")
    moved = (ranks - 1) / ranks * n * (s.heads + 2 * s.heads_kv + s.heads) * s.head_dim
    # extra memory: the whole sequence's k and v for H_kv / P heads
    extra = seqlen * 2 * (s.heads_kv // ranks) * s.head_dim * s.elem_bytes
    return Row(seqlen, ranks, n, name, moved * s.elem_bytes, moved * s.elem_bytes, extra)


def all_gather_method(s: Setting, seqlen: int, ranks: int) -> Row:
    """All-gather the whole K/V (the P - 1 other shards); backward: reduce-scatter of dK/dV, each rank
    receiving (P - 1) / P of its own shard's share of N, i.e. (P - 1) n rows. Assumes the gathered
    K/V is kept from the forward (re-gathering it for the backward would add the forward's volume)."""
    n = seqlen // ranks
    others = (ranks - 1) * n * kv_row_elements(s)
    return Row(seqlen, ranks, n, "K/V all-gather (Llama 3 style)", others * s.elem_bytes, others * s.grad_bytes,
               seqlen * kv_row_elements(s) * s.elem_bytes)


METHODS = [halo_method, ring_method, ring_window_method, ulysses_method, all_gather_method]


def human(nbytes: Optional[float]) -> str:
    """Bytes as B / KiB / MiB / GiB (base 1024), one decimal."""
    if nbytes is None:
        return "-"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes:.0f} B"


def tokens(n: int) -> str:
    """131072 -> 128K, 1048576 -> 1M (exact multiples only; otherwise the number)."""
    if n >= 1 << 20 and n % (1 << 20) == 0:
        return f"{n >> 20}M"
    if n >= 1 << 10 and n % (1 << 10) == 0:
        return f"{n >> 10}K"
    return str(n)


def sweep(s: Setting, seqlens: list[int], ranks: list[int]) -> list[Row]:
    rows = []
    for seqlen in seqlens:
        for p in ranks:
            if seqlen % p:
                raise SystemExit(f"N = {seqlen} does not split evenly over P = {p} ranks")
            rows.extend(method(s, seqlen, p) for method in METHODS)
    return rows


def halo_window_table(s: Setting, seqlens: list[int], ranks: list[int], windows: list[int],
                      dilations: list[int]) -> list[dict]:
    """The halo's k/v forward volume per (symmetric window, dilation), computed at every (N, P) of
    the sweep: one value when it does not depend on them (the band's reach is the same rows
    whatever the shard size), a range when a sequence is too short for the reach."""
    out = []
    for w in windows:
        for dil in dilations:
            t = Setting(s.heads, s.heads_kv, s.head_dim, w, w, dil, s.num_globals, s.elem_bytes, s.grad_bytes)
            values = sorted({halo_rows(t, n, p) * kv_row_elements(t) * t.elem_bytes for n in seqlens for p in ranks})
            out.append({"window": w, "dilation": dil, "halo_rows": t.reach_left + t.reach_right,
                        "kv_forward_bytes": values, "same_for_every_N_P": len(values) == 1,
                        "global_forward_bytes": {str(p): halo_global_forward_bytes(t, p) for p in ranks}})
    return out


def header(s: Setting) -> str:
    return (
        "Computed by `bench/cp_volumes.py` from the formulas in that script, not measured. Bytes **received** "
        "per rank for one attention layer, the sequence of N tokens split into P contiguous shards of "
        f"n = N / P tokens. Setting: H = {s.heads} query heads, H_kv = {s.heads_kv} key/value heads, "
        f"D = {s.head_dim}, window ({s.left}, {s.right}) one-sided, max dilation {s.dilation} "
        f"(halo L = {s.reach_left}, R = {s.reach_right} rows), G = {s.num_globals} global tokens, "
        f"{s.elem_bytes} bytes per element of q/k/v/output, {s.grad_bytes} bytes per element of gradients that "
        f"accumulate over ranks (halo dK/dV, ring dK/dV, reduce-scatter), {ACC_BYTES} bytes for the global rows' "
        "lse, partial outputs and their gradients. An all-reduce of S elements counts 2 (P - 1) / P S received (ring "
        "algorithm). Extra K/V memory: keys and values (and, for the halo, the global tokens' queries) a "
        "rank holds beyond its own shard.\n\n"
        "* **halo (longformer_ext.distributed)**: one all-to-all of the L + R k/v rows next to the shard "
        "(the busiest rank; from several ranks when n < L), an all-reduce of the global tokens' q/k/v, an "
        "all-gather of the global rows' lse and an all-reduce of their partial outputs; backward: the halo's "
        "dK/dV sent back, all-reduces of the global rows' output gradients and of their q/k/v gradients.\n"
        "* **ring**: each rank's K/V block passed around all P ranks (P - 1 steps), as torch's context_parallel "
        "and ring attention do; global rows see every key, so a window with global tokens needs every block. "
        "Backward: the blocks again, with their dK/dV. Holds 2 blocks (one computed on, one arriving).\n"
        "* **ring, window only**: the same ring stopped after ceil(L/n) + ceil(R/n) steps (capped at P - 1), "
        "whole blocks of n rows; cannot serve global tokens.\n"
        "* **Ulysses**: all-to-alls of q, k, v to head shards and of the output back (each rank keeps 1/P of "
        "its share), reversed in the backward; needs P <= H_kv (heads split over ranks); global tokens are free.\n"
        "* **K/V all-gather (Llama 3 style)**: every rank gathers the whole K/V; backward: a reduce-scatter of "
        "dK/dV. Assumes the gathered K/V is kept for the backward.\n"
    )


def main_table(rows: list[Row]) -> str:
    lines = ["| N | P | n per rank | method | forward received | backward received | extra K/V memory |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.forward_bytes is None:
            cells = [r.note] * 3
        else:
            cells = [human(r.forward_bytes), human(r.backward_bytes), human(r.extra_kv_bytes)]
        method = f"{r.method} [{r.note}]" if r.note and r.forward_bytes is not None else r.method
        lines.append(f"| {tokens(r.seqlen)} | {r.ranks} | {r.per_rank} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def window_table(s: Setting, entries: list[dict], seqlens: list[int], ranks: list[int]) -> str:
    lines = [
        f"Halo forward volume against the window (H = {s.heads}, H_kv = {s.heads_kv}, D = {s.head_dim}, "
        f"{s.elem_bytes} bytes per element): the k/v halo, computed at every N in "
        f"{{{', '.join(tokens(n) for n in seqlens)}}} and P in {{{', '.join(map(str, ranks))}}} above, depends "
        "only on the window's reach; the global tokens' collectives (G = "
        f"{s.num_globals}, added to it in the table above) do not depend on the window, and on P only "
        "through (P - 1) / P.",
        "",
        "| window (one-sided) | dilation | halo rows L + R | k/v halo forward (every N, P) | "
        + " | ".join(f"global tokens' part, P = {p}" for p in ranks) + " |",
        "|---|---|---|---|" + "---|" * len(ranks),
    ]
    for e in entries:
        kv = e["kv_forward_bytes"]
        kv_text = human(kv[0]) if e["same_for_every_N_P"] else f"{human(kv[0])} to {human(kv[-1])} (varies)"
        lines.append(f"| {e['window']} | {e['dilation']} | {e['halo_rows']} | {kv_text} | "
                     + " | ".join(human(e["global_forward_bytes"][str(p)]) for p in ranks) + " |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--heads", type=int, default=16, help="H, query heads")
    p.add_argument("--heads-kv", type=int, default=16, help="H_kv, key/value heads")
    p.add_argument("--head-dim", type=int, default=64, help="D")
    p.add_argument("--left", type=int, default=256, help="one-sided window before the token")
    p.add_argument("--right", type=int, default=256, help="one-sided window after the token")
    p.add_argument("--dilation", type=int, default=1, help="largest dilation over the heads")
    p.add_argument("--globals", type=int, default=64, help="G, global tokens")
    p.add_argument("--bytes", type=int, default=2, help="bytes per element of q/k/v/output (2: bf16)")
    p.add_argument("--grad-bytes", type=int, default=4,
                   help="bytes per element of gradients accumulated over ranks (4: float32, as sent by "
                        "longformer_ext.distributed and torch's ring)")
    p.add_argument("--seqlens", type=int, nargs="+", default=SEQLENS, help="N values")
    p.add_argument("--ranks", type=int, nargs="+", default=RANKS, help="P values")
    p.add_argument("--windows", type=int, nargs="+", default=HALO_WINDOWS, help="windows of the halo table")
    p.add_argument("--dilations", type=int, nargs="+", default=HALO_DILATIONS, help="dilations of the halo table")
    p.add_argument("--md", type=Path, default=HERE / "results" / "cp_volumes.md")
    p.add_argument("--json", type=Path, default=HERE / "results" / "cp_volumes.json")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    s = Setting(a.heads, a.heads_kv, a.head_dim, a.left, a.right, a.dilation, a.globals, a.bytes, a.grad_bytes)
    rows = sweep(s, a.seqlens, a.ranks)
    windows = halo_window_table(s, a.seqlens, a.ranks, a.windows, a.dilations)
    markdown = header(s) + "\n" + main_table(rows) + "\n\n" + window_table(s, windows, a.seqlens, a.ranks) + "\n"
    a.md.parent.mkdir(parents=True, exist_ok=True)
    a.md.write_text(markdown)
    a.json.parent.mkdir(parents=True, exist_ok=True)
    setting = asdict(s) | {"reach_left": s.reach_left, "reach_right": s.reach_right, "acc_bytes": ACC_BYTES}
    a.json.write_text(json.dumps({"computed_not_measured": True, "setting": setting,
                                  "rows": [asdict(r) for r in rows], "halo_windows": windows}, indent=1) + "\n")
    print(markdown)
    print(f"wrote {a.md} and {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
