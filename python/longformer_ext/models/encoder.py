"""A standalone Longformer encoder (no ``transformers`` needed) with task heads.

The structure follows RoBERTa as Longformer does: learned absolute position embeddings, post-norm
layers, and in every layer two sets of projections: local ``query/key/value`` for the sliding-window
rows and ``query_global/key_global/value_global`` for the rows of global tokens (the paper's separate
global projections; the names match Hugging Face's so weights can be mapped by name): each layer's
self-attention is ``longformer_ext.nn.LongformerSelfAttention``. Each layer has its own one-sided
window and dilation (an int, or one value per head).

Task heads put global attention where the paper does:

* ``LongformerForSequenceClassification``: on the first token (CLS);
* ``LongformerForQuestionAnswering``: on the question tokens (everything before the first separator;
  the question comes first), start/end logits per token;
* ``LongformerForTokenClassification``: no global tokens by default (local context suffices).

Any head also takes an explicit ``global_attention_mask``, merged (OR) with its own choice.
There is no attention-probability dropout: the fused op computes no probability matrix to drop
from. Hidden-state dropout (``dropout``) applies as in RoBERTa.
"""

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import LongformerSelfAttention

__all__ = [
    "LongformerEncoderConfig", "LongformerEncoder", "LongformerForSequenceClassification",
    "LongformerForQuestionAnswering", "LongformerForTokenClassification", "QuestionAnsweringOutput",
    "question_global_mask",
]

PerLayer = Union[int, Sequence]


@dataclass
class LongformerEncoderConfig:
    """``window``: one-sided window (int for every layer, or one per layer): a local token sees
    ``2 * window + 1`` positions. Hugging Face's two-sided ``attention_window = W`` is ``window = W // 2``.
    ``dilation``: int, or per layer an int or a list of ``heads`` ints."""
    vocab_size: int = 1000
    hidden_size: int = 128
    layers: int = 2
    heads: int = 4
    intermediate_size: int = 512
    max_positions: int = 4096
    window: PerLayer = 64
    dilation: PerLayer = 1
    dropout: float = 0.1
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    cls_token_id: int = 0
    sep_token_id: int = 2
    num_labels: int = 2

    def __post_init__(self):
        if self.hidden_size % self.heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of heads ({self.heads})")
        windows = [self.window] * self.layers if isinstance(self.window, int) else list(self.window)
        if len(windows) != self.layers or any(not isinstance(w, int) or w < 0 for w in windows):
            raise ValueError(f"window must be an int >= 0 or {self.layers} of them, got {self.window!r}")
        dilations = [self.dilation] * self.layers if isinstance(self.dilation, int) else list(self.dilation)
        if len(dilations) != self.layers:
            raise ValueError(f"dilation must be an int or one entry per layer ({self.layers}), got {self.dilation!r}")
        self.window, self.dilation = windows, dilations


class Embeddings(nn.Module):
    def __init__(self, config: LongformerEncoderConfig):
        super().__init__()
        self.word = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position = nn.Embedding(config.max_positions, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.drop = nn.Dropout(config.dropout)
        self.max_positions = config.max_positions

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        if input_ids.shape[1] > self.max_positions:
            raise ValueError(f"sequence of {input_ids.shape[1]} tokens exceeds max_positions={self.max_positions}")
        # Positions count real tokens only, so a sequence gets the same positions whether it is padded
        # on the left, on the right or not at all (what makes a batch equal its examples run alone).
        positions = (attention_mask.long().cumsum(1) - 1).clamp(min=0)
        return self.drop(self.norm(self.word(input_ids) + self.position(positions)))


class Layer(nn.Module):
    def __init__(self, config: LongformerEncoderConfig, layer: int):
        super().__init__()
        c, eps = config.hidden_size, config.layer_norm_eps
        # Without attention dropout (the module's default) it always runs the fused op.
        self.attention = LongformerSelfAttention(c, config.heads, window=config.window[layer],
                                                 dilation=config.dilation[layer])
        self.attention_output = nn.Linear(c, c)
        self.attention_norm = nn.LayerNorm(c, eps=eps)
        self.intermediate = nn.Linear(c, config.intermediate_size)
        self.output = nn.Linear(config.intermediate_size, c)
        self.output_norm = nn.LayerNorm(c, eps=eps)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x, attention_mask, global_attention_mask):
        x = self.attention_norm(x + self.drop(self.attention_output(self.attention(x, attention_mask,
                                                                                   global_attention_mask))))
        return self.output_norm(x + self.drop(self.output(F.gelu(self.intermediate(x)))))


class LongformerEncoder(nn.Module):
    """``forward(input_ids [B, N], attention_mask=None, global_attention_mask=None) -> [B, N, C]``.
    Masks are bool/int ``[B, N]`` (nonzero = real token / global token). Any ``N <= max_positions``:
    no padding to a multiple of the window."""

    def __init__(self, config: LongformerEncoderConfig):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList(Layer(config, i) for i in range(config.layers))
        self.apply(_init_weights)

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                global_attention_mask: Optional[Tensor] = None) -> Tensor:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, N], got shape {tuple(input_ids.shape)}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        x = self.embeddings(input_ids, attention_mask)
        for layer in self.layers:
            x = layer(x, attention_mask, global_attention_mask)
        return x


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.Embedding) and module.padding_idx is not None:
        with torch.no_grad():
            module.weight[module.padding_idx].zero_()


def _merge_global(own: Tensor, given: Optional[Tensor]) -> Tensor:
    return own if given is None else own | given.bool()


def question_global_mask(input_ids: Tensor, sep_token_id: int) -> Tensor:
    """Global on every token before the first separator (CLS and the question), as the paper does for
    QA. Written with a cumulative sum instead of a search, so it never branches on data."""
    return (input_ids == sep_token_id).long().cumsum(1) == 0


@dataclass
class QuestionAnsweringOutput:
    start_logits: Tensor
    end_logits: Tensor
    loss: Optional[Tensor] = None


class LongformerForSequenceClassification(nn.Module):
    """Global attention on the first token; RoBERTa's head (dense, tanh, projection) on its output.
    ``forward(...) -> logits [B, num_labels]``, or ``(loss, logits)`` when ``labels`` are given.
    The first position must hold CLS (pad on the right)."""

    def __init__(self, config: LongformerEncoderConfig):
        super().__init__()
        self.encoder = LongformerEncoder(config)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.drop = nn.Dropout(config.dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.dense.apply(_init_weights)
        self.classifier.apply(_init_weights)

    def forward(self, input_ids, attention_mask=None, global_attention_mask=None, labels=None):
        cls = torch.zeros_like(input_ids, dtype=torch.bool)
        cls[:, 0] = True
        hidden = self.encoder(input_ids, attention_mask, _merge_global(cls, global_attention_mask))
        logits = self.classifier(self.drop(torch.tanh(self.dense(self.drop(hidden[:, 0])))))
        return logits if labels is None else (F.cross_entropy(logits, labels), logits)


class LongformerForQuestionAnswering(nn.Module):
    """Input: ``<cls> question <sep> context``. Global attention on the question tokens (see
    ``question_global_mask``); start/end logits per token, padding positions at the dtype's minimum.
    With ``start_positions``/``end_positions`` the output carries the mean of both cross-entropies."""

    def __init__(self, config: LongformerEncoderConfig):
        super().__init__()
        self.encoder = LongformerEncoder(config)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.qa_outputs.apply(_init_weights)
        self.sep_token_id = config.sep_token_id

    def forward(self, input_ids, attention_mask=None, global_attention_mask=None, start_positions=None,
                end_positions=None) -> QuestionAnsweringOutput:
        own = question_global_mask(input_ids, self.sep_token_id)
        hidden = self.encoder(input_ids, attention_mask, _merge_global(own, global_attention_mask))
        start, end = self.qa_outputs(hidden).unbind(-1)
        if attention_mask is not None:
            pad = attention_mask == 0
            start = start.masked_fill(pad, torch.finfo(start.dtype).min)
            end = end.masked_fill(pad, torch.finfo(end.dtype).min)
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = (F.cross_entropy(start, start_positions) + F.cross_entropy(end, end_positions)) / 2
        elif (start_positions is None) != (end_positions is None):
            raise ValueError("give both start_positions and end_positions, or neither")
        return QuestionAnsweringOutput(start, end, loss)


class LongformerForTokenClassification(nn.Module):
    """Per-token labels. ``forward(...) -> logits [B, N, num_labels]``, or ``(loss, logits)`` when
    ``labels`` are given (label -100 and padding positions are ignored)."""

    def __init__(self, config: LongformerEncoderConfig):
        super().__init__()
        self.encoder = LongformerEncoder(config)
        self.drop = nn.Dropout(config.dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.classifier.apply(_init_weights)

    def forward(self, input_ids, attention_mask=None, global_attention_mask=None, labels=None):
        logits = self.classifier(self.drop(self.encoder(input_ids, attention_mask, global_attention_mask)))
        if labels is None:
            return logits
        if attention_mask is not None:
            labels = labels.masked_fill(attention_mask == 0, -100)
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100), logits
