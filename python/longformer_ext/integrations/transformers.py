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
in Hugging Face's layout and ``global_attentions[l]`` is ``[B, H, N, x]``, with Hugging Face's values
everywhere, the filler rows of unused global slots (rows with fewer than ``x`` global tokens)
included. One difference: nothing is padded, so sequence axes have the input's length (unpatched
Hugging Face leaves ``global_attentions`` padded to the window).

Attention dropout (``attention_probs_dropout_prob``, LED's ``attention_dropout``) is applied in
training through the module's unfused path. ``head_mask`` is applied exactly on transformers 4.57;
transformers 5 removed head masking (its models accept and ignore the argument), so there the
patched model raises ``ValueError`` for one instead of dropping it.

Supported ``transformers`` versions: 4.57.x and 5.x (``SUPPORTED_TRANSFORMERS``; CI runs the parity
tests under ``TESTED_TRANSFORMERS``). ``patch`` raises for other versions, warns for a 5.x newer than
the newest tested one, and before replacing anything checks that the model's layers take the
arguments and hold the attributes it relies on (what differs between versions, whether layers take
``layer_head_mask``, is decided there, once, not per call).
"""

import functools
import inspect
import types
import warnings
from typing import Optional

import torch
from torch import Tensor, nn

from ..nn import LongformerSelfAttention

__all__ = ["HFLongformerSelfAttention", "SUPPORTED_TRANSFORMERS", "TESTED_TRANSFORMERS", "patch"]

SUPPORTED_TRANSFORMERS = ("4.57.x", "5.x")
# The releases CI runs the parity tests against; a 5.x newer than the last one here warns.
TESTED_TRANSFORMERS = ("4.57.6", "5.24.0")


def _check_transformers_version():
    """Refuses a transformers release whose Longformer/LED classes we have not matched (below
    4.57, 4.58+ of 4.x, 6.x and later); warns for a 5.x newer than the newest tested one (the
    structural check in ``patch`` still refuses one whose layers changed)."""
    try:
        import transformers
    except ImportError as exc:
        raise ImportError("longformer_ext.integrations.transformers.patch needs `transformers` 4.57.x or 5.x "
                          "(pip install 'transformers>=4.57,<6')") from exc
    from packaging.version import Version

    installed = Version(transformers.__version__)
    major, minor = installed.major, installed.minor
    if (major, minor) == (4, 57) or major == 5:
        newest = Version(TESTED_TRANSFORMERS[-1])
        if major == 5 and minor > newest.minor:
            warnings.warn(
                f"longformer_ext.integrations.transformers.patch is tested with transformers "
                f"{', '.join(TESTED_TRANSFORMERS)}; {transformers.__version__} is newer. The layers it patches "
                "passed the structural check, but parity with the unpatched model is not verified.",
                UserWarning, stacklevel=3)
        return
    raise RuntimeError(
        f"longformer_ext.integrations.transformers.patch supports transformers 4.57.x and 5.x (tested: "
        f"{', '.join(TESTED_TRANSFORMERS)}), but {transformers.__version__} is installed. It replaces methods "
        "of Hugging Face's Longformer/LED classes and must match their signatures; install a supported "
        "version, e.g. `pip install 'transformers>=4.57,<6'`")


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
        if not is_global_attn:
            return out, local_probs
        return out, local_probs, _with_hf_filler_rows(probs.global_rows, probs.global_index >= 0, layer_head_mask,
                                                      hidden_states.shape[1])


def _with_hf_filler_rows(global_rows: Tensor, slot_used: Tensor, head_mask: Optional[Tensor], n_keys: int) -> Tensor:
    """``global_rows`` ``[B, H, x, N]`` with Hugging Face's values in the slots a row does not use.

    A row with fewer than ``x`` global tokens has unused slots; Hugging Face computes them as a
    softmax over scores that are all ``finfo.min``, padding keys included: ``1 / n_keys`` at every
    key (times the head mask on 4.x). They never reach an output; its own tests check them.
    """
    filler = global_rows.new_full((1, 1, 1, 1), 1.0 / max(n_keys, 1))
    if head_mask is not None:
        filler = filler * head_mask.to(global_rows.dtype).view(1, -1, 1, 1)
    return torch.where(slot_used[:, None, :, None], global_rows, filler)


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
                              output_hidden_states=None, return_dict=None, **kwargs):
    """``LongformerModel.forward`` without padding to the window and with boolean role masks.

    Other keyword arguments are ignored, as transformers 5's own forward ignores them.
    """
    from transformers.models.longformer.modeling_longformer import LongformerBaseModelOutputWithPooling

    config = self.config
    output_attentions = config.output_attentions if output_attentions is None else output_attentions
    output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
    return_dict = _return_dict_default(config) if return_dict is None else return_dict

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
                                   is_index_masked=is_index_masked, is_index_global_attn=is_index_global_attn,
                                   hf_length=_hf_padded_length(config, input_shape[1]))
    sequence_output = encoder_outputs[0]
    pooled_output = self.pooler(sequence_output) if self.pooler is not None else None
    if not return_dict:
        return (sequence_output, pooled_output) + tuple(encoder_outputs[1:])
    return LongformerBaseModelOutputWithPooling(
        last_hidden_state=sequence_output, pooler_output=pooled_output, hidden_states=encoder_outputs.hidden_states,
        attentions=encoder_outputs.attentions, global_attentions=encoder_outputs.global_attentions)


def _run_layers(encoder, layers, hidden_states, head_mask, is_index_masked, is_index_global_attn, is_global_attn,
                output_attentions, output_hidden_states, layerdrop=0.0, hf_length=None):
    """The layer loop shared by the patched Longformer and LED encoders: roles instead of additive
    masks, attentions in Hugging Face's layout. A layer dropped by LayerDrop contributes no attentions.
    ``hf_length`` is the length Hugging Face would have padded the input to (it sets the filler of
    unused global-attention slots, see ``_with_hf_filler_rows``); None = the input's length.

    Returns (hidden_states, all_hidden_states, all_attentions, all_global_attentions); the last three
    are None when not asked for.
    """
    if head_mask is not None:
        if not encoder._longformer_ext_head_mask:
            raise ValueError("head_mask is not supported with transformers 5: it removed head masking from "
                             "Longformer and LED (the unpatched model ignores the argument); drop it, or mask "
                             "heads by zeroing their rows of the output projection")
        if head_mask.size(0) != len(layers):
            raise ValueError(f"The head_mask should be specified for {len(layers)} layers, but it is for "
                             f"{head_mask.size(0)}.")
    head_mask_arg = {}
    all_hidden_states = () if output_hidden_states else None
    all_attentions = () if output_attentions else None
    all_global_attentions = () if (output_attentions and is_global_attn) else None
    for idx, layer in enumerate(layers):
        if output_hidden_states:
            all_hidden_states = all_hidden_states + (hidden_states,)
        if layerdrop > 0 and bool(torch.rand([]) < layerdrop):
            continue
        if encoder._longformer_ext_head_mask:  # decided at patch time: 4.x layers take layer_head_mask
            head_mask_arg = dict(layer_head_mask=head_mask[idx] if head_mask is not None else None)
        layer_outputs = layer(hidden_states, attention_mask=None, is_index_masked=is_index_masked,
                              is_index_global_attn=is_index_global_attn, is_global_attn=is_global_attn,
                              output_attentions=output_attentions, **head_mask_arg)
        hidden_states = layer_outputs[0]
        if output_attentions:
            all_attentions = all_attentions + (layer_outputs[1].transpose(1, 2),)
            if is_global_attn:
                global_rows = layer_outputs[2]
                if hf_length is not None and hf_length != global_rows.shape[-1]:
                    slots = torch.arange(global_rows.shape[2], device=global_rows.device)
                    slot_used = slots[None, :] < is_index_global_attn.sum(1)[:, None]
                    global_rows = _with_hf_filler_rows(global_rows, slot_used, head_mask_arg.get("layer_head_mask"),
                                                       hf_length)
                all_global_attentions = all_global_attentions + (global_rows.transpose(2, 3),)
    if output_hidden_states:
        all_hidden_states = all_hidden_states + (hidden_states,)
    return hidden_states, all_hidden_states, all_attentions, all_global_attentions


def _hf_padded_length(config, n: int) -> int:
    """The length Hugging Face's Longformer / LED pad an input of length ``n`` to (a multiple of the
    largest ``attention_window``)."""
    window = config.attention_window
    window = window if isinstance(window, int) else max(window)
    return n + (window - n % window) % window


def _return_dict_default(config) -> bool:
    """``config.use_return_dict`` without its transformers-5 deprecation warning (same definition)."""
    return config.return_dict and not getattr(config, "torchscript", False)


def _longformer_encoder_forward(self, hidden_states, attention_mask=None, *, head_mask=None, padding_len=0,
                                output_attentions=False, output_hidden_states=False, return_dict=True,
                                is_index_masked=None, is_index_global_attn=None, hf_length=None):
    """``LongformerEncoder.forward`` without the host sync (``.item()``) on the global mask.

    Takes boolean roles (``is_index_masked``, ``is_index_global_attn``) or, as Hugging Face's, an
    additive ``attention_mask`` whose sign gives them. Arguments after ``attention_mask`` are
    keyword-only: their order differs between transformers 4.57 and 5.
    """
    from transformers.models.longformer.modeling_longformer import LongformerBaseModelOutput

    if attention_mask is not None and is_index_masked is None:
        is_index_masked, is_index_global_attn = attention_mask < 0, attention_mask > 0
    is_global_attn = _global_flag(is_index_global_attn, output_attentions)
    hidden_states, all_hidden_states, all_attentions, all_global_attentions = _run_layers(
        self, self.layer, hidden_states, head_mask, is_index_masked, is_index_global_attn, is_global_attn,
        output_attentions, output_hidden_states, hf_length=hf_length)

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
    model.encoder._longformer_ext_head_mask = _layer_takes_head_mask(model.encoder.layer)
    model.forward = types.MethodType(_longformer_model_forward, model)
    model.encoder.forward = types.MethodType(_longformer_encoder_forward, model.encoder)


# ------------------------------------------------------------------------------------------------
# LED (encoder only: the decoder's full attention is untouched)


def _led_encoder_forward(self, input_ids=None, attention_mask=None, global_attention_mask=None, head_mask=None,
                         inputs_embeds=None, output_attentions=None, output_hidden_states=None, return_dict=None,
                         **kwargs):
    """``LEDEncoder.forward`` without padding to the window and without the ``.item()`` host sync.

    Other keyword arguments are ignored, as transformers 5's own forward ignores them.
    """
    from transformers.models.led.modeling_led import LEDEncoderBaseModelOutput

    config = self.config
    output_attentions = config.output_attentions if output_attentions is None else output_attentions
    output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
    return_dict = _return_dict_default(config) if return_dict is None else return_dict

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
        self, self.layers, hidden_states, head_mask, is_index_masked, is_index_global_attn, is_global_attn,
        output_attentions, output_hidden_states, layerdrop, hf_length=_hf_padded_length(config, inputs_embeds.shape[1]))

    if not return_dict:
        return tuple(v for v in (hidden_states, encoder_states, all_attentions, all_global_attentions) if v is not None)
    return LEDEncoderBaseModelOutput(last_hidden_state=hidden_states, hidden_states=encoder_states,
                                     attentions=all_attentions, global_attentions=all_global_attentions)


def _patch_led_encoder(encoder) -> None:
    for layer in encoder.layers:
        attention = layer.self_attn
        if not isinstance(attention.longformer_self_attn, HFLongformerSelfAttention):
            attention.longformer_self_attn = HFLongformerSelfAttention.from_hf(attention.longformer_self_attn)
    encoder._longformer_ext_head_mask = _layer_takes_head_mask(encoder.layers)
    encoder.forward = types.MethodType(_led_encoder_forward, encoder)


# ------------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------------
# What the patch relies on, checked before anything is replaced


# The layer arguments the patched layer loop passes (transformers 4.57 also takes layer_head_mask).
_LAYER_ARGUMENTS = ("hidden_states", "attention_mask", "is_index_masked", "is_index_global_attn", "is_global_attn",
                    "output_attentions")
# What HFLongformerSelfAttention.from_hf reads from Hugging Face's self-attention core.
_CORE_ATTRIBUTES = ("query", "key", "value", "query_global", "key_global", "value_global", "num_heads",
                    "one_sided_attn_window_size", "dropout", "layer_id")
_LONGFORMER_ATTRIBUTES = ("config", "embeddings", "encoder", "pooler", "warn_if_padding_and_no_attention_mask")
_LED_ENCODER_ATTRIBUTES = ("config", "embed_tokens", "embed_positions", "layernorm_embedding", "dropout", "layerdrop",
                           "layers")
# Head-mask arguments of the models' forwards; transformers 5 accepts and ignores them.
_HEAD_MASK_ARGUMENTS = ("head_mask", "decoder_head_mask", "cross_attn_head_mask")


def _layer_parameters(layer) -> set:
    # transformers 5 wraps layer forwards with functools.wraps; signature() follows __wrapped__.
    return set(inspect.signature(layer.forward).parameters)


def _layer_takes_head_mask(layers) -> bool:
    return all("layer_head_mask" in _layer_parameters(layer) for layer in layers)


def _structure_problems(target) -> list:
    """What ``target`` (a LongformerModel or LEDEncoder) lacks of what the patch uses, as messages."""
    from transformers.models.longformer.modeling_longformer import LongformerModel

    name = type(target).__name__
    if isinstance(target, LongformerModel):
        attributes, layers = _LONGFORMER_ATTRIBUTES, getattr(getattr(target, "encoder", None), "layer", None)
        core_of = lambda layer: getattr(getattr(layer, "attention", None), "self", None)  # noqa: E731
    else:
        attributes, layers = _LED_ENCODER_ATTRIBUTES, getattr(target, "layers", None)
        core_of = lambda layer: getattr(getattr(layer, "self_attn", None), "longformer_self_attn", None)  # noqa: E731
    problems = [f"{name} has no attribute `{a}`" for a in attributes if not hasattr(target, a)]
    if layers is None:
        return problems + [f"{name} has no layer list"]
    for index, layer in enumerate(layers):
        missing = [a for a in _LAYER_ARGUMENTS if a not in _layer_parameters(layer)]
        if missing:
            problems.append(f"{type(layer).__name__}.forward (layer {index}) takes no {', '.join(missing)}")
        core = core_of(layer)
        if core is None:
            problems.append(f"layer {index} ({type(layer).__name__}) has no Longformer self-attention core")
            continue
        missing = [a for a in _CORE_ATTRIBUTES if not hasattr(core, a)]
        if missing:
            problems.append(f"{type(core).__name__} (layer {index}) has no {', '.join(missing)}")
    return problems


def _forward_refusing_head_masks(self, *args, **kwargs):
    for name in _HEAD_MASK_ARGUMENTS:
        if kwargs.get(name) is not None:
            raise ValueError(f"{name} is not supported with transformers 5: it removed head masking from "
                             "Longformer and LED (the unpatched model ignores the argument); drop it")
    return type(self).forward(self, *args, **kwargs)


def _refuse_head_masks(model: nn.Module) -> None:
    """Makes ``model.forward`` raise for a head mask: transformers 5's task heads accept one and
    drop it before it reaches the patched encoder."""
    if getattr(model.forward, "__func__", None) is not None and \
            getattr(model.forward.__func__, "_longformer_ext_refuses_head_masks", False):
        return
    template = _forward_refusing_head_masks
    forward = types.FunctionType(template.__code__, template.__globals__, template.__name__)
    # A function of this model's class: generate() reads the class forward's signature through
    # __wrapped__; a bound method (not a closure) is rebound to the copy by copy.deepcopy.
    functools.update_wrapper(forward, type(model).forward)
    forward._longformer_ext_refuses_head_masks = True
    model.forward = types.MethodType(forward, model)


def patch(model: nn.Module) -> nn.Module:
    """Makes a Hugging Face Longformer / LED model use longformer_ext's attention; returns ``model``.

    Patches, in place, every ``LongformerModel`` and ``LEDEncoder`` inside ``model`` (so the task
    heads, ``LEDModel`` and ``LEDForConditionalGeneration`` are covered; LED's decoder is left as it
    is). Weights are kept and shared (same ``nn.Linear`` modules, same parameter names). Patching
    twice is harmless. Raises ``RuntimeError`` for an unsupported ``transformers`` version or when
    the model's layers lack something the patch relies on (nothing is replaced then), and
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
    problems = [problem for target in targets for problem in _structure_problems(target)]
    if problems:
        import transformers

        raise RuntimeError(f"patch() cannot patch {type(model).__name__} with transformers {transformers.__version__}: "
                           + "; ".join(problems) + ". Nothing was changed.")
    for target in targets:
        if isinstance(target, LongformerModel):
            _patch_longformer_model(target)
        else:
            _patch_led_encoder(target)
    # A patched LongformerModel / LEDEncoder refuses a head mask itself (in the layer loop).
    heads_take_head_mask = all(_layer_takes_head_mask(t.layers if isinstance(t, LEDEncoder) else t.encoder.layer)
                               for t in targets)
    if not heads_take_head_mask and model not in targets:
        _refuse_head_masks(model)
    return model
