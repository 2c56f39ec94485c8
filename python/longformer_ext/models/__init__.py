"""Reference models built on ``longformer_attention`` (import as ``longformer_ext.models``).

* ``CharLM``: the paper's character-level autoregressive LM (causal windows growing with depth,
  dilation on a few upper-layer heads, rotary positions).
* ``LongformerEncoder`` and task heads for sequence classification, question answering and token
  classification, standalone (no ``transformers``).
"""

from .char_lm import CharLM, CharLMConfig, decode_bytes, encode_bytes, growing_windows, upper_layer_dilation
from .encoder import (LongformerEncoder, LongformerEncoderConfig, LongformerForQuestionAnswering,
                      LongformerForSequenceClassification, LongformerForTokenClassification,
                      QuestionAnsweringOutput, question_global_mask)

__all__ = [
    "CharLM", "CharLMConfig", "decode_bytes", "encode_bytes", "growing_windows", "upper_layer_dilation",
    "LongformerEncoder", "LongformerEncoderConfig", "LongformerForQuestionAnswering",
    "LongformerForSequenceClassification", "LongformerForTokenClassification", "QuestionAnsweringOutput",
    "question_global_mask",
]
