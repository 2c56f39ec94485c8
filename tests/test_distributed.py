"""longformer_ext.distributed on gloo: 2, 3 and 4 processes on this machine, each case checked
against the single-process op on every rank (tests/distributed_cases.py); DTensor inputs,
torch.compile(fullgraph=True) of a sharded layer, and broken programs that must fail rather than
hang. One spawn per world size runs all its cases (process start-up dominates)."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import distributed_cases as dc

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

# Absolute for float64 and float32; for half precision relative to 1 + the largest value, with
# tests/conftest.py's bounds (a few roundings of the result and of the gradients it reads back).
TOLERANCE = {"float64": 1e-12, "float32": 1e-5, "bfloat16": 2.56 * 2 ** -7, "float16": 2.56 * 2 ** -10}


def _spawn(fn, world: int, *args) -> list:
    """Runs fn(rank, world, rendezvous, *args, results) in `world` processes; their reports."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(fn, args=(world, os.path.join(tmp, "rendezvous"), *args, tmp), nprocs=world, join=True)
        reports = []
        for rank in range(world):
            with open(os.path.join(tmp, f"rank{rank}.json")) as f:
                reports.append(json.load(f))
        return reports


_reports = {}


def _case_reports(world: int) -> list:
    if world not in _reports:
        names = [name for name, case in dc.CASES.items() if case.world == world]
        _reports[world] = [r["report"] for r in _spawn(dc.worker, world, names)]
    return _reports[world]


@pytest.mark.parametrize("name", list(dc.CASES))
def test_sharded_equals_single_process(name):
    case = dc.CASES[name]
    reports = _case_reports(case.world)
    bound = TOLERANCE[case.dtype]
    rows = [r[name]["rows"] for r in reports]
    assert sum(rows) == case.seqlen
    for rank, report in enumerate(reports):
        errors = {k: v for k, v in report[name].items() if k not in ("rows", "digest")}
        expected = {"out", "grad_q", "grad_k", "grad_v"} | ({"lse"} if case.return_lse else set()) | (
            {"grad_global_q", "grad_global_k", "grad_global_v"} if case.projections else set()) | (
            {"grad_sinks"} if case.sinks else set())
        assert set(errors) == expected, f"rank {rank} checked {sorted(errors)}"
        for what, err in errors.items():
            assert err <= bound, f"{name}, rank {rank} ({rows[rank]} rows): {what} differs by {err:.3e} > {bound}"


@pytest.mark.parametrize("world", [2, 3, 4])
def test_repeated_call_is_bitwise_identical(world):
    """For a fixed number of ranks the result is deterministic: a case run twice gives the same
    output and gradients, bit for bit."""
    assert all(report["repeat"] for report in _case_reports(world))


def test_cases_cover_the_hard_layouts():
    """The case list keeps the layouts that broke prototypes: empty shards, halos wider than a shard."""
    from longformer_ext.distributed import shard_bounds

    cases = dc.CASES.values()
    assert {c.world for c in cases} == {2, 3, 4}
    assert any(0 in [e - s for s, e in shard_bounds(c.seqlen, c.world, c.sizes)] for c in cases)
    widest = [max(c.window if isinstance(c.window, int) else max(c.window), 0) *
              (max(c.dilation) if isinstance(c.dilation, list) else c.dilation) for c in cases]
    smallest = [min(e - s for s, e in shard_bounds(c.seqlen, c.world, c.sizes) if e > s) for c in cases]
    assert any(w > s for w, s in zip(widest, smallest))


def test_dtensor_in_dtensor_out():
    for rank, report in enumerate(_spawn(dc.dtensor_worker, 3)):
        assert report["sharded_on_sequence"], report
        assert report["shape"] == [2, 2, 37, 8]
        assert report["unshard"] and report["shard_rows"] == [5, 0, 32][rank], report
        assert report["out"] <= 1e-12 and report["grads"] <= 1e-12, (rank, report)


def test_compiled_fullgraph_layer():
    for rank, report in enumerate(_spawn(dc.compile_worker, 2)):
        assert report["out"] <= 1e-5 and report["grad_x"] <= 1e-5, (rank, report)


def test_misuse_fails_instead_of_hanging():
    reports = _spawn(dc.misuse_worker, 2)
    for report in reports:
        assert "ranks disagree" in report["mismatch"], report
    assert reports[0]["skipped"] == "RuntimeError", reports[0]
    assert reports[0]["seconds"] < 30, reports[0]


def test_shard_bounds():
    from longformer_ext.distributed import shard_bounds

    assert shard_bounds(10, 4) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert shard_bounds(5, 4) == [(0, 2), (2, 4), (4, 5), (5, 5)]  # torch.chunk: the last shard empty
    assert [tuple(c.shape)[0] for c in torch.arange(5).chunk(4)] == [2, 2, 1]
    assert shard_bounds(7, 3, [0, 7, 0]) == [(0, 0), (0, 7), (7, 7)]
    with pytest.raises(ValueError, match="adding up to 7"):
        shard_bounds(7, 3, [1, 2, 3])


def test_example_sharded_training_step():
    """The README's torchrun command: a char-LM training step split over 2 processes equals the
    one-process step (--check makes the example exit 1 otherwise)."""
    example = Path(__file__).resolve().parents[1] / "examples" / "sharded_char_lm_step.py"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(example),
         "--check", "--tokens", "600", "--layers", "2", "--dim", "32", "--repeats", "1"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "sharded step equals the one-process step" in result.stdout


def test_unsupported_arguments_are_refused_by_name():
    """Refused before any collective, so no process group is needed to see the errors."""
    from longformer_ext import distributed as lfd

    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(NotImplementedError, match="q_offset"):
        lfd.longformer_attention(q, q, q, 2, q_offset=0)
    with pytest.raises(NotImplementedError, match="cu_seqlens"):
        lfd.longformer_attention(q, q, q, 2, cu_seqlens=torch.tensor([0, 8]))
    with pytest.raises(ValueError, match="same shard"):
        lfd.longformer_attention(q, torch.randn(1, 2, 9, 4), torch.randn(1, 2, 9, 4), 2)
    with pytest.raises(TypeError, match="plan must come from"):
        lfd.longformer_attention(q, q, q, 2, plan=object())


@pytest.mark.parametrize("small_blocks", [False, True])
def test_partial_attention_and_its_backward(monkeypatch, small_blocks):
    """The global-token pieces (local rows x global keys, global rows x a shard's keys): forward
    against a direct computation, the hand-written backward (from the lse) against autograd of it;
    GQA, softcap, ALiBi, a row without keys; in one block and in many (rows and keys split)."""
    from longformer_ext._softmax import masked_logsumexp, masked_softmax
    from longformer_ext.distributed import _partial

    if small_blocks:
        monkeypatch.setattr(_partial, "_PAIRS_PER_BLOCK", 6)
        monkeypatch.setattr(_partial, "_KEYS_PER_BLOCK", 4)
    gen = torch.Generator().manual_seed(0)
    b, h, h_kv, m, s, d = 2, 4, 2, 7, 9, 5
    q = torch.randn(b, h, m, d, generator=gen, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(b, h_kv, s, d, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    q_pos = torch.randint(0, 50, (b, m), generator=gen)
    k_pos = torch.randint(0, 50, (b, s), generator=gen)
    allowed = torch.rand(b, m, s, generator=gen) < 0.6
    allowed[1, 3] = False
    terms = _partial.ScoreTerms(0.4, 1.5, torch.rand(h, generator=gen, dtype=torch.float64))

    scores = 0.4 * q @ k.repeat_interleave(h // h_kv, dim=1).transpose(-1, -2)
    scores = 1.5 * torch.tanh(scores / 1.5)
    scores = scores - terms.alibi_slopes[:, None, None] * (q_pos[:, None, :, None] - k_pos[:, None, None, :]).abs()
    mask = allowed[:, None]
    expected = masked_softmax(scores, mask) @ v.repeat_interleave(h // h_kv, dim=1)
    expected_lse = masked_logsumexp(scores, mask)
    seed = torch.randn(b, h, m, d, generator=gen, dtype=torch.float64)
    seed_lse = torch.randn(b, h, m, generator=gen, dtype=torch.float64).masked_fill(~torch.isfinite(expected_lse), 0)
    ((expected * seed).sum() + (torch.where(torch.isfinite(expected_lse), expected_lse, 0) * seed_lse).sum()).backward()

    with torch.no_grad():
        out, lse = _partial.partial_attention(q, q_pos, k, v, k_pos, allowed, terms)
        grads = _partial.partial_attention_backward(seed, seed_lse, q, q_pos, k, v, k_pos, allowed, terms, out, lse)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-13)
    assert torch.equal(torch.isinf(lse), torch.isinf(expected_lse)) and torch.isinf(lse[1, :, 3]).all()
    torch.testing.assert_close(lse[torch.isfinite(lse)], expected_lse[torch.isfinite(lse)], rtol=0, atol=1e-13)
    for ours, leaf in zip(grads, (q, k, v)):
        torch.testing.assert_close(ours, leaf.grad, rtol=0, atol=1e-12)
