"""Class-conditional GPT over image tokens: LlamaGen's Llama-style decoder and GigaTok's 1D variant.

    from tokscale.autoregressive.presets import preset_config
    model = GPT(preset_config("gpt-B"))                 # LlamaGen GPT-B, 110,888,448 parameters
    logits = model(tokens_BT, labels_B)                  # teacher forcing: (B, T, vocab), float32

The sequence is ``[class] + tokens[:-1]``: position 0 holds the class embedding and predicts token 0, position
p >= 1 holds token p - 1 and predicts token p. Labels run 0 .. num_classes - 1; ``num_classes`` itself is the null
class that classifier-free guidance samples against (training replaces each label by it with probability
``class_dropout``).

Blocks are pre-norm: ``h = x + attn(rmsnorm(x))``, ``out = h + swiglu(rmsnorm(h))``, no biases anywhere, a final
RMSNorm and an untied, zero-initialised output head. Positions come from one of

- ``position="rope2d"`` (LlamaGen, GigaTok's ``--gpt-2d``): rotary embedding of the token's grid cell. Each head's
  rotation pairs are adjacent channels (2i, 2i+1); the first half of the pairs turns with the row, the second half
  with the column, at frequencies ``base^(-2k / (head_dim/2))``. The class position has (cos, sin) = (0, 0), which
  zeroes its query and key: the class reaches later positions only through its value vector (as in LlamaGen).
- ``position="learned"`` (GigaTok's ``gpt_1d``, every released GigaTok AR): a learned (1 + T, width) table added
  to the input embeddings, class position included; no rotary embedding.

Sampling (tokscale.autoregressive.sample) uses :meth:`GPT.decode` with a static :class:`KVCache`, or
:meth:`GPT.last_logits`, which recomputes the whole prefix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

POSITIONS = ("rope2d", "learned")


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass
class GPTConfig:
    preset: str | None = None  # fills every field below before the YAML and command line apply
    width: int = 768
    depth: int = 12
    heads: int = 12
    vocab_size: int = 16384  # the tokenizer's codebook size
    num_tokens: int = 256  # image tokens per sample (T); rope2d needs a square grid
    num_classes: int = 1000  # the class table has one more row: the null class for CFG
    position: str = "rope2d"  # rope2d (LlamaGen) | learned (GigaTok 1D: learned absolute (1 + T) x width)
    rope_base: float = 10000.0
    ffn_multiple_of: int = 256  # SwiGLU hidden = int(2 * 4 * width / 3) [* ffn_dim_multiplier], rounded up
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    qk_norm: bool = False  # LayerNorm(head_dim) on queries and keys before RoPE (GigaTok's use_qk_norm)
    class_dropout: float = 0.1  # training: a label becomes the null class with this probability
    token_dropout: float = 0.1  # element-wise dropout on the input embeddings (class position included)
    resid_dropout: float = 0.1  # after the attention output projection
    ffn_dropout: float = 0.1  # after the SwiGLU down projection
    attn_dropout: float = 0.0
    init_std: float = 0.02
    grad_checkpointing: bool = False  # recompute each block in backward

    def __post_init__(self):
        for key in ("width", "depth", "heads", "vocab_size", "num_tokens", "num_classes", "ffn_multiple_of"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"model.{key} must be a positive integer, got {value!r}")
        if self.position not in POSITIONS:
            raise ValueError(f"model.position must be one of {POSITIONS}, got {self.position!r}")
        if self.width % self.heads:
            raise ValueError(f"model.width={self.width} must be a multiple of model.heads={self.heads}")
        self._check_positions()
        for key in ("class_dropout", "token_dropout", "resid_dropout", "ffn_dropout", "attn_dropout"):
            p = getattr(self, key)
            if not 0.0 <= p < 1.0:
                raise ValueError(f"model.{key} must be in [0, 1), got {p}")
        if self.ffn_dim_multiplier is not None and self.ffn_dim_multiplier <= 0:
            raise ValueError(
                f"model.ffn_dim_multiplier must be positive or null, got {self.ffn_dim_multiplier}"
            )
        if self.rope_base <= 1:
            raise ValueError(f"model.rope_base must be > 1, got {self.rope_base}")

    def _check_positions(self) -> None:
        """rope2d needs rotation pairs split between rows and columns, and a square grid."""
        if self.position == "rope2d":
            if self.head_dim % 4:
                raise ValueError(
                    f"model.position=rope2d splits each head into row and column rotation pairs: the head "
                    f"width (model.width / model.heads = {self.head_dim}) must be a multiple of 4"
                )
            if self.grid_size**2 != self.num_tokens:
                raise ValueError(
                    f"model.num_tokens={self.num_tokens} is not a square grid, which model.position=rope2d "
                    "needs; use position=learned for a 1D tokenizer of any length"
                )

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def grid_size(self) -> int:
        return round(self.num_tokens**0.5)

    @property
    def ffn_hidden(self) -> int:
        hidden = int(2 * 4 * self.width / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return round_up(hidden, self.ffn_multiple_of)

    @property
    def null_class(self) -> int:
        return self.num_classes


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 and cast back before the weight."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rope_2d(positions: torch.Tensor, cfg: GPTConfig) -> torch.Tensor:
    """(cos, sin) per rotation pair for sequence positions (L,) -> (L, head_dim / 2, 2), float32.

    Position p >= 1 is grid cell p - 1 in raster order; position 0 (the class) gets (0, 0)."""
    cell = (positions - 1).clamp(min=0)
    row = torch.div(cell, cfg.grid_size, rounding_mode="floor")
    return rope_table(row, cell % cfg.grid_size, positions > 0, cfg)


def rope_table(row: torch.Tensor, col: torch.Tensor, on: torch.Tensor, cfg: GPTConfig) -> torch.Tensor:
    """(cos, sin) (L, head_dim / 2, 2), float32, of grid cells (row, col): the first half of each head's rotation
    pairs turns with the row, the second half with the column; (0, 0) where ``on`` is False."""
    quarter = cfg.head_dim // 4
    exponent = torch.arange(quarter, device=row.device, dtype=torch.float32) * 2 / (cfg.head_dim // 2)
    freqs = 1.0 / (cfg.rope_base**exponent)  # (head_dim / 4,)
    angles = torch.cat([row.float()[:, None] * freqs, col.float()[:, None] * freqs], dim=-1)
    table = torch.stack([angles.cos(), angles.sin()], dim=-1)
    return table * on.float()[:, None, None]


def apply_rope(x_BLHD: torch.Tensor, table_LP2: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs (2i, 2i + 1) of every head by the table's angles (float32 inside)."""
    x = x_BLHD.float().unflatten(-1, (-1, 2))
    cos, sin = table_LP2[None, :, None, :, 0], table_LP2[None, :, None, :, 1]
    x0, x1 = x[..., 0], x[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1)
    return out.flatten(-2).type_as(x_BLHD)


class KVCache:
    """Static key/value buffers for sampling: per layer (batch, heads, max_seq, head_dim), allocated once, with
    ``max_seq`` = 1 + T rounded up to a multiple of 8. Position p of every row is written when the model is run at
    p; attention always reads the whole buffer under a mask of the positions written so far, so every decode step
    has the same shapes (what a compiled or graph-captured step needs)."""

    def __init__(self, cfg: GPTConfig, batch: int, device=None, dtype=torch.float32):
        self.batch, self.max_seq = batch, round_up(cfg.num_tokens + 1, 8)
        shape = (batch, cfg.heads, self.max_seq, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.depth)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.depth)]

    def mask(self, start: int, length: int, device) -> torch.Tensor:
        """(1, 1, length, max_seq) bool: query start + i sees keys 0 .. start + i."""
        query = torch.arange(start, start + length, device=device)
        return (torch.arange(self.max_seq, device=device)[None, :] <= query[:, None])[None, None]


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width, bias=False)  # q, k, v stacked in this order
        self.proj = nn.Linear(cfg.width, cfg.width, bias=False)
        self.q_norm = nn.LayerNorm(cfg.head_dim) if cfg.qk_norm else None
        self.k_norm = nn.LayerNorm(cfg.head_dim) if cfg.qk_norm else None
        self.attn_dropout = cfg.attn_dropout
        self.resid_dropout = nn.Dropout(cfg.resid_dropout)

    def forward(self, x_BLD, rope, cache_kv=None, start: int = 0, mask=None) -> torch.Tensor:
        b, length, width = x_BLD.shape
        q, k, v = self.qkv(x_BLD).view(b, length, 3, self.heads, self.head_dim).unbind(2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, L, hd)
        if cache_kv is None:
            # causal unless the model passes its own mask (DetailFlow's group-causal one)
            dropout = self.attn_dropout if self.training else 0.0
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=dropout
            )
        else:
            k_cache, v_cache = cache_kv
            k_cache[:, :, start : start + length] = k
            v_cache[:, :, start : start + length] = v
            out = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask)
        return self.resid_dropout(self.proj(out.transpose(1, 2).reshape(b, length, width)))


class SwiGLU(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.width, cfg.ffn_hidden, bias=False)
        self.up = nn.Linear(cfg.width, cfg.ffn_hidden, bias=False)
        self.down = nn.Linear(cfg.ffn_hidden, cfg.width, bias=False)
        self.dropout = nn.Dropout(cfg.ffn_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(F.silu(self.gate(x)) * self.up(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.width, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.width, cfg.norm_eps)
        self.ffn = SwiGLU(cfg)

    def forward(self, x, rope, cache_kv=None, start: int = 0, mask=None) -> torch.Tensor:
        h = x + self.attn(self.attn_norm(x), rope, cache_kv, start, mask)
        return h + self.ffn(self.ffn_norm(h))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.class_embed = nn.Embedding(cfg.num_classes + 1, cfg.width)  # last row: the null class
        self.token_embed = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos_embed = (
            nn.Parameter(cfg.width**-0.5 * torch.randn(cfg.num_tokens + 1, cfg.width))
            if cfg.position == "learned"
            else None
        )
        self.token_dropout = nn.Dropout(cfg.token_dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = RMSNorm(cfg.width, cfg.norm_eps)
        self.head = nn.Linear(cfg.width, cfg.vocab_size, bias=False)
        self._init_weights()

    def _init_weights(self) -> None:
        # N(0, init_std) for every Linear and Embedding, the output head zero; norms keep weight 1 (bias 0); the
        # learned position table keeps its width^-0.5 normal init.
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=self.config.init_std)
        nn.init.zeros_(self.head.weight)

    @property
    def num_tokens(self) -> int:
        return self.config.num_tokens

    def new_cache(self, batch: int, device=None, dtype=None) -> KVCache:
        weight = self.token_embed.weight
        return KVCache(self.config, batch, device or weight.device, dtype or weight.dtype)

    def class_tokens(self, labels_B: torch.Tensor) -> torch.Tensor:
        """(B, 1, width): the class embeddings, each label replaced by the null class with probability
        ``class_dropout`` in training."""
        if self.training and self.config.class_dropout > 0:
            drop = torch.rand(labels_B.shape, device=labels_B.device) < self.config.class_dropout
            labels_B = torch.where(drop, torch.full_like(labels_B, self.config.null_class), labels_B)
        return self.class_embed(labels_B)[:, None]

    def _embed(self, labels_B, tokens_BL, start: int) -> torch.Tensor:
        """Input embeddings of positions start .. start + L - 1: the class (when ``labels_B`` is given, at
        position 0) followed by ``tokens_BL``."""
        parts = []
        if labels_B is not None:
            if start != 0:
                raise ValueError(f"the class token sits at position 0, not {start}")
            parts.append(self.class_tokens(labels_B))
        if tokens_BL is not None and tokens_BL.shape[1]:
            parts.append(self.token_embed(tokens_BL))
        h = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        if start + h.shape[1] > self.num_tokens:
            raise ValueError(
                f"positions {start}..{start + h.shape[1] - 1} exceed the model's {self.num_tokens} input positions"
            )
        if self.pos_embed is not None:
            h = h + self.pos_embed[start : start + h.shape[1]].to(h.dtype)
        return self.token_dropout(h)

    def _rope(self, start: int, length: int, device):
        if self.config.position != "rope2d":
            return None
        return rope_2d(torch.arange(start, start + length, device=device), self.config)

    def _attn_mask(self, start: int, length: int, cache: KVCache | None, device):
        """Boolean (1, 1, length, keys) mask of positions start .. start + length - 1; None = causal over the
        sequence itself (no cache)."""
        return cache.mask(start, length, device) if cache is not None else None

    def _trunk(self, h, start: int = 0, cache: KVCache | None = None, stop_after: int | None = None):
        rope = self._rope(start, h.shape[1], h.device)
        mask = self._attn_mask(start, h.shape[1], cache, h.device)
        remat = self.config.grad_checkpointing and self.training and torch.is_grad_enabled() and cache is None
        for i, block in enumerate(self.blocks):
            kv = (cache.k[i], cache.v[i]) if cache is not None else None
            if remat:
                h = checkpoint(block, h, rope, use_reentrant=False)
            else:
                h = block(h, rope, kv, start, mask)
            if stop_after is not None and i + 1 == stop_after:
                return h
        return h

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(h)).float()

    def _teacher_input(self, tokens_BT, labels_B) -> torch.Tensor:
        if tokens_BT.ndim != 2 or not 1 <= tokens_BT.shape[1] <= self.num_tokens:
            raise ValueError(
                f"tokens must be (batch, L) with 1 <= L <= {self.num_tokens}, got {tuple(tokens_BT.shape)}"
            )
        return self._embed(labels_B, tokens_BT[:, :-1], 0)

    def forward(self, tokens_BT: torch.Tensor, labels_B: torch.Tensor) -> torch.Tensor:
        """Teacher-forced next-token logits (B, L, vocab) in float32, aligned with ``tokens_BT`` (B, L): position
        0 is predicted from the class alone."""
        return self._logits(self._trunk(self._teacher_input(tokens_BT, labels_B)))

    def features(self, tokens_BT: torch.Tensor, labels_B: torch.Tensor, layer: int) -> torch.Tensor:
        """The hidden state after block ``layer`` (1-based, before the final norm) of the teacher-forced
        sequence, (B, L, width): GigaTok's AR linear probe reads block depth // 2 with the null class."""
        if not 1 <= layer <= self.config.depth:
            raise ValueError(f"layer must be in 1..{self.config.depth}, got {layer}")
        return self._trunk(self._teacher_input(tokens_BT, labels_B), stop_after=layer)

    def last_logits(self, labels_B: torch.Tensor, prefix_BL: torch.Tensor) -> torch.Tensor:
        """Logits (B, vocab) of the token after ``prefix_BL`` (B, L >= 0), recomputing the whole sequence."""
        return self._logits(self._trunk(self._embed(labels_B, prefix_BL, 0))[:, -1])

    def decode(self, cache: KVCache, start: int, labels_B=None, tokens_BL=None) -> torch.Tensor:
        """Run positions start .. start + L - 1 against the cache (writing their keys and values) and return
        the logits (B, vocab) of the last one. Prefill: ``start=0, labels_B=...``; a decode step:
        ``start=p, tokens_BL=token p - 1``."""
        h = self._embed(labels_B, tokens_BL, start)
        if h.shape[0] != cache.batch:
            raise ValueError(f"batch {h.shape[0]} does not match the cache's {cache.batch}")
        return self._logits(self._trunk(h, start, cache)[:, -1])


def param_counts(model: GPT) -> dict[str, int]:
    """Parameter counts (works on meta-device models); non-embedding excludes the token table and the head."""
    total = sum(p.numel() for p in model.parameters())
    embed = model.token_embed.weight.numel() + model.head.weight.numel()
    return {"params": total, "non_embedding_params": total - embed}
