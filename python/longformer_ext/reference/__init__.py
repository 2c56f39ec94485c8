"""Reference implementations of ``longformer_attention``, slow and written to be obviously right.

* ``dense_attention``: the float64 oracle every kernel is tested against ([N, N] masks); it also
  takes the general op's arguments (docs/design.md §2.2) ahead of the kernels.
* ``loop_attention``: one query at a time, keys listed explicitly (the paper's "loop"); the general
  op's arguments too, written apart from the oracle.
* ``chunked_attention``: the overlapping-chunks algorithm of the paper and Hugging Face.
"""

from .chunked import chunked_attention
from .dense import dense_attention
from .loop import loop_attention

__all__ = ["chunked_attention", "dense_attention", "loop_attention"]
