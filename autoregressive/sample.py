"""Batched class-conditional sampling with classifier-free guidance.

    from tokscale.autoregressive.sample import SampleConfig, generate
    g = torch.Generator(device="cuda").manual_seed(0)
    codes = generate(model, labels, SampleConfig(cfg_scale=1.75, cfg_schedule="step"), generator=g)  # (B, T)

One token per forward pass. Token 0 comes from the class alone (the *prefill*); token t from the class and
tokens 0 .. t - 1. With the KV cache (default) the prefill runs the class position and each later step runs one
position against static, pre-allocated buffers (tokscale.autoregressive.gpt.KVCache); ``use_cache=False``
recomputes the whole prefix at every step instead (the same tokens under the same generator, slower: a check).

Guidance (LlamaGen, GigaTok): when ``cfg_scale > 1`` the batch runs as ``[cond; null]``, labels then the null
class, and the next-token logits are mixed **before** temperature and filtering,
``uncond + scale * (cond - uncond)``. The scale of token t follows ``cfg_schedule``, with GigaTok's
definitions (ratio = t / (T - 1) for decode step t >= 1):

- ``constant``: ``cfg_scale`` for every token (LlamaGen's only schedule);
- ``linear``: ``1 + (cfg_scale - 1) * ratio + 1e-4``;
- ``step``: ``cfg_scale`` once ``ratio >= cfg_start_ratio`` (GigaTok's default 0.18), ``1 + 1e-4`` before.

The prefill (token 0) always gets the full ``cfg_scale``, whatever the schedule, as in GigaTok's sampler; the
``+ 1e-4`` is GigaTok's too (its steps only mix when the scale exceeds 1, so "unguided" steps still mix at
1.0001). ``cfg_interval`` >= 0 is LlamaGen's: decode steps after that index use the conditional logits alone
(both halves still run, to keep the cache whole). ``cfg_scale <= 1`` samples without the null half at all.

Each token is then drawn from ``softmax(logits / max(temperature, 1e-5))`` after top-k (``top_k > 0``) and nucleus
(``top_p < 1``; the most likely token is always kept) filtering, with ``torch.multinomial`` on ``generator``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SCHEDULES = ("constant", "linear", "step")
GIGATOK_EPS = 1e-4  # GigaTok's schedules add it to every non-constant scale


def check_filtering(temperature: float, top_k: int, top_p: float) -> None:
    """The settings :func:`sample_logits` reads, shared by every sampler's config (an error names the key)."""
    if temperature < 0:
        raise ValueError(f"sample.temperature must be >= 0, got {temperature}")
    if top_k < 0:
        raise ValueError(f"sample.top_k must be >= 0 (0 = off), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"sample.top_p must be in (0, 1], got {top_p}")


@dataclass
class SampleConfig:
    cfg_scale: float = 1.0
    cfg_schedule: str = "constant"  # constant | linear | step
    cfg_start_ratio: float = 0.18  # step schedule: full guidance from this fraction of the decode steps on
    cfg_interval: int = -1  # >= 0: decode steps after this one use the conditional logits only (LlamaGen)
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k filtering
    top_p: float = 1.0  # 1.0: no nucleus filtering

    def __post_init__(self):
        if self.cfg_schedule not in SCHEDULES:
            raise ValueError(f"sample.cfg_schedule must be one of {SCHEDULES}, got {self.cfg_schedule!r}")
        if self.cfg_scale < 0:
            raise ValueError(f"sample.cfg_scale must be >= 0 (1 = no guidance), got {self.cfg_scale}")
        if not 0.0 <= self.cfg_start_ratio <= 1.0:
            raise ValueError(f"sample.cfg_start_ratio must be in [0, 1], got {self.cfg_start_ratio}")
        if self.cfg_interval < -1:
            raise ValueError(
                f"sample.cfg_interval must be -1 (always guide) or >= 0, got {self.cfg_interval}"
            )
        check_filtering(self.temperature, self.top_k, self.top_p)

    @property
    def guided(self) -> bool:
        return self.cfg_scale > 1.0


def guidance_scales(cfg: SampleConfig, num_tokens: int) -> list[float | None]:
    """The CFG scale of each of the ``num_tokens`` tokens (index 0 = the prefill); None = conditional logits only.
    All None when ``cfg_scale <= 1``."""
    if not cfg.guided:
        return [None] * num_tokens
    s, steps = cfg.cfg_scale, num_tokens - 1
    scales: list[float | None] = [s]
    for i in range(steps):  # decode step i produces token i + 1
        ratio = (i + 1) / steps
        if cfg.cfg_interval > -1 and i > cfg.cfg_interval:
            scales.append(None)
        elif cfg.cfg_schedule == "constant":
            scales.append(s)
        elif cfg.cfg_schedule == "linear":
            scales.append(1.0 + (s - 1.0) * ratio + GIGATOK_EPS)
        else:  # step
            scales.append(s if ratio >= cfg.cfg_start_ratio else 1.0 + GIGATOK_EPS)
    return scales


def filter_logits(logits_BV: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Top-k then nucleus filtering (removed entries -inf); ties with the k-th logit are kept, and the nucleus
    keeps the smallest set of most likely tokens whose probability reaches ``top_p``."""
    if top_k > 0:
        kth = torch.topk(logits_BV, min(top_k, logits_BV.shape[-1]), dim=-1).values[..., -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits_BV, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = torch.zeros_like(cumulative, dtype=torch.bool)
        drop_sorted[..., 1:] = cumulative[..., :-1] > top_p  # drop a token once those before it reach top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits_BV = logits_BV.masked_fill(drop, float("-inf"))
    return logits_BV


def sample_logits(
    logits_BV: torch.Tensor, cfg: SampleConfig, generator: torch.Generator | None
) -> torch.Tensor:
    logits = filter_logits(logits_BV.float() / max(cfg.temperature, 1e-5), cfg.top_k, cfg.top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


def mix_guidance(logits_NV: torch.Tensor, scale: float | None, guided: bool) -> torch.Tensor:
    """Under CFG, rows [conditional; unconditional] -> uncond + (cond - uncond) * scale (the conditional rows
    alone where ``scale`` is None); unguided logits as they are."""
    if not guided:
        return logits_NV
    cond, uncond = logits_NV.chunk(2)
    return cond if scale is None else uncond + (cond - uncond) * scale


def check_labels(labels_B: torch.Tensor, mcfg) -> torch.Tensor:
    """Class labels as int64 (B,), checked against the model's classes (num_classes = the null class)."""
    if labels_B.ndim != 1 or labels_B.numel() == 0:
        raise ValueError(
            f"labels must be a non-empty 1-D tensor of class indices, got shape {tuple(labels_B.shape)}"
        )
    labels_B = labels_B.long()
    if int(labels_B.min()) < 0 or int(labels_B.max()) > mcfg.num_classes:
        raise ValueError(f"labels must be in 0..{mcfg.num_classes} ({mcfg.num_classes} = null class)")
    return labels_B


def guided_batch(model, labels_B: torch.Tensor, cfg: SampleConfig):
    """What a sampler of ``model`` starts from: the checked labels on the model's device, the conditioning rows
    (under CFG the labels, then as many null-class rows), each token's guidance scale and the (B, T) int64 codes
    to fill."""
    mcfg = model.config
    device = model.token_embed.weight.device
    labels_B = check_labels(labels_B, mcfg).to(device)
    cond = torch.cat([labels_B, torch.full_like(labels_B, mcfg.null_class)]) if cfg.guided else labels_B
    out = torch.empty(labels_B.shape[0], mcfg.num_tokens, dtype=torch.long, device=device)
    return labels_B, cond, guidance_scales(cfg, mcfg.num_tokens), out


@torch.no_grad()
def generate(
    model,
    labels_B: torch.Tensor,
    cfg: SampleConfig | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """Sample (B, T) int64 token grids for class labels (B,) (0 .. num_classes - 1, or the null class itself)."""
    cfg = cfg or SampleConfig()
    if hasattr(model, "generate_tokens"):  # a model with its own sampler (DetailFlow's group-parallel one)
        return model.generate_tokens(labels_B, cfg, generator, use_cache)
    labels_B, cond, scales, out = guided_batch(model, labels_B, cfg)
    was_training = model.training
    model.eval()
    try:
        cache = model.new_cache(cond.shape[0]) if use_cache else None
        for t in range(out.shape[1]):
            prefix = out[:, :t]
            if cfg.guided:
                prefix = torch.cat([prefix, prefix])
            if cache is None:
                logits = model.last_logits(cond, prefix)
            elif t == 0:
                logits = model.decode(cache, 0, labels_B=cond)
            else:
                logits = model.decode(cache, t, tokens_BL=prefix[:, t - 1 : t])
            out[:, t] = sample_logits(mix_guidance(logits, scales[t], cfg.guided), cfg, generator)
    finally:
        model.train(was_training)
    return out
