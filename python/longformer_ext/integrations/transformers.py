"""Hugging Face ``transformers`` drop-in: ``patch(model)``.

``patch`` makes a ``LongformerModel`` (or any model holding one: ``LongformerForMaskedLM``,
``...ForSequenceClassification``, ``...ForQuestionAnswering``, ``...ForTokenClassification``,
``...ForMultipleChoice``) and an ``LEDModel`` / ``LEDForConditionalGeneration`` (or any model holding an
``LEDEncoder``) use longformer_ext's attention, in place, keeping every weight:

* each layer's self-attention core (``LongformerSelfAttention`` / ``LEDEncoderSelfAttention``) is
  replaced by ``HFLongformerSelfAttention``, which reuses the layer's six ``nn.Linear`` modules
  themselves (no copies), so parameter names, the state dict and ``save_pretrained`` are unchanged;
* ``LongformerModel.forward``, ``LongformerEncoder.forward`` and ``LEDEncoder.forward`` are replaced
  (on the instances, not the classes) by versions that do not pad the input to a multiple of
  ``attention_window`` (our op takes any length) and pass boolean role masks to the layers instead
  of Hugging Face's additive ones, so that nothing reads tensor values on the host: without
  ``output_attentions`` and without dropout in training the patched model compiles with
  ``torch.compile(fullgraph=True)``.

Masks follow Hugging Face's model-level convention: ``attention_mask`` 1 = real, 0 = padding;
``global_attention_mask`` 1 = global. (Hugging Face's legacy merged ``attention_mask`` with 2 = global
is not read as global: give ``global_attention_mask``; reading it would cost a host sync.) Outputs have Hugging Face's types and shapes; with ``output_attentions=True``,
``attentions[l]`` is ``[B, H, N, x + attention_window + 1]`` (``x`` = most global tokens in a row)
in Hugging Face's layout and ``global_attentions[l]`` is ``[B, H, N, x]``. Differences: nothing is
padded, so sequence axes have the input's length (unpatched Hugging Face leaves ``global_attentions``
padded), and the unused global slots of rows with fewer than ``x`` global tokens hold 0 in
``global_attentions`` (Hugging Face fills them with a uniform filler row).

Attention dropout (``attention_probs_dropout_prob``, LED's ``attention_dropout``) is applied in
training through the module's unfused path; ``head_mask`` is applied exactly.

Supported ``transformers`` versions: ``SUPPORTED_TRANSFORMERS`` (the range the tests run against);
``patch`` raises for others because it replaces methods whose signatures it must match.
"""

import types
from typing import Optional

import torch
from torch import Tensor, nn

from ..nn import LongformerSelfAttention

__all__ = ["HFLongformerSelfAttention", "SUPPORTED_TRANSFORMERS", "patch"]

SUPPORTED_TRANSFORMERS = (">=4.57", "<4.58")
_SUPPORTED_RANGE = ("4.57", "4.58")


def _check_transformers_version():
    try:
        import transformers
    except ImportError as exc:
        raise ImportError("longformer_ext.integrations.transformers.patch needs `transformers` "
                          f"({','.join(SUPPORTED_TRANSFORMERS)})") from exc
    from packaging.version import Version

    version = Version(Version(transformers.__version__).base_version)
    low, high = (Version(v) for v in _SUPPORTED_RANGE)
    if not low <= version < high:
        raise RuntimeError(
            f"longformer_ext.integrations.transformers.patch supports transformers {','.join(SUPPORTED_TRANSFORMERS)} "
            f"(the versions it is tested against), but {transformers.__version__} is installed. It replaces "
            "methods of Hugging Face's Longformer/LED classes and must match their signatures; install a "
            "supported version, e.g. `pip install transformers==4.57.6`")


class HFLongformerSelfAttention(LongformerSelfAttention):
    """``LongformerSelfAttention`` with Hugging Face's layer-level call signature.

    Stands in for ``transformers``' ``LongformerSelfAttention`` and ``LEDEncoderSelfAttention``:
    ``forward(hidden_states, attention_mask=None, layer_head_mask=None, is_index_masked=None,
    is_index_global_attn=None, is_global_attn=None, output_attentions=False)`` returns
    ``(output [B, N, C],)``, plus ``local_probs [B, N, H, x + W + 1]`` and, when some token is global,
    ``global_probs [B, H, x, N]`` with ``output_attentions``.

    Roles come from the boolean ``is_index_masked`` / ``is_index_global_attn`` when given, else from
    the sign of the additive ``attention_mask`` (negative = padding, positive = global), as in
    Hugging Face. ``is_global_attn=False`` skips the global-token pass; ``None`` means "not known",
    so the global mask is used as it is (no host sync).
    """

    @classmethod
    def from_hf(cls, hf_module: nn.Module) -> "HFLongformerSelfAttention":
        """Wraps the ``nn.Linear`` modules of a Hugging Face self-attention core (shared, not copied)."""
        module = cls.from_projections(
            hf_module.query, hf_module.key, hf_module.value, hf_module.query_global, hf_module.key_global,
            hf_module.value_global, num_heads=hf_module.num_heads,
            attention_window=2 * hf_module.one_sided_attn_window_size, dropout=float(hf_module.dropout))
        # Attributes other Hugging Face code may read from the layer it replaces.
        module.layer_id = hf_module.layer_id
        module.one_sided_attn_window_size = hf_module.one_sided_attn_window_size
        # A new module starts in training mode; patching an eval model must not turn dropout on.
        return module.train(hf_module.training)

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None,
                layer_head_mask: Optional[Tensor] = None, is_index_masked: Optional[Tensor] = None,
                is_index_global_attn: Optional[Tensor] = None, is_global_attn: Optional[bool] = None,
                output_attentions: bool = False):
        if attention_mask is not None:
            if is_index_masked is None:
                is_index_masked = attention_mask < 0
            if is_index_global_attn is None:
                is_index_global_attn = attention_mask > 0
        real = None if is_index_masked is None else ~is_index_masked
        glob = None if is_global_attn is False else is_index_global_attn
        if not output_attentions:
            return (super().forward(hidden_states, real, glob, layer_head_mask),)
        out, probs = super().forward(hidden_states, real, glob, layer_head_mask, output_attentions=True)
        # Hugging Face's layout: [B, N, H, x global slots + band slots], self at column x + W/2.
        local_probs = torch.cat([probs.global_keys, probs.band], dim=-1).transpose(1, 2)
        if is_global_attn is None:
            is_global_attn = probs.global_index.shape[1] > 0
        return (out, local_probs, probs.global_rows) if is_global_attn else (out, local_probs)


# ------------------------------------------------------------------------------------------------
# Masks


def _roles_from_hf_masks(attention_mask: Optional[Tensor], global_attention_mask: Optional[Tensor]):
    """(is_index_masked, is_index_global_attn) bool [B, N], or None where there is nothing to mask.

    Same rule as Hugging Face's merge ``m = attention_mask * (global_attention_mask + 1)`` followed by
    its additive transform ``(1 - m) * min``: padding where ``m < 1``, global where ``m > 1``;
    without a global_attention_mask, no token is global (``None``).
    """
    if global_attention_mask is None:
        # No global tokens: the global pass (three more projections and the global op) is skipped.
        # Hugging Face's legacy merged mask (2 = global in attention_mask) needs a host sync to
        # detect, so it is not read: pass global_attention_mask instead.
        return (None if attention_mask is None else attention_mask < 1), None
    if attention_mask is None:
        merged = global_attention_mask + 1
    else:
        merged = attention_mask * (global_attention_mask + 1)
    return merged < 1, merged > 1


def _global_flag(is_index_global_attn: Optional[Tensor], output_attentions: bool) -> Optional[bool]:
    """Whether any token is global: known statically when there is no global mask; read from the
    data only when attentions are returned (their shapes depend on it anyway)."""
    if is_index_global_attn is None:
        return False
    if output_attentions:
        return bool(is_index_global_attn.any())
    return None


# ------------------------------------------------------------------------------------------------
# Longformer


def _longformer_model_forward(self, input_ids=None, attention_mask=None, global_attention_mask=None, head_mask=None,
                              token_type_ids=None, position_ids=None, inputs_embeds=None, output_attentions=None,
                              output_hidden_states=None, return_dict=None):
    """``LongformerModel.forward`` without padding to the window and with boolean role masks."""
    from transformers.models.longformer.modeling_longformer import LongformerBaseModelOutputWithPooling

    config = self.config
    output_attentions = config.output_attentions if output_attentions is None else output_attentions
    output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
    return_dict = config.use_return_dict if return_dict is None else return_dict

    if input_ids is not None and inputs_embeds is not None:
        raise ValueError("You cannot specify both input_ids and inputs_embeds at the same time")
    if input_ids is not None:
        self.warn_if_padding_and_no_attention_mask(input_ids, attention_mask)
        input_shape = input_ids.size()
        device = input_ids.device
    elif inputs_embeds is not None:
        input_shape = inputs_embeds.size()[:-1]
        device = inputs_embeds.device
    else:
        raise ValueError("You have to specify either input_ids or inputs_embeds")
    if token_type_ids is None:
        token_type_ids = torch.zeros(input_shape, dtype=torch.long, device=device)

    is_index_masked, is_index_global_attn = _roles_from_hf_masks(attention_mask, global_attention_mask)
    embedding_output = self.embeddings(input_ids=input_ids, position_ids=position_ids, token_type_ids=token_type_ids,
                                       inputs_embeds=inputs_embeds)
    encoder_outputs = self.encoder(embedding_output, head_mask=head_mask, output_attentions=output_attentions,
                                   output_hidden_states=output_hidden_states, return_dict=return_dict,
                                   is_index_masked=is_index_masked, is_index_global_attn=is_index_global_attn)
    sequence_output = encoder_outputs[0]
    pooled_output = self.pooler(sequence_output) if self.pooler is not None else None
    if not return_dict:
        return (sequence_output, pooled_output) + tuple(encoder_outputs[1:])
    return LongformerBaseModelOutputWithPooling(
        last_hidden_state=sequence_output, pooler_output=pooled_output, hidden_states=encoder_outputs.hidden_states,
        attentions=encoder_outputs.attentions, global_attentions=encoder_outputs.global_attentions)


def _run_layers(layers, hidden_states, head_mask, is_index_masked, is_index_global_attn, is_global_attn,
                output_attentions, output_hidden_states, layerdrop=0.0):
    """The layer loop shared by the patched Longformer and LED encoders: roles instead of additive
    masks, attentions in Hugging Face's layout. A layer dropped by LayerDrop contributes no attentions.

    Returns (hidden_states, all_hidden_states, all_attentions, all_global_attentions); the last three
    are None when not asked for.
    """
    if head_mask is not None and head_mask.size(0) != len(layers):
        raise ValueError(f"The head_mask should be specified for {len(layers)} layers, but it is for "
                         f"{head_mask.size(0)}.")
    all_hidden_states = () if output_hidden_states else None
    all_attentions = () if output_attentions else None
    all_global_attentions = () if (output_attentions and is_global_attn) else None
    for idx, layer in enumerate(layers):
        if output_hidden_states:
            all_hidden_states = all_hidden_states + (hidden_states,)
        if layerdrop > 0 and bool(torch.rand([]) < layerdrop):
            continue
        layer_outputs = layer(hidden_states, attention_mask=None,
                              layer_head_mask=head_mask[idx] if head_mask is not None else None,
                              is_index_masked=is_index_masked, is_index_global_attn=is_index_global_attn,
                              is_global_attn=is_global_attn, output_attentions=output_attentions)
        hidden_states = layer_outputs[0]
        if output_attentions:
            all_attentions = all_attentions + (layer_outputs[1].transpose(1, 2),)
            if is_global_attn:
                all_global_attentions = all_global_attentions + (layer_outputs[2].transpose(2, 3),)
    if output_hidden_states:
        all_hidden_states = all_hidden_states + (hidden_states,)
    return hidden_states, all_hidden_states, all_attentions, all_global_attentions


def _longformer_encoder_forward(self, hidden_states, attention_mask=None, head_mask=None, padding_len=0,
                                output_attentions=False, output_hidden_states=False, return_dict=True, *,
                                is_index_masked=None, is_index_global_attn=None):
    """``LongformerEncoder.forward`` without the host sync (``.item()``) on the global mask.

    Takes boolean roles (``is_index_masked``, ``is_index_global_attn``) or, as Hugging Face's, an
    additive ``attention_mask`` whose sign gives them.
    """
    from transformers.models.longformer.modeling_longformer import LongformerBaseModelOutput

    if attention_mask is not None and is_index_masked is None:
        is_index_masked, is_index_global_attn = attention_mask < 0, attention_mask > 0
    is_global_attn = _global_flag(is_index_global_attn, output_attentions)
    hidden_states, all_hidden_states, all_attentions, all_global_attentions = _run_layers(
        self.layer, hidden_states, head_mask, is_index_masked, is_index_global_attn, is_global_attn,
        output_attentions, output_hidden_states)

    if padding_len:  # only when a caller padded on its own; the patched model never does
        n = hidden_states.shape[1] - padding_len
        hidden_states = hidden_states[:, :n]
        if output_hidden_states:
            all_hidden_states = tuple(state[:, :n] for state in all_hidden_states)
        if output_attentions:
            all_attentions = tuple(state[:, :, :n] for state in all_attentions)

    if not return_dict:
        return tuple(v for v in (hidden_states, all_hidden_states, all_attentions, all_global_attentions)
                     if v is not None)
    return LongformerBaseModelOutput(last_hidden_state=hidden_states, hidden_states=all_hidden_states,
                                     attentions=all_attentions, global_attentions=all_global_attentions)


def _patch_longformer_model(model) -> None:
    for layer in model.encoder.layer:
        if not isinstance(layer.attention.self, HFLongformerSelfAttention):
            layer.attention.self = HFLongformerSelfAttention.from_hf(layer.attention.self)
    model.forward = types.MethodType(_longformer_model_forward, model)
    model.encoder.forward = types.MethodType(_longformer_encoder_forward, model.encoder)


# ------------------------------------------------------------------------------------------------
# LED (encoder only: the decoder's full attention is untouched)


def _led_encoder_forward(self, input_ids=None, attention_mask=None, global_attention_mask=None, head_mask=None,
                         inputs_embeds=None, output_attentions=None, output_hidden_states=None, return_dict=None):
    """``LEDEncoder.forward`` without padding to the window and without the ``.item()`` host sync."""
    from transformers.models.led.modeling_led import LEDEncoderBaseModelOutput

    config = self.config
    output_attentions = config.output_attentions if output_attentions is None else output_attentions
    output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
    return_dict = config.use_return_dict if return_dict is None else return_dict

    if input_ids is not None and inputs_embeds is not None:
        raise ValueError("You cannot specify both input_ids and inputs_embeds at the same time")
    if input_ids is None and inputs_embeds is None:
        raise ValueError("You have to specify either input_ids or inputs_embeds")
    if inputs_embeds is None:
        inputs_embeds = self.embed_tokens(input_ids)
    is_index_masked, is_index_global_attn = _roles_from_hf_masks(attention_mask, global_attention_mask)
    is_global_attn = _global_flag(is_index_global_attn, output_attentions)

    hidden_states = inputs_embeds + self.embed_positions(inputs_embeds.shape[:2])
    hidden_states = self.layernorm_embedding(hidden_states)
    hidden_states = nn.functional.dropout(hidden_states, p=self.dropout, training=self.training)

    # LayerDrop: decided on the host, in training only (so eval stays free of host syncs).
    layerdrop = self.layerdrop if self.training else 0.0
    hidden_states, encoder_states, all_attentions, all_global_attentions = _run_layers(
        self.layers, hidden_states, head_mask, is_index_masked, is_index_global_attn, is_global_attn,
        output_attentions, output_hidden_states, layerdrop)

    if not return_dict:
        return tuple(v for v in (hidden_states, encoder_states, all_attentions, all_global_attentions) if v is not None)
    return LEDEncoderBaseModelOutput(last_hidden_state=hidden_states, hidden_states=encoder_states,
                                     attentions=all_attentions, global_attentions=all_global_attentions)


def _patch_led_encoder(encoder) -> None:
    for layer in encoder.layers:
        attention = layer.self_attn
        if not isinstance(attention.longformer_self_attn, HFLongformerSelfAttention):
            attention.longformer_self_attn = HFLongformerSelfAttention.from_hf(attention.longformer_self_attn)
    encoder.forward = types.MethodType(_led_encoder_forward, encoder)


# ------------------------------------------------------------------------------------------------


def patch(model: nn.Module) -> nn.Module:
    """Makes a Hugging Face Longformer / LED model use longformer_ext's attention; returns ``model``.

    Patches, in place, every ``LongformerModel`` and ``LEDEncoder`` inside ``model`` (so the task
    heads, ``LEDModel`` and ``LEDForConditionalGeneration`` are covered; LED's decoder is left as it
    is). Weights are kept and shared (same ``nn.Linear`` modules, same parameter names). Patching
    twice is harmless. Raises ``RuntimeError`` for an unsupported ``transformers`` version and
    ``TypeError`` when ``model`` holds no Longformer or LED encoder.
    """
    _check_transformers_version()
    from transformers.models.led.modeling_led import LEDEncoder
    from transformers.models.longformer.modeling_longformer import LongformerModel

    if not isinstance(model, nn.Module):
        raise TypeError(f"patch() expects a transformers model (an nn.Module), got {type(model).__name__}")
    targets = [m for m in model.modules() if isinstance(m, (LongformerModel, LEDEncoder))]
    if not targets:
        raise TypeError(f"patch() found no LongformerModel or LEDEncoder in {type(model).__name__}; it supports "
                        "transformers' Longformer models (LongformerModel, LongformerFor*) and LED models")
    for target in targets:
        if isinstance(target, LongformerModel):
            _patch_longformer_model(target)
        else:
            _patch_led_encoder(target)
    return model
