"""Reference models (longformer_ext.models): the character LM and the standalone encoder with heads."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import longformer_ext
from longformer_ext.models import (CharLM, CharLMConfig, LongformerEncoder, LongformerEncoderConfig,
                                   LongformerForQuestionAnswering, LongformerForSequenceClassification,
                                   LongformerForTokenClassification, growing_windows, question_global_mask,
                                   upper_layer_dilation)

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# Char LM


def small_lm(**overrides) -> CharLM:
    torch.manual_seed(0)
    config = dict(dim=32, layers=3, heads=4, windows=[2, 4, 6], dilations=[[1, 1, 1, 1], [1, 1, 1, 2], [1, 1, 3, 3]])
    config.update(overrides)
    return CharLM(CharLMConfig(**config)).eval()


def test_char_lm_shapes_and_config():
    model = small_lm()
    tokens = torch.randint(0, 256, (2, 37))
    assert model(tokens).shape == (2, 37, 256)
    assert [b.attn.window for b in model.blocks] == [2, 4, 6]
    assert [b.attn.dilation for b in model.blocks] == [[1, 1, 1, 1], [1, 1, 1, 2], [1, 1, 3, 3]]
    assert model.receptive_field() == 2 + 4 * 2 + 6 * 3
    model.set_windows([4, 8, 12])
    assert model.windows == [4, 8, 12]
    with pytest.raises(ValueError):
        model.set_windows([1, 2])


def test_schedule_helpers():
    assert growing_windows(4, 8, 32) == [8, 16, 24, 32]
    assert growing_windows(1, 8, 32) == [32]
    table = upper_layer_dilation(6, 4, dilated_layers=2, dilated_heads=2, max_dilation=3)
    assert table[:4] == [[1, 1, 1, 1]] * 4
    assert table[4] == [1, 1, 2, 2] and table[5] == [1, 1, 3, 3]
    default = CharLMConfig(layers=4, heads=4)
    assert default.windows == [16, 32, 48, 64]
    assert default.dilations == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 2], [1, 1, 1, 2]]
    with pytest.raises(ValueError):
        CharLMConfig(layers=2, heads=2, windows=[1, 2, 3])
    with pytest.raises(ValueError):
        CharLMConfig(layers=1, heads=2, dilations=[[1, 0]])


def test_char_lm_is_causal():
    model = small_lm()
    tokens = torch.randint(0, 256, (1, 64))
    base = model(tokens)
    for t in (5, 31, 63):
        changed = tokens.clone()
        changed[0, t] = (changed[0, t] + 1) % 256
        out = model(changed)
        torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=0)
        assert not torch.allclose(out[:, t], base[:, t])  # position t itself does see its own byte


def test_char_lm_window_limits_reach():
    """The last position depends on exactly the bytes within the receptive field (windows and
    dilations summed over layers): the model uses the band, and nothing outside it."""
    model = small_lm(layers=2, heads=2, windows=[3, 4], dilations=[[1, 1], [1, 2]])
    n = 40
    tokens = torch.randint(0, 256, (1, n))
    base = model(tokens)[0, -1]
    reach = model.receptive_field()  # 3 + 8 = 11
    inside = n - 1 - reach
    changed = tokens.clone()
    changed[0, inside] = (changed[0, inside] + 7) % 256
    # a two-hop path through small initial weights: the change is tiny, but it is there
    assert (model(changed)[0, -1] - base).abs().max() > 0
    changed = tokens.clone()
    changed[0, inside - 1] = (changed[0, inside - 1] + 7) % 256
    torch.testing.assert_close(model(changed)[0, -1], base, rtol=0, atol=0)


def test_char_lm_rotary_is_relative():
    """Rotary positions: the same bytes at a shifted offset give the same logits (once the window
    no longer reaches the start), which absolute positions would not."""
    model = small_lm(layers=1, heads=2, windows=[3], dilations=[[1, 1]])
    tokens = torch.randint(0, 256, (1, 30))
    shifted = torch.cat([torch.randint(0, 256, (1, 11)), tokens], dim=1)
    torch.testing.assert_close(model(shifted)[:, 11 + 3:], model(tokens)[:, 3:], rtol=1e-4, atol=1e-5)


def test_char_lm_gradients_flow():
    model = small_lm().train()
    loss = model.loss(torch.randint(0, 256, (2, 33)))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_char_lm_rejects_bad_tokens():
    with pytest.raises(ValueError):
        small_lm()(torch.randint(0, 256, (2, 3, 4)))


# --------------------------------------------------------------------------------------------
# Encoder


def encoder_config(**overrides) -> LongformerEncoderConfig:
    config = dict(vocab_size=50, hidden_size=32, layers=2, heads=4, intermediate_size=64, max_positions=128,
                  window=[3, 5], dilation=[1, [1, 1, 2, 2]], dropout=0.0, num_labels=3)
    config.update(overrides)
    return LongformerEncoderConfig(**config)


def ids(batch, n, seed=0, low=3):
    gen = torch.Generator().manual_seed(seed)
    out = torch.randint(low, 50, (batch, n), generator=gen)
    out[:, 0] = 0  # CLS
    return out


def test_encoder_config_per_layer():
    model = LongformerEncoder(encoder_config())
    # the layers' nn.LongformerSelfAttention keeps them normalised: (left, right), one dilation per head
    assert [layer.attention.window for layer in model.layers] == [(3, 3), (5, 5)]
    assert [layer.attention.dilation for layer in model.layers] == [[1, 1, 1, 1], [1, 1, 2, 2]]
    names = {n.split(".")[-2] for n, _ in model.layers[0].attention.named_parameters()}
    assert names == {"query", "key", "value", "query_global", "key_global", "value_global"}
    with pytest.raises(ValueError):
        encoder_config(window=[3])
    with pytest.raises(ValueError):
        LongformerEncoder(encoder_config())(ids(1, 200))  # beyond max_positions


def test_heads_shapes_and_losses():
    torch.manual_seed(0)
    config = encoder_config()
    x = ids(2, 23)
    mask = torch.ones(2, 23, dtype=torch.long)
    mask[1, 17:] = 0

    cls = LongformerForSequenceClassification(config).eval()
    assert cls(x, mask).shape == (2, 3)
    loss, logits = cls(x, mask, labels=torch.tensor([0, 2]))
    assert loss.ndim == 0 and logits.shape == (2, 3)

    qa = LongformerForQuestionAnswering(config).eval()
    x_qa = x.clone()
    x_qa[:, 4] = config.sep_token_id
    out = qa(x_qa, mask, start_positions=torch.tensor([5, 6]), end_positions=torch.tensor([7, 9]))
    assert out.start_logits.shape == out.end_logits.shape == (2, 23) and out.loss.ndim == 0
    assert (out.start_logits[1, 17:] == torch.finfo(torch.float32).min).all()
    with pytest.raises(ValueError):
        qa(x_qa, mask, start_positions=torch.tensor([5, 6]))

    tok = LongformerForTokenClassification(config).eval()
    assert tok(x, mask).shape == (2, 23, 3)
    labels = torch.randint(0, 3, (2, 23))
    loss, _ = tok(x, mask, labels=labels)
    assert torch.isfinite(loss)


def test_question_global_mask():
    x = torch.tensor([[0, 5, 6, 2, 7, 8, 2, 9], [0, 2, 5, 6, 7, 2, 8, 9]])
    expected = torch.tensor([[1, 1, 1, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(question_global_mask(x, 2), expected)


def record_global_masks(monkeypatch):
    """Captures the global_attention_mask every layer passes to longformer_attention (through its
    nn.LongformerSelfAttention)."""
    seen = []
    real = longformer_ext.nn.longformer_attention

    def spy(*args, **kwargs):
        seen.append(kwargs.get("global_attention_mask"))
        return real(*args, **kwargs)

    monkeypatch.setattr(longformer_ext.nn, "longformer_attention", spy)
    return seen


def test_global_attention_placement(monkeypatch):
    config = encoder_config()
    x = ids(2, 16)
    x[:, 5] = config.sep_token_id
    seen = record_global_masks(monkeypatch)
    LongformerForSequenceClassification(config).eval()(x)
    assert len(seen) == config.layers
    expected = torch.zeros(2, 16, dtype=torch.bool)
    expected[:, 0] = True
    assert all(torch.equal(m, expected) for m in seen)

    seen.clear()
    LongformerForQuestionAnswering(config).eval()(x)
    expected = torch.zeros(2, 16, dtype=torch.bool)
    expected[:, :5] = True  # CLS and the question, up to (not including) the first separator
    assert all(torch.equal(m, expected) for m in seen)

    seen.clear()
    LongformerForTokenClassification(config).eval()(x)
    assert seen == [None, None]

    seen.clear()  # a caller's global tokens are added to the head's own
    extra = torch.zeros(2, 16, dtype=torch.long)
    extra[1, 9] = 1
    LongformerForSequenceClassification(config).eval()(x, global_attention_mask=extra)
    expected = torch.zeros(2, 16, dtype=torch.bool)
    expected[:, 0] = True
    expected[1, 9] = True
    assert all(torch.equal(m, expected) for m in seen)


def test_global_tokens_change_outputs():
    """The global projections are used: global CLS sees the whole sequence, so a far-away token
    changes CLS's output, which a window-only encoder could not do."""
    torch.manual_seed(0)
    config = encoder_config(window=[1, 1], dilation=1)
    model = LongformerForSequenceClassification(config).eval()
    x = ids(1, 40)
    changed = x.clone()
    changed[0, 35] = 4 if x[0, 35] != 4 else 5
    assert not torch.allclose(model(x), model(changed))
    encoder = model.encoder
    local_only = encoder(x)[0, 0]
    torch.testing.assert_close(encoder(changed)[0, 0], local_only)  # without global tokens: unchanged


@pytest.mark.parametrize("head", ["encoder", "cls", "qa", "tok"])
def test_padding_content_does_not_matter(head):
    torch.manual_seed(0)
    config = encoder_config()
    model = {"encoder": LongformerEncoder, "cls": LongformerForSequenceClassification,
             "qa": LongformerForQuestionAnswering, "tok": LongformerForTokenClassification}[head](config).eval()
    x = ids(2, 30)
    x[:, 6] = config.sep_token_id
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[0, 20:] = 0
    mask[1, 26:] = 0
    other = x.clone()
    other[mask == 0] = torch.randint(3, 50, ((mask == 0).sum().item(),))
    a, b = model(x, mask), model(other, mask)
    if head == "qa":
        a, b = torch.stack([a.start_logits, a.end_logits]), torch.stack([b.start_logits, b.end_logits])
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    elif head == "cls":
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    else:
        real = mask.bool()
        torch.testing.assert_close(a[real], b[real], rtol=0, atol=1e-6)
        assert not torch.allclose(a[~real], b[~real])  # the test can tell: padding rows did change


@pytest.mark.parametrize("side", ["right", "left"])
def test_batch_equals_examples(side):
    """Different lengths, different numbers of question (global) tokens, padded on either side:
    each example of the batch equals the same example run alone without padding."""
    torch.manual_seed(0)
    config = encoder_config()
    model = LongformerForQuestionAnswering(config).eval()
    lengths, seps = [29, 17, 24], [3, 8, 5]
    n = max(lengths)
    batch = torch.full((3, n), config.pad_token_id)
    mask = torch.zeros(3, n, dtype=torch.long)
    singles = []
    for row, (length, sep) in enumerate(zip(lengths, seps)):
        example = ids(1, length, seed=row)
        example[0, sep] = config.sep_token_id
        singles.append(model(example))
        cols = slice(0, length) if side == "right" else slice(n - length, n)
        batch[row, cols] = example[0]
        mask[row, cols] = 1
    # no explicit global mask: the head's rule (tokens before the first separator) also marks left
    # padding, which must not matter since a padding token is never global
    out = model(batch, mask)
    for row, (length, single) in enumerate(zip(lengths, singles)):
        cols = slice(0, length) if side == "right" else slice(n - length, n)
        torch.testing.assert_close(out.start_logits[row, cols], single.start_logits[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out.end_logits[row, cols], single.end_logits[0], rtol=1e-4, atol=1e-5)


def test_encoder_gradients_flow():
    """Every parameter gets a gradient when the model is used as intended: token classification
    with a global token trains the local and global projections of every layer; sequence
    classification reaches the global ones through CLS."""
    torch.manual_seed(0)
    model = LongformerForTokenClassification(encoder_config())
    glob = torch.zeros(2, 20, dtype=torch.bool)
    glob[:, 0] = True
    loss, _ = model(ids(2, 20), global_attention_mask=glob, labels=torch.randint(0, 3, (2, 20)))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name

    cls = LongformerForSequenceClassification(encoder_config())
    loss, _ = cls(ids(2, 20), labels=torch.tensor([1, 2]))
    loss.backward()
    for layer in cls.encoder.layers:
        for proj in (layer.attention.query_global, layer.attention.key_global, layer.attention.value_global):
            assert proj.weight.grad.abs().sum() > 0
    # the last layer's local queries feed only non-CLS rows, which the classifier never reads
    assert cls.encoder.layers[-1].attention.query.weight.grad.abs().sum() == 0
    assert cls.encoder.layers[0].attention.query.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------
# The example script


def test_train_char_lm_quick_runs():
    env = dict(os.environ)
    # the subprocess imports the same longformer_ext as this test (an installed one or the sources)
    package_root = str(Path(longformer_ext.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "train_char_lm.py"), "--quick"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    match = re.search(r"held-out BPC: char LM ([0-9.]+) \| bigram \(add-one\) ([0-9.]+)", result.stdout)
    assert match, result.stdout
    lm, bigram = float(match.group(1)), float(match.group(2))
    assert 0 < lm < 9 and 0 < bigram < 9  # 8 bits = uniform over bytes; a broken eval gives nan/inf/0
    assert "phase 2/2" in result.stdout and "time:" in result.stdout
