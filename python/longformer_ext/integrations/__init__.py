"""Drop-in integrations with other libraries.

* ``longformer_ext.integrations.transformers.patch(model)``: make a Hugging Face ``transformers``
  Longformer or LED model use longformer_ext's attention (imported on demand, so that importing
  ``longformer_ext`` never requires ``transformers``).
* ``longformer_ext.integrations.patch_modernbert(model)`` (from ``.modernbert``): run the local
  (sliding-window) attention layers of a ``transformers`` 5 ModernBERT model on longformer_ext's op,
  through transformers' ``AttentionInterface``. Importing it does not import ``transformers``; calling
  it does.
"""

from .modernbert import patch_modernbert

__all__ = ["patch_modernbert"]
