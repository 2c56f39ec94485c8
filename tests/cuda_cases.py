"""Cases and references shared by the CUDA tests (host-emulated and on a GPU)."""

import random

import torch

from conftest import Case
from longformer_ext._args import check_attention_args, token_roles
from longformer_ext.reference.dense import allowed_pairs

HALF_TYPES = (torch.float16, torch.bfloat16)


def same_dtype_reference(q, k, v, window, *, dilation=1, attention_mask=None, global_attention_mask=None,
                         global_q=None, global_k=None, global_v=None, causal=False, scale=None):
    """The dense attention computed by PyTorch in the inputs' own dtype: the error budget for half types."""
    args = check_attention_args(q, k, v, window, dilation, attention_mask, global_attention_mask, global_q, global_k,
                                global_v, causal, scale)
    real, glob = token_roles(q, attention_mask, global_attention_mask)
    local_allowed, global_allowed = allowed_pairs(q, args.window_left, args.window_right, args.dilation, real, glob,
                                                  causal)

    def attend(q_, k_, v_, allowed):
        scores = (q_ @ k_.transpose(-1, -2)) * args.scale
        scores = torch.where(allowed.any(-1, keepdim=True), scores.masked_fill(~allowed, float("-inf")), 0.0)
        return (torch.softmax(scores, dim=-1) * allowed) @ v_

    gq, gk, gv = (q, k, v) if global_q is None else (global_q, global_k, global_v)
    local_row = (real & ~glob)[:, None, :, None]
    zero = q.new_zeros(())
    return torch.where(local_row, attend(q, k, v, local_allowed),
                       torch.where(glob[:, None, :, None], attend(gq, gk, gv, global_allowed), zero))


def random_small_case(rng: random.Random, seed: int) -> Case:
    """Small shapes (the emulation runs every CUDA thread as a fiber) covering every mode."""
    seqlen = rng.choice([1, 3, 17, 40, 64, 65, 100, 130, 257])
    heads = rng.randint(1, 3)
    dim = rng.choice([32, 64, 64, 40, 13, 128])
    w = rng.randint(1, 40)
    window = rng.choice([0, w, (w, rng.randint(0, 40)), (w, 0), seqlen + rng.randint(0, 20), w])
    dilation = rng.choice([1, 1, rng.randint(2, 4), [rng.randint(1, 4) for _ in range(heads)]])
    return Case(batch=rng.randint(1, 2), heads=heads, seqlen=seqlen, dim=dim, window=window, dilation=dilation,
                causal=rng.random() < 0.3, globals=rng.choice(["none", "one", "many", "edges", "all", "none"]),
                padding=rng.random() < 0.4, global_projections=rng.random() < 0.4,
                dtype=rng.choice([torch.float32, torch.float32, torch.float64, torch.float16, torch.bfloat16]),
                layout=rng.choice(["contiguous", "head_split", "sliced"]), seed=seed)


def small_cases(count, seed):
    rng = random.Random(seed + 4242)
    return [random_small_case(rng, seed * 100003 + i) for i in range(count)]
