"""DetailFlow's next-detail GPT: coarse-to-fine 1D tokens predicted a group at a time, and its parallel sampler.

    from tokscale.autoregressive.detailflow import DetailFlowGPT, detailflow_config, generate_groups
    model = DetailFlowGPT(detailflow_config("detailflow-L", ["num_tokens=128"]))  # 326,140,928 parameters
    logits = model(tokens_BN, labels_B)                    # teacher forcing: (B, N, vocab), aligned with tokens
    codes = generate_groups(model, labels_B, SampleConfig(cfg_scale=1.45), generator)  # 23 forward passes

The tokens come from a DetailFlow tokenizer (tokscale.tokenizers.detailflow): the first t of them decode to a
coarse image, later groups add detail. The model is LlamaGen's GPT (tokscale.autoregressive.gpt: the same blocks,
head, class table and null class) with three changes:

- **Sequence layout** (group g = 8). The input is ``[class] + z[0:g] + (g - 1) learned placeholders + z[g:N-g]``,
  N positions in all, and output position p predicts token p. Positions 0 .. g-1 (the class, z0 .. z_{g-2}) predict
  the first group token by token; the block of positions g .. 2g-1 (z_{g-1} and the placeholders) predicts group 1;
  every later block of g positions holds group k-1 and predicts group k.
- **Group-causal attention** (:func:`sequence_mask`): positions 0 .. g-1 attend causally; a later position p attends to
  every position of its own block and of earlier blocks (q // g <= p // g): bidirectional inside a block, nothing
  of a later block.
- **2D rotary positions over (group, position in group)** (:func:`group_rope`): an N/g x g grid, the class position
  (cos, sin) = (0, 0) as in LlamaGen. Position p >= 1 gets cell ``p - rope_offset``. DetailFlow's code uses cell p - 1
  (the LlamaGen convention carried over), so its RoPE rows start one position later than its attention blocks: the
  first position of block k carries row k - 1, column g - 1. We keep ``rope_offset: 1`` as the default, the
  reference's layout, so that published DetailFlow recipes and numbers carry over; ``rope_offset: 0`` aligns the
  rows with the blocks (position p sits at the cell of the token it predicts). Both are consistent between training
  and sampling, and the KV cache is valid under either (a position's rotation depends on the position alone).

**Sampling** (:func:`generate_groups`): the class alone predicts token 0, then one forward pass per token up to the
end of the first group, then one pass per group of g tokens, sampled independently from the block's g logits:
``1 + (g - 1) + (N/g - 1)`` passes (23 for 128 tokens, 39 for 256, 71 for 512) against N token by token. With
``use_cache=True`` each pass appends its positions to a static KV cache (:class:`GroupKVCache`: a pass of the first
group appends one position, a later pass one block of g); ``use_cache=False`` recomputes the whole prefix at every
step, as DetailFlow's own sampler does (its cache is disabled). Both give the same tokens under the same generator.
Guidance mixes ``uncond + s * (cond - uncond)`` per token before temperature and top-k / top-p, with the scale of
token t from tokscale.autoregressive.sample.guidance_scales (DetailFlow samples with a constant scale).

**Self-correction** is learned, not run: training replaces, per sample with probability ``correction_prob`` (0.3),
the clean (input, target) pair by the extracted (corrupted input, corrected label) pair
(tokscale.autoregressive.detailflow_train), so the model learns to continue sensibly after its own imperfect
tokens; the sampler has no separate correction step (nor has DetailFlow's).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from tokscale.autoregressive.gpt import GPT, GPTConfig, KVCache

# DetailFlow's GPTs: LlamaGen's sizes, vocab 8192 (the 8192 x 8 codebook); counts equal DetailFlow's gpt.py built
# with vocab 8192 and group 8 (the reference's GPT-L is the released DetailFlow-*-GPT-L) and do not depend on N
PRESETS: dict[str, dict] = {
    "detailflow-tiny": {"width": 256, "depth": 4, "heads": 4, "vocab_size": 4096, "num_tokens": 64},
    "detailflow-B": {"width": 768, "depth": 12, "heads": 12},
    "detailflow-L": {"width": 1024, "depth": 24, "heads": 16},
    "detailflow-XL": {"width": 1280, "depth": 36, "heads": 20},
}
PARAMS: dict[str, int] = {
    "detailflow-B": 98_310_912,
    "detailflow-L": 326_140_928,
    "detailflow-XL": 753_736_960,
}


@dataclass
class DetailFlowGPTConfig(GPTConfig):
    vocab_size: int = 8192
    num_tokens: int = 128  # N: 128, 256 or 512 in DetailFlow (DetailFlow-16/32/64 = N / 8 groups)
    group_size: int = 8  # tokens predicted per parallel step (and the causal first group's length)
    rope_offset: int = 1  # position p >= 1 sits at RoPE cell p - rope_offset (1: DetailFlow's layout; 0: aligned)

    def _check_positions(self) -> None:
        g, n = self.group_size, self.num_tokens
        if self.position != "rope2d":
            raise ValueError(
                f"model.position must be rope2d for a DetailFlow GPT (2D RoPE over group and position in group), "
                f"got {self.position!r}"
            )
        if self.head_dim % 4:
            raise ValueError(
                f"2D RoPE splits each head into row and column rotation pairs: the head width (model.width / "
                f"model.heads = {self.head_dim}) must be a multiple of 4"
            )
        if g < 2 or n % g or n < 2 * g:
            raise ValueError(
                f"model.num_tokens={n} must be a multiple of model.group_size={g} (>= 2) with at least two groups"
            )
        if self.rope_offset not in (0, 1):
            raise ValueError(f"model.rope_offset must be 0 or 1, got {self.rope_offset}")

    @property
    def num_groups(self) -> int:
        return self.num_tokens // self.group_size


def list_presets() -> list[str]:
    return list(PRESETS)


def get_preset(name: str) -> dict:
    if name not in PRESETS:
        raise ValueError(f"unknown DetailFlow GPT preset {name!r}; expected one of {list_presets()}")
    return copy.deepcopy(PRESETS[name])


def detailflow_config(name: str, overrides=()) -> DetailFlowGPTConfig:
    """The DetailFlowGPTConfig of a preset with model-config overrides (``num_tokens=256``), validated."""
    from tokscale.config import load_config

    return load_config(
        DetailFlowGPTConfig, None, [f"preset={name}", *overrides], presets=get_preset, preset_key="preset"
    )


def num_forward_passes(num_tokens: int, group: int = 8) -> int:
    """Forward passes of the parallel sampler: the class, the rest of the first group one by one, then a group per
    pass."""
    return 1 + (group - 1) + (num_tokens // group - 1)


def sequence_mask(rows: torch.Tensor, cols: torch.Tensor, group: int) -> torch.Tensor:
    """(len(rows), len(cols)) bool, True = sequence position rows[i] may attend to position cols[j]: causal inside
    the first group, then by blocks of ``group`` (bidirectional inside a block, nothing of a later block)."""
    r, c = rows[:, None], cols[None, :]
    causal = c <= r
    block = torch.div(c, group, rounding_mode="floor") <= torch.div(r, group, rounding_mode="floor")
    return torch.where(r < group, causal, block)


def group_rope(positions: torch.Tensor, cfg: DetailFlowGPTConfig) -> torch.Tensor:
    """(cos, sin) per rotation pair (L, head_dim / 2, 2) for sequence positions: cell p - rope_offset of the
    (N/g) x g grid, row = group, column = position in group; the class position (0) gets (0, 0)."""
    from tokscale.autoregressive.gpt import rope_table

    cell = (positions - cfg.rope_offset).clamp(min=0)
    row = torch.div(cell, cfg.group_size, rounding_mode="floor")
    return rope_table(row, cell % cfg.group_size, positions > 0, cfg)


class GroupKVCache(KVCache):
    """The static KV buffers of :class:`KVCache` under the group-causal mask: a pass writes positions start ..
    start + L - 1 and its queries see what :func:`sequence_mask` allows among the positions written so far (a block
    pass sees its whole block)."""

    def __init__(self, cfg: DetailFlowGPTConfig, batch: int, device=None, dtype=torch.float32):
        super().__init__(cfg, batch, device, dtype)
        self.group = cfg.group_size

    def mask(self, start: int, length: int, device) -> torch.Tensor:
        rows = torch.arange(start, start + length, device=device)
        keys = torch.arange(self.max_seq, device=device)
        return (sequence_mask(rows, keys, self.group) & (keys < start + length)[None, :])[None, None]


class DetailFlowGPT(GPT):
    """The next-detail GPT: LlamaGen's GPT plus ``placeholders`` (group - 1 learned input rows), a group-causal
    mask and 2D RoPE over (group, position in group). See the module docstring for the layout."""

    def __init__(self, cfg: DetailFlowGPTConfig):
        super().__init__(cfg)
        self.placeholders = nn.Embedding(cfg.group_size - 1, cfg.width)
        nn.init.normal_(self.placeholders.weight, std=cfg.init_std)

    def new_cache(self, batch: int, device=None, dtype=None) -> GroupKVCache:
        weight = self.token_embed.weight
        return GroupKVCache(self.config, batch, device or weight.device, dtype or weight.dtype)

    def embed_positions(self, labels_B, tokens_BL: torch.Tensor, start: int, length: int) -> torch.Tensor:
        """Input embeddings of sequence positions start .. start + length - 1, from the class labels (needed when
        the span holds position 0) and the known tokens ``tokens_BL`` (every token the span carries: position
        p <= g holds token p - 1, g < p < 2g a placeholder, p >= 2g token p - g)."""
        cfg, g = self.config, self.config.group_size
        if start < 0 or start + length > cfg.num_tokens:
            raise ValueError(f"positions {start}..{start + length - 1} outside the model's 0..{cfg.num_tokens - 1}")
        device = self.token_embed.weight.device
        pos = torch.arange(start, start + length, device=device)
        tok = torch.where(pos <= g, pos - 1, pos - g)
        is_spe = (pos > g) & (pos < 2 * g)
        carried = tok[(pos > 0) & ~is_spe]
        known = tokens_BL.shape[1]
        if carried.numel() and int(carried.max()) >= known:
            raise ValueError(
                f"positions {start}..{start + length - 1} carry {int(carried.max()) + 1} tokens, got {known}"
            )
        if known:
            h = self.token_embed(tokens_BL[:, tok.clamp(0, known - 1)])
        else:  # the class position alone
            h = self.token_embed.weight.new_zeros(tokens_BL.shape[0], length, cfg.width)
        if bool(is_spe.any()):
            spe = self.placeholders((pos - g - 1).clamp(0, g - 2)).to(h.dtype)
            h = torch.where(is_spe[None, :, None], spe[None], h)
        if start == 0:
            h = torch.cat([self.class_tokens(labels_B).to(h.dtype), h[:, 1:]], dim=1)
        return self.token_dropout(h)

    def _rope(self, start: int, length: int, device):
        return group_rope(torch.arange(start, start + length, device=device), self.config)

    def _attn_mask(self, start: int, length: int, cache, device):
        if cache is not None:
            return cache.mask(start, length, device)
        pos = torch.arange(start, start + length, device=device)
        return sequence_mask(pos, pos, self.config.group_size)[None, None]

    def _teacher_input(self, tokens_BT, labels_B) -> torch.Tensor:
        n = self.num_tokens
        if tokens_BT.ndim != 2 or tokens_BT.shape[1] != n:
            raise ValueError(f"tokens must be (batch, {n}), got {tuple(tokens_BT.shape)}")
        return self.embed_positions(labels_B, tokens_BT[:, : n - self.config.group_size], 0, n)

    def prefix_logits(self, labels_B, prefix_BL: torch.Tensor) -> torch.Tensor:
        """Logits of what follows ``prefix_BL`` (B, L), recomputing the whole sequence (DetailFlow's sampler):
        (B, 1, vocab) inside the first group (L < g), else (B, g, vocab) for the next group (L a multiple of g)."""
        n_pos, out = _step_span(prefix_BL.shape[1], self.config.group_size)
        h = self._trunk(self.embed_positions(labels_B, prefix_BL, 0, n_pos))
        return self._logits(h[:, -out:])

    def cached_logits(self, cache: GroupKVCache, labels_B, prefix_BL: torch.Tensor) -> torch.Tensor:
        """The same logits as :meth:`prefix_logits`, running only the positions this step adds against ``cache``
        (which holds every earlier step's)."""
        n_pos, out = _step_span(prefix_BL.shape[1], self.config.group_size)
        start = n_pos - out
        h = self.embed_positions(labels_B, prefix_BL, start, out)
        if h.shape[0] != cache.batch:
            raise ValueError(f"batch {h.shape[0]} does not match the cache's {cache.batch}")
        return self._logits(self._trunk(h, start, cache))

    def generate_tokens(self, labels_B, cfg=None, generator=None, use_cache: bool = True) -> torch.Tensor:
        """tokscale.autoregressive.sample.generate's entry for this model: the parallel sampler."""
        return generate_groups(self, labels_B, cfg, generator, use_cache)


def _step_span(known: int, group: int) -> tuple[int, int]:
    """(sequence length after the step, positions whose logits it samples) when ``known`` tokens are known."""
    if known < group:
        return known + 1, 1
    if known % group:
        raise ValueError(f"after the first group, a step starts at a multiple of {group} tokens, not {known}")
    return known + group, group


@torch.no_grad()
def generate_groups(
    model: DetailFlowGPT, labels_B: torch.Tensor, cfg=None, generator=None, use_cache: bool = True
) -> torch.Tensor:
    """Sample (B, N) int64 codes for class labels (B,): the first group token by token, then a group per forward
    pass (see the module docstring); ``use_cache=False`` recomputes the prefix each step (the same tokens)."""
    from tokscale.autoregressive.sample import SampleConfig, guided_batch, mix_guidance, sample_logits

    cfg = cfg or SampleConfig()
    labels_B, cond, scales, out = guided_batch(model, labels_B, cfg)
    b, n = out.shape
    was_training = model.training
    model.eval()
    try:
        cache = model.new_cache(cond.shape[0]) if use_cache else None
        known = 0
        while known < n:
            prefix = out[:, :known]
            if cfg.guided:
                prefix = torch.cat([prefix, prefix])
            if cache is None:
                logits = model.prefix_logits(cond, prefix)
            else:
                logits = model.cached_logits(cache, cond, prefix)
            width = logits.shape[1]
            if cfg.guided:  # each position of the block at its own scale
                logits = torch.stack([mix_guidance(logits[:, j], scales[known + j], True) for j in range(width)], 1)
            # the block's tokens are drawn independently, row-major (image 0's group, then image 1's, ...)
            drawn = sample_logits(logits.reshape(b * width, -1), cfg, generator)
            out[:, known : known + width] = drawn.view(b, width)
            known += width
    finally:
        model.train(was_training)
    return out
