"""Turn a short-context Hugging Face encoder into a long one, as the Longformer paper does.

* RoBERTa / BERT (``RobertaModel``, ``RobertaForMaskedLM``, ``BertModel``, ``BertForMaskedLM``) become a
  ``transformers`` Longformer (``LongformerModel`` / ``LongformerForMaskedLM``): :func:`to_longformer`.
* BART (``BartModel``, ``BartForConditionalGeneration``) becomes LED (``LEDModel`` /
  ``LEDForConditionalGeneration``): :func:`to_led`.

Every weight is carried over; the learned position rows are copied repeatedly up to ``max_pos`` (the
paper's initialisation: it keeps the local structure the model already learned at every offset inside
one copy); the global projections (``query_global``, ``key_global``, ``value_global``) start as copies of
the local ones. Masked-LM pretraining uses no global tokens, so those layers get no gradient there:
call :func:`copy_local_to_global` after continued pretraining, as the paper's recipe does.

The result is a plain ``transformers`` model: ``save_pretrained`` / ``from_pretrained`` work as usual, and
:func:`load_long_model` reloads it with longformer_ext's attention patched in
(``longformer_ext.integrations.transformers.patch``).

Windows. Two names, two conventions, exactly one of them per call:

* ``attention_window``: Hugging Face's **two-sided** size ``W`` (even, > 0), as stored in the HF config;
  each token sees ``W/2`` neighbours on each side. The paper's 512 is ``attention_window=512``.
* ``window``: longformer_ext's **one-sided** ``w`` (``w`` neighbours on each side, ``w >= 1``), stored in
  the config as ``attention_window = 2*w``.

Either may be one int for every layer or a list with one value per layer. (Hugging Face's own, unpatched
attention pads the input to a multiple of the largest window and then needs every layer's window to
divide that length; longformer_ext's patched attention has no such constraint.)

Positions. ``max_pos`` is the number of tokens the long model accepts. Longformer numbers positions like
RoBERTa, from ``padding_idx + 1`` (``pad_token_id + 1``; 2 for RoBERTa), so its table has
``max_pos + pad_token_id + 1`` rows. RoBERTa's learned rows (from ``pad_token_id + 1`` on) are tiled from
there; BERT's rows start at 0, so BERT's row ``t`` lands at ``pad_token_id + 1 + t`` (rows below that
are zero: only the padding row is read, by padding tokens). BART's positions also start at an offset of
2 while LED's start at 0: BART's row ``2 + t`` becomes LED's row ``t``, tiled to ``max_pos`` in the
encoder, kept as is (``max_position_embeddings`` rows) in the decoder.

What cannot be carried over raises ``ValueError`` (e.g. relative position embeddings, a decoder-style
BERT, BART with ``scale_embedding=True``, a BERT masked-LM head whose activation is not GELU) and an
unsupported model class raises ``NotImplementedError``.
"""

import copy
import math
import re
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

__all__ = ["to_longformer", "to_led", "convert_to_long", "copy_local_to_global", "load_long_model"]

WindowArg = Union[int, Sequence[int]]

# Long-model classes load_long_model accepts from a saved config's `architectures`.
_LONG_ARCHITECTURES = (
    "LongformerModel", "LongformerForMaskedLM", "LongformerForSequenceClassification",
    "LongformerForTokenClassification", "LongformerForQuestionAnswering", "LongformerForMultipleChoice",
    "LEDModel", "LEDForConditionalGeneration", "LEDForSequenceClassification", "LEDForQuestionAnswering",
)

# The GELU variants that compute what Longformer's masked-LM head hard-codes (exact, erf-based GELU).
_EXACT_GELU = ("gelu", "gelu_python")


def _transformers():
    try:
        import transformers
    except ImportError as exc:  # transformers is optional for the rest of the package
        raise ImportError("longformer_ext.convert needs `transformers` (pip install 'transformers>=4.57,<6')") from exc
    return transformers


# --------------------------------------------------------------------------------------------------
# Windows and positions


def _hf_windows(num_layers: int, attention_window: Optional[WindowArg], window: Optional[WindowArg],
                default: int) -> List[int]:
    """Per-layer windows in Hugging Face's two-sided convention, from exactly one of the two names."""
    if attention_window is not None and window is not None:
        raise ValueError("pass either attention_window (Hugging Face, two-sided, even) or window "
                         "(longformer_ext, one-sided), not both")
    if attention_window is None and window is None:
        attention_window = default

    def per_layer(value, name):
        values = [value] * num_layers if isinstance(value, int) else list(value)
        if len(values) != num_layers:
            raise ValueError(f"{name} has {len(values)} values but the model has {num_layers} layers")
        for v in values:
            if not isinstance(v, int) or isinstance(v, bool):
                raise ValueError(f"{name} values must be ints, got {v!r}")
        return values

    if window is not None:
        one_sided = per_layer(window, "window")
        if any(w < 1 for w in one_sided):
            # Hugging Face's attention asserts attention_window > 0, so w = 0 has no HF config.
            raise ValueError(f"window (one-sided) must be >= 1 in every layer, got {one_sided}")
        return [2 * w for w in one_sided]
    two_sided = per_layer(attention_window, "attention_window")
    if any(w <= 0 or w % 2 for w in two_sided):
        raise ValueError(f"attention_window (Hugging Face, two-sided) must be even and > 0 in every layer, "
                         f"got {two_sided}; for a one-sided window use window=")
    return two_sided


def _tile_rows(rows: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` rows made of ``rows`` repeated (the last copy cut short)."""
    repeats = math.ceil(count / rows.shape[0])
    return rows.repeat(repeats, 1)[:count].clone()


# --------------------------------------------------------------------------------------------------
# Carrying a state dict over


def _carry_state(source: nn.Module, target: nn.Module, rename: Callable[[str], Optional[str]],
                 computed: Dict[str, torch.Tensor], skip: Sequence[str] = ()) -> None:
    """Loads ``source``'s weights into ``target`` under new names; every target entry must be accounted for.

    ``rename`` maps a source key to a target key (None: no counterpart). ``computed`` holds target
    entries built here (position tables). Global projections missing from the source are copied from
    the local ones. Anything left over on either side is an error, so a model with an extra or missing
    piece is refused instead of converted with silently random weights.
    """
    carried: Dict[str, torch.Tensor] = {}
    unmatched = []
    for key, value in source.state_dict().items():
        if key in skip:
            continue
        new_key = rename(key)
        if new_key is None:
            unmatched.append(key)
        else:
            carried[new_key] = value
    carried.update(computed)

    target_state = target.state_dict()
    for key in target_state:
        if key not in carried:
            match = re.search(r"\.(query|key|value)_global\.(weight|bias)$", key)
            local = key[:match.start()] + f".{match.group(1)}.{match.group(2)}" if match else None
            if local is not None and local in carried:
                carried[key] = carried[local].clone()

    missing = sorted(set(target_state) - set(carried))
    unexpected = sorted(set(carried) - set(target_state))
    if unmatched or missing or unexpected:
        raise ValueError(
            f"cannot carry {type(source).__name__} over to {type(target).__name__}: "
            f"source weights without a place: {unmatched or 'none'}; target weights with no source: "
            f"{missing or 'none'}; renamed weights the target lacks: {unexpected or 'none'}")
    for key, value in carried.items():
        if tuple(value.shape) != tuple(target_state[key].shape):
            raise ValueError(f"cannot carry {key}: shape {tuple(value.shape)} in the source, "
                             f"{tuple(target_state[key].shape)} in {type(target).__name__}")
    target.load_state_dict(carried, strict=True)


def _model_dtype_device(model: nn.Module) -> Tuple[torch.dtype, torch.device]:
    param = next(model.parameters())
    return param.dtype, param.device


# --------------------------------------------------------------------------------------------------
# RoBERTa / BERT -> Longformer


def _encoder_source(model: nn.Module):
    """(kind, base-model attribute, head kind, target class name) for a supported encoder."""
    tf = _transformers()
    table = [
        (tf.RobertaForMaskedLM, "roberta", "roberta", "roberta_lm", "LongformerForMaskedLM"),
        (tf.RobertaModel, "roberta", None, None, "LongformerModel"),
        (tf.BertForMaskedLM, "bert", "bert", "bert_lm", "LongformerForMaskedLM"),
        (tf.BertModel, "bert", None, None, "LongformerModel"),
    ]
    for cls, kind, base_attr, head, target in table:
        # Exact types: a subclass may add modules or change the forward, which carrying weights by name
        # would not notice.
        if type(model) is cls:
            return kind, base_attr, head, target
    supported = ", ".join(row[0].__name__ for row in table)
    raise NotImplementedError(f"to_longformer converts {supported}; got {type(model).__name__}")


def _check_encoder_config(config, kind: str) -> None:
    position_type = getattr(config, "position_embedding_type", "absolute")
    if position_type != "absolute":
        raise ValueError(f"position_embedding_type={position_type!r}: Longformer has absolute learned positions "
                         "only, relative position weights cannot be carried over")
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        raise ValueError("a decoder-style (causal or cross-attending) encoder cannot become a Longformer "
                         "encoder; convert an encoder-only model")
    if not isinstance(config.hidden_act, str):
        raise ValueError("hidden_act is a Python callable; a saved Longformer config needs its name")
    if not isinstance(config.pad_token_id, int) or config.pad_token_id < 0:
        raise ValueError(f"pad_token_id={config.pad_token_id!r}: Longformer numbers positions from "
                         "pad_token_id + 1 and needs a non-negative pad token id")
    if kind == "roberta" and config.max_position_embeddings <= config.pad_token_id + 1:
        raise ValueError(f"RoBERTa max_position_embeddings={config.max_position_embeddings} leaves no learned "
                         f"position rows after the offset {config.pad_token_id + 1}")


def to_longformer(model: nn.Module, max_pos: int = 4096, *, attention_window: Optional[WindowArg] = None,
                  window: Optional[WindowArg] = None):
    """Converts a RoBERTa or BERT model into a ``transformers`` Longformer accepting ``max_pos`` tokens.

    Args:
        model: ``RobertaModel``, ``RobertaForMaskedLM``, ``BertModel`` or ``BertForMaskedLM``.
        max_pos: tokens the long model accepts (the paper: 4096). Its position table gets
            ``max_pos + pad_token_id + 1`` rows, filled by copying the learned rows repeatedly.
        attention_window: Hugging Face's two-sided window (even), int or one per layer. Default 512.
        window: longformer_ext's one-sided window (``w`` keys on each side), int or one per layer;
            stored as ``attention_window = 2 * w``. Give this or ``attention_window``, not both.

    Returns:
        ``LongformerModel`` (from a ``*Model``) or ``LongformerForMaskedLM`` (from a ``*ForMaskedLM``),
        same dtype and device as ``model``, in eval mode if ``model`` was. The source is not modified.
    """
    tf = _transformers()
    kind, base_attr, head, target_name = _encoder_source(model)
    src_config = model.config
    _check_encoder_config(src_config, kind)
    base = getattr(model, base_attr) if base_attr else model
    pad = src_config.pad_token_id
    offset = pad + 1  # Longformer's first position id (RoBERTa convention)
    if kind == "roberta":
        learned = src_config.max_position_embeddings - offset
    else:
        learned = src_config.max_position_embeddings
    if not isinstance(max_pos, int) or max_pos < learned:
        raise ValueError(f"max_pos={max_pos!r} must be an int >= the source's {learned} positions "
                         "(this conversion lengthens a model)")
    if head == "bert_lm" and src_config.hidden_act not in _EXACT_GELU:
        raise ValueError(f"BERT's masked-LM head uses hidden_act={src_config.hidden_act!r}, but Longformer's head "
                         "computes exact GELU; its outputs would change. Convert BertModel instead.")

    windows = _hf_windows(src_config.num_hidden_layers, attention_window, window, default=512)
    # RoBERTa configs carry no separator id; its separator is the eos token (</s>).
    sep = getattr(src_config, "sep_token_id", None)
    if sep is None and kind == "roberta":
        sep = src_config.eos_token_id
    config = tf.LongformerConfig(
        attention_window=windows,
        vocab_size=src_config.vocab_size,
        hidden_size=src_config.hidden_size,
        num_hidden_layers=src_config.num_hidden_layers,
        num_attention_heads=src_config.num_attention_heads,
        intermediate_size=src_config.intermediate_size,
        hidden_act=src_config.hidden_act,
        hidden_dropout_prob=src_config.hidden_dropout_prob,
        attention_probs_dropout_prob=src_config.attention_probs_dropout_prob,
        max_position_embeddings=max_pos + offset,
        type_vocab_size=src_config.type_vocab_size,
        initializer_range=src_config.initializer_range,
        layer_norm_eps=src_config.layer_norm_eps,
        pad_token_id=pad,
        bos_token_id=src_config.bos_token_id,
        eos_token_id=src_config.eos_token_id,
        sep_token_id=sep,
        tie_word_embeddings=src_config.tie_word_embeddings,
        chunk_size_feed_forward=src_config.chunk_size_feed_forward,
    )
    dtype, device = _model_dtype_device(model)
    if target_name == "LongformerModel":
        target = tf.LongformerModel(config, add_pooling_layer=base.pooler is not None)
        src_prefix, tgt_prefix = "", ""
    else:
        target = tf.LongformerForMaskedLM(config)
        src_prefix, tgt_prefix = base_attr + ".", "longformer."
    target.to(device=device, dtype=dtype)

    position_key = src_prefix + "embeddings.position_embeddings.weight"
    old = base.embeddings.position_embeddings.weight.detach()
    table = torch.zeros(max_pos + offset, old.shape[1], dtype=old.dtype, device=old.device)
    if kind == "roberta":
        table[:offset] = old[:offset]  # the padding row (and unused rows below it) stay as they were
        table[offset:] = _tile_rows(old[offset:], max_pos)
    else:
        table[offset:] = _tile_rows(old, max_pos)  # BERT row t -> pad + 1 + t; rows below stay 0
    computed = {tgt_prefix + "embeddings.position_embeddings.weight": table}

    bert_head = {
        "cls.predictions.transform.dense.": "lm_head.dense.",
        "cls.predictions.transform.LayerNorm.": "lm_head.layer_norm.",
        "cls.predictions.decoder.": "lm_head.decoder.",
        "cls.predictions.bias": "lm_head.bias",
    }

    def rename(key: str) -> Optional[str]:
        if key.startswith(src_prefix):  # the encoder body: same names in all three
            return tgt_prefix + key[len(src_prefix):]
        if head == "roberta_lm" and key.startswith("lm_head."):
            return key  # same names in RobertaLMHead and LongformerLMHead
        if head == "bert_lm":
            for old_name, new_name in bert_head.items():
                if key.startswith(old_name):
                    return new_name + key[len(old_name):]
        return None

    _carry_state(model, target, rename, computed, skip=(position_key,))
    target.train(model.training)
    return target


# --------------------------------------------------------------------------------------------------
# BART -> LED

_BART_ATTENTION = {"q_proj": "longformer_self_attn.query", "k_proj": "longformer_self_attn.key",
                   "v_proj": "longformer_self_attn.value", "out_proj": "output"}
_BART_OFFSET = 2  # BartLearnedPositionalEmbedding looks up row position + 2; LED looks up row position


def to_led(model: nn.Module, max_pos: int = 16384, *, attention_window: Optional[WindowArg] = None,
           window: Optional[WindowArg] = None):
    """Converts a BART model into a ``transformers`` LED whose encoder accepts ``max_pos`` tokens.

    Args:
        model: ``BartModel`` or ``BartForConditionalGeneration``.
        max_pos: encoder tokens (the paper's LED: 16384). BART's learned encoder rows are copied
            repeatedly; the decoder keeps BART's ``max_position_embeddings`` positions.
        attention_window / window: the encoder's window, as in :func:`to_longformer` (default 1024
            two-sided, as the paper's LED).

    Returns:
        ``LEDModel`` or ``LEDForConditionalGeneration``, same dtype and device as ``model``.
    """
    tf = _transformers()
    if type(model) is tf.BartForConditionalGeneration:
        target_cls, src_prefix, tgt_prefix = tf.LEDForConditionalGeneration, "model.", "led."
    elif type(model) is tf.BartModel:
        target_cls, src_prefix, tgt_prefix = tf.LEDModel, "", ""
    else:
        raise NotImplementedError(f"to_led converts BartModel and BartForConditionalGeneration; "
                                  f"got {type(model).__name__}")
    src_config = model.config
    if src_config.scale_embedding:
        # LED adds token and position embeddings unscaled; the token table is tied to the LM head, so the
        # scale cannot be folded into it either.
        raise ValueError("BART with scale_embedding=True: LED has no embedding scale, outputs would change")
    if not isinstance(src_config.activation_function, str):
        raise ValueError("activation_function is a Python callable; a saved LED config needs its name")
    learned = src_config.max_position_embeddings
    if not isinstance(max_pos, int) or max_pos < learned:
        raise ValueError(f"max_pos={max_pos!r} must be an int >= BART's {learned} encoder positions")

    windows = _hf_windows(src_config.encoder_layers, attention_window, window, default=1024)
    config = tf.LEDConfig(
        attention_window=windows,
        vocab_size=src_config.vocab_size,
        max_encoder_position_embeddings=max_pos,
        max_decoder_position_embeddings=learned,
        encoder_layers=src_config.encoder_layers,
        encoder_ffn_dim=src_config.encoder_ffn_dim,
        encoder_attention_heads=src_config.encoder_attention_heads,
        decoder_layers=src_config.decoder_layers,
        decoder_ffn_dim=src_config.decoder_ffn_dim,
        decoder_attention_heads=src_config.decoder_attention_heads,
        encoder_layerdrop=src_config.encoder_layerdrop,
        decoder_layerdrop=src_config.decoder_layerdrop,
        use_cache=src_config.use_cache,
        activation_function=src_config.activation_function,
        d_model=src_config.d_model,
        dropout=src_config.dropout,
        attention_dropout=src_config.attention_dropout,
        activation_dropout=src_config.activation_dropout,
        init_std=src_config.init_std,
        classifier_dropout=src_config.classifier_dropout,
        pad_token_id=src_config.pad_token_id,
        bos_token_id=src_config.bos_token_id,
        eos_token_id=src_config.eos_token_id,
        decoder_start_token_id=src_config.decoder_start_token_id,
        tie_word_embeddings=src_config.tie_word_embeddings,
    )
    dtype, device = _model_dtype_device(model)
    target = target_cls(config).to(device=device, dtype=dtype)
    if getattr(model, "generation_config", None) is not None and getattr(target, "generation_config", None) is not None:
        # A fine-tuned BART's decoding settings (forced bos/eos, beams, length penalty, ...) describe its
        # decoder, which LED keeps unchanged; they live in the generation config, not in LEDConfig.
        target.generation_config = copy.deepcopy(model.generation_config)

    base = model.model if src_prefix else model
    encoder_rows = base.encoder.embed_positions.weight.detach()[_BART_OFFSET:]
    decoder_rows = base.decoder.embed_positions.weight.detach()[_BART_OFFSET:]
    computed = {
        tgt_prefix + "encoder.embed_positions.weight": _tile_rows(encoder_rows, max_pos),
        tgt_prefix + "decoder.embed_positions.weight": decoder_rows.clone(),
    }
    skip = (src_prefix + "encoder.embed_positions.weight", src_prefix + "decoder.embed_positions.weight")
    encoder_attention = re.compile(r"^(encoder\.layers\.\d+\.self_attn\.)(q_proj|k_proj|v_proj|out_proj)\.(.+)$")

    def rename(key: str) -> Optional[str]:
        if not key.startswith(src_prefix):
            # The LM head and final_logits_bias sit outside `model.` with the same names in both.
            return key if key in ("lm_head.weight", "final_logits_bias") else None
        rest = key[len(src_prefix):]
        match = encoder_attention.match(rest)
        if match:
            rest = match.group(1) + _BART_ATTENTION[match.group(2)] + "." + match.group(3)
        return tgt_prefix + rest

    _carry_state(model, target, rename, computed, skip=skip)
    target.train(model.training)
    return target


def convert_to_long(model: nn.Module, max_pos: Optional[int] = None, **window_kwargs):
    """:func:`to_longformer` for RoBERTa/BERT, :func:`to_led` for BART (``max_pos`` defaults 4096 / 16384)."""
    tf = _transformers()
    if isinstance(model, (tf.BartModel, tf.BartForConditionalGeneration)):
        return to_led(model, 16384 if max_pos is None else max_pos, **window_kwargs)
    return to_longformer(model, 4096 if max_pos is None else max_pos, **window_kwargs)


# --------------------------------------------------------------------------------------------------
# After conversion


_PROJECTIONS = ("query", "key", "value")


@torch.no_grad()
def copy_local_to_global(model: nn.Module) -> int:
    """Copies ``query/key/value`` into ``query_global/key_global/value_global`` in every attention layer.

    Works on Hugging Face Longformer / LED models, patched or not (any module holding the six
    projections under those names). The copy is in place, so an optimizer holding the global
    parameters keeps working. Returns the number of layers copied; raises ``ValueError`` if none.
    """
    layers = 0
    for module in model.modules():
        if all(isinstance(getattr(module, name, None), nn.Linear) for name in
               _PROJECTIONS + tuple(p + "_global" for p in _PROJECTIONS)):
            for name in _PROJECTIONS:
                local, global_ = getattr(module, name), getattr(module, name + "_global")
                global_.weight.copy_(local.weight)
                if (local.bias is None) != (global_.bias is None):
                    raise ValueError(f"{name} and {name}_global disagree on having a bias")
                if local.bias is not None:
                    global_.bias.copy_(local.bias)
            layers += 1
    if layers == 0:
        raise ValueError(f"{type(model).__name__} has no attention layer with local and global projections "
                         "(query/key/value and query_global/key_global/value_global)")
    return layers


def load_long_model(path, *, patch: bool = True, model_class=None, **from_pretrained_kwargs):
    """Loads a converted model saved with ``save_pretrained`` and puts longformer_ext's attention in place.

    Args:
        path: a directory written by ``save_pretrained``.
        patch: apply ``longformer_ext.integrations.transformers.patch`` (in place). ``False`` returns
            the plain Hugging Face model.
        model_class: a ``transformers`` class to load with; default: the config's first
            ``architectures`` entry (Longformer or LED classes only).
        **from_pretrained_kwargs: passed to ``from_pretrained`` (e.g. ``dtype``). transformers 5
            loads a checkpoint in the dtype it was saved in (4.57: float32 unless asked); pass
            ``dtype=torch.float32`` for float32 weights either way.
    """
    tf = _transformers()
    if model_class is None:
        config = tf.AutoConfig.from_pretrained(path)
        architectures = getattr(config, "architectures", None) or []
        if not architectures or architectures[0] not in _LONG_ARCHITECTURES:
            raise ValueError(f"{path}: config architectures {architectures} is not one of {_LONG_ARCHITECTURES}; "
                             "pass model_class= to choose the class")
        model_class = getattr(tf, architectures[0], None)
        if model_class is None:
            raise ValueError(f"{path}: its architecture {architectures[0]} does not exist in the installed transformers "
                             f"{tf.__version__} (LEDForSequenceClassification was removed in transformers 5); pass "
                             "model_class= to load it with another class, e.g. transformers.LEDModel")
    model = model_class.from_pretrained(path, **from_pretrained_kwargs)
    if patch:
        from .integrations.transformers import patch as patch_model
        model = patch_model(model)
    return model
