"""longformer_ext.integrations.modernbert.patch_modernbert: patched Hugging Face ModernBERT models
(small, randomly initialised from configs, fp32) against the unpatched ones (SDPA, or eager where
the patched model falls back to eager)."""

import copy
import sys
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
from packaging.version import Version  # noqa: E402

if Version(transformers.__version__).release[:2] < (5, 1):
    pytest.skip(f"the ModernBERT drop-in needs transformers 5.1+, {transformers.__version__} is installed",
                allow_module_level=True)

from transformers import ModernBertConfig, ModernBertForMaskedLM, ModernBertModel  # noqa: E402

from longformer_ext.integrations import modernbert as integration  # noqa: E402
from longformer_ext.integrations.modernbert import longformer_ext_attention, patch_modernbert  # noqa: E402

VOCAB, PAD = 50, 0
ATOL = RTOL = 1e-4

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def config(**overrides):
    """4 layers: global, local, local, global (global_attn_every_n_layers=3)."""
    values = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                  local_attention=8, global_attn_every_n_layers=3, max_position_embeddings=128, pad_token_id=PAD,
                  bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)
    values.update(overrides)
    return ModernBertConfig(**values)


def pair(model_class, cfg, seed=0):
    """(unpatched, patched) models with the same weights, in eval mode."""
    torch.manual_seed(seed)
    reference = model_class(cfg).eval()
    return reference, patch_modernbert(copy.deepcopy(reference))


def inputs(n, padded, seed=0):
    """(input_ids [3, n], attention_mask or None, real-token mask [3, n] bool); padded: rows full,
    right-padded and left-padded."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (3, n), generator=gen)
    real = torch.ones(3, n, dtype=torch.bool)
    if not padded:
        return ids, None, real
    real[1, n - 11:] = False  # right padding
    real[2, :17] = False      # left padding, longer than a band so some padding queries see no real key
    return ids.masked_fill(~real, PAD), real.long(), real


def real_loss(real, *tensors, seed=1):
    """A fixed random projection of the outputs at real tokens (padding positions' hidden states are
    not part of the contract: no real token reads them)."""
    gen = torch.Generator().manual_seed(seed)
    return sum((t * torch.randn(t.shape, generator=gen) * real[..., None]).sum() for t in tensors)


def grads_of(model, loss):
    model.zero_grad()
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(reference, patched):
    """Every gradient within 1e-4 of the unpatched one, relative to that gradient's scale."""
    assert reference.keys() == patched.keys()
    for name in reference:
        scale = max(1.0, reference[name].abs().max().item())
        torch.testing.assert_close(patched[name], reference[name], atol=ATOL * scale, rtol=RTOL,
                                   msg=lambda m: f"{name}: {m}")


def count_op_calls(monkeypatch):
    calls = []
    original = integration.longformer_attention

    def counted(*args, **kwargs):
        calls.append(args[3])  # the window
        return original(*args, **kwargs)

    monkeypatch.setattr(integration, "longformer_attention", counted)
    return calls


# ------------------------------------------------------------------------------------------------
# Parity


@pytest.mark.parametrize("local_attention", [8, 13])  # half-widths 4 and 6 (13 // 2)
@pytest.mark.parametrize("n", [37, 53])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_model_outputs_and_gradients(n, padded, local_attention):
    reference, patched = pair(ModernBertModel, config(local_attention=local_attention))
    ids, mask, real = inputs(n, padded)
    outs, grads = [], []
    for model in (reference, patched):
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
        out = model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        outs.append(out)
        grads.append({**grads_of(model, real_loss(real, out)), "inputs_embeds": embeds.grad})
    torch.testing.assert_close(outs[1][real], outs[0][real], atol=ATOL, rtol=RTOL)
    assert_grads_close(*grads)


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_masked_lm_loss_logits_and_gradients(padded):
    reference, patched = pair(ModernBertForMaskedLM, config())
    ids, mask, real = inputs(41, padded)
    labels = ids.masked_fill(~real, -100)
    labels[:, ::3] = -100
    outs, grads = [], []
    for model in (reference, patched):
        out = model(ids, attention_mask=mask, labels=labels)
        outs.append(out)
        grads.append(grads_of(model, out.loss + real_loss(real, out.logits)))
    torch.testing.assert_close(outs[1].loss, outs[0].loss, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(outs[1].logits[real], outs[0].logits[real], atol=ATOL, rtol=RTOL)
    assert_grads_close(*grads)


def test_local_layers_call_the_op_and_global_layers_do_not(monkeypatch):
    _, patched = pair(ModernBertForMaskedLM, config(num_hidden_layers=6, local_attention=13))
    assert patched.config.layer_types.count("sliding_attention") == 4
    calls = count_op_calls(monkeypatch)
    ids, mask, _ = inputs(37, padded=True)
    patched(ids, attention_mask=mask)
    assert calls == [6] * 4  # once per local layer, with half-width local_attention // 2
    patch_modernbert(patched)  # patching twice is harmless
    patched(ids, attention_mask=mask)
    assert len(calls) == 8
    patched.set_attn_implementation("sdpa")  # undoes it
    patched(ids, attention_mask=mask)
    assert len(calls) == 8


def test_patch_is_per_model_and_keeps_weights():
    reference, patched = pair(ModernBertForMaskedLM, config())
    assert reference.config._attn_implementation == "sdpa"
    assert patched.config._attn_implementation == patched.model.config._attn_implementation == "longformer_ext"
    assert reference.state_dict().keys() == patched.state_dict().keys()
    for name, tensor in reference.state_dict().items():
        assert torch.equal(tensor, patched.state_dict()[name]), name


def test_registered_name_works_without_patch(monkeypatch):
    """``register()`` then transformers' own switch gives the patched model."""
    calls = count_op_calls(monkeypatch)
    reference, _ = pair(ModernBertModel, config())
    model = copy.deepcopy(reference)
    model.set_attn_implementation(integration.register())
    ids, mask, real = inputs(37, padded=True)
    torch.testing.assert_close(model(ids, attention_mask=mask).last_hidden_state[real],
                               reference(ids, attention_mask=mask).last_hidden_state[real], atol=ATOL, rtol=RTOL)
    assert len(calls) == 2


def test_compiles_fullgraph_with_padding():
    """The [B, N] mask reaches the op without host reads, so the patched model has no graph break."""
    _, patched = pair(ModernBertModel, config())
    ids, mask, real = inputs(37, padded=True)
    eager = patched(ids, attention_mask=mask).last_hidden_state
    torch._dynamo.reset()
    compiled = torch.compile(patched, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(ids, attention_mask=mask).last_hidden_state[real], eager[real],
                               atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# Fallbacks to eager attention


def test_attention_dropout_in_training_falls_back_to_eager(monkeypatch):
    """Our op has no dropout: in training with attention_dropout > 0 every layer runs transformers'
    eager attention, with the unpatched model's masks: same dropout draws as the unpatched eager model."""
    reference, patched = pair(ModernBertModel, config(attention_dropout=0.3))
    reference.set_attn_implementation("eager")
    calls = count_op_calls(monkeypatch)
    ids, mask, real = inputs(37, padded=True)
    outs, grads = [], []
    for model in (reference, patched):
        model.train()
        torch.manual_seed(7)
        out = model(ids, attention_mask=mask).last_hidden_state
        outs.append(out)
        grads.append(grads_of(model, real_loss(real, out)))
    assert calls == []
    torch.testing.assert_close(outs[1], outs[0], atol=ATOL, rtol=RTOL)
    assert_grads_close(*grads)
    torch.manual_seed(8)
    assert not torch.allclose(patched(ids, attention_mask=mask).last_hidden_state, outs[1])  # dropout is on
    patched.eval()
    patched(ids, attention_mask=mask)
    assert len(calls) == 2  # eval: no dropout, back on the op


@pytest.mark.parametrize("through", ["argument", "config"])
def test_output_attentions_falls_back_to_eager(through, monkeypatch):
    torch.manual_seed(0)
    reference = ModernBertModel(config()).eval()
    reference.set_attn_implementation("eager")
    if through == "config":
        # transformers sets it only on an eager model; a patched copy keeps it.
        reference.config.output_attentions = True
    patched = patch_modernbert(copy.deepcopy(reference))
    calls = count_op_calls(monkeypatch)
    ids, mask, _ = inputs(37, padded=True)
    kwargs = dict(output_attentions=True) if through == "argument" else {}
    ref_out, ours_out = (m(ids, attention_mask=mask, **kwargs) for m in (reference, patched))
    assert calls == []
    torch.testing.assert_close(ours_out.last_hidden_state, ref_out.last_hidden_state, atol=ATOL, rtol=RTOL)
    assert len(ours_out.attentions) == 4 and ours_out.attentions[1].shape == (3, 4, 37, 37)
    for ours, ref in zip(ours_out.attentions, ref_out.attentions):
        torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# Errors


def test_patch_rejects_other_models_and_versions(monkeypatch):
    with pytest.raises(TypeError, match="found no ModernBertModel in Linear"):
        patch_modernbert(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="expects a transformers model"):
        patch_modernbert("ModernBertModel")
    installed = sys.modules["transformers"]  # the module `import transformers` returns now
    for refused in ("4.57.6", "5.0.0", "6.0.0", "6.1.0.dev0"):
        monkeypatch.setattr(installed, "__version__", refused)
        model = ModernBertModel(config())
        with pytest.raises(RuntimeError, match=f"supports transformers 5.1 and later 5.x .* {refused} is installed"):
            patch_modernbert(model)
        assert model.config._attn_implementation == "sdpa"
    monkeypatch.setattr(installed, "__version__", "5.99.0")
    with pytest.warns(UserWarning, match="5.99.0 is newer") as record:
        patch_modernbert(ModernBertModel(config()))
    assert len(record) == 1
    for accepted in integration.TESTED_TRANSFORMERS + ("5.1.0", "5.24.2"):
        monkeypatch.setattr(installed, "__version__", accepted)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            patch_modernbert(ModernBertModel(config()))


def test_patch_refuses_a_structure_it_does_not_match():
    model = ModernBertModel(config())
    model.config.layer_types = ["full_attention", "chunked_attention", "sliding_attention", "full_attention"]
    with pytest.raises(RuntimeError, match=r"layer types \['chunked_attention'\] are neither.*Nothing was changed"):
        patch_modernbert(model)
    assert model.config._attn_implementation == "sdpa"


def test_dense_masks_are_refused():
    _, patched = pair(ModernBertModel, config())
    ids, _, _ = inputs(37, padded=False)
    dense = torch.ones(3, 1, 37, 37, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"takes the model's \[B, N\] attention_mask.*shape \(3, 1, 37, 37\)"):
        patched(ids, attention_mask=dense)


def test_attention_function_refuses_other_modules():
    q = torch.randn(1, 2, 5, 4)
    with pytest.raises(TypeError, match="supports ModernBERT's encoder attention only, but Linear called it"):
        longformer_ext_attention(torch.nn.Linear(2, 2), q, q, q, None)


def test_installed_transformers_is_supported():
    """CI pins a supported 5.x; a silent skip of every test above would hide a mismatch."""
    integration._check_transformers_version()
