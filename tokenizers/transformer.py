"""Transformer blocks of the hybrid tokenizer: pre-norm self-attention, optional cross-attention, MLP.

Attention runs through torch's scaled_dot_product_attention (flash / memory-efficient kernels on GPU).
Token masks for 1D tokenizers: "none", "causal", or "block_causal" (the first ``causal_prefix`` tokens strictly
causal, then groups of ``group_size`` that see themselves and everything before), the DetailFlow layout that
lets a decoder reconstruct from any group-aligned prefix.
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
    def __init__(self, width: int, heads: int, cross: bool = False):
        super().__init__()
        self.heads = heads
        self.cross = cross
        if cross:
            self.q = nn.Linear(width, width)
            self.kv = nn.Linear(width, 2 * width)
        else:
            self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x_BLD, context_BSD=None, mask=None):
        B, L, D = x_BLD.shape
        h = self.heads
        if self.cross:
            q = self.q(x_BLD)
            k, v = self.kv(context_BSD).chunk(2, dim=-1)
        else:
            q, k, v = self.qkv(x_BLD).chunk(3, dim=-1)
        q, k, v = (t.reshape(B, -1, h, D // h).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(B, L, D))


class Block(nn.Module):
    """Pre-norm block: self-attention, optional cross-attention to a context, MLP."""

    def __init__(self, cfg: TransformerConfig, cross: bool = False):
        super().__init__()
        w = cfg.width
        self.norm1 = nn.LayerNorm(w)
        self.attn = Attention(w, cfg.heads)
        self.cross = cross
        if cross:
            self.norm_q = nn.LayerNorm(w)
            self.norm_ctx = nn.LayerNorm(w)
            self.cross_attn = Attention(w, cfg.heads, cross=True)
        self.norm2 = nn.LayerNorm(w)
        hidden = int(w * cfg.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(w, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, w))

    def forward(self, x, context=None, mask=None):
        x = x + self.attn(self.norm1(x), mask=mask)
        if self.cross:
            x = x + self.cross_attn(self.norm_q(x), self.norm_ctx(context))
        return x + self.mlp(self.norm2(x))


class Stack(nn.Module):
    """A stack of blocks with optional per-block activation checkpointing; can return one layer's output."""

    def __init__(self, cfg: TransformerConfig, cross: bool = False, grad_checkpointing: bool = False):
        super().__init__()
        self.blocks = nn.ModuleList(Block(cfg, cross) for _ in range(cfg.depth))
        self.grad_checkpointing = grad_checkpointing

    def forward(self, x, context=None, mask=None, capture_layer: int = 0):
        """capture_layer: 1-based index of the block whose output is also returned (0: none)."""
        captured = None
        for i, block in enumerate(self.blocks, start=1):
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, context, mask, use_reentrant=False)
            else:
                x = block(x, context, mask)
            if i == capture_layer:
                captured = x
        return x, captured


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
