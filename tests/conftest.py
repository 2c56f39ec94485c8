"""Shared test helpers: per-dtype tolerances, seeded random cases, input builders.

Environment:
  LONGFORMER_SWEEP_COUNT  number of random cases in the oracle sweep (default 150)
  LONGFORMER_SEED         seed of the sweep (default 0); a long run is e.g.
                          LONGFORMER_SWEEP_COUNT=2000 LONGFORMER_SEED=7 pytest tests/test_sweep.py
"""

import os
import random
from dataclasses import dataclass, field
from typing import Optional

import pytest
import torch

SWEEP_COUNT = int(os.environ.get("LONGFORMER_SWEEP_COUNT", "150"))
SEED = int(os.environ.get("LONGFORMER_SEED", "0"))

# The dtypes the CPU kernels take; float16 and bfloat16 are computed in float32 and rounded on store.
CPU_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
HALF_PRECISION = (torch.float16, torch.bfloat16)

# Allowed max |ours - oracle| relative to (1 + max |oracle|), per input dtype. A half-precision
# result is bounded by a few roundings to its own precision (eps = 2^-7 for bfloat16's 8 significant
# bits, 2^-10 for float16's 11): of the result, and in the backward of the out and dO it reads
# back, so 2.56 eps (2e-2 for bfloat16, 2.5e-3 for float16; sweeps of seeds 0-3 stay under 0.7 eps).
TOLERANCE = {torch.float64: 1e-10, torch.float32: 3e-5,
             **{dtype: 2.56 * torch.finfo(dtype).eps for dtype in HALF_PRECISION}}


def assert_close_to_oracle(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = ""):
    expected = expected.double()
    err = (actual.double() - expected).abs().max().item() if expected.numel() else 0.0
    bound = TOLERANCE[dtype] * (1.0 + (expected.abs().max().item() if expected.numel() else 0.0))
    assert err <= bound, f"{what}: max abs error {err:.3e} > {bound:.3e} ({dtype})"


@dataclass
class Case:
    batch: int
    heads: int
    seqlen: int
    dim: int
    window: object
    dilation: object = 1
    causal: bool = False
    globals: str = "none"  # none | one | many | edges | all
    padding: bool = False
    global_projections: bool = False
    dtype: torch.dtype = torch.float32
    layout: str = "contiguous"  # contiguous | head_split (view of [B, N, H*D]) | sliced (row stride 2D)
    seed: int = 0
    kwargs: dict = field(default_factory=dict)

    def __str__(self):
        return (f"B{self.batch}H{self.heads}N{self.seqlen}D{self.dim}-w{self.window}-d{self.dilation}"
                f"{'-causal' if self.causal else ''}-g{self.globals}{'-pad' if self.padding else ''}"
                f"{'-gproj' if self.global_projections else ''}-{str(self.dtype)[6:]}-{self.layout}")


def random_case(rng: random.Random, seed: int) -> Case:
    big = rng.random() < 0.08
    seqlen = rng.choice([1000, 1537, 2049, 3001]) if big else rng.choice(
        [1, 2, 3, 5, 8, 13, 31, 64, 65, 100, 127, 200, 257, 333, 513, 700])
    heads = 1 if big else rng.randint(1, 4)
    batch = 1 if big else rng.randint(1, 3)
    dim = rng.choice([8, 16, 32]) if big else rng.choice([8, 13, 16, 31, 64, 128])
    kind = rng.choice(["zero", "symmetric", "asymmetric", "causal", "huge", "symmetric"])
    w = rng.randint(1, 80)
    window = {"zero": 0, "symmetric": w, "asymmetric": (w, rng.randint(0, 80)), "causal": (w, 0),
              "huge": seqlen + rng.randint(0, 50)}[kind]
    dilation = rng.choice([1, 1, rng.randint(2, 4), [rng.randint(1, 4) for _ in range(heads)]])
    return Case(batch=batch, heads=heads, seqlen=seqlen, dim=dim, window=window, dilation=dilation,
                causal=rng.random() < 0.3, globals=rng.choice(["none", "one", "many", "edges", "all", "none"]),
                padding=rng.random() < 0.4, global_projections=rng.random() < 0.4,
                dtype=rng.choice([torch.float32, torch.float32, torch.float64, torch.float16, torch.bfloat16]),
                layout=rng.choice(["contiguous", "head_split", "sliced"]), seed=seed)


def sweep_cases(count: int = SWEEP_COUNT, seed: int = SEED):
    rng = random.Random(seed)
    return [random_case(rng, seed * 100003 + i) for i in range(count)]


def make_heads(case: Case, gen: torch.Generator, requires_grad: bool = True) -> torch.Tensor:
    b, h, n, d = case.batch, case.heads, case.seqlen, case.dim
    if case.layout == "head_split":
        t = torch.randn(b, n, h * d, generator=gen).view(b, n, h, d).transpose(1, 2)
    elif case.layout == "sliced":
        t = torch.randn(b, h, n, 2 * d, generator=gen)[..., :d]
    else:
        t = torch.randn(b, h, n, d, generator=gen)
    t = t.to(case.dtype)
    if case.layout != "contiguous":  # .to() may have made a copy; restore the intended strides
        t = torch.empty_strided(t.shape, _strides(case), dtype=case.dtype).copy_(t)
    return t.requires_grad_(requires_grad)


def _strides(case: Case):
    b, h, n, d = case.batch, case.heads, case.seqlen, case.dim
    if case.layout == "head_split":
        return (n * h * d, d, h * d, 1)
    return (h * n * 2 * d, n * 2 * d, 2 * d, 1)


def make_masks(case: Case, gen: torch.Generator):
    b, n = case.batch, case.seqlen
    attention_mask = None
    if case.padding:
        lengths = torch.randint(0, n + 1, (b,), generator=gen)
        attention_mask = (torch.arange(n)[None, :] < lengths[:, None]).to(torch.int64)
    glob = torch.zeros(b, n, dtype=torch.bool)
    if case.globals == "one":
        glob[:, torch.randint(0, n, (1,), generator=gen)] = True
    elif case.globals == "many":
        glob = torch.rand(b, n, generator=gen) < 0.15
    elif case.globals == "edges":
        glob[:, 0] = True
        glob[:, -1] = True
    elif case.globals == "all":
        glob[:] = True
    global_attention_mask = None if case.globals == "none" else glob
    return attention_mask, global_attention_mask


def make_inputs(case: Case):
    """(q, k, v, kwargs) for longformer_attention, seeded by the case."""
    gen = torch.Generator().manual_seed(case.seed)
    q, k, v = (make_heads(case, gen) for _ in range(3))
    attention_mask, global_attention_mask = make_masks(case, gen)
    kwargs = dict(dilation=case.dilation, attention_mask=attention_mask,
                  global_attention_mask=global_attention_mask, causal=case.causal)
    if case.global_projections and global_attention_mask is not None:
        kwargs.update(global_q=make_heads(case, gen), global_k=make_heads(case, gen), global_v=make_heads(case, gen))
    return q, k, v, kwargs


def differentiable_inputs(q, k, v, kwargs):
    return [q, k, v] + [kwargs[n] for n in ("global_q", "global_k", "global_v") if n in kwargs]


@pytest.fixture
def threads():
    """Restores torch's thread count after a test that changes it."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def one_thread_per_module():
    """For files of tiny tensors: one thread avoids OpenMP overhead (50x slower on a loaded 2-core
    machine); the previous count is restored for the other test files."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def load_emulation_or_skip():
    """Loads the host-emulated CUDA op library, or skips the caller (a test, or a module at import)
    when it was not built; a failure instead under LONGFORMER_REQUIRE_EMULATION=1 (what CI runs)."""
    from longformer_ext.testing import load_emulated_library
    try:
        load_emulated_library()
    except RuntimeError as exc:
        if os.environ.get("LONGFORMER_REQUIRE_EMULATION") == "1":
            pytest.fail(str(exc))
        pytest.skip(str(exc), allow_module_level=True)
