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
* the vocabulary is bytes (256 symbols), input and output embeddings are tied.

The window and dilation are not parameters: ``set_windows`` changes them between training phases
(the paper doubles the window each phase).
"""

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attention import longformer_attention

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
    by the angle ``n * base^(-2c/D)``. The cos/sin table is cached per (length, device, dtype)."""

    def __init__(self, head_dim: int, base: float):
        super().__init__()
        self.register_buffer("inv_freq", base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim),
                             persistent=False)
        self._cache: dict = {}

    def tables(self, n: int, device, dtype) -> tuple[Tensor, Tensor]:
        key = (n, device, dtype)
        if key not in self._cache:
            angles = torch.arange(n, device=device, dtype=torch.float32)[:, None] * self.inv_freq.to(device)[None, :]
            self._cache = {key: (angles.cos().to(dtype), angles.sin().to(dtype))}  # keep the latest only
        return self._cache[key]

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``[B, H, N, D]``; returns a new contiguous tensor of the same shape."""
        cos, sin = self.tables(x.shape[-2], x.device, x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class CausalWindowAttention(nn.Module):
    def __init__(self, config: CharLMConfig, layer: int, rotary: Rotary):
        super().__init__()
        self.heads = config.heads
        self.head_dim = config.dim // config.heads
        self.window = config.windows[layer]
        self.dilation = list(config.dilations[layer])
        self.rotary = rotary
        self.qkv = nn.Linear(config.dim, 3 * config.dim, bias=False)
        self.out = nn.Linear(config.dim, config.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        # [B, N, 3, H, D] -> three [B, H, N, D] views (head split without a copy; v goes in as a view)
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.rotary(q), self.rotary(k)
        # (window, 0) already excludes the future; causal=True states the intent and would also cover
        # global tokens if a caller ever added some.
        y = longformer_attention(q, k, v, (self.window, 0), dilation=self.dilation, causal=True)
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

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.drop(self.mlp(self.norm2(x)))


class CharLM(nn.Module):
    """Byte-level causal LM. ``forward(tokens [B, N] int64) -> logits [B, N, vocab]``; the logits at
    position ``i`` predict byte ``i + 1`` and depend on bytes ``<= i`` only."""

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

    def forward(self, tokens: Tensor) -> Tensor:
        if tokens.dim() != 2 or tokens.dtype != torch.long:
            raise ValueError(f"tokens must be an int64 [B, N] tensor, got {tokens.dtype} {tuple(tokens.shape)}")
        x = self.drop(self.embed(tokens))
        for block in self.blocks:
            x = block(x)
        return F.linear(self.norm(x), self.embed.weight)  # tied input/output embedding

    def loss(self, tokens: Tensor) -> Tensor:
        """Mean next-byte cross-entropy in nats over ``tokens[:, 1:]``."""
        logits = self(tokens[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def encode_bytes(text) -> Tensor:
    """``str`` (UTF-8) or ``bytes`` -> int64 tensor of byte values."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def decode_bytes(tokens: Tensor) -> str:
    return bytes(tokens.to(torch.uint8).tolist()).decode("utf-8", errors="replace")
