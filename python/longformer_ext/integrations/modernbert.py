"""Hugging Face ``transformers`` 5 ModernBERT drop-in: ``patch_modernbert(model)``.

ModernBERT alternates global attention layers with local ones, where query ``i`` sees the keys
``j`` with ``|i - j| <= config.local_attention // 2`` (``config.sliding_window``). ``patch_modernbert``
runs the local layers on ``longformer_attention`` (a band of that half-width, no global tokens) and
leaves the global layers to transformers' SDPA attention.

It goes through transformers' own extension points, so no ModernBERT code is replaced:

* ``AttentionInterface`` gets the attention function ``longformer_ext`` (``longformer_ext_attention``):
  local layers call our op, global layers ``sdpa_attention_forward``;
* ``AttentionMaskInterface`` gets a mask function of the same name that hands the attention function
  the ``[B, N]`` boolean padding mask itself (True = real token) instead of a dense ``[B, 1, N, N]``
  one. Without it transformers would build no mask at all for an implementation it does not know
  (padding would be ignored silently); with it no ``N x N`` mask is built and nothing reads tensor
  values on the host;
* the model's config is switched to it with ``set_attn_implementation("longformer_ext")``.

The model stays padded: ModernBERT of transformers 5.1+ unpads only inside the flash-attention
functions, which this implementation does not use. RoPE is applied by the model before the attention
function, as for every implementation.

Fallbacks: a forward in training with ``attention_dropout > 0``, or one that returns attentions
(``output_attentions=True``, as argument or in the config), runs every layer through transformers'
eager attention with the same masks the unpatched model uses (dense ``[N, N]`` scores, so memory grows
with ``N^2``): our op has no dropout and does not return probabilities. The attentions are then
eager's ``[B, H, N, N]`` probabilities.

Differences from the unpatched model: hidden states at padding positions (which no real token ever
reads) are not the same: our op returns zero attention output for padding queries. A 4D
``attention_mask`` or a ``BlockMask`` given to the model is refused (``ValueError``): the band is
applied from the config, so a custom dense pattern could not be honoured.

Undo with ``model.set_attn_implementation("sdpa")``. Supported ``transformers``: 5.1 and later 5.x
(5.0's ModernBERT dispatches attention through a table of its own); tested with
``TESTED_TRANSFORMERS``; a newer 5.x warns.
"""

import warnings
from typing import Optional

import torch
from torch import Tensor, nn

from ..attention import longformer_attention

__all__ = ["ATTN_IMPLEMENTATION", "TESTED_TRANSFORMERS", "longformer_ext_attention", "patch_modernbert", "register"]

ATTN_IMPLEMENTATION = "longformer_ext"
# The releases the parity tests run against; a 5.x newer than the last one here warns.
TESTED_TRANSFORMERS = ("5.24.0",)
_LAYER_TYPES = ("full_attention", "sliding_attention")


def _check_transformers_version() -> None:
    """Refuses a transformers release whose ModernBERT does not go through ``AttentionInterface``
    (4.x, 5.0) or that we have not matched at all (6+); warns for a 5.x newer than the tested ones."""
    try:
        import transformers
    except ImportError as exc:
        raise ImportError("longformer_ext.integrations.modernbert needs `transformers` 5.1 or later 5.x "
                          "(pip install 'transformers>=5.1,<6')") from exc
    from packaging.version import Version

    installed = Version(transformers.__version__)
    if installed.major == 5 and installed.minor >= 1:
        newest = Version(TESTED_TRANSFORMERS[-1])
        if installed.minor > newest.minor:
            warnings.warn(
                f"longformer_ext.integrations.modernbert is tested with transformers {', '.join(TESTED_TRANSFORMERS)}; "
                f"{transformers.__version__} is newer, so parity with the unpatched model is not verified.",
                UserWarning, stacklevel=3)
        return
    raise RuntimeError(
        f"patch_modernbert supports transformers 5.1 and later 5.x (tested: {', '.join(TESTED_TRANSFORMERS)}), but "
        f"{transformers.__version__} is installed. It plugs into ModernBERT through transformers' AttentionInterface, "
        "which ModernBERT uses from 5.1 on (4.x and 5.0 dispatch through a table of their own and unpad the "
        "input for flash-attention); install e.g. `pip install 'transformers>=5.1,<6'`")


def _key_padding_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                      mask_function=None, attention_mask: Optional[Tensor] = None, **kwargs) -> Optional[Tensor]:
    """The ``AttentionMaskInterface`` entry: the model's ``[B, N]`` mask, already made boolean on the
    right device by transformers (True = real token), or None when the model got no mask.

    The same mask goes to global and local layers; the attention function knows a layer's kind and
    applies the band itself, so ``mask_function`` (the pattern) is not needed. ModernBERT passes no
    extra ``or``/``and`` mask functions and has no cache (so no offsets).
    """
    return attention_mask


def _eager_mask(real: Optional[Tensor], window: Optional[int], n: int, dtype: torch.dtype,
                device: torch.device) -> Optional[Tensor]:
    """Additive mask for transformers' eager attention with the values of the unpatched model's: 0
    where a query may see a key (band, when ``window`` is given, and real keys), ``finfo.min``
    elsewhere. Shapes broadcast against ``[B, H, N, N]``; None when nothing is masked."""
    allowed = None
    if window is not None:
        pos = torch.arange(n, device=device)
        allowed = (pos[:, None] - pos[None, :]).abs() <= window
    if real is not None:
        keys = real[:, None, None, :]
        allowed = keys if allowed is None else allowed & keys
    if allowed is None:
        return None
    return torch.where(allowed, torch.zeros((), dtype=dtype, device=device), torch.finfo(dtype).min)


def longformer_ext_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                             attention_mask: Optional[Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                             **kwargs):
    """transformers attention function (``AttentionInterface`` signature) for ModernBERT layers.

    ``query``, ``key``, ``value``: ``[B, H, N, D]`` after RoPE; ``attention_mask``: the ``[B, N]``
    boolean mask from ``_key_padding_mask`` or None. Returns ``(output [B, N, H, D], None)``, or eager's
    ``(output, probabilities)`` in the fallback cases described in the module docstring.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.models.modernbert.modeling_modernbert import ModernBertAttention, eager_attention_forward

    if not isinstance(module, ModernBertAttention):
        raise TypeError(f"the `{ATTN_IMPLEMENTATION}` attention implementation supports ModernBERT's encoder "
                        f"attention only, but {type(module).__name__} called it; use it through patch_modernbert")
    if attention_mask is not None and (not isinstance(attention_mask, Tensor) or attention_mask.dim() != 2):
        raise ValueError(
            f"`{ATTN_IMPLEMENTATION}` attention takes the model's [B, N] attention_mask (1 = real token, 0 = padding), "
            f"but got {type(attention_mask).__name__} with shape {tuple(getattr(attention_mask, 'shape', ()))}: a "
            "4D mask or BlockMask given to the model cannot be honoured, since local layers apply their band "
            "from the config. Pass the [B, N] mask, or use attn_implementation='sdpa' for a custom pattern")
    config = module.config
    # The layer kind and band half-width the unpatched model builds its masks from (ModernBertModel
    # picks the mask by layer type; create_bidirectional_sliding_window_mask uses config.sliding_window).
    window = config.sliding_window if config.layer_types[module.layer_idx] == "sliding_attention" else None

    # capture_outputs passes output_attentions down only when given to forward; otherwise the config's.
    if dropout > 0.0 or kwargs.get("output_attentions", getattr(config, "output_attentions", False)):
        mask = _eager_mask(attention_mask, window, query.shape[2], query.dtype, query.device)
        return eager_attention_forward(module, query, key, value, mask, scaling=scaling, dropout=dropout)
    if window is None:
        # Key padding only: [B, 1, 1, N] broadcasts over heads and queries.
        mask = None if attention_mask is None else attention_mask[:, None, None, :]
        return sdpa_attention_forward(module, query, key, value, mask, scaling=scaling, **kwargs)
    out = longformer_attention(query, key, value, window, attention_mask=attention_mask, scale=scaling)
    return out.transpose(1, 2), None  # [B, N, H, D], contiguous


def register() -> str:
    """Registers the ``longformer_ext`` attention and mask functions with transformers (idempotent)
    and returns the name, for ``from_pretrained(..., attn_implementation=name)`` or
    ``model.set_attn_implementation(name)`` on a ModernBERT model (``patch_modernbert`` does both
    steps, after checking the model)."""
    _check_transformers_version()
    return _register()


def _register() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, longformer_ext_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _key_padding_mask)
    return ATTN_IMPLEMENTATION


def _structure_problems(target) -> list:
    """What a ModernBertModel lacks of what the attention function relies on, as messages."""
    config = target.config
    problems = []
    if not isinstance(getattr(config, "sliding_window", None), int):
        problems.append("its config has no integer `sliding_window` (local_attention // 2)")
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None or len(layer_types) != len(target.layers):
        problems.append("its config's `layer_types` does not list every layer")
    else:
        unknown = sorted(set(layer_types) - set(_LAYER_TYPES))
        if unknown:
            problems.append(f"its layer types {unknown} are neither of {list(_LAYER_TYPES)}")
    for index, layer in enumerate(target.layers):
        if getattr(getattr(layer, "attn", None), "layer_idx", None) != index:
            problems.append(f"layer {index} has no attention module `attn` with layer_idx {index}")
    return problems


def patch_modernbert(model: nn.Module) -> nn.Module:
    """Runs the local attention layers of a Hugging Face ModernBERT model on longformer_ext's op;
    returns ``model``.

    Every ``ModernBertModel`` inside ``model`` is switched, in place, to the ``longformer_ext``
    attention implementation (``ModernBertModel`` itself and the task heads ``ModernBertFor*``, whose
    config it shares): local layers run ``longformer_attention`` with the model's band and padding
    mask, global layers transformers' SDPA attention. Weights, parameter names and the state dict are
    untouched; patching twice is harmless; ``model.set_attn_implementation("sdpa")`` undoes it.

    Training with ``attention_dropout > 0`` and ``output_attentions=True`` fall back to transformers'
    eager attention (dense, ``O(N^2)`` memory); see the module docstring.

    Raises ``RuntimeError`` for an unsupported ``transformers`` version or a model whose structure the
    attention function does not match (nothing is changed then), and ``TypeError`` when ``model``
    holds no ``ModernBertModel`` (e.g. the decoder-only ``ModernBertDecoderModel``).
    """
    _check_transformers_version()
    from transformers.models.modernbert.modeling_modernbert import ModernBertModel

    if not isinstance(model, nn.Module):
        raise TypeError(f"patch_modernbert() expects a transformers model (an nn.Module), got {type(model).__name__}")
    targets = [m for m in model.modules() if isinstance(m, ModernBertModel)]
    if not targets:
        raise TypeError(f"patch_modernbert() found no ModernBertModel in {type(model).__name__}; it supports "
                        "transformers' ModernBERT encoders (ModernBertModel, ModernBertFor*)")
    problems = [f"{type(t).__name__}: {p}" for t in targets for p in _structure_problems(t)]
    if problems:
        import transformers

        raise RuntimeError(f"patch_modernbert() cannot patch {type(model).__name__} with transformers "
                           f"{transformers.__version__}: " + "; ".join(problems) + ". Nothing was changed.")
    _register()
    for target in targets:
        target.set_attn_implementation(ATTN_IMPLEMENTATION)
        # set_attn_implementation only logs when a model class cannot switch implementations.
        if target.config._attn_implementation != ATTN_IMPLEMENTATION:
            raise RuntimeError(f"{type(target).__name__} did not switch to the `{ATTN_IMPLEMENTATION}` attention "
                               f"implementation (it uses `{target.config._attn_implementation}`)")
    return model
