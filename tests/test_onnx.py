"""longformer_ext.onnx: ONNX exports of the ops and of patched Hugging Face models, run in ONNX Runtime
(CPU), against PyTorch; and the exported graphs' memory: no intermediate grows like N^2.

Every export is made at one (batch, sequence) size and run at others, so dynamic axes are tested.
Skipped without onnx / onnxruntime / onnxscript, unless LONGFORMER_REQUIRE_ONNX=1 (CI), which makes a
missing package a failure.
"""

import contextlib
import copy
import importlib
import io
import json
import os

import numpy as np
import pytest
import torch


def _require(name):
    if os.environ.get("LONGFORMER_REQUIRE_ONNX") == "1":
        return importlib.import_module(name)  # an ImportError fails the run
    return pytest.importorskip(name)


onnx = _require("onnx")
ort = _require("onnxruntime")
_require("onnxscript")

import longformer_ext.onnx as lfo  # noqa: E402
from longformer_ext import longformer_attention  # noqa: E402

ATOL = RTOL = 1e-4

pytestmark = [
    pytest.mark.usefixtures("one_thread_per_module"),
    # torch.onnx names shared dynamic axes once and warns about every other input that uses them.
    pytest.mark.filterwarnings("ignore:# The axis name"),
    pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated:FutureWarning"),
]


def _session(path, profile=False):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # tiny graphs on a shared machine
    options.inter_op_num_threads = 1
    options.enable_profiling = profile
    if profile:
        options.profile_file_prefix = str(path) + ".profile"
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _run(session, feeds):
    names = {i.name for i in session.get_inputs()}
    return session.run(None, {name: value.numpy() for name, value in feeds.items() if name in names})


def _quiet_export(*args, **kwargs):
    with contextlib.redirect_stdout(io.StringIO()):
        return lfo.export(*args, **kwargs)


# ------------------------------------------------------------------------------------------------
# Op level: longformer_attention in every mode


class Attention(torch.nn.Module):
    """longformer_attention with one mode's static arguments; tensors are the inputs."""

    def __init__(self, window, dilation=1, causal=False, padding=True, globals_=True, projections=False):
        super().__init__()
        self.window, self.dilation, self.causal = window, dilation, causal
        self.padding, self.globals_, self.projections = padding, globals_, projections

    def forward(self, q, k, v, attention_mask, global_attention_mask, global_q, global_k, global_v):
        kwargs = {}
        if self.projections:
            kwargs = dict(global_q=global_q, global_k=global_k, global_v=global_v)
        return longformer_attention(q, k, v, self.window, dilation=self.dilation, causal=self.causal,
                                    attention_mask=attention_mask if self.padding else None,
                                    global_attention_mask=global_attention_mask if self.globals_ else None,
                                    **kwargs)


HEADS, DIM = 4, 8

# Each mode is exported at (B, N) = (2, 13); RUN_SIZES then differ in both. The windows make 13, 29
# and 70 non-multiples, and 5 is shorter than every window but (1, 0).
MODES = {
    "symmetric": dict(window=4),
    "asymmetric": dict(window=(3, 6)),
    "causal": dict(window=(5, 0), causal=True),
    "causal_wide_right": dict(window=(4, 3), causal=True),  # causal cuts the right side
    # Heads grouped by dilation run as [0, 3 | 1 | 2]: putting them back needs the inverse permutation.
    "dilation_per_head": dict(window=(3, 2), dilation=[1, 3, 2, 1]),
    "dilation_shared": dict(window=3, dilation=2, causal=True),
    "global_projections": dict(window=2, projections=True),
    "window_wider_than_n": dict(window=40, dilation=[1, 3, 1, 2], projections=True),
    "no_masks": dict(window=(1, 0), padding=False, globals_=False),
    "globals_without_padding": dict(window=3, padding=False),
}
EXPORT_SIZE = (2, 13)
RUN_SIZES = [(4, 29), (1, 70), (3, 5)]


def op_inputs(batch, n, seed, dtype=torch.float32):
    """q, k, v, masks and global projections. Row 0 is full length with several global tokens, row 1
    is full length without any global token, row 2 is entirely padding, row 3 is padded at random and
    has a global token on padding."""
    gen = torch.Generator().manual_seed(seed)
    heads = [torch.randn(batch, HEADS, n, DIM, generator=gen).to(dtype) for _ in range(6)]
    lengths = torch.randint(1, n + 1, (batch,), generator=gen)
    lengths[:2] = n
    if batch > 2:
        lengths[2] = 0
    attention_mask = (torch.arange(n)[None] < lengths[:, None]).to(torch.int64)
    glob = torch.rand(batch, n, generator=gen) < 0.2
    glob[0, 0] = glob[0, n - 1] = True
    if batch > 1:
        glob[1] = False
    if batch > 3:
        glob[3, n - 1] = True  # padding wins
    q, k, v, gq, gk, gv = heads
    return dict(q=q, k=k, v=v, attention_mask=attention_mask, global_attention_mask=glob, global_q=gq,
                global_k=gk, global_v=gv)


def _op_dynamic_shapes():
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    heads = {0: batch, 2: sequence}
    mask = {0: batch, 1: sequence}
    return (heads, heads, heads, mask, mask, heads, heads, heads)


def export_op_module(module, path, example=None):
    module.eval()
    example = op_inputs(*EXPORT_SIZE, seed=0) if example is None else example
    _quiet_export(module, tuple(example.values()), path, dynamic_shapes=_op_dynamic_shapes())
    return _session(path)


@pytest.fixture(scope="module")
def exported_modes(tmp_path_factory):
    """Exports each mode once (lazily) for all the tests that use it."""
    cache = {}
    root = tmp_path_factory.mktemp("onnx_modes")

    def get(name):
        """(module, session, path of the .onnx file)."""
        if name not in cache:
            module = Attention(**MODES[name]).eval()
            path = root / f"{name}.onnx"
            cache[name] = module, export_op_module(module, path), path
        return cache[name]

    return get


@pytest.mark.parametrize("mode", list(MODES))
def test_op_modes_match_pytorch_at_other_sizes(mode, exported_modes):
    module, session, _ = exported_modes(mode)
    for batch, n in RUN_SIZES:
        feeds = op_inputs(batch, n, seed=n)
        expected = module(*feeds.values())
        (actual,) = _run(session, feeds)
        assert actual.shape == (batch, HEADS, n, DIM)
        assert np.isfinite(actual).all(), f"{mode} B={batch} N={n}: non-finite values"
        torch.testing.assert_close(torch.from_numpy(actual), expected, atol=ATOL, rtol=RTOL,
                                   msg=lambda m: f"{mode} B={batch} N={n}: {m}")
        if batch > 2 and module.padding:  # the all-padding row is exactly 0
            assert not actual[2].any()


@pytest.mark.parametrize("mode", ["dilation_per_head", "global_projections", "causal"])
def test_op_empty_batch_and_sequence(mode, exported_modes):
    """N = 0 and B = 0 run and give empty outputs of the right shape."""
    module, session, _ = exported_modes(mode)
    full = op_inputs(2, 7, seed=1)
    for feeds in ({name: (t[:, :, :0] if t.dim() == 4 else t[:, :0]) for name, t in full.items()},
                  {name: t[:0] for name, t in full.items()}):
        (actual,) = _run(session, feeds)
        assert actual.shape == tuple(module(*feeds.values()).shape)


def test_op_float64_matches_pytorch(tmp_path):
    """float64 inputs accumulate in float64, as the kernels do."""
    module = Attention(window=(2, 3), dilation=[2, 1, 1, 3], causal=True, projections=True)
    session = export_op_module(module, tmp_path / "f64.onnx", op_inputs(*EXPORT_SIZE, seed=0, dtype=torch.float64))
    feeds = op_inputs(3, 31, seed=5, dtype=torch.float64)
    (actual,) = _run(session, feeds)
    assert actual.dtype == np.float64
    torch.testing.assert_close(torch.from_numpy(actual), module(*feeds.values()), atol=1e-10, rtol=1e-10)


class RawOps(torch.nn.Module):
    """Both outputs of the op, lse included, without and with global projections."""

    def forward(self, q, k, v, attention_mask, global_attention_mask, global_q, global_k, global_v):
        out, lse = torch.ops.longformer.banded_attn(q, k, v, 2, 3, [1, 2, 1, 1], attention_mask, global_attention_mask,
                                                    False, 0.3)
        out2, lse2 = torch.ops.longformer.banded_attn(q, k, v, 2, 3, [1, 2, 1, 1], attention_mask,
                                                      global_attention_mask, False, 0.3, global_q, global_k, global_v)
        return out, lse, out2, lse2


def test_op_lse_outputs_match_pytorch(tmp_path):
    module = RawOps()
    session = export_op_module(module, tmp_path / "raw.onnx")
    for batch, n in RUN_SIZES[:2]:
        feeds = op_inputs(batch, n, seed=n + 1)
        for name, actual, expected in zip(("out", "lse", "projected out", "projected lse"), _run(session, feeds),
                                          module(*feeds.values())):
            actual = torch.from_numpy(actual)
            # -inf exactly where PyTorch has -inf (padding rows of lse), close elsewhere.
            assert torch.equal(torch.isneginf(actual), torch.isneginf(expected)), name
            finite = torch.isfinite(expected)
            torch.testing.assert_close(actual[finite], expected[finite], atol=ATOL, rtol=RTOL,
                                       msg=lambda m: f"{name}: {m}")


def test_an_off_by_one_band_is_caught(tmp_path, monkeypatch):
    """The comparison is sharp enough: a translation whose band is one key short on the right fails."""
    original = lfo._blocked_attention

    def short_band(q, k, v, key_ok, left, right, *rest):
        return original(q, k, v, key_ok, left, max(right - 1, 0), *rest)

    monkeypatch.setattr(lfo, "_blocked_attention", short_band)
    module = Attention(**MODES["asymmetric"])
    session = export_op_module(module, tmp_path / "wrong.onnx")
    feeds = op_inputs(3, 29, seed=29)
    (actual,) = _run(session, feeds)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(torch.from_numpy(actual), module(*feeds.values()), atol=ATOL, rtol=RTOL)


# ------------------------------------------------------------------------------------------------
# Memory: no intermediate of the exported graph grows like N^2


def intermediate_sizes(path, feeds):
    """{node name: elements of its largest output} for one run, from ONNX Runtime's profile (the
    graph as ONNX Runtime executes it, after its own optimisations)."""
    session = _session(path, profile=True)
    _run(session, feeds)
    with open(session.end_profiling()) as f:
        events = json.load(f)
    sizes = {}
    for event in events:
        if event.get("cat") != "Node" or "output_type_shape" not in event.get("args", {}):
            continue
        for output in event["args"]["output_type_shape"]:
            for shape in output.values():
                sizes[event["name"]] = max(sizes.get(event["name"], 0), int(np.prod(shape, dtype=np.int64)))
    assert sizes, "the profile recorded no node outputs"
    return sizes


def assert_linear_in_n(path, make_feeds, n):
    """Runs at N and 2N (same batch and global tokens): every intermediate may at most double.
    An [N, N] intermediate (dense scores or a pair mask) quadruples."""
    small, large = intermediate_sizes(path, make_feeds(n)), intermediate_sizes(path, make_feeds(2 * n))
    assert small.keys() == large.keys()
    grown = {name: large[name] / small[name] for name in small if small[name] > 0}
    worst = max(grown, key=grown.get)
    assert grown[worst] <= 2.0 + 1e-9, (f"{worst} grows {grown[worst]:.2f}x from N={n} to N={2 * n} "
                                        f"({small[worst]} -> {large[worst]} elements): quadratic in N")
    return max(large.values())


def _fixed_global_feeds(batch, n):
    """Inputs whose global tokens (positions 0, 5, 17) and padding (last 11 keys of row 1) do not
    depend on N beyond the sequence itself."""
    feeds = op_inputs(batch, n, seed=3)
    glob = torch.zeros(batch, n, dtype=torch.bool)
    glob[0, [0, 5, 17]] = True
    glob[1, 0] = True
    feeds["global_attention_mask"] = glob
    feeds["attention_mask"] = torch.ones(batch, n, dtype=torch.int64)
    feeds["attention_mask"][1, -11:] = 0
    return feeds


def test_op_graph_memory_is_linear_in_n(exported_modes):
    # Dilations 1, 2, 3 and blocks of 32 rows: N = 384 and 768 fill whole blocks in every residue
    # class, so no padding rounds the sizes.
    _, _, path = exported_modes("dilation_per_head")
    largest = assert_linear_in_n(path, lambda n: _fixed_global_feeds(2, n), 384)
    n = 768
    assert largest < 2 * HEADS * n * n / 8, "an intermediate is as large as a fraction of [B, H, N, N]"


class DenseAttention(torch.nn.Module):
    """Plain masked attention ([N, N] scores): what the memory check must reject."""

    def forward(self, q, k, v, attention_mask, global_attention_mask, global_q, global_k, global_v):
        mask = (attention_mask != 0)[:, None, None, :]
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def test_memory_check_rejects_dense_attention(tmp_path):
    path = tmp_path / "dense.onnx"
    export_op_module(DenseAttention(), path)
    with pytest.raises(AssertionError, match="quadratic"):
        assert_linear_in_n(path, lambda n: _fixed_global_feeds(2, n), 64)


# ------------------------------------------------------------------------------------------------
# Export helper


def test_export_helper_errors(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="opset"):
        lfo.export(Attention(window=2), tuple(op_inputs(2, 5, 0).values()), opset_version=17)
    with pytest.raises(ValueError, match="dynamic_shapes"):
        lfo.export(Attention(window=2), tuple(op_inputs(2, 5, 0).values()), dynamic_shapes="batch")
    monkeypatch.setattr(lfo, "_IMPORT_ERROR", ImportError("No module named 'onnxscript'"))
    with pytest.raises(ImportError, match="pip install onnx onnxscript"):
        lfo.export(Attention(window=2), tuple(op_inputs(2, 5, 0).values()), tmp_path / "x.onnx")
    with pytest.raises(ImportError, match="pip install onnx onnxscript"):
        lfo.translation_table()


@pytest.mark.parametrize("mode", ["dilation_per_head", "global_projections"])
def test_translation_uses_standard_operators_only(mode, exported_modes):
    """No custom domain: every node is an ai.onnx operator (or a function defined in the file)."""
    _, _, path = exported_modes(mode)
    model = onnx.load(str(path))
    domains = {node.domain for node in model.graph.node} | {f.domain for f in model.functions}
    assert domains <= {"", "ai.onnx"}, domains
    onnx.checker.check_model(model, full_check=True)


# ------------------------------------------------------------------------------------------------
# Model level: patched Hugging Face models


try:  # the op-level tests above run without transformers
    from transformers import (
        LEDConfig, LEDModel, LongformerConfig, LongformerForSequenceClassification, LongformerModel,
    )

    from longformer_ext.integrations.transformers import patch
except ImportError:
    LongformerModel = None

requires_transformers = pytest.mark.skipif(LongformerModel is None, reason="transformers is not installed")

VOCAB, PAD = 60, 1
MODEL_EXPORT_SIZE = (2, 21)  # 21: not a multiple of the windows 8 and 16
MODEL_RUN_SIZES = [(3, 37), (4, 50)]


def longformer_config(**overrides):
    config = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                  attention_window=[8, 16], max_position_embeddings=800, pad_token_id=PAD, bos_token_id=0,
                  eos_token_id=2, sep_token_id=2, type_vocab_size=1, num_labels=3)
    config.update(overrides)
    return LongformerConfig(**config)


def led_config():
    return LEDConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
                     decoder_attention_heads=2, encoder_ffn_dim=48, decoder_ffn_dim=48, attention_window=[8, 16],
                     max_encoder_position_embeddings=800, max_decoder_position_embeddings=32, pad_token_id=PAD,
                     bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)


def model_inputs(batch, n, seed=0):
    """input_ids with padding (rows of n, n-5, n-2, n-7 tokens) and 3, 1, 2, 1 global tokens per row."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, n), generator=gen)
    ids[:, 0] = 0
    lengths = torch.tensor([n, n - 5, n - 2, n - 7][:batch])
    attention_mask = (torch.arange(n)[None] < lengths[:, None]).to(torch.int64)
    ids = ids.masked_fill(attention_mask == 0, PAD)
    glob = torch.zeros(batch, n, dtype=torch.int64)
    glob[:, 0] = 1
    glob[0, [4, n - 1]] = 1
    if batch > 2:
        glob[2, 6] = 1
    return dict(input_ids=ids, attention_mask=attention_mask, global_attention_mask=glob)


def export_model(model, path):
    example = model_inputs(*MODEL_EXPORT_SIZE)
    ids = example.pop("input_ids")
    _quiet_export(model, (ids,), path, kwargs=example)
    return _session(path)


@pytest.fixture(scope="module")
def longformer_pair(tmp_path_factory):
    torch.manual_seed(0)
    reference = LongformerModel(longformer_config()).eval()
    patched = patch(copy.deepcopy(reference))
    path = tmp_path_factory.mktemp("onnx_models") / "longformer.onnx"
    return reference, patched, export_model(patched, path), path


def _check_model(model, session, outputs, reference=None):
    for batch, n in MODEL_RUN_SIZES:
        feeds = model_inputs(batch, n, seed=n)
        actual = _run(session, feeds)
        with torch.no_grad():
            expected = model(**feeds)
            unpatched = reference(**feeds) if reference is not None else None
        for index, name in enumerate(outputs):
            got = torch.from_numpy(actual[index])
            torch.testing.assert_close(got, getattr(expected, name), atol=ATOL, rtol=RTOL,
                                       msg=lambda m: f"{name} B={batch} N={n}: {m}")
            if unpatched is not None:
                torch.testing.assert_close(got, getattr(unpatched, name), atol=ATOL, rtol=RTOL,
                                           msg=lambda m: f"{name} (unpatched) B={batch} N={n}: {m}")


@requires_transformers
def test_longformer_model_matches_pytorch(longformer_pair):
    reference, patched, session, _ = longformer_pair
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask", "global_attention_mask"]
    _check_model(patched, session, ["last_hidden_state", "pooler_output"], reference=reference)


@requires_transformers
def test_longformer_for_sequence_classification_matches_pytorch(tmp_path):
    torch.manual_seed(1)
    model = patch(LongformerForSequenceClassification(longformer_config()).eval())
    session = export_model(model, tmp_path / "classification.onnx")
    _check_model(model, session, ["logits"])


@requires_transformers
def test_led_encoder_matches_pytorch(tmp_path):
    torch.manual_seed(2)
    encoder = patch(LEDModel(led_config()).eval()).get_encoder()
    session = export_model(encoder, tmp_path / "led_encoder.onnx")
    _check_model(encoder, session, ["last_hidden_state"])


@requires_transformers
def test_longformer_model_graph_memory_is_linear_in_n(longformer_pair):
    *_, path = longformer_pair

    def feeds(n):
        inputs = model_inputs(2, n, seed=4)
        inputs["global_attention_mask"][:] = 0
        inputs["global_attention_mask"][:, [0, 7]] = 1  # the same global tokens at both lengths
        return inputs

    assert_linear_in_n(path, feeds, 192)
