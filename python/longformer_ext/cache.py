"""A key/value cache for decoding with causal sliding-window attention.

In a causal layer with the window ``(left, 0)`` and per-head dilation ``d_h``, the query at position
``p`` sees the keys ``p - t * d_h`` for ``t`` in ``[0, left]``: never more than ``reach = left *
max(d)`` positions back. A chunk of ``n`` new tokens at positions ``P .. P + n - 1`` (a prompt being
prefilled, or one generated token) therefore needs only the keys of ``P - reach .. P + n - 1``: the
``reach`` positions before the chunk complete the band of its first query, and every later query's
band starts later, inside those or inside the chunk itself. So per layer the cache keeps the keys
and values of the last ``reach`` positions, and memory and per-token cost are bounded by the window
whatever the length of the text.

Storage: per layer one buffer of ``reach + slack`` positions, allocated at the layer's first update
with the batch size, KV heads, head size, dtype and device of its keys. New keys are written after the
stored ones; when a chunk does not fit, the last ``reach`` keys are first moved to the front (one
copy of ``reach`` positions every ``slack`` tokens or so), so decoding never allocates. The keys stay
in position order, which the op needs (its band is defined on indices into the key sequence); a ring
buffer would wrap around. A chunk longer than the slack (a long prompt) is attended to from a new
concatenation, which costs no more than the chunk itself, and only its last ``reach`` positions are
stored.

The cache stores keys as the model computed them: a model with rotary positions rotates the new keys
by their absolute positions (``next_position`` onwards) before the update.

Global tokens (``attend(..., global_attention_mask=)``): every later query attends to every global
key, so the cache also keeps the keys and values of each global position, for good (memory grows
with the number of global tokens only). Once such a position has left the window, its key goes
before the window's keys in the sequence handed to the op, marked global: a global key is never a
band key, so its index there does not matter, and it precedes every new query, as causality wants.
(That sequence is then a concatenation, one copy of the window per step.) A global *query* attends
to every earlier key, so a global token is accepted only while the cache still holds every earlier
position (the prompt, typically); later, a NotImplementedError says so.
"""

from numbers import Integral
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from ._args import check_role_mask
from .attention import longformer_attention

__all__ = ["WindowKVCache"]

# The least default slack: a layer of small reach shifting every token or two would spend a copy per
# token to save a few positions of memory.
MIN_SLACK = 16


def _positive_ints(value, what: str) -> list[int]:
    values = [value] if isinstance(value, Integral) else list(value)
    if not values or any(not isinstance(x, Integral) or isinstance(x, bool) or x < 1 for x in values):
        raise ValueError(f"{what} must be an int >= 1 or a non-empty sequence of them, got {value!r}")
    return [int(x) for x in values]


class WindowKVCache:
    """Keys and values of the last positions of every layer of a causal sliding-window model.

    Args:
        windows: the one-sided causal window ``left`` of each layer (the layer's window is
            ``(left, 0)``).
        dilations: per layer, an int or one value per query head, as given to the op.
        slack: positions allocated beyond each layer's reach (default ``max(reach, 16)``, which
            keeps the shifts to at most one copied position per generated token on average).

    Use: for each chunk of new tokens (the prompt, then one token at a time), call ``attend`` (or
    ``update`` and the op yourself) for layers ``0 .. L-1`` in order, each with the chunk's
    ``[B, H, n, D]`` projections.
    """

    def __init__(self, windows: Sequence[int], dilations: Sequence[Union[int, Sequence[int]]], *,
                 slack: Optional[int] = None):
        windows = list(windows)
        if not windows or any(not isinstance(w, Integral) or isinstance(w, bool) or w < 0 for w in windows):
            raise ValueError(f"windows must be a non-empty sequence of ints >= 0 (one per layer), got {windows!r}")
        if len(dilations) != len(windows):
            raise ValueError(f"got {len(windows)} windows but {len(dilations)} dilations: one of each per layer")
        if slack is not None and (not isinstance(slack, Integral) or isinstance(slack, bool) or slack < 1):
            raise ValueError(f"slack must be an int >= 1 or None, got {slack!r}")
        self.windows = [int(w) for w in windows]
        # kept as given (an int stays an int) so that a model can compare them with its own
        self.dilations = [d if isinstance(d, Integral) else list(d) for d in dilations]
        self.reach = [w * max(_positive_ints(d, f"dilation of layer {i}"))
                      for i, (w, d) in enumerate(zip(self.windows, dilations))]
        self._capacity = [r + (max(r, MIN_SLACK) if slack is None else slack) for r in self.reach]
        self._keys: list[Optional[Tensor]] = [None] * len(windows)
        self._values: list[Optional[Tensor]] = [None] * len(windows)
        self._length = [0] * len(windows)  # stored positions: buffer slots [0, length)
        self._end = [0] * len(windows)     # absolute position after the newest stored one
        # Global tokens: which stored slots are global ([B, capacity] bool), and every global
        # position's key and value, kept for good: [B, H, G, D], positions [B, G] (padded slots: -1).
        self._is_global: list[Optional[Tensor]] = [None] * len(windows)
        self._global_keys: list[Optional[Tensor]] = [None] * len(windows)
        self._global_values: list[Optional[Tensor]] = [None] * len(windows)
        self._global_positions: list[Optional[Tensor]] = [None] * len(windows)

    @property
    def layers(self) -> int:
        return len(self.windows)

    @property
    def next_position(self) -> int:
        """Absolute position of the next token: how many tokens have gone through every layer."""
        return self._end[-1]

    def first_position(self, layer: int) -> int:
        """Absolute position of the first key ``layer`` still stores."""
        self._check_layer(layer)
        return self._end[layer] - self._length[layer]

    def capacity(self, layer: int) -> int:
        """Positions allocated for ``layer`` (``reach + slack``); it never grows."""
        self._check_layer(layer)
        return self._capacity[layer]

    def stored(self, layer: int) -> tuple[Tensor, Tensor]:
        """Views of the keys and values ``layer`` stores, ``[B, H, n, D]``, positions
        ``first_position(layer)`` onwards (at least the last ``reach``, once there are that many)."""
        self._check_layer(layer)
        if self._keys[layer] is None:
            raise ValueError(f"layer {layer} has no keys yet: nothing was appended to it")
        length = self._length[layer]
        return self._keys[layer][:, :, :length], self._values[layer][:, :, :length]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Appends the keys and values ``[B, H, n, D]`` of the next ``n`` positions to ``layer`` and
        returns the keys and values the new queries attend to, in position order: the last
        ``min(reach, stored)`` stored positions followed by the ``n`` new ones. They are views of the
        cache's buffer (valid until this layer's next update), or a new tensor for a chunk longer than
        the slack."""
        out_k, out_v, _ = self._append(layer, k, v, None)
        return out_k, out_v

    def _append(self, layer: int, k: Tensor, v: Tensor, glob: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """``update``, also keeping which positions are global (``glob`` [B, n] bool, None: none);
        returns the keys, values and global flags [B, needed + n] of the positions handed back."""
        self._check_update(layer, k, v)
        n = k.shape[2]
        if self._keys[layer] is None:
            shape = (k.shape[0], k.shape[1], self._capacity[layer], k.shape[3])
            self._keys[layer], self._values[layer] = k.new_empty(shape), v.new_empty(shape)
            self._is_global[layer] = torch.zeros(k.shape[0], self._capacity[layer], dtype=torch.bool, device=k.device)
        if glob is None:
            glob = torch.zeros(k.shape[0], n, dtype=torch.bool, device=k.device)
        keys, values, flags = self._keys[layer], self._values[layer], self._is_global[layer]
        length, reach, capacity = self._length[layer], self.reach[layer], self._capacity[layer]
        needed = min(length, reach)  # what the new queries need of the stored positions
        if needed + n > capacity:
            # Does not fit even after a shift (a long prompt): attend from a concatenation, store
            # only its last positions.
            out_k = torch.cat([keys[:, :, length - needed:length], k], dim=2)
            out_v = torch.cat([values[:, :, length - needed:length], v], dim=2)
            out_flags = torch.cat([flags[:, length - needed:length], glob], dim=1)
            length = min(reach, needed + n)
            keys[:, :, :length].copy_(out_k[:, :, out_k.shape[2] - length:])
            values[:, :, :length].copy_(out_v[:, :, out_v.shape[2] - length:])
            flags[:, :length].copy_(out_flags[:, out_flags.shape[1] - length:])
        else:
            if length + n > capacity:  # full: move the needed tail to the front, drop the rest
                _move_to_front(keys, length - needed, needed)
                _move_to_front(values, length - needed, needed)
                _move_to_front(flags[:, None, :, None], length - needed, needed)
                length = needed
            keys[:, :, length:length + n].copy_(k)
            values[:, :, length:length + n].copy_(v)
            flags[:, length:length + n].copy_(glob)
            length += n
            out_k = keys[:, :, length - needed - n:length]
            out_v = values[:, :, length - needed - n:length]
            out_flags = flags[:, length - needed - n:length]
        self._length[layer] = length
        self._end[layer] += n
        return out_k, out_v, out_flags

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, *, scale: Optional[float] = None,
               global_attention_mask: Optional[Tensor] = None) -> Tensor:
        """``update(layer, k, v)``, then causal sliding-window attention of the new queries ``q``
        ``[B, H, n, D]`` (the newest ``n`` positions) over the returned keys, with the layer's
        window and dilation, plus every global key so far. ``global_attention_mask`` ``[B, n]``
        marks the new positions that are global tokens (accepted while the cache holds every
        earlier position: see the module's docstring). Returns ``[B, H, n, D]``."""
        if q.dim() != 4 or k.dim() != 4 or q.shape[2] != k.shape[2]:
            raise ValueError(f"q and k must be [B, H, n, D] for the same n new positions, got {tuple(q.shape)} "
                             f"and {tuple(k.shape)}")
        self._check_layer(layer)
        # The first position of the stored keys handed back with the new ones (update's `needed`).
        window_start = self._end[layer] - min(self._length[layer], self.reach[layer])
        glob = None
        if global_attention_mask is not None:
            check_role_mask("global_attention_mask", global_attention_mask, k.shape[0], k.shape[2], k.device,
                            "the new positions")
            glob = global_attention_mask != 0
            if window_start > 0 and bool(glob.any()):
                raise NotImplementedError(
                    f"a global token at position {self._end[layer]} or later: a global query attends to every "
                    f"earlier key, but layer {layer} hands the op only the positions from {window_start} on; "
                    f"global tokens are accepted while the window still reaches position 0 (in the prompt, "
                    f"typically)")
        keys, values, flags = self._append(layer, k, v, glob)
        if glob is not None:
            self._keep_global(layer, k, v, glob, self._end[layer] - k.shape[2])
        mask = None
        has_globals = self._global_positions[layer] is not None
        if has_globals:
            positions = self._global_positions[layer]
            left_behind = (positions >= 0) & (positions < window_start)  # no longer among the window's keys
            if bool(left_behind.any()):  # before the window's keys; the other slots masked out as padding
                keys = torch.cat([self._global_keys[layer], keys], dim=2)
                values = torch.cat([self._global_values[layer], values], dim=2)
                mask = torch.cat([left_behind, torch.ones_like(flags)], dim=1)
                flags = torch.cat([left_behind, flags], dim=1)
        # The queries are the last positions of the key sequence: the op's default q_offset.
        return longformer_attention(q, keys, values, (self.windows[layer], 0), dilation=self.dilations[layer],
                                    causal=True, scale=scale, attention_mask=mask,
                                    global_attention_mask=flags if has_globals else None)

    def _keep_global(self, layer: int, k: Tensor, v: Tensor, glob: Tensor, first: int) -> None:
        """Adds the global positions among the new ones (``glob`` [B, n]; the first is ``first``) to
        the layer's global keys, each batch row's in position order (rows with fewer padded, -1)."""
        counts = glob.sum(1)
        width = int(counts.max()) if glob.numel() else 0
        if width == 0:
            return
        n = glob.shape[1]
        index = torch.arange(n, device=k.device).expand_as(glob)
        order = torch.where(glob, index, index + n).sort(dim=1).values[:, :width]  # global indices first
        valid = order < n
        order = torch.where(valid, order, 0)
        pick = order[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
        new = (k.gather(2, pick), v.gather(2, pick), torch.where(valid, order + first, -1))
        if self._global_positions[layer] is None:
            self._global_keys[layer], self._global_values[layer], self._global_positions[layer] = new
        else:
            self._global_keys[layer] = torch.cat([self._global_keys[layer], new[0]], dim=2)
            self._global_values[layer] = torch.cat([self._global_values[layer], new[1]], dim=2)
            self._global_positions[layer] = torch.cat([self._global_positions[layer], new[2]], dim=1)

    def _check_layer(self, layer) -> None:
        if not isinstance(layer, Integral) or isinstance(layer, bool) or not 0 <= layer < self.layers:
            raise IndexError(f"layer must be an int in [0, {self.layers}), got {layer!r}: this cache has "
                             f"{self.layers} layers")

    def _check_update(self, layer, k, v) -> None:
        self._check_layer(layer)
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, Tensor) or t.dim() != 4 or not t.is_floating_point():
                raise ValueError(f"{name} must be a floating-point [B, H, n, D] tensor, got "
                                 f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
        if k.shape != v.shape or k.dtype != v.dtype or k.device != v.device:
            raise ValueError(f"k and v must match: {k.dtype} {tuple(k.shape)} on {k.device} vs "
                             f"{v.dtype} {tuple(v.shape)} on {v.device}")
        if k.shape[2] == 0:
            raise ValueError("k and v hold no positions (n = 0)")
        stored = self._keys[layer]
        if stored is not None:
            b, h, _, d = stored.shape
            if (k.shape[0], k.shape[1], k.shape[3]) != (b, h, d) or k.dtype != stored.dtype or \
                    k.device != stored.device:
                raise ValueError(f"k is {k.dtype} {tuple(k.shape)} on {k.device}, but layer {layer} holds "
                                 f"{stored.dtype} [B={b}, H={h}, n, D={d}] on {stored.device}")
        # A chunk goes through layers 0 .. L-1 in order, so that every layer sees the same positions.
        n = k.shape[2]
        if layer == 0 and self._end[0] != self._end[-1]:
            raise ValueError(f"layer 0 got new positions before the previous chunk went through every layer "
                             f"(positions per layer: {self._end}): update layers 0 .. {self.layers - 1} in order "
                             f"for each chunk")
        if layer > 0 and self._end[layer] + n != self._end[layer - 1]:
            raise ValueError(f"layer {layer} got {n} new positions after {self._end[layer]}, but layer {layer - 1} "
                             f"has {self._end[layer - 1]}: update layers 0 .. {self.layers - 1} in order, each "
                             f"with the same chunk")


def _move_to_front(buffer: Tensor, start: int, count: int) -> None:
    """``buffer[:, :, :count] = buffer[:, :, start:start + count]``."""
    tail = buffer[:, :, start:start + count]
    # copy_ refuses a source that overlaps its destination; that happens only when the tail is longer
    # than the part it leaves behind
    buffer[:, :, :count].copy_(tail if start >= count else tail.clone())
