"""``nn.Module``s built on ``longformer_attention``.

``LongformerSelfAttention`` is a self-attention layer whose parameter names match Hugging Face's
(``query``, ``key``, ``value``, ``query_global``, ``key_global``, ``value_global``), so a state dict
moves between the two unchanged. It has two execution paths that compute the same function:

* the **fused** path (``longformer_attention``: no ``[N, window]`` matrix in memory, compilable with
  ``torch.compile(fullgraph=True)``), used whenever it can be;
* the **unfused** path (``ops.banded_matmul_qk`` / ``ops.banded_matmul_pv`` plus dense products over
  the gathered global tokens), used when the probabilities themselves are needed: attention dropout
  in training (``dropout > 0``) and ``output_attentions=True``. It materialises the probabilities and
  reads the number of global tokens on the host (one ``.item()``), so it is slower and not
  graph-break free.

A ``head_mask`` is exact on both paths: every output row is linear in its probabilities, so scaling a
head's probabilities by ``m_h`` is the same as scaling that head's output by ``m_h`` (and gives the
same gradient with respect to ``head_mask``); the fused path does the latter.
"""

import contextlib
from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops
from ._args import Dilation, Window, check_role_mask, per_head_dilation, token_roles, window_pair
from ._softmax import masked_softmax
from .attention import longformer_attention

__all__ = ["LongformerAttentionProbs", "LongformerSelfAttention"]


class LongformerAttentionProbs(NamedTuple):
    """Attention probabilities of one ``LongformerSelfAttention`` call (after head mask and dropout).

    ``G`` is the largest number of global tokens in a row of the batch (0 without global tokens).

    * ``band``: ``[B, H, N, left + right + 1]``; slot ``t`` of query ``i`` in head ``h`` is key
      ``i + (t - left) * dilation[h]``. 0 for slots off the sequence, on padding or global keys
      (a global key's weight is in ``global_keys``), and in rows of padding and global queries.
    * ``global_keys``: ``[B, H, N, G]``: weight of local query ``i`` on the ``g``-th global token.
    * ``global_rows``: ``[B, H, G, N]``: weights of the ``g``-th global query over all keys.
    * ``global_index``: ``[B, G]`` int64: position of the ``g``-th global token of each row (global
      tokens in increasing position order), -1 in unused slots (whose probabilities are 0).
    """

    band: Tensor
    global_keys: Tensor
    global_rows: Tensor
    global_index: Tensor


@contextlib.contextmanager
def _as_value_errors():
    """The modules raise ValueError for every bad argument; the shared checks of ``_args`` raise
    TypeError for an argument of the wrong type (as ``longformer_attention`` does)."""
    try:
        yield
    except TypeError as exc:
        raise ValueError(str(exc)) from None


class LongformerSelfAttention(nn.Module):
    """Longformer self-attention (sliding window with per-head dilation, plus global tokens).

    Args:
        hidden_size: ``C``, the width of the input and of every projection.
        num_heads: ``H``; ``C`` must be a multiple of it.
        window: our one-sided window: an int ``w`` (``w`` keys each side) or ``(left, right)``.
        attention_window: Hugging Face's two-sided, even, positive window ``W`` (= ``window=W // 2``).
            Give exactly one of ``window`` and ``attention_window``.
        dilation: an int or one int per head (>= 1): band keys of query ``i`` in head ``h`` are
            ``i + t * dilation[h]``.
        causal: no query attends to a later key (band, global keys and global rows alike).
        dropout: probability of dropping an attention probability in training (applied to local
            and global rows, as Hugging Face does). ``dropout > 0`` in training uses the unfused path.
        bias: whether the projections have a bias.

    Parameters (``nn.Linear(C, C)`` each, named as in Hugging Face): ``query``, ``key``, ``value``
    (local rows and the keys local rows see), ``query_global``, ``key_global``, ``value_global``
    (rows of global tokens). There is no output projection (Hugging Face keeps it outside too).

    ``forward(hidden_states, attention_mask=None, global_attention_mask=None, head_mask=None,
    output_attentions=False)``:

    * ``hidden_states``: ``[B, N, C]``; any ``N`` (no padding to a multiple of the window).
    * ``attention_mask``: ``[B, N]`` bool/int, nonzero = real token, 0 = padding (float rejected).
    * ``global_attention_mask``: ``[B, N]`` bool/int, nonzero = global token (padding wins).
    * ``head_mask``: ``[H]`` float, multiplies each head's probabilities.
    * returns ``[B, N, C]`` (padding rows are 0), or ``(output, LongformerAttentionProbs)`` when
      ``output_attentions`` is true.

    Use ``LongformerSelfAttention.from_projections`` to build one around existing ``nn.Linear``
    modules without copying them (that is how the Hugging Face integration keeps the weights).
    """

    def __init__(
        self, hidden_size: int, num_heads: int, window: Optional[Window] = None, *,
        attention_window: Optional[int] = None, dilation: Dilation = 1, causal: bool = False,
        dropout: float = 0.0, bias: bool = True,
    ):
        super().__init__()
        self._configure(hidden_size, num_heads, window, attention_window, dilation, causal, dropout)
        for name in ("query", "key", "value", "query_global", "key_global", "value_global"):
            setattr(self, name, nn.Linear(hidden_size, hidden_size, bias=bias))

    @classmethod
    def from_projections(
        cls, query: nn.Linear, key: nn.Linear, value: nn.Linear, query_global: nn.Linear,
        key_global: nn.Linear, value_global: nn.Linear, *, num_heads: int, window: Optional[Window] = None,
        attention_window: Optional[int] = None, dilation: Dilation = 1, causal: bool = False,
        dropout: float = 0.0,
    ) -> "LongformerSelfAttention":
        """A module that uses the given ``nn.Linear(C, C)`` modules themselves (shared, not copied)."""
        projections = dict(query=query, key=key, value=value, query_global=query_global, key_global=key_global,
                           value_global=value_global)
        for name, linear in projections.items():
            if not isinstance(linear, nn.Linear):
                raise ValueError(f"{name} must be an nn.Linear, got {type(linear).__name__}")
        hidden_size = query.in_features
        for name, linear in projections.items():
            if (linear.in_features, linear.out_features) != (hidden_size, hidden_size):
                raise ValueError(f"{name} is Linear({linear.in_features}, {linear.out_features}); every projection "
                                 f"must be Linear({hidden_size}, {hidden_size})")
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module._configure(hidden_size, num_heads, window, attention_window, dilation, causal, dropout)
        for name, linear in projections.items():
            setattr(module, name, linear)
        return module

    def _configure(self, hidden_size, num_heads, window, attention_window, dilation, causal, dropout):
        if not isinstance(hidden_size, int) or not isinstance(num_heads, int) or hidden_size < 1 or num_heads < 1:
            raise ValueError(f"hidden_size and num_heads must be positive ints, got {hidden_size!r}, {num_heads!r}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not a multiple of num_heads {num_heads}")
        if (window is None) == (attention_window is None):
            raise ValueError(
                "give exactly one of `window` (ours: one-sided, an int w or a pair (left, right)) and "
                "`attention_window` (Hugging Face's two-sided even size W, which means window = W // 2)")
        if attention_window is not None:
            if (not isinstance(attention_window, int) or isinstance(attention_window, bool) or attention_window <= 0
                    or attention_window % 2):
                raise ValueError(f"attention_window (Hugging Face's two-sided size) must be a positive even int, "
                                 f"got {attention_window!r}; for our one-sided window use `window=`")
            left = right = attention_window // 2
        else:
            with _as_value_errors():
                left, right = window_pair(window)
        with _as_value_errors():
            dilations = per_head_dilation(dilation, num_heads)
        if not isinstance(causal, bool):
            raise ValueError(f"causal must be a bool, got {causal!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
        self.embed_dim = hidden_size
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.window = (left, right)
        self.dilation = dilations
        self.causal = causal
        self.dropout = float(dropout)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.embed_dim}, num_heads={self.num_heads}, window={self.window}, "
                f"dilation={self.dilation}, causal={self.causal}, dropout={self.dropout}")

    def _heads(self, x: Tensor) -> Tensor:
        """``[B, N, C]`` -> ``[B, H, N, D]`` view (no copy; the op accepts these strides)."""
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None,
        global_attention_mask: Optional[Tensor] = None, head_mask: Optional[Tensor] = None,
        output_attentions: bool = False,
    ) -> Union[Tensor, tuple[Tensor, LongformerAttentionProbs]]:
        if not isinstance(hidden_states, Tensor) or hidden_states.dim() != 3 or hidden_states.shape[-1] != self.embed_dim:
            raise ValueError(f"hidden_states must be [B, N, {self.embed_dim}], got "
                             f"{tuple(hidden_states.shape) if isinstance(hidden_states, Tensor) else hidden_states!r}")
        b, n, c = hidden_states.shape
        with _as_value_errors():
            check_role_mask("attention_mask", attention_mask, b, n, hidden_states.device, "hidden_states")
            check_role_mask("global_attention_mask", global_attention_mask, b, n, hidden_states.device,
                            "hidden_states")
        if head_mask is not None:
            if not isinstance(head_mask, Tensor) or tuple(head_mask.shape) != (self.num_heads,):
                raise ValueError(f"head_mask must be a [H] = [{self.num_heads}] tensor, got "
                                 f"{tuple(head_mask.shape) if isinstance(head_mask, Tensor) else head_mask!r}")
            if not head_mask.is_floating_point() and head_mask.dtype != torch.bool:
                head_mask = head_mask.float()

        if output_attentions or (self.training and self.dropout > 0.0):
            out, probs = self._unfused(hidden_states, attention_mask, global_attention_mask, head_mask)
            out = out.transpose(1, 2).reshape(b, n, c)
            return (out, probs) if output_attentions else out

        q, k, v = (self._heads(proj(hidden_states)) for proj in (self.query, self.key, self.value))
        global_qkv = {}
        if global_attention_mask is not None:
            # The fused op reads only the global rows of global_q, but takes a full [B, H, N, D]
            # tensor so that no shape depends on the data (no host sync, compilable).
            global_qkv = dict(zip(("global_q", "global_k", "global_v"),
                                  (self._heads(proj(hidden_states))
                                   for proj in (self.query_global, self.key_global, self.value_global))))
        out = longformer_attention(q, k, v, self.window, dilation=self.dilation, attention_mask=attention_mask,
                                   global_attention_mask=global_attention_mask, causal=self.causal, **global_qkv)
        if head_mask is not None:
            out = out * head_mask.to(out.dtype).view(1, -1, 1, 1)
        return out.transpose(1, 2).reshape(b, n, c)  # free: out is laid out as [B, N, H, D]

    # ----------------------------------------------------------------------------------------
    # Unfused path: materialised probabilities (dropout, output_attentions).

    def _unfused(self, x: Tensor, attention_mask, global_attention_mask, head_mask):
        b, n, _ = x.shape
        h, d = self.num_heads, self.head_dim
        left, right = self.window
        slots = left + right + 1
        scale = 1.0 / d ** 0.5
        device = x.device
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32

        q, k, v = (self._heads(proj(x)) for proj in (self.query, self.key, self.value))
        real, glob = token_roles(q, attention_mask, global_attention_mask)
        local_key = real & ~glob
        local_row = local_key  # a real, non-global query

        # Band scores and which band slots hold an allowed key (in the sequence, real, not global).
        band = ops.banded_matmul_qk(q, k, left, right, self.dilation)
        pos = torch.arange(n, device=device)
        offset = torch.arange(slots, device=device) - left
        dil = torch.tensor(self.dilation, device=device)
        key_pos = pos[None, :, None] + offset[None, None, :] * dil[:, None, None]  # [H, N, S]
        in_seq = (key_pos >= 0) & (key_pos < n)
        band_ok = in_seq[None] & local_key[:, key_pos.clamp(0, max(n - 1, 0)).reshape(-1)].view(b, h, n, slots)
        if self.causal:
            band_ok = band_ok & (offset <= 0)

        # Global tokens of each row, in increasing position order, in slots 0..count-1 of G slots.
        count = glob.sum(1)
        g = int(count.max()) if b * n > 0 else 0  # data-dependent shape: the unfused path syncs here
        index = torch.argsort(glob.to(torch.int8), dim=1, descending=True, stable=True)[:, :g]  # [B, G]
        valid = torch.arange(g, device=device)[None, :] < count[:, None]  # [B, G]
        head_index = index[:, None, :, None].expand(b, h, g, d)
        k_glob, v_glob = k.gather(2, head_index), v.gather(2, head_index)  # local k/v of the global tokens
        glob_scores = q @ k_glob.transpose(-1, -2)  # [B, H, N, G]
        glob_ok = valid[:, None, None, :]
        if self.causal:
            glob_ok = glob_ok & (index[:, None, None, :] <= pos[None, None, :, None])

        scores = torch.cat([glob_scores, band], dim=-1).to(acc) * scale
        allowed = torch.cat([glob_ok.expand(b, h, n, g), band_ok.expand(b, h, n, slots)], dim=-1)
        probs = masked_softmax(scores, allowed) * local_row[:, None, :, None]
        probs = self._head_mask_and_dropout(probs, head_mask).to(x.dtype)
        p_glob, p_band = probs.split([g, slots], dim=-1)
        out = ops.banded_matmul_pv(p_band.contiguous(), v, left, right, self.dilation) + p_glob @ v_glob

        global_rows = x.new_zeros(b, h, g, n)
        if g > 0:
            # Rows of global queries: every real key, with the global projections (queries
            # projected for the G gathered tokens only).
            xg = x.gather(1, index[:, :, None].expand(b, g, x.shape[-1]))
            qg = self._heads(self.query_global(xg))
            kg, vg = (self._heads(proj(x)) for proj in (self.key_global, self.value_global))
            rows_ok = real[:, None, None, :] & valid[:, None, :, None]
            if self.causal:
                rows_ok = rows_ok & (pos[None, None, None, :] <= index[:, None, :, None])
            row_probs = masked_softmax((qg @ kg.transpose(-1, -2)).to(acc) * scale, rows_ok)
            global_rows = self._head_mask_and_dropout(row_probs, head_mask).to(x.dtype)
            global_out = (global_rows @ vg) * valid[:, None, :, None]
            # Unused slots point at some non-global position but add exactly 0 there.
            out = out + torch.zeros_like(out).scatter_add(2, head_index, global_out)

        probs_out = LongformerAttentionProbs(p_band, p_glob, global_rows, torch.where(valid, index, -1))
        return out, probs_out

    def _head_mask_and_dropout(self, probs: Tensor, head_mask: Optional[Tensor]) -> Tensor:
        if head_mask is not None:
            probs = probs * head_mask.to(probs.dtype).view(1, -1, 1, 1)
        return F.dropout(probs, p=self.dropout, training=self.training)
