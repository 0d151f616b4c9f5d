"""VAR-style next-scale prediction transformer (Tian et al. 2024, "Visual Autoregressive Modeling").

    from tokscale.autoregressive.presets import var_preset_config
    model = VAR(var_preset_config("var-d16"))            # 310,283,520 parameters, VAR's d16 exactly
    logits = model(x_in_BLD, labels_B)                    # teacher forcing: (B, L, vocab), float32

The image is a pyramid of K token maps p_1 x p_1 .. p_K x p_K (``scales``, VAR's 1, 2, 3, 4, 5, 6, 8, 10, 13, 16:
L = 680 tokens), flattened coarse to fine, each map row-major. The model predicts all p_k^2 tokens of scale k at
once from the class and the scales before it:

- scale 0's positions hold the class embedding plus a learned start table (``start_pos``);
- scale k >= 1's positions hold ``input_proj`` (Linear(code_dim, width)) of the multi-scale tokenizer's
  teacher-forcing input: the accumulated f_hat after scales 0..k-1, area-downsampled to p_k x p_k
  (``MultiScaleQuantizer.var_input`` in training, ``next_scale`` while sampling), so ``x_in`` is (B, L - p_1^2,
  code_dim);
- every position adds an absolute position row (``pos_embed``, L x width) and its scale's level row
  (``level_embed``, K x width).

The attention mask is block-causal by scale: a token sees every token of its own and of coarser scales, none of a
finer one (within a scale attention is bidirectional). Attention is cosine: queries and keys are L2-normalised per
head and the logits scaled by a learned per-head factor exp(s_h) (s_h starts at log 4, clamped at log 100), with
no further 1/sqrt(d). Each block is conditioned on the class embedding through AdaLN: a SiLU + Linear(width,
6 width) gives the scale, shift and gate of the attention and MLP branches around a LayerNorm without affine
weights (eps 1e-6); the head has its own AdaLN (scale, shift) before Linear(width, vocab). The MLP is
Linear - GELU(tanh) - Linear with ratio 4. Stochastic depth rises linearly over the blocks to ``drop_path``.
The class table has ``num_classes + 1`` rows, the last the null class of classifier-free guidance (training drops
a label to it with probability ``class_dropout``).

These are VAR's architecture facts; the parameter counts of the presets equal VAR's own constructor's
(tokscale.autoregressive.presets.VAR_PARAMS). Sampling (tokscale.autoregressive.var_sample) runs one forward
per scale through :meth:`VAR.scale_logits` against a :class:`VARCache` that appends each scale's keys and values.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

VAR_SCALES = [1, 2, 3, 4, 5, 6, 8, 10, 13, 16]  # VAR's pyramid on a 16 x 16 token grid: 680 tokens
MAX_LOGIT_SCALE = math.log(100.0)


@dataclass
class VARConfig:
    preset: str | None = None  # fills every field below before the YAML and command line apply
    width: int = 1024  # VAR: 64 x depth
    depth: int = 16
    heads: int = 16  # VAR: depth (head width 64)
    mlp_ratio: float = 4.0
    vocab_size: int = 4096  # the multi-scale tokenizer's codebook
    code_dim: int = 32  # the tokenizer's code width (VAR's Cvae): the teacher-forcing input's channels
    scales: list[int] = field(default_factory=lambda: list(VAR_SCALES))
    num_classes: int = 1000  # the class table has one more row: the null class for CFG
    class_dropout: float = 0.1
    drop_path: float = 0.0  # stochastic depth of the last block (VAR: 0.1 * depth / 24)
    dropout: float = 0.0  # after the attention projection and the MLP
    attn_dropout: float = 0.0
    norm_eps: float = 1e-6
    # VAR's init: N(0, sqrt(1 / (3 width))) (truncated at 2 std) everywhere, the head x init_head, the AdaLN
    # scale/shift rows x init_adaln, the gate rows x init_adaln_gamma, the branch outputs / sqrt(2 depth)
    init_adaln: float = 0.5
    init_adaln_gamma: float = 1e-5
    init_head: float = 0.02

    def __post_init__(self):
        for key in ("width", "depth", "heads", "vocab_size", "code_dim", "num_classes"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"model.{key} must be a positive integer, got {value!r}")
        if self.width % self.heads:
            raise ValueError(f"model.width={self.width} must be a multiple of model.heads={self.heads}")
        scales = list(self.scales)
        if not scales or any(int(p) < 1 for p in scales) or any(b <= a for a, b in zip(scales, scales[1:])):
            raise ValueError(f"model.scales must be strictly increasing positive sides, got {scales}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"model.mlp_ratio must be positive, got {self.mlp_ratio}")
        for key in ("class_dropout", "drop_path", "dropout", "attn_dropout"):
            p = getattr(self, key)
            if not 0.0 <= p < 1.0:
                raise ValueError(f"model.{key} must be in [0, 1), got {p}")

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def num_scales(self) -> int:
        return len(self.scales)

    @property
    def num_tokens(self) -> int:
        return sum(p * p for p in self.scales)

    @property
    def boundaries(self) -> list[int]:
        """Cumulative token counts: scale k holds flat positions boundaries[k] .. boundaries[k + 1] - 1."""
        out = [0]
        for p in self.scales:
            out.append(out[-1] + p * p)
        return out

    @property
    def ffn_hidden(self) -> int:
        return round(self.width * self.mlp_ratio)

    @property
    def null_class(self) -> int:
        return self.num_classes


class VARCache:
    """Per-layer keys and values of the scales run so far, (B, heads, n, head_dim), grown by appending each scale
    (``torch.cat``: the first scales are tiny and the total, 680 positions, is known only per pyramid).

    ``bytes`` is what the layers hold now and ``peak_bytes`` the most they held at once: the figure the KV budget
    (tokscale.autoregressive.var_sample.BudgetCache) lowers. ``attend`` is the one place a query meets the cache, so
    that a subclass can score and evict entries."""

    def __init__(self, depth: int):
        self.k: list[torch.Tensor | None] = [None] * depth
        self.v: list[torch.Tensor | None] = [None] * depth
        self.bytes = 0
        self.peak_bytes = 0

    def length(self, layer: int) -> int:
        return 0 if self.k[layer] is None else self.k[layer].shape[2]

    def _account(self, delta: int) -> None:
        self.bytes += delta
        self.peak_bytes = max(self.peak_bytes, self.bytes)

    def append(self, layer: int, k, v) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k[layer] is None:
            self.k[layer], self.v[layer] = k, v
        else:
            self.k[layer] = torch.cat([self.k[layer], k], dim=2)
            self.v[layer] = torch.cat([self.v[layer], v], dim=2)
        self._account(k.numel() * k.element_size() + v.numel() * v.element_size())
        return self.k[layer], self.v[layer]

    def attend(self, layer: int, q, mask) -> torch.Tensor:
        """Attention of the new queries (B, H, n_q, hd) over this layer's cache (new keys already appended)."""
        return F.scaled_dot_product_attention(q, self.k[layer], self.v[layer], attn_mask=mask, scale=1.0)


class Attention(nn.Module):
    """Cosine self-attention with a learned per-head logit scale; q and v have biases, k none (VAR's layout)."""

    def __init__(self, cfg: VARConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width, bias=False)  # q, k, v stacked in this order
        self.q_bias = nn.Parameter(torch.zeros(cfg.width))
        self.v_bias = nn.Parameter(torch.zeros(cfg.width))
        self.logit_scale = nn.Parameter(torch.full((cfg.heads,), math.log(4.0)))
        self.proj = nn.Linear(cfg.width, cfg.width)
        self.attn_dropout = cfg.attn_dropout
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x_BLD, mask, cache: VARCache | None = None, layer: int = 0) -> torch.Tensor:
        b, length, width = x_BLD.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        qkv = F.linear(x_BLD, self.qkv.weight, bias).view(b, length, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, hd)
        scale = self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp().to(q.dtype)
        q = F.normalize(q, dim=-1) * scale[None, :, None, None]
        k = F.normalize(k, dim=-1)
        if cache is None:
            dropout = self.attn_dropout if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=1.0)
        else:
            cache.append(layer, k, v)
            out = cache.attend(layer, q, mask)
        return self.dropout(self.proj(out.transpose(1, 2).reshape(b, length, width)))


class MLP(nn.Module):
    def __init__(self, cfg: VARConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.ffn_hidden)
        self.fc2 = nn.Linear(cfg.ffn_hidden, cfg.width)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.fc2(F.gelu(self.fc1(x), approximate="tanh")))


def drop_path(x_BLD: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the whole branch of a sample with probability p (kept ones scaled by 1 / (1 - p))."""
    if p == 0.0 or not training:
        return x_BLD
    keep = torch.rand(x_BLD.shape[0], 1, 1, device=x_BLD.device) >= p
    return x_BLD * keep.to(x_BLD.dtype) / (1 - p)


class Block(nn.Module):
    def __init__(self, cfg: VARConfig, drop_path_p: float):
        super().__init__()
        self.width, self.drop_path_p = cfg.width, drop_path_p
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps, elementwise_affine=False)
        self.attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.ada = nn.Linear(cfg.width, 6 * cfg.width)  # on SiLU(class embedding)

    def forward(self, x, cond_BD, mask, cache=None, layer: int = 0):
        # rows of ada's output: gate_attn, gate_mlp, scale_attn, scale_mlp, shift_attn, shift_mlp (VAR's order)
        g1, g2, s1, s2, b1, b2 = self.ada(F.silu(cond_BD)).view(-1, 1, 6, self.width).unbind(2)
        h = self.attn(self.norm(x) * (1 + s1) + b1, mask, cache, layer) * g1
        x = x + drop_path(h, self.drop_path_p, self.training)
        h = self.mlp(self.norm(x) * (1 + s2) + b2) * g2
        return x + drop_path(h, self.drop_path_p, self.training)


class VAR(nn.Module):
    def __init__(self, cfg: VARConfig):
        super().__init__()
        self.config = cfg
        c, first = cfg.width, cfg.scales[0] ** 2
        self.input_proj = nn.Linear(cfg.code_dim, c)
        self.class_embed = nn.Embedding(cfg.num_classes + 1, c)  # last row: the null class
        self.start_pos = nn.Parameter(torch.empty(first, c))
        self.pos_embed = nn.Parameter(torch.empty(cfg.num_tokens, c))
        self.level_embed = nn.Embedding(cfg.num_scales, c)
        rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]  # 0 .. drop_path
        self.blocks = nn.ModuleList(Block(cfg, p) for p in rates)
        self.head_norm = nn.LayerNorm(c, eps=cfg.norm_eps, elementwise_affine=False)
        self.head_ada = nn.Linear(c, 2 * c)  # scale, shift before the head
        self.head = nn.Linear(c, cfg.vocab_size)
        levels = torch.cat([torch.full((p * p,), k) for k, p in enumerate(cfg.scales)])
        self.register_buffer("levels", levels, persistent=False)  # (L,) scale index of each flat position
        self._init_weights()

    def _init_weights(self) -> None:
        cfg, c = self.config, self.config.width
        std = (1 / c / 3) ** 0.5
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        for p in (self.start_pos, self.pos_embed):
            nn.init.trunc_normal_(p, std=std, a=-2 * std, b=2 * std)
        with torch.no_grad():
            self.head.weight.mul_(cfg.init_head)
            self.head_ada.weight.mul_(cfg.init_adaln)
            for block in self.blocks:
                block.attn.proj.weight.div_(math.sqrt(2 * cfg.depth))
                block.mlp.fc2.weight.div_(math.sqrt(2 * cfg.depth))
                block.ada.weight[2 * c :].mul_(cfg.init_adaln)
                block.ada.weight[: 2 * c].mul_(cfg.init_adaln_gamma)

    @property
    def num_tokens(self) -> int:
        return self.config.num_tokens

    def cond(self, labels_B: torch.Tensor) -> torch.Tensor:
        """The class embedding (B, width) that starts the sequence and drives every AdaLN; in training a label
        becomes the null class with probability ``class_dropout``."""
        if self.training and self.config.class_dropout > 0:
            drop = torch.rand(labels_B.shape, device=labels_B.device) < self.config.class_dropout
            labels_B = torch.where(drop, torch.full_like(labels_B, self.config.null_class), labels_B)
        return self.class_embed(labels_B)

    def _embed(self, cond_BD, x_in, first: int, last: int) -> torch.Tensor:
        """Input rows of scales first..last: scale 0 from the class, the others from ``x_in`` (B, n, code_dim),
        the tokenizer input of those scales (of first..last, or of 1..last when first is 0)."""
        bounds = self.config.boundaries
        parts = []
        if first == 0:
            b = cond_BD.shape[0]
            parts.append(cond_BD[:, None].expand(b, bounds[1], -1) + self.start_pos)
        if last >= max(first, 1):
            expected = bounds[last + 1] - bounds[max(first, 1)]
            if x_in is None or x_in.ndim != 3 or x_in.shape[1] != expected:
                got = None if x_in is None else tuple(x_in.shape)
                raise ValueError(
                    f"scales {max(first, 1)}..{last} need an input of {expected} positions x "
                    f"{self.config.code_dim} channels, got {got}"
                )
            parts.append(self.input_proj(x_in.to(self.input_proj.weight.dtype)))
        h = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        lo, hi = bounds[first], bounds[last + 1]
        return h + self.pos_embed[lo:hi] + self.level_embed(self.levels[lo:hi])

    def block_mask(self, lo: int, hi: int, num_cached: int = 0) -> torch.Tensor | None:
        """(hi - lo, num_cached + hi - lo) bool, True = may attend: flat positions lo..hi-1 against the cached
        (all coarser, always visible) and themselves, by scale. None when lo..hi-1 is a single scale with
        nothing finer to hide."""
        bounds = self.config.boundaries
        if bisect.bisect_right(bounds, lo) == bisect.bisect_left(bounds, hi):  # lo..hi-1 within one scale
            return None
        levels = self.levels[lo:hi]
        own = levels[:, None] >= levels[None, :]
        if num_cached:
            own = torch.cat([own.new_ones(hi - lo, num_cached), own], dim=1)
        return own

    def _trunk(self, h, cond_BD, mask, cache: VARCache | None = None) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            h = block(h, cond_BD, mask, cache, i)
        return h

    def _logits(self, h, cond_BD) -> torch.Tensor:
        scale, shift = self.head_ada(F.silu(cond_BD)).view(-1, 1, 2, self.config.width).unbind(2)
        return self.head(self.head_norm(h) * (1 + scale) + shift).float()

    def forward(self, x_in: torch.Tensor, labels_B: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits (B, n, vocab), float32, of every token of the scales that ``x_in`` (B, n -
        p_1^2, code_dim) covers: all of them (n = L) or a prefix of whole scales."""
        bounds = self.config.boundaries
        n = x_in.shape[1] + bounds[1]
        if n not in bounds[1:]:
            raise ValueError(
                f"x_in covers {x_in.shape[1]} positions: expected the input of a prefix of whole scales "
                f"({[b - bounds[1] for b in bounds[1:]]})"
            )
        last = bounds.index(n) - 1
        cond = self.cond(labels_B)
        h = self._embed(cond, x_in, 0, last)
        return self._logits(self._trunk(h, cond, self.block_mask(0, n)), cond)

    def scale_logits(
        self, cond_BD, x_in, first: int, last: int, cache: VARCache | None = None
    ) -> torch.Tensor:
        """Run scales first..last (appending their keys and values to ``cache``, whose entries are all of
        coarser scales) and return the logits (B, p_last^2, vocab) of scale ``last``. Without a cache ``first``
        must be 0: the whole prefix is recomputed. ``x_in``: the tokenizer input of scales max(first, 1)..last."""
        if cache is None and first != 0:
            raise ValueError("without a cache the prefix must start at scale 0")
        bounds = self.config.boundaries
        h = self._embed(cond_BD, x_in, first, last)
        num_cached = cache.length(0) if cache is not None else 0
        mask = self.block_mask(bounds[first], bounds[last + 1], num_cached)
        h = self._trunk(h, cond_BD, mask, cache)
        return self._logits(h[:, bounds[last] - bounds[first] :], cond_BD)


def var_param_counts(model: VAR) -> dict[str, int]:
    """Parameter counts (works on meta-device models); non-embedding excludes the class, position and level
    tables, the input projection and the head (VAR's published sizes count everything)."""
    total = sum(p.numel() for p in model.parameters())
    embed = sum(
        p.numel()
        for m in (model.class_embed, model.level_embed, model.input_proj, model.head)
        for p in m.parameters()
    )
    embed += model.start_pos.numel() + model.pos_embed.numel()
    return {"params": total, "non_embedding_params": total - embed}
