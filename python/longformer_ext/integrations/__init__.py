"""Drop-in integrations with other libraries.

* ``longformer_ext.integrations.transformers.patch(model)``: make a Hugging Face ``transformers``
  Longformer or LED model use longformer_ext's attention (imported on demand, so that importing
  ``longformer_ext`` never requires ``transformers``).
"""
