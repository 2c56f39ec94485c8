"""ONNX export of models that use longformer_ext's ops, into standard ONNX operators only.

``torch.onnx.export(..., dynamo=True)`` cannot translate ``torch.ops.longformer.*`` on its own. This
module gives it translations (``TRANSLATION_TABLE``, or ``translation_table()``) that rebuild the
inference op, ``banded_attn``, from ONNX opset-18 operators (Gather, MatMul,
TopK, ScatterElements, ...): no custom domain, so the exported file runs in any ONNX runtime with no
extra code. ``export(model, args, path)`` wraps the exporter with that table and with dynamic batch and
sequence axes. The backward ops and the unfused products (``banded_matmul_*``, used only for
``output_attentions`` and attention dropout, which read a global count on the host) are not
translated: export inference models in eval mode without ``output_attentions``.

Usage (the exported graph's inputs keep the example's names; batch and sequence axes are dynamic)::

    import longformer_ext.onnx
    from longformer_ext.integrations.transformers import patch

    model = patch(LongformerModel.from_pretrained(name).eval())
    longformer_ext.onnx.export(model, (input_ids,), "longformer.onnx",
                               kwargs=dict(attention_mask=mask, global_attention_mask=global_mask))
    # or, with torch's exporter directly:
    torch.onnx.export(model, (input_ids,), kwargs=..., dynamo=True, dynamic_shapes=...,
                      custom_translation_table=longformer_ext.onnx.TRANSLATION_TABLE)

How the graph computes the ops (semantics as in the README's "Semantics" section), and what it holds
in memory; nothing is ever ``[N, N]``:

* **Band keys, blocked.** Queries are cut into blocks of ``c`` rows (``c`` fixed at export from the
  window, at most the runtime length). Block ``b`` reads the ``L = c + left + right`` consecutive keys
  starting ``left`` before it, gathered with a ``[N / c, L]`` index built from the runtime ``N`` with
  ``Range`` (clamped into the sequence, with a validity mask). One batched MatMul per block gives
  ``[c, L]`` scores, and an additive 0 / -inf bias keeps exactly each row's ``left + right + 1`` band
  slots whose keys are in the sequence, real and not global. Scores take ``N * L`` entries per head:
  O(N * window). The window sides are clamped at run time to ``N - 1`` (keys farther away never
  exist), so a window wider than the sequence costs O(N^2) at most, never more than a dense product.
  ``causal=True`` drops the right side (its keys are all in the future).
* **Dilation.** With dilation ``d`` every band key of query ``i`` is congruent to ``i`` mod ``d``,
  so the sequence is split into its ``d`` residue classes (pad to a multiple of ``d``, reshape,
  transpose) and each class is an undilated band of length ``ceil(N / d)``. Heads are grouped by
  their dilation at export time (the dilation list is static); each group is one such pass.
* **Global tokens.** ``G``, the largest number of global tokens in a row of the batch, is
  data-dependent; the graph computes it (ReduceSum, ReduceMax) and takes the global positions with
  ``TopK(k=G)`` over the 0/1 mask: every global position, then (in rows with fewer) distinct
  non-global filler positions, masked out. The ``G`` global keys (local ``k``, ``v``) are put in
  front of every block's key window, so a local row's softmax runs over ``[G global | L band]`` in one
  pass (each key counted once: global keys are masked out of the band). Global rows score all ``N``
  keys with the global projections in a ``[G, N]`` block and are written over the local result with
  ScatterElements (filler slots write back the values already there). Memory O(N * (window + G));
  ``G`` is what the op itself costs (every local row sees every global key), far below ``N`` in
  Longformer use.
* **Softmax** in float32 (float64 for float64 inputs), as the kernels, as one fused ``Softmax`` node
  (several times faster in ONNX Runtime than max / exp / sum as separate nodes). A row whose keys are
  all masked gives NaN there; such rows only exist where the op's output is 0 or left unchanged
  (padding queries, padded rows of the last block, filler global slots) and are overwritten, so the
  outputs hold no NaN: padding rows are 0.
  ``lse`` is computed from the same scores on its own (max, exp, sum, -inf for rows without keys),
  and dropped from the graph when nothing reads it, as in a model.

Shapes: batch and sequence are dynamic (read with ``Shape`` at run time); the number of heads is
static only when heads have different dilations (the list gives it).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from . import ops as _ops  # loads the op library, so torch.ops.longformer.* exist

try:  # onnxscript is an optional dependency: importing this module works without it
    from onnxscript import ir as _ir  # onnx_ir, as onnxscript and torch.onnx use it
    from onnxscript import opset18 as op
except ImportError as _exc:  # pragma: no cover - exercised only without onnxscript
    op = None
    _ir = None
    _IMPORT_ERROR: Optional[ImportError] = _exc
else:
    _IMPORT_ERROR = None

__all__ = ["TRANSLATION_TABLE", "export", "translation_table", "banded_attn"]

_INSTALL_HINT = ("longformer_ext.onnx needs `onnx` and `onnxscript` (and `onnxruntime` to run the exported "
                 "model): pip install onnx onnxscript onnxruntime")

_NEG_INF = float("-inf")


def _require_onnxscript() -> None:
    if _IMPORT_ERROR is not None:
        raise ImportError(f"{_INSTALL_HINT} ({_IMPORT_ERROR})") from _IMPORT_ERROR


# ------------------------------------------------------------------------------------------------
# Small graph helpers. Shapes are read at run time (op.Shape), so batch and sequence stay dynamic.


def _dim(x, axis: int):
    """Size of ``x`` along ``axis`` as an int64 [1] tensor."""
    return op.Shape(x, start=axis, end=axis + 1)


def _scalar(x):
    """An int64 [1] tensor as a scalar (Range takes scalars)."""
    return op.Squeeze(x, [0])


# Constants are explicit Constant nodes with their dtype: the exporter's tracer cannot infer the dtype
# of a Python number next to an intermediate value (those carry no type while tracing).
def _ints(*values: int):
    """int64 [len(values)]."""
    return op.Constant(value_ints=list(values))


def _int(value: int):
    """int64 scalar."""
    return op.Constant(value_int=value)


def _float(value: float, dtype):
    """A scalar of the floating type ``dtype``."""
    return op.Constant(value=_ir.tensor(value, dtype=dtype))


def _accumulation_type(x):
    """The kernels accumulate in float64 for float64 inputs and in float32 for everything else."""
    return _ir.DataType.DOUBLE if x.dtype == _ir.DataType.DOUBLE else _ir.DataType.FLOAT


def _as(x, dtype):
    return x if x.dtype == dtype else op.Cast(x, to=dtype)


def _and(a, b):
    """Logical and where ``None`` means "all true"."""
    if a is None:
        return b
    if b is None:
        return a
    return op.And(a, b)


def _roles(attention_mask, global_attention_mask):
    """(real, glob) bool [B, N] or None: padding wins over global, as in the kernels."""
    real = None if attention_mask is None else op.Cast(attention_mask, to=_ir.DataType.BOOL)
    glob = None
    if global_attention_mask is not None:
        glob = _and(op.Cast(global_attention_mask, to=_ir.DataType.BOOL), real)
    return real, glob


def _global_slots(glob):
    """(index [B, G] int64, valid [B, G] bool) for G = max(1, most global tokens in a row), at most N.

    TopK over the 0/1 mask returns every global position of a row (value 1) before any non-global
    one (value 0, lowest positions first: ONNX breaks ties by index), so the first ``count[b]`` slots
    are row b's global tokens and the rest are distinct fillers, marked invalid. At least one slot
    keeps every shape non-empty when no token is global.
    """
    count = op.ReduceSum(op.Cast(glob, to=_ir.DataType.INT64), [1], keepdims=0)  # [B]
    most = op.Reshape(op.ReduceMax(count, keepdims=0), [1])
    k = op.Min(op.Max(most, _ints(1)), _dim(glob, 1))
    values, index = op.TopK(op.Cast(glob, to=_ir.DataType.FLOAT), k, axis=1, largest=1, sorted=1)
    return index, op.Cast(values, to=_ir.DataType.BOOL)


def _row_index(t, index):
    """index [B, G] -> an index for GatherElements / ScatterElements on axis 2 of t [B, H, N, D]."""
    shape = op.Concat(_ints(1), _dim(t, 1), _ints(1), _dim(t, 3), axis=0)
    return op.Expand(op.Unsqueeze(index, [1, 3]), shape)


def _bias(allowed, acc):
    """0 where ``allowed``, -inf elsewhere, built on the small head-less masks and then added to the
    scores: ONNX Runtime broadcasts an Add several times faster than a Where over the scores."""
    return op.Where(allowed, _float(0.0, acc), _float(_NEG_INF, acc))


def _logsumexp(scores, acc):
    """log-sum-exp over the last axis: -inf (never NaN) in rows whose scores are all -inf."""
    row_max = op.ReduceMax(scores, [-1], keepdims=1)
    safe_max = op.Where(op.IsInf(row_max, detect_positive=0), _float(0.0, acc), row_max)
    total = op.ReduceSum(op.Exp(op.Sub(scores, safe_max)), [-1], keepdims=0)
    return op.Add(op.Log(total), op.Squeeze(safe_max, [-1]))  # log(0) = -inf


def _attend(queries, keys, values, bias, rank: int, acc):
    """(softmax(queries keys^T + bias) values, log-sum-exp of the rows) over the last two axes.

    One fused Softmax (max, exp, sum, divide in one pass) is about four times faster in ONNX Runtime
    than the same steps as separate nodes. A row whose bias is all -inf comes out NaN; the callers
    only produce such rows where the op's output is 0 or unchanged (padding queries, the padded rows
    of the last block, filler global slots) and overwrite them. The log-sum-exp is computed on its
    own (it is dropped from the graph when nothing reads it, as in a model).
    """
    perm = list(range(rank - 2)) + [rank - 1, rank - 2]
    scores = op.MatMul(queries, op.Transpose(keys, perm=perm))
    if bias is not None:
        scores = op.Add(scores, bias)
    return op.MatMul(op.Softmax(scores, axis=-1), values), _logsumexp(scores, acc)


# ------------------------------------------------------------------------------------------------
# Band keys


def _chunk_rows(left: int, right: int) -> int:
    """Query rows per block, c. Scores hold N * (c + left + right) entries (the band needs
    N * (left + right + 1)) and the gathered key and value windows N * D * (c + left + right) / c
    each. A quarter of the band wastes 25% of the scores' work; at window (256, 256), D = 64 it was
    the fastest in ONNX Runtime on CPU (c = 64, 128, 256: 691, 672, 768 ms for 12 heads, N = 4096).
    At least 32 rows keeps the MatMuls from being tiny for small windows."""
    return max(32, (left + right + 1) // 4)


def _blocked_attention(q, k, v, key_ok, left: int, right: int, global_keys, positions, acc):
    """Attention of every query over its undilated band keys j in [i - left, i + right] (those with
    ``key_ok``) plus, when given, the global keys.

    q, k, v: [B, Hg, R, M, D] (R independent sequences per head: the residue classes of a dilation);
    key_ok: [B, 1, R, M] bool (real, non-global keys); global_keys: None or (k_glob, v_glob
    [B, Hg, G, D], bias [B, 1, 1, 1, 1, G] or, causal, a function of the query positions giving
    [B, 1, R, blocks, c, G]); positions: [R, M] int64 sequence positions of the queries (causal
    global keys only, else None). Returns out [B, Hg, R, M, D] and lse [B, Hg, R, M].
    """
    length = _dim(q, 3)
    # Clamp the window sides to M - 1 and the block to M: farther keys are never in the sequence.
    last = op.Max(op.Sub(length, _ints(1)), _ints(0))
    left_e = op.Min(_ints(left), last)
    right_e = op.Min(_ints(right), last)
    rows = op.Max(op.Min(_ints(_chunk_rows(left, right)), length), _ints(1))  # c
    span = op.Add(left_e, right_e)  # allowed offsets l - a in [0, span]
    width = op.Add(rows, span)  # L keys per block
    blocks = op.Div(op.Sub(op.Add(length, rows), _ints(1)), rows)  # ceil(M / c)
    padded = op.Mul(blocks, rows)

    # Queries: pad to whole blocks, then [B, Hg, R, blocks, c, D].
    pads = op.Concat(_ints(0, 0, 0, 0, 0, 0, 0, 0), op.Sub(padded, length), _ints(0), axis=0)
    qb = op.Reshape(op.Pad(q, pads),
                    op.Concat(op.Shape(q, start=0, end=3), blocks, rows, op.Shape(q, start=4, end=5), axis=0))

    # Keys of block b: positions b*c - left_e + l for l in [0, L), clamped, with a validity mask.
    block_start = op.Sub(op.Mul(op.Range(_int(0), _scalar(blocks), _int(1)), rows), left_e)  # [blocks]
    slots = op.Range(_int(0), _scalar(width), _int(1))  # [L]
    key_pos = op.Add(op.Unsqueeze(block_start, [1]), op.Unsqueeze(slots, [0]))  # [blocks, L]
    in_seq = op.And(op.GreaterOrEqual(key_pos, _int(0)), op.Less(key_pos, length))
    key_pos = op.Min(op.Max(key_pos, _ints(0)), last)
    keys = op.Gather(k, key_pos, axis=3)  # [B, Hg, R, blocks, L, D]
    values = op.Gather(v, key_pos, axis=3)
    key_bias = _bias(op.And(op.Gather(key_ok, key_pos, axis=3), in_seq), acc)  # [B, 1, R, blocks, L]

    # Row a of a block holds query b*c + a; slot l is offset l - left_e - a from it.
    offset = op.Sub(op.Unsqueeze(slots, [0]), op.Unsqueeze(op.Range(_int(0), _scalar(rows), _int(1)), [1]))
    band_bias = _bias(op.And(op.GreaterOrEqual(offset, _int(0)), op.LessOrEqual(offset, span)), acc)  # [c, L]
    bias = op.Add(op.Unsqueeze(key_bias, [4]), band_bias)  # [B, 1, R, blocks, c, L]

    if global_keys is not None:
        # The G global keys go in front of each block's window: one MatMul and one softmax over both.
        k_glob, v_glob, global_bias = global_keys
        window_shape = op.Shape(keys, start=0, end=4)
        glob_shape = op.Concat(window_shape, _dim(k_glob, 2), _dim(k_glob, 3), axis=0)
        keys = op.Concat(op.Expand(op.Unsqueeze(k_glob, [2, 3]), glob_shape), keys, axis=4)
        values = op.Concat(op.Expand(op.Unsqueeze(v_glob, [2, 3]), glob_shape), values, axis=4)
        if callable(global_bias):  # causal: depends on the query positions, in blocks [R, blocks, c]
            query_pos = op.Pad(positions, op.Concat(_ints(0, 0), _ints(0), op.Sub(padded, length), axis=0))
            query_pos = op.Reshape(query_pos, op.Concat(_dim(positions, 0), blocks, rows, axis=0))
            global_bias = global_bias(query_pos)
        shape = op.Concat(op.Shape(bias, start=0, end=5), _dim(k_glob, 2), axis=0)
        bias = op.Concat(op.Expand(global_bias, shape), bias, axis=5)

    out, lse = _attend(qb, keys, values, bias, 6, acc)
    flat = op.Concat(op.Shape(q, start=0, end=3), padded, axis=0)
    lse = op.Slice(op.Reshape(lse, flat), [0], length, [3])
    out = op.Slice(op.Reshape(out, op.Concat(flat, op.Shape(q, start=4, end=5), axis=0)), [0], length, [3])
    return out, lse


def _dilated_attention(q, k, v, key_ok, left: int, right: int, dilation: int, global_keys, causal_globals: bool,
                       acc):
    """Attention over the dilated band keys i + t * dilation, t in [-left, right], plus global keys.

    q, k, v: [B, Hg, N, D]; key_ok: [B, N] bool. Returns out [B, Hg, N, D], lse [B, Hg, N].
    """
    n = _dim(q, 2)
    if dilation == 1:
        positions = op.Unsqueeze(op.Range(_int(0), _scalar(n), _int(1)), [0]) if causal_globals else None
        out, lse = _blocked_attention(*(op.Unsqueeze(t, [2]) for t in (q, k, v)), op.Unsqueeze(key_ok, [1, 2]),
                                      left, right, global_keys, positions, acc)
        return op.Squeeze(out, [2]), op.Squeeze(lse, [2])

    # Residue classes: position m * d + r -> class r, index m. Pad N to a multiple of d with keys
    # that no row may see, reshape [.., M, d, D] and move d in front of M.
    per_class = op.Div(op.Add(n, _ints(dilation - 1)), _ints(dilation))
    pad = op.Sub(op.Mul(per_class, _ints(dilation)), n)
    head_shape = op.Shape(q, start=0, end=2)
    split = op.Concat(head_shape, per_class, _ints(dilation), op.Shape(q, start=3, end=4), axis=0)
    pads = op.Concat(_ints(0, 0, 0, 0, 0, 0), pad, _ints(0), axis=0)
    q5, k5, v5 = (op.Transpose(op.Reshape(op.Pad(t, pads), split), perm=[0, 1, 3, 2, 4]) for t in (q, k, v))
    # Pad the mask as int32 (padding keys: 0); bool Pad is not implemented everywhere.
    ok = op.Pad(op.Cast(key_ok, to=_ir.DataType.INT32), op.Concat(_ints(0, 0, 0), pad, axis=0))
    ok = op.Cast(op.Transpose(op.Reshape(ok, op.Concat(_dim(key_ok, 0), per_class, _ints(dilation), axis=0)),
                              perm=[0, 2, 1]), to=_ir.DataType.BOOL)
    positions = None
    if causal_globals:  # [d, M]: class r, index m is position m * d + r
        positions = op.Add(op.Unsqueeze(op.Mul(op.Range(_int(0), _scalar(per_class), _int(1)), _int(dilation)), [0]),
                           op.Unsqueeze(op.Range(_int(0), _int(dilation), _int(1)), [1]))
    out, lse = _blocked_attention(q5, k5, v5, op.Unsqueeze(ok, [1]), left, right, global_keys, positions, acc)

    # Back to sequence order: [.., d, M] -> [.., M, d] -> [.., M * d] -> the first N.
    flat = op.Concat(head_shape, op.Mul(per_class, _ints(dilation)), axis=0)
    lse = op.Slice(op.Reshape(op.Transpose(lse, perm=[0, 1, 3, 2]), flat), [0], n, [2])
    out = op.Slice(op.Reshape(op.Transpose(out, perm=[0, 1, 3, 2, 4]),
                              op.Concat(flat, op.Shape(q, start=3, end=4), axis=0)), [0], n, [2])
    return out, lse


def _band_attention(q, k, v, key_ok, left: int, right: int, dilation: Sequence[int], global_keys,
                    causal_globals: bool, acc):
    """Every head's local rows, heads grouped by dilation (one pass per distinct value)."""
    dilation = list(dilation)
    if len(set(dilation)) == 1:
        return _dilated_attention(q, k, v, key_ok, left, right, dilation[0], global_keys, causal_globals, acc)
    heads = len(dilation)  # the op takes 1 or H values
    groups: dict[int, list[int]] = {}
    for head, d in enumerate(dilation):
        groups.setdefault(d, []).append(head)
    order, outs, lses = [], [], []
    for d, members in groups.items():
        index = op.Constant(value_ints=members)
        sub = [op.Gather(t, index, axis=1) for t in (q, k, v)]
        sub_globals = None
        if global_keys is not None:
            sub_globals = (op.Gather(global_keys[0], index, axis=1), op.Gather(global_keys[1], index, axis=1),
                           global_keys[2])
        out, lse = _dilated_attention(*sub, key_ok, left, right, d, sub_globals, causal_globals, acc)
        outs.append(out)
        lses.append(lse)
        order.extend(members)
    # Concatenate the groups, then put the heads back in their order.
    inverse = op.Constant(value_ints=sorted(range(heads), key=order.__getitem__))
    return (op.Gather(op.Concat(*outs, axis=1), inverse, axis=1),
            op.Gather(op.Concat(*lses, axis=1), inverse, axis=1))


def _all_true(like):
    """bool [B, N] of ones shaped like the first two axes of ``like`` [B, H, N, D]."""
    shape = op.Concat(_dim(like, 0), _dim(like, 2), axis=0)
    return op.Expand(op.Constant(value=_ir.tensor(True)), shape)


# ------------------------------------------------------------------------------------------------
# Translations of the ops (signatures as in csrc/include/longformer/schemas.h)


def banded_attn(q, k, v, window_left: int, window_right: int, dilation: Sequence[int], attention_mask,
                global_attention_mask, causal: bool, scale: float, global_q=None, global_k=None, global_v=None,
                allow_tf32: bool = False, q_offset: int = -1, cu_seqlens=None, softcap: float = 0.0,
                alibi_slopes=None, sinks=None):
    """``longformer::banded_attn``: local rows over their band keys plus every global key, then the
    global rows over every real key (with the global projections when given), padding rows 0.

    Returns (out [B, H, N, D] in q's dtype, lse [B, H, N] float32/float64, -inf for padding rows).
    The graph computes exact float32 whatever ``allow_tf32`` (a CUDA kernel choice) says. It covers
    Longformer attention (docs/design.md §2: ``k, v`` shaped like ``q``); the general op's
    arguments are refused.
    """
    general = [name for name, used in (("q_offset", q_offset != -1), ("cu_seqlens", cu_seqlens is not None),
                                       ("softcap", softcap != 0.0), ("alibi_slopes", alibi_slopes is not None),
                                       ("sinks", sinks is not None)) if used]
    if general:
        raise NotImplementedError(f"longformer_ext.onnx exports Longformer attention (docs/design.md §2); "
                                  f"{', '.join(general)} of the general op have no ONNX translation")
    out, lse = _local_rows(q, k, v, window_left, window_right, dilation, attention_mask, global_attention_mask,
                           causal, scale)
    if global_attention_mask is None:
        return out, lse
    if global_q is None:
        global_q, global_k, global_v = q, k, v
    return _global_rows(global_q, global_k, global_v, global_attention_mask, attention_mask, causal, scale, out,
                        lse)


def _local_rows(q, k, v, window_left: int, window_right: int, dilation: Sequence[int], attention_mask,
                global_attention_mask, causal: bool, scale: float):
    """The local rows; global and padding rows are 0 with lse -inf."""
    acc = _accumulation_type(q)
    out_type = acc if q.dtype is None else q.dtype
    q, k, v = (_as(t, acc) for t in (q, k, v))
    q = op.Mul(q, _float(scale, acc))  # scaling the N x D queries is cheaper than the N x window scores
    real, glob = _roles(attention_mask, global_attention_mask)
    local = _and(real, None if glob is None else op.Not(glob))  # real, non-global: rows and band keys
    right = 0 if causal else window_right  # causal: every right-side key is in the future

    global_keys = None
    if glob is not None:
        index, valid = _global_slots(glob)
        k_glob = op.GatherElements(k, _row_index(k, index), axis=2)  # local k, v of the global tokens
        v_glob = op.GatherElements(v, _row_index(v, index), axis=2)
        key_index = op.Unsqueeze(index, [1, 2, 3, 4])  # [B, 1, 1, 1, 1, G]
        allowed = op.Unsqueeze(valid, [1, 2, 3, 4])
        if causal:
            def global_bias(query_pos):  # query_pos [R, blocks, c] -> [B, 1, R, blocks, c, G]
                return _bias(op.And(allowed, op.LessOrEqual(key_index, op.Unsqueeze(query_pos, [-1]))), acc)
        else:
            global_bias = _bias(allowed, acc)
        global_keys = (k_glob, v_glob, global_bias)

    out, lse = _band_attention(q, k, v, _all_true(q) if local is None else local, window_left, right, dilation,
                               global_keys, causal and glob is not None, acc)
    if local is not None:  # padding and global rows: 0 and -inf (also replaces their NaN, see _attend)
        out = op.Where(op.Unsqueeze(local, [1, 3]), out, _float(0.0, acc))
        lse = op.Where(op.Unsqueeze(local, [1]), lse, _float(_NEG_INF, acc))
    return _as(out, out_type), lse


def _global_rows(global_q, global_k, global_v, global_attention_mask, attention_mask, causal: bool, scale: float,
                 out, lse):
    """``out`` and ``lse`` with the rows of global tokens replaced by their attention over every real
    key (projections ``global_q/k/v``) and its log-sum-exp."""
    acc = _accumulation_type(global_q)
    gq, gk, gv = (_as(t, acc) for t in (global_q, global_k, global_v))
    real, glob = _roles(attention_mask, global_attention_mask)
    index, valid = _global_slots(glob)
    row_index = _row_index(gq, index)  # [B, H, G, D]
    q_rows = op.Mul(op.GatherElements(gq, row_index, axis=2), _float(scale, acc))
    allowed = None if real is None else op.Unsqueeze(real, [1, 2])  # [B, 1, 1, N]
    if causal:
        position = op.Range(_int(0), _scalar(_dim(gq, 2)), _int(1))  # [N]
        allowed = _and(allowed, op.LessOrEqual(position, op.Unsqueeze(index, [1, 3])))  # key <= query
    rows, lse_rows = _attend(q_rows, gk, gv, None if allowed is None else _bias(allowed, acc), 4, acc)

    # Filler slots (rows with fewer global tokens than G) point at non-global rows: write back what
    # is there. TopK's indices are distinct, so no row is written twice. The select runs in the
    # accumulation type: ONNX Runtime's CPU Where has no bfloat16 kernel.
    old = _as(op.GatherElements(out, row_index, axis=2), acc)
    rows = _as(op.Where(op.Unsqueeze(valid, [1, 3]), rows, old), out.dtype)
    new_out = op.ScatterElements(out, row_index, rows, axis=2)
    lse_index = op.Expand(op.Unsqueeze(index, [1]), op.Concat(_dim(gq, 0), _dim(gq, 1), _ints(1), axis=0))
    lse_rows = op.Where(op.Unsqueeze(valid, [1]), lse_rows, op.GatherElements(lse, lse_index, axis=2))
    return new_out, op.ScatterElements(lse, lse_index, lse_rows, axis=2)


def translation_table() -> dict[Callable, Callable]:
    """``{torch.ops.longformer.<op>.default: translation}`` for ``torch.onnx.export(dynamo=True,
    custom_translation_table=...)``; merge it with your own entries if you have any."""
    _require_onnxscript()
    return {
        torch.ops.longformer.banded_attn.default: banded_attn,
    }


TRANSLATION_TABLE: dict[Callable, Callable] = translation_table() if _IMPORT_ERROR is None else {}


# ------------------------------------------------------------------------------------------------
# Export helper


def _auto_dynamic_shapes(args: tuple, kwargs: Mapping[str, Any], batch_axis: int, sequence_axis: int):
    """Every tensor input of rank >= 2 gets a dynamic batch and sequence axis (Hugging Face's layout:
    input_ids, masks [B, N], inputs_embeds [B, N, C]); other inputs stay static."""
    batch = torch.export.Dim("batch")
    sequence = torch.export.Dim("sequence")

    def spec(value):
        if isinstance(value, torch.Tensor) and value.dim() > max(batch_axis, sequence_axis):
            return {batch_axis: batch, sequence_axis: sequence}
        if isinstance(value, (list, tuple)):
            return type(value)(spec(v) for v in value)
        if isinstance(value, dict):
            return {key: spec(v) for key, v in value.items()}
        return None

    return tuple(spec(a) for a in args), {key: spec(value) for key, value in kwargs.items()}


def export(model: torch.nn.Module, args: tuple = (), path: Optional[str | os.PathLike] = None, *,
           kwargs: Optional[Mapping[str, Any]] = None, dynamic_shapes: Any = "auto", batch_axis: int = 0,
           sequence_axis: int = 1, input_names: Optional[Sequence[str]] = None,
           output_names: Optional[Sequence[str]] = None, opset_version: Optional[int] = None,
           custom_translation_table: Optional[Mapping[Callable, Callable]] = None, external_data: bool = False,
           verbose: bool = False, **export_options):
    """Exports ``model`` to ONNX with longformer_ext's translations; saves it to ``path`` if given.

    Args:
        model: an ``nn.Module`` (e.g. a patched Hugging Face Longformer / LED model, in eval mode).
        args, kwargs: example inputs, as for ``torch.onnx.export``.
        path: where to save the ``.onnx`` file (None: only return the program).
        dynamic_shapes: ``"auto"`` (default): axis ``batch_axis`` and ``sequence_axis`` of every tensor
            input of rank >= 2 are dynamic, shared as ``batch`` / ``sequence`` (Hugging Face's
            ``[B, N]`` / ``[B, N, C]`` inputs); ``None``: all static; anything else is passed to
            ``torch.onnx.export`` as it is (``torch.export`` dynamic_shapes format).
        input_names, output_names, opset_version: as for ``torch.onnx.export`` (opset >= 18).
        custom_translation_table: more translations, merged over ours.
        external_data: save the weights in a separate ``.data`` file (needed above 2 GB).
        verbose: print the exporter's progress.
        export_options: any other ``torch.onnx.export`` keyword (``optimize``, ``verify``, ``report``...).

    Returns:
        the ``torch.onnx.ONNXProgram``.
    """
    _require_onnxscript()
    if isinstance(model, torch.nn.Module):
        from .nn import LongformerSelfAttention

        if any(isinstance(m, LongformerSelfAttention) and m.training and m.dropout > 0 for m in model.modules()):
            raise ValueError("longformer_ext.onnx.export exports inference graphs: call model.eval() first (attention "
                             "dropout in training runs an unfused path that reads a global-token count on the host)")
    try:
        import onnx  # noqa: F401  (torch.onnx needs it to serialise)
    except ImportError as exc:
        raise ImportError(f"{_INSTALL_HINT} ({exc})") from exc
    if opset_version is not None and opset_version < 18:
        raise ValueError(f"longformer_ext.onnx translates into opset 18 operators; opset_version={opset_version} "
                         "is too old (use 18 or newer)")
    args = tuple(args) if isinstance(args, (list, tuple)) else (args,)
    kwargs = dict(kwargs or {})
    if isinstance(dynamic_shapes, str):
        if dynamic_shapes != "auto":
            raise ValueError(f"dynamic_shapes must be 'auto', None or a torch.export dynamic_shapes structure, "
                             f"got {dynamic_shapes!r}")
        dyn_args, dyn_kwargs = _auto_dynamic_shapes(args, kwargs, batch_axis, sequence_axis)
        # torch.export takes a tuple for positional-only calls and a dict naming every input otherwise.
        dynamic_shapes = dyn_args if not kwargs else _named_dynamic_shapes(model, dyn_args, dyn_kwargs)
    table = dict(translation_table())
    table.update(custom_translation_table or {})
    program = torch.onnx.export(model, args, kwargs=kwargs or None, dynamo=True, dynamic_shapes=dynamic_shapes,
                                custom_translation_table=table, input_names=input_names,
                                output_names=output_names, opset_version=opset_version,
                                external_data=external_data, verbose=verbose, **export_options)
    if path is not None:
        program.save(os.fspath(path), external_data=external_data)
    return program


def _named_dynamic_shapes(model, dyn_args: tuple, dyn_kwargs: dict) -> dict:
    """dynamic_shapes keyed by the forward parameters' names (required when kwargs are given)."""
    import inspect

    forward = model.forward if isinstance(model, torch.nn.Module) else model
    names = [name for name, p in inspect.signature(forward).parameters.items()
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(dyn_args) > len(names):
        raise ValueError("dynamic_shapes='auto' with kwargs needs named positional parameters in forward; "
                         "pass dynamic_shapes explicitly")
    named = dict(zip(names, dyn_args))
    named.update(dyn_kwargs)
    return named
