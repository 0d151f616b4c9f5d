"""Transformer layers of the hybrid tokenizer, as GigaTok builds them (pre-norm, MLP ratio 4, exact GELU).

- ``QFormerLayer`` (DETR's decoder layer): self-attention over the queries, attention from the queries to a
  memory, MLP. Positions are added at every layer, to the queries and keys of the self-attention, to the
  cross-attention's queries and to the memory's keys (never to values); the memory is not re-normalised.
  The 1D encoder (queries = pooled 1D tokens, memory = embedded CNN features), the 1D decoder (queries = the
  grid, memory = the 1D tokens) and GigaTok's released 2D S-S model (memory = the layer's own input) use it.
- ``PlainLayer``: self-attention and MLP with positions added once before the stack (2D S-B and B-L).

Attention runs through torch's scaled_dot_product_attention (flash / memory-efficient kernels on GPU); its
in-projection is one packed (3 width, width) matrix, as torch's MultiheadAttention stores it.
Token masks for 1D encoder queries: "none", "causal", or "block_causal" (the first ``causal_prefix`` tokens
strictly causal, then groups of ``group_size`` that see themselves and everything before), the DetailFlow layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass
class TransformerConfig:
    width: int = 512
    depth: int = 6
    heads: int = 8
    mlp_ratio: float = 4.0

    def __post_init__(self):
        if self.width % self.heads:
            raise ValueError(f"transformer width {self.width} is not divisible by heads={self.heads}")
        if self.depth < 1:
            raise ValueError(f"transformer depth must be >= 1, got {self.depth}")


class Attention(nn.Module):
    """Multi-head attention whose query, key and value inputs may differ (positions on q/k only)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def reset_in_proj(self) -> None:
        nn.init.xavier_uniform_(self.in_proj.weight)
        nn.init.zeros_(self.in_proj.bias)

    def forward(self, q_in, k_in, v_in, mask=None):
        B, L, D = q_in.shape
        w, b = self.in_proj.weight, self.in_proj.bias
        if q_in is k_in:
            q, k = F.linear(q_in, w[: 2 * D], b[: 2 * D]).chunk(2, dim=-1)
        else:
            q = F.linear(q_in, w[:D], b[:D])
            k = F.linear(k_in, w[D : 2 * D], b[D : 2 * D])
        v = F.linear(v_in, w[2 * D :], b[2 * D :])
        h = self.heads
        q, k, v = (t.reshape(B, -1, h, D // h).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(B, L, D))


class MLP(nn.Module):
    def __init__(self, width: int, ratio: float):
        super().__init__()
        self.fc1 = nn.Linear(width, int(width * ratio))
        self.fc2 = nn.Linear(int(width * ratio), width)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class QFormerLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        w = cfg.width
        self.norm1 = nn.LayerNorm(w)
        self.self_attn = Attention(w, cfg.heads)
        self.norm2 = nn.LayerNorm(w)
        self.cross_attn = Attention(w, cfg.heads)
        self.norm3 = nn.LayerNorm(w)
        self.mlp = MLP(w, cfg.mlp_ratio)

    def forward(self, x, memory, query_pos, memory_pos, mask=None):
        h = self.norm1(x)
        qk = h + query_pos
        x = x + self.self_attn(qk, qk, h, mask)
        x = x + self.cross_attn(self.norm2(x) + query_pos, memory + memory_pos, memory)
        return x + self.mlp(self.norm3(x))


class PlainLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        w = cfg.width
        self.norm1 = nn.LayerNorm(w)
        self.self_attn = Attention(w, cfg.heads)
        self.norm2 = nn.LayerNorm(w)
        self.mlp = MLP(w, cfg.mlp_ratio)

    def forward(self, x, mask=None):
        h = self.norm1(x)
        x = x + self.self_attn(h, h, h, mask)
        return x + self.mlp(self.norm2(x))


def run_layer(layer: nn.Module, grad_checkpointing: bool, *args):
    if grad_checkpointing and layer.training and torch.is_grad_enabled():
        return checkpoint(layer, *args, use_reentrant=False)
    return layer(*args)


def token_mask(
    kind: str, n: int, causal_prefix: int = 8, group_size: int = 8, device=None
) -> torch.Tensor | None:
    """Boolean (n, n) attention mask (True = may attend) for 1D token queries, or None for full attention."""
    if kind == "none":
        return None
    pos = torch.arange(n, device=device)
    if kind == "causal":
        return pos[None, :] <= pos[:, None]
    if kind == "block_causal":
        # group id: each of the first causal_prefix tokens is its own group; then blocks of group_size
        gid = torch.where(pos < causal_prefix, pos, causal_prefix + (pos - causal_prefix) // group_size)
        return gid[None, :] <= gid[:, None]
    raise ValueError(f"token mask {kind!r} is not one of 'none', 'causal', 'block_causal'")
