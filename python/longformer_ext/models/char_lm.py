"""The paper's character-level autoregressive language model, small and readable.

Beltagy et al. (2020, section 4) train a byte-level LM whose attention is causal sliding windows:
small windows in the lower layers (local detail), growing with depth (longer context higher up),
plus dilation on a couple of heads of the upper layers so that those heads reach further at no extra
cost. Here:

* every layer is a pre-norm transformer block; its attention is ``longformer_attention`` with the
  one-sided causal window ``(window[layer], 0)`` and a per-head dilation list;
* positions are relative: rotary embeddings rotate q and k before the op (the fused op takes no score
  bias, and a rotation of q and k makes ``q_i . k_j`` depend on ``i - j`` only), so the model has no
  maximum length and the same weights run at every phase of the staged schedule;
* the vocabulary is bytes (256 symbols), input and output embeddings are tied;
* ``generate`` decodes on a ``WindowKVCache``: the prompt in one forward, then one byte per forward,
  each attending to the last ``window * max(dilation)`` positions kept per layer.

The window and dilation are not parameters: ``set_windows`` changes them between training phases
(the paper doubles the window each phase).
"""

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attention import longformer_attention
from ..cache import WindowKVCache

if TYPE_CHECKING:
    from ..distributed import ShardPlan

__all__ = ["CharLMConfig", "CharLM", "growing_windows", "upper_layer_dilation", "encode_bytes", "decode_bytes"]


def growing_windows(layers: int, bottom: int, top: int) -> list[int]:
    """One-sided window per layer, growing linearly from ``bottom`` (layer 0) to ``top`` (last layer)."""
    if layers < 1 or bottom < 0 or top < bottom:
        raise ValueError(f"need layers >= 1 and 0 <= bottom <= top, got {layers}, {bottom}, {top}")
    if layers == 1:
        return [top]
    return [round(bottom + (top - bottom) * i / (layers - 1)) for i in range(layers)]


def upper_layer_dilation(layers: int, heads: int, dilated_layers: int, dilated_heads: int,
                         max_dilation: int = 2) -> list[list[int]]:
    """Per-layer, per-head dilation as in the paper: none in the lower layers; in the top
    ``dilated_layers`` layers the last ``dilated_heads`` heads get a dilation growing with depth up
    to ``max_dilation`` (the other heads keep 1 so that every layer still sees its nearest bytes)."""
    if not (0 <= dilated_layers <= layers and 0 <= dilated_heads <= heads and max_dilation >= 1):
        raise ValueError(f"bad dilation layout: layers={layers}, heads={heads}, dilated_layers={dilated_layers}, "
                         f"dilated_heads={dilated_heads}, max_dilation={max_dilation}")
    table = []
    for layer in range(layers):
        rank = layer - (layers - dilated_layers)  # 0 for the first dilated layer
        if rank < 0:
            table.append([1] * heads)
            continue
        d = 2 + round((max_dilation - 2) * rank / max(dilated_layers - 1, 1)) if max_dilation >= 2 else 1
        table.append([1] * (heads - dilated_heads) + [d] * dilated_heads)
    return table


@dataclass
class CharLMConfig:
    """``windows``: one-sided causal window per layer (default: growing 16 .. 64); ``dilations``:
    one list of ``heads`` values per layer (default: 2 on the last head of the upper half)."""
    vocab_size: int = 256
    dim: int = 256
    layers: int = 4
    heads: int = 4
    mlp_ratio: int = 4
    windows: Optional[Sequence[int]] = None
    dilations: Optional[Sequence[Sequence[int]]] = None
    rotary_base: float = 10000.0
    dropout: float = 0.0

    def __post_init__(self):
        if self.dim % self.heads or (self.dim // self.heads) % 2:
            raise ValueError(f"dim ({self.dim}) must split into {self.heads} heads of even size (rotary pairs)")
        if self.windows is None:
            self.windows = growing_windows(self.layers, 16, 64)
        if self.dilations is None:
            self.dilations = upper_layer_dilation(self.layers, self.heads, self.layers // 2, min(1, self.heads))
        self.windows = [int(w) for w in self.windows]
        self.dilations = [[int(d) for d in row] for row in self.dilations]
        if len(self.windows) != self.layers or any(w < 0 for w in self.windows):
            raise ValueError(f"windows needs {self.layers} values >= 0, got {self.windows}")
        if len(self.dilations) != self.layers or any(len(row) != self.heads or min(row) < 1 for row in self.dilations):
            raise ValueError(f"dilations needs {self.layers} lists of {self.heads} values >= 1, got {self.dilations}")


class Rotary(nn.Module):
    """Rotary position embedding: channel pair ``(x[c], x[c + D/2])`` of position ``n`` is rotated
    by the angle ``n * base^(-2c/D)``. The cos/sin table is cached per (length, first position,
    device, dtype)."""

    def __init__(self, head_dim: int, base: float):
        super().__init__()
        self.register_buffer("inv_freq", base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim),
                             persistent=False)
        self._cache: dict = {}

    def tables(self, n: int, offset: int, device, dtype) -> tuple[Tensor, Tensor]:
        """cos and sin ``[n, D/2]`` of positions ``offset .. offset + n - 1`` (computed for those
        positions only, so that a decoding step costs the same at any position)."""
        key = (n, offset, device, dtype)
        if key not in self._cache:
            positions = torch.arange(offset, offset + n, device=device, dtype=torch.float32)
            angles = positions[:, None] * self.inv_freq.to(device)[None, :]
            self._cache = {key: (angles.cos().to(dtype), angles.sin().to(dtype))}  # keep the latest only
        return self._cache[key]

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        """``x``: ``[B, H, N, D]`` at positions ``offset .. offset + N - 1``; returns a new contiguous
        tensor of the same shape."""
        cos, sin = self.tables(x.shape[-2], offset, x.device, x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class CausalWindowAttention(nn.Module):
    def __init__(self, config: CharLMConfig, layer: int, rotary: Rotary):
        super().__init__()
        self.layer = layer  # its index in a WindowKVCache
        self.heads = config.heads
        self.head_dim = config.dim // config.heads
        self.window = config.windows[layer]
        self.dilation = list(config.dilations[layer])
        self.rotary = rotary
        self.qkv = nn.Linear(config.dim, 3 * config.dim, bias=False)
        self.out = nn.Linear(config.dim, config.dim, bias=False)

    def forward(self, x: Tensor, cache: Optional[WindowKVCache] = None, shard: Optional["ShardPlan"] = None) -> Tensor:
        b, n, c = x.shape
        # [B, N, 3, H, D] -> three [B, H, N, D] views (head split without a copy; v goes in as a view)
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if shard is not None:
            # x is this rank's shard of the sequence: its positions start at shard.start
            from .. import distributed
            q, k = self.rotary(q, shard.start), self.rotary(k, shard.start)
            y = distributed.longformer_attention(q, k, v, (self.window, 0), dilation=self.dilation, causal=True,
                                                 plan=shard)
        elif cache is None:
            q, k = self.rotary(q), self.rotary(k)
            # (window, 0) already excludes the future; causal=True states the intent and would also
            # cover global tokens if a caller ever added some.
            y = longformer_attention(q, k, v, (self.window, 0), dilation=self.dilation, causal=True)
        else:
            # The new tokens follow the cached ones, whose keys were rotated by their absolute
            # positions: so are the new ones. (next_position counts the tokens that went through the
            # last layer, so it reads the same in every layer of this forward.)
            offset = cache.next_position
            q, k = self.rotary(q, offset), self.rotary(k, offset)
            y = cache.attend(self.layer, q, k, v)
        return self.out(y.transpose(1, 2).reshape(b, n, c))  # y is [B, N, H, D] in memory: free reshape


class Block(nn.Module):
    def __init__(self, config: CharLMConfig, layer: int, rotary: Rotary):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.dim)
        self.attn = CausalWindowAttention(config, layer, rotary)
        self.norm2 = nn.LayerNorm(config.dim)
        self.mlp = nn.Sequential(nn.Linear(config.dim, config.mlp_ratio * config.dim), nn.GELU(),
                                 nn.Linear(config.mlp_ratio * config.dim, config.dim))
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, cache: Optional[WindowKVCache] = None, shard: Optional["ShardPlan"] = None) -> Tensor:
        x = x + self.drop(self.attn(self.norm1(x), cache, shard))
        return x + self.drop(self.mlp(self.norm2(x)))


class CharLM(nn.Module):
    """Byte-level causal LM. ``forward(tokens [B, N] int64) -> logits [B, N, vocab]``; the logits at
    position ``i`` predict byte ``i + 1`` and depend on bytes ``<= i`` only. ``generate`` continues
    a prompt."""

    def __init__(self, config: CharLMConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        rotary = Rotary(config.dim // config.heads, config.rotary_base)
        self.blocks = nn.ModuleList(Block(config, i, rotary) for i in range(config.layers))
        self.norm = nn.LayerNorm(config.dim)
        self.drop = nn.Dropout(config.dropout)
        self.apply(self._init)
        # GPT-2's scaling of the residual-branch outputs keeps the residual stream's variance flat in depth
        for block in self.blocks:
            for proj in (block.attn.out, block.mlp[2]):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * config.layers))

    @staticmethod
    def _init(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def windows(self) -> list[int]:
        return [block.attn.window for block in self.blocks]

    @property
    def dilations(self) -> list[list[int]]:
        return [list(block.attn.dilation) for block in self.blocks]

    def set_windows(self, windows: Sequence[int]) -> None:
        """New one-sided window per layer (the staged schedule doubles them between phases)."""
        windows = [int(w) for w in windows]
        if len(windows) != len(self.blocks) or any(w < 0 for w in windows):
            raise ValueError(f"need {len(self.blocks)} windows >= 0, got {windows}")
        for block, w in zip(self.blocks, windows):
            block.attn.window = w
        self.config.windows = windows

    def receptive_field(self) -> int:
        """How many past bytes the last position can depend on: the per-layer reaches add up."""
        return sum(block.attn.window * max(block.attn.dilation) for block in self.blocks)

    def new_cache(self, slack: Optional[int] = None) -> WindowKVCache:
        """An empty KV cache for this model's current windows and dilations (see ``forward``)."""
        return WindowKVCache(self.windows, self.dilations, slack=slack)

    def forward(self, tokens: Tensor, cache: Optional[WindowKVCache] = None,
                shard: Optional["ShardPlan"] = None) -> Tensor:
        """Logits ``[B, N, vocab]`` of ``tokens`` ``[B, N]``. With a ``cache`` (``new_cache``), the
        tokens are the ``N`` positions after those the cache has seen: they attend to the cached keys
        and their own, and the cache takes their keys and values (call it under ``torch.no_grad``).
        With a ``shard`` (``longformer_ext.distributed.plan`` of the tokens), ``tokens`` is this
        rank's shard of a sequence split over a process group: every rank calls forward on its shard
        and gets the logits of its positions, equal to the whole sequence's (the attention exchanges
        the window's halo with the other ranks)."""
        if tokens.dim() != 2 or tokens.dtype != torch.long:
            raise ValueError(f"tokens must be an int64 [B, N] tensor, got {tokens.dtype} {tuple(tokens.shape)}")
        if shard is not None and cache is not None:
            raise ValueError("cache and shard cannot be combined: decoding runs on one process")
        if cache is not None and (cache.windows != self.windows or cache.dilations != self.dilations):
            raise ValueError(f"the cache was made for windows {cache.windows} and dilations {cache.dilations}, but the "
                             f"model has {self.windows} and {self.dilations}: make a new one with new_cache()")
        x = self.drop(self.embed(tokens))
        for block in self.blocks:
            x = block(x, cache, shard)
        return F.linear(self.norm(x), self.embed.weight)  # tied input/output embedding

    def loss(self, tokens: Tensor) -> Tensor:
        """Mean next-byte cross-entropy in nats over ``tokens[:, 1:]``."""
        logits = self(tokens[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))

    @torch.no_grad()
    def generate(self, ids: Tensor, max_new_tokens: int, *, do_sample: bool = False, temperature: float = 1.0,
                 top_k: Optional[int] = None, generator: Optional[torch.Generator] = None) -> Tensor:
        """Continues the prompts ``ids`` ``[B, N]`` (int64, ``N >= 1``) by ``max_new_tokens`` bytes and
        returns ``[B, N + max_new_tokens]``: the prompts followed by the new bytes.

        Greedy (the most likely byte) unless ``do_sample``: then each byte is drawn from the softmax of
        the logits divided by ``temperature``, restricted to the ``top_k`` most likely bytes when
        given, with ``generator``'s random numbers. Runs in eval mode (the model's mode is restored)
        on a ``WindowKVCache``: the prompt goes through the model once, then each new byte alone, so
        a byte costs the same however long the text already is."""
        if ids.dim() != 2 or ids.dtype != torch.long or ids.shape[1] == 0:
            raise ValueError(f"ids must be a non-empty int64 [B, N] tensor, got {ids.dtype} {tuple(ids.shape)}")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if not do_sample and (temperature != 1.0 or top_k is not None):
            raise ValueError("temperature and top_k shape the sampling: pass do_sample=True with them")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be an int >= 1 or None, got {top_k!r}")
        was_training = self.training
        self.eval()
        try:
            cache = self.new_cache()
            logits = self(ids, cache)[:, -1]
            new = []
            for step in range(max_new_tokens):
                token = _next_token(logits, do_sample, temperature, top_k, generator)[:, None]
                new.append(token)
                if step + 1 < max_new_tokens:  # the last byte's own prediction is not needed
                    logits = self(token, cache)[:, -1]
        finally:
            self.train(was_training)
        return torch.cat([ids, *new], dim=1)


def _next_token(logits: Tensor, do_sample: bool, temperature: float, top_k: Optional[int],
                generator: Optional[torch.Generator]) -> Tensor:
    """``[B]`` next bytes from the last logits ``[B, vocab]``."""
    if not do_sample:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]


def encode_bytes(text) -> Tensor:
    """``str`` (UTF-8) or ``bytes`` -> int64 tensor of byte values."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def decode_bytes(tokens: Tensor) -> str:
    return bytes(tokens.to(torch.uint8).tolist()).decode("utf-8", errors="replace")
