"""longformer_ext.integrations.transformers.patch: patched Hugging Face Longformer / LED models
(small, randomly initialised from configs, fp32) against the unpatched ones."""

import copy
import sys
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    LEDConfig, LEDForConditionalGeneration, LEDModel, LongformerConfig, LongformerForMaskedLM,
    LongformerForSequenceClassification, LongformerModel,
)
from transformers.models.longformer.modeling_longformer import (  # noqa: E402
    LongformerSelfAttention as HFLongformerSelfAttentionCore,
)

from longformer_ext.integrations import transformers as integration  # noqa: E402
from longformer_ext.integrations.transformers import HFLongformerSelfAttention, patch  # noqa: E402

# transformers 5 removed head masking; 4.57 applies it.
TF5 = int(transformers.__version__.split(".")[0]) >= 5
VOCAB, PAD = 60, 1
ATOL = RTOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def longformer_config(**overrides):
    config = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                  attention_window=[4, 8], max_position_embeddings=64, pad_token_id=PAD, bos_token_id=0,
                  eos_token_id=2, sep_token_id=2, type_vocab_size=1, num_labels=3)
    config.update(overrides)
    return LongformerConfig(**config)


def led_config(**overrides):
    config = dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                  decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, attention_window=[4, 8],
                  max_encoder_position_embeddings=64, max_decoder_position_embeddings=32, pad_token_id=PAD,
                  bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
    config.update(overrides)
    return LEDConfig(**config)


def pair(model_class, config, seed=0):
    """(unpatched, patched) models with the same weights, in eval mode."""
    torch.manual_seed(seed)
    reference = model_class(config).eval()
    patched = patch(copy.deepcopy(reference))
    return reference, patched


def inputs(kind, n=13, batch=3, seed=0):
    """input_ids with masks for one of the cases; n=13 is not a multiple of any window (4, 8)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, n), generator=gen)
    ids[:, 0] = 0  # <s>
    kwargs = {}
    if kind in ("padding", "mixed"):
        lengths = torch.tensor([n, n - 5, n - 2][:batch])
        mask = torch.arange(n)[None] < lengths[:, None]
        ids = ids.masked_fill(~mask, PAD)
        kwargs["attention_mask"] = mask.long()
    if kind in ("globals", "mixed"):
        glob = torch.zeros(batch, n, dtype=torch.long)
        glob[:, 0] = 1
        glob[0, [4, n - 1]] = 1          # rows with 3, 1 and 2 global tokens
        if batch > 2:
            glob[2, 6] = 1
        kwargs["global_attention_mask"] = glob
    return ids, kwargs


KINDS = ["none", "globals", "padding", "mixed"]


def _loss_and_grads(model, *out_tensors, seed=1):
    """Gradients of a fixed random projection of the outputs (each output weighted on its own)."""
    gen = torch.Generator().manual_seed(seed)
    model.zero_grad()
    sum((t * torch.randn(t.shape, generator=gen)).sum() for t in out_tensors).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(reference, patched):
    """Every parameter gradient within 1e-4 of the unpatched one, relative to that gradient's scale
    (an embedding gradient sums many fp32 contributions; its absolute rounding grows with them)."""
    assert reference.keys() == patched.keys()
    for name in reference:
        scale = max(1.0, reference[name].abs().max().item())
        torch.testing.assert_close(patched[name], reference[name], atol=ATOL * scale, rtol=RTOL,
                                   msg=lambda m: f"{name}: {m}")


# ------------------------------------------------------------------------------------------------
# Longformer


@pytest.mark.parametrize("n", [13, 16])
@pytest.mark.parametrize("kind", KINDS)
def test_longformer_model_outputs_and_gradients(kind, n):
    reference, patched = pair(LongformerModel, longformer_config())
    ids, kwargs = inputs(kind, n=n)
    outs, grads = [], []
    for model in (reference, patched):
        out = model(ids, **kwargs)
        outs.append(out)
        grads.append(_loss_and_grads(model, out.last_hidden_state, out.pooler_output))
    assert outs[1].last_hidden_state.shape == (3, n, 32)  # no padding left in the output
    torch.testing.assert_close(outs[1].last_hidden_state, outs[0].last_hidden_state, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(outs[1].pooler_output, outs[0].pooler_output, atol=ATOL, rtol=RTOL)
    assert_grads_close(*grads)


@pytest.mark.parametrize("kind", ["none", "mixed"])
def test_longformer_task_heads(kind):
    ids, kwargs = inputs(kind)
    # Sequence classification puts global attention on <s> itself when no global mask is given.
    reference, patched = pair(LongformerForSequenceClassification, longformer_config())
    labels = torch.tensor([0, 2, 1])
    results = [(m(ids, labels=labels, **kwargs), m) for m in (reference, patched)]
    grads = []
    for out, model in results:
        model.zero_grad()
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(results[1][0].logits, results[0][0].logits, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(results[1][0].loss, results[0][0].loss, atol=ATOL, rtol=RTOL)
    assert_grads_close(*grads)

    reference, patched = pair(LongformerForMaskedLM, longformer_config(), seed=1)
    labels = ids.masked_fill(torch.rand(ids.shape, generator=torch.Generator().manual_seed(0)) < 0.7, -100)
    ref_out, ours_out = (m(ids, labels=labels, **kwargs) for m in (reference, patched))
    torch.testing.assert_close(ours_out.logits, ref_out.logits, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(ours_out.loss, ref_out.loss, atol=ATOL, rtol=RTOL)


def test_longformer_head_mask_and_tuple_outputs():
    reference, patched = pair(LongformerModel, longformer_config())
    ids, kwargs = inputs("mixed")
    head_mask = torch.tensor([[1.0, 0.0, 1.0, 0.5], [0.0, 1.0, 1.0, 1.0]])
    if TF5:
        # transformers 5 ignores a head mask; the patched model refuses it instead of dropping it.
        with pytest.raises(ValueError, match="head_mask is not supported with transformers 5"):
            patched(ids, head_mask=head_mask, **kwargs)
        head_mask = None
    ref_out, ours_out = (m(ids, head_mask=head_mask, return_dict=False, output_hidden_states=True, **kwargs)
                         for m in (reference, patched))
    assert len(ref_out) == len(ours_out)
    torch.testing.assert_close(ours_out[0], ref_out[0], atol=ATOL, rtol=RTOL)
    for ref_state, our_state in zip(ref_out[2], ours_out[2]):
        torch.testing.assert_close(our_state, ref_state, atol=ATOL, rtol=RTOL)


def _compare_attentions(ref_out, ours_out, kwargs, n, prefix=""):
    real = kwargs.get("attention_mask", torch.ones(3, n, dtype=torch.long)).bool()
    glob = kwargs.get("global_attention_mask")
    ref_local, ours_local = getattr(ref_out, prefix + "attentions"), getattr(ours_out, prefix + "attentions")
    assert len(ref_local) == len(ours_local) == 2
    for layer, (ref_att, our_att) in enumerate(zip(ref_local, ours_local)):
        assert our_att.shape == ref_att.shape, (layer, our_att.shape, ref_att.shape)
        rows = real[:, None, :, None].expand_as(ref_att)
        torch.testing.assert_close(our_att[rows], ref_att[rows], atol=ATOL, rtol=RTOL)
    ref_global, ours_global = (getattr(o, prefix + "global_attentions") for o in (ref_out, ours_out))
    if glob is None:
        assert ref_global is None and ours_global is None
        return
    counts = (glob.bool() & real).sum(1)
    assert counts.min() < counts.max()  # some rows have unused global slots
    for ref_att, our_att in zip(ref_global, ours_global):
        # Hugging Face leaves the key axis padded to the window; ours has the input's length.
        assert our_att.shape[:2] == ref_att.shape[:2] and our_att.shape[2] == n and our_att.shape[3] == ref_att.shape[3]
        # Every slot, the unused ones (Hugging Face's filler rows) included, at every key.
        torch.testing.assert_close(our_att, ref_att[:, :, :n], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("kind", KINDS)
def test_longformer_output_attentions(kind):
    reference, patched = pair(LongformerModel, longformer_config())
    ids, kwargs = inputs(kind)
    ref_out, ours_out = (m(ids, output_attentions=True, **kwargs) for m in (reference, patched))
    torch.testing.assert_close(ours_out.last_hidden_state, ref_out.last_hidden_state, atol=ATOL, rtol=RTOL)
    _compare_attentions(ref_out, ours_out, kwargs, ids.shape[1])


def test_longformer_compiles_fullgraph():
    _, patched = pair(LongformerModel, longformer_config())
    ids, kwargs = inputs("mixed")
    eager = patched(ids, **kwargs).last_hidden_state
    torch._dynamo.reset()
    compiled = torch.compile(patched, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(ids, **kwargs).last_hidden_state, eager, atol=1e-5, rtol=1e-5)


def test_dropout_in_distribution():
    """Attention-probability dropout in training, layer by layer: the patched core must reproduce
    Hugging Face's in distribution (same mean, same per-element variance over many draws)."""
    config = longformer_config(attention_probs_dropout_prob=0.3, attention_window=[4, 4])
    torch.manual_seed(0)
    hf_core = HFLongformerSelfAttentionCore(config, layer_id=0)
    ours = HFLongformerSelfAttention.from_hf(hf_core)
    assert ours.dropout == 0.3
    gen = torch.Generator().manual_seed(0)
    n = 16  # a multiple of the window so the unpatched core runs as is
    x = torch.randn(2, n, 32, generator=gen)
    glob = torch.zeros(2, n, dtype=torch.bool)
    glob[0, [0, 9]] = True
    glob[1, 0] = True
    masked = torch.zeros(2, n, dtype=torch.bool)
    additive = glob.float() * 10000.0
    call = dict(attention_mask=additive, is_index_masked=masked, is_index_global_attn=glob, is_global_attn=True)
    draws = 250
    with torch.no_grad():
        hf_core.eval()
        clean = hf_core(x, **call)[0]
        hf_core.train()
        ours.train()
        torch.manual_seed(1)
        hf_samples = torch.stack([hf_core(x, **call)[0] for _ in range(draws)])
        ours_samples = torch.stack([ours(x, **call)[0] for _ in range(draws)])
    for samples in (hf_samples, ours_samples):
        z = (samples.mean(0) - clean).abs() / (samples.std(0) / draws ** 0.5 + 1e-6)
        assert z.max() < 6.0, f"mean over draws is {z.max():.1f} standard errors off the eval output"
    ratio = ours_samples.var(0).mean() / hf_samples.var(0).mean()
    assert ours_samples.var(0).mean() > 0, "dropout was ignored"
    assert 0.85 < ratio < 1.18, f"per-element variance differs from Hugging Face's: ratio {ratio:.3f}"


def test_patched_model_trains_with_dropout():
    config = longformer_config(attention_probs_dropout_prob=0.2)
    _, patched = pair(LongformerForMaskedLM, config)
    patched.train()
    ids, kwargs = inputs("mixed")
    first = patched(ids, labels=ids, **kwargs)
    second = patched(ids, labels=ids, **kwargs)
    assert first.loss != second.loss  # dropout draws differ
    first.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in patched.parameters() if p.grad is not None)


def test_longformer_gradient_checkpointing():
    config = longformer_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    reference, patched = pair(LongformerModel, config)
    ids, kwargs = inputs("mixed")
    grads = []
    for model in (reference, patched):
        model.train()
        # transformers 5 renamed it (the old name warns until 6).
        getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
        grads.append(_loss_and_grads(model, model(ids, **kwargs).last_hidden_state))
    assert_grads_close(*grads)


# ------------------------------------------------------------------------------------------------
# LED


@pytest.mark.parametrize("n", [13, 16])
@pytest.mark.parametrize("kind", KINDS)
def test_led_outputs_and_gradients(kind, n):
    ids, kwargs = inputs(kind, n=n)
    decoder_ids = torch.randint(3, VOCAB, (3, 5), generator=torch.Generator().manual_seed(3))
    reference, patched = pair(LEDModel, led_config())
    outs, grads = [], []
    for model in (reference, patched):
        out = model(ids, decoder_input_ids=decoder_ids, **kwargs)
        outs.append(out)
        grads.append(_loss_and_grads(model, out.last_hidden_state, out.encoder_last_hidden_state))
    assert outs[1].encoder_last_hidden_state.shape == (3, n, 32)
    torch.testing.assert_close(outs[1].encoder_last_hidden_state, outs[0].encoder_last_hidden_state, atol=ATOL,
                               rtol=RTOL)
    torch.testing.assert_close(outs[1].last_hidden_state, outs[0].last_hidden_state, atol=ATOL, rtol=RTOL)
    assert_grads_close(*grads)


@pytest.mark.parametrize("kind", ["globals", "mixed"])
def test_led_conditional_generation_loss_attentions_and_gradients(kind):
    ids, kwargs = inputs(kind)
    labels = torch.randint(3, VOCAB, (3, 6), generator=torch.Generator().manual_seed(4))
    reference, patched = pair(LEDForConditionalGeneration, led_config())
    outs, grads = [], []
    for model in (reference, patched):
        out = model(ids, labels=labels, output_attentions=True, **kwargs)
        model.zero_grad()
        out.loss.backward()
        outs.append(out)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(outs[1].logits, outs[0].logits, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(outs[1].loss, outs[0].loss, atol=ATOL, rtol=RTOL)
    assert_grads_close(*grads)
    _compare_attentions(outs[0], outs[1], kwargs, ids.shape[1], prefix="encoder_")


@pytest.mark.parametrize("kind", ["globals", "mixed"])
def test_led_greedy_generate(kind):
    ids, kwargs = inputs(kind)
    reference, patched = pair(LEDForConditionalGeneration, led_config(), seed=2)
    # A random LED emits EOS at once: min_new_tokens makes every one of the 8 steps count.
    generated = [m.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, num_beams=1,
                            output_scores=True, return_dict_in_generate=True, **kwargs) for m in (reference, patched)]
    assert generated[0].sequences.shape[1] >= 8
    assert torch.equal(generated[1].sequences, generated[0].sequences)
    assert len(generated[1].scores) == len(generated[0].scores) == 8
    for ours, ref in zip(generated[1].scores, generated[0].scores):
        torch.testing.assert_close(ours, ref, atol=ATOL, rtol=RTOL)


# ------------------------------------------------------------------------------------------------
# The patch itself


def test_patch_keeps_weights_in_place():
    torch.manual_seed(0)
    model = LongformerForMaskedLM(longformer_config())
    before = {name: p for name, p in model.named_parameters()}
    query = model.longformer.encoder.layer[0].attention.self.query
    assert patch(model) is model
    assert patch(model) is model  # twice is harmless
    after = dict(model.named_parameters())
    assert before.keys() == after.keys()
    assert all(before[name] is after[name] for name in before)  # same tensors, no copies
    core = model.longformer.encoder.layer[0].attention.self
    assert isinstance(core, HFLongformerSelfAttention) and core.query is query and core.window == (2, 2)
    assert model.longformer.encoder.layer[1].attention.self.window == (4, 4)

    torch.manual_seed(0)
    led = LEDForConditionalGeneration(led_config(attention_dropout=0.25))
    decoder_attention = type(led.led.decoder.layers[0].self_attn)
    patch(led)
    core = led.led.encoder.layers[0].self_attn.longformer_self_attn
    assert isinstance(core, HFLongformerSelfAttention) and core.dropout == 0.25
    assert type(led.led.decoder.layers[0].self_attn) is decoder_attention  # decoder untouched


def test_patch_rejects_other_models_and_versions(monkeypatch):
    with pytest.raises(TypeError, match="no LongformerModel"):
        patch(torch.nn.Linear(2, 2))
    # The module object `import transformers` returns now (transformers' lazy module may have
    # replaced the one importorskip returned).
    installed = sys.modules["transformers"]
    for refused in ("4.58.0", "4.56.2", "6.0.0", "6.1.0.dev0"):
        monkeypatch.setattr(installed, "__version__", refused)
        with pytest.raises(RuntimeError, match="supports transformers 4.57.x and 5.x"):
            patch(LongformerModel(longformer_config()))
    monkeypatch.setattr(installed, "__version__", "5.99.0")
    with pytest.warns(UserWarning, match="5.99.0 is newer"):
        patch(LongformerModel(longformer_config()))
    for tested in integration.TESTED_TRANSFORMERS + ("4.57.1", "5.0.0", "5.24.2"):
        monkeypatch.setattr(installed, "__version__", tested)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            patch(LongformerModel(longformer_config()))


def test_patch_refuses_layers_it_does_not_match(monkeypatch):
    """A release whose layers lost an argument the layer loop passes is refused before anything
    is replaced, naming what is missing."""
    model = LongformerForSequenceClassification(longformer_config())
    layer_class = type(model.longformer.encoder.layer[0])

    def forward(self, hidden_states, attention_mask=None, is_index_masked=None, output_attentions=False):
        raise AssertionError("not called")

    monkeypatch.setattr(layer_class, "forward", forward)
    with pytest.raises(RuntimeError, match="takes no is_index_global_attn, is_global_attn"):
        patch(model)
    assert not isinstance(model.longformer.encoder.layer[0].attention.self, HFLongformerSelfAttention)
    assert "forward" not in vars(model.longformer)  # nothing replaced
    monkeypatch.undo()

    led = LEDModel(led_config())
    del led.encoder.layers[1].self_attn.longformer_self_attn.key_global
    with pytest.raises(RuntimeError, match="LEDEncoderSelfAttention \\(layer 1\\) has no key_global"):
        patch(led)


@pytest.mark.skipif(not TF5, reason="transformers 4.57 applies head masks")
def test_head_masks_refused_through_task_heads_on_transformers_5():
    """transformers 5's task heads accept a head mask and drop it; patched ones refuse it."""
    ids, kwargs = inputs("mixed")
    head_mask = torch.ones(2, 4)
    _, classifier = pair(LongformerForSequenceClassification, longformer_config())
    with pytest.raises(ValueError, match="head_mask is not supported"):
        classifier(ids, head_mask=head_mask, **kwargs)
    copied = copy.deepcopy(classifier)  # the refusal is a bound method: it follows the copy
    with pytest.raises(ValueError, match="head_mask is not supported"):
        copied(ids, head_mask=head_mask, **kwargs)
    torch.testing.assert_close(copied(ids, **kwargs).logits, classifier(ids, **kwargs).logits)
    _, led = pair(LEDForConditionalGeneration, led_config())
    for name in ("head_mask", "decoder_head_mask", "cross_attn_head_mask"):
        with pytest.raises(ValueError, match=f"{name} is not supported"):
            led(ids, decoder_input_ids=ids[:, :4], **{name: head_mask}, **kwargs)
    with pytest.raises(ValueError, match="head_mask is not supported"):
        led.get_encoder()(ids, head_mask=head_mask, **kwargs)


def test_layer_attention_probabilities_match_hugging_face():
    """The layer-level call Hugging Face's own test_layer_attn_probs makes: additive masks with a
    token that is both global and padding, rows with different global counts. Outputs, local and
    global attentions (filler slots of rows with fewer global tokens included) match the HF core."""
    config = longformer_config(attention_window=[4, 4])
    torch.manual_seed(0)
    hf_core = HFLongformerSelfAttentionCore(config, layer_id=0).eval()
    ours = HFLongformerSelfAttention.from_hf(hf_core)
    x = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(5))
    additive = torch.zeros(2, 8)
    additive[0, -3:] = 10000.0
    additive[0, -1:] = -10000.0  # global and padding: padding wins
    additive[1, 2:] = 10000.0
    call = dict(attention_mask=additive, is_index_masked=additive < 0, is_index_global_attn=additive > 0,
                is_global_attn=True, output_attentions=True)
    ref, got = hf_core(x, **call), ours(x, **call)
    real = additive >= 0
    torch.testing.assert_close(got[0][real], ref[0][real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], ref[1], atol=1e-6, rtol=1e-5)
    assert got[2].shape == ref[2].shape == (2, 4, 6, 8)
    torch.testing.assert_close(got[2], ref[2], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got[2].sum(-1), torch.ones(2, 4, 6))  # filler rows sum to 1 as well


def test_installed_transformers_is_supported():
    """CI pins a supported version; a silent skip of every test above would hide a mismatch."""
    integration._check_transformers_version()
