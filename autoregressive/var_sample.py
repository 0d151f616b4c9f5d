"""Class-conditional sampling from a VAR next-scale transformer: one forward pass per scale.

    from tokscale.autoregressive.var_sample import VARSampleConfig, generate_var
    g = torch.Generator().manual_seed(0)
    codes = generate_var(model, quantizer, labels, VARSampleConfig(cfg_scale=1.5, top_k=900, top_p=0.96), g)

``quantizer`` is the multi-scale tokenizer's (tokscale.tokenizers.multiscale.MultiScaleQuantizer, or anything
with ``scales`` and ``next_scale(f_hat, idx_k, k) -> (f_hat, next_input)``): after scale k is drawn it adds the
codes to f_hat and gives scale k + 1's input, f_hat area-downsampled to p_{k+1} x p_{k+1}. The result is the flat
(B, L) codes, scales concatenated coarse to fine, each row-major: what ``VQTokenizer.decode`` takes.

With the KV cache (default) scale k runs only its own p_k^2 positions against the keys and values the coarser
scales appended (tokscale.autoregressive.var.VARCache); ``use_cache=False`` recomputes the whole prefix under the
block-causal mask at every scale instead (the same tokens under the same generator: the check of the cache).

Guidance (VAR's ``autoregressive_infer_cfg``): when ``cfg_scale > 0`` the batch runs as ``[cond; null]`` and the
logits of scale k are ``(1 + t_k) cond - t_k uncond`` with ``t_k = cfg_scale * k / (K - 1)`` (``linear``, VAR's
ramp: scale 0 unguided) or ``t_k = cfg_scale`` (``constant``). Note VAR's convention: cfg 1.5 means a final guidance
weight 1 + 1.5 = 2.5 on the conditional logits, not LlamaGen's 1.5. Then temperature, top-k and top-p
(tokscale.autoregressive.sample.filter_logits) and one multinomial draw per token.

Two memory and speed options, both off by default:

- ``kv_budget < 1``: :class:`BudgetCache`. The rule: every layer keeps all entries of the first ``kv_keep_scales``
  scales (the coarse scales, which every later scale attends to: ScaleKV (Li et al. 2025, arXiv 2505.19602) and
  HACK (Qin et al. 2025, arXiv 2504.09261) both keep them), and of the finer scales' entries only the
  ``kv_budget`` fraction (of what the full cache would hold after this scale) that received the most attention
  from the current scale's queries, summed over those queries, chosen per layer, per head and per sample
  (heavy-hitter selection with the current scale as the observation window, as SnapKV scores; ScaleKV's
  drafter/refiner budget split and HACK's head classification are not implemented: the budget is uniform over
  layers and heads). Eviction happens after the scale's attention, so the current scale always sees itself whole;
  the peak therefore includes the finest scale's own entries.
- ``code_handoff = K > 0``: collaborative decoding (CoDe, Chen et al. 2024, arXiv 2411.17787): the (large) model
  draws scales 0..K-1, then ``small_model`` runs the whole prefix 0..K once (its own keys and values: the two
  models differ in width, so the large one's cache is useless to it), which gives scale K, and continues with its
  own cache for the rest. Forward passes stay one per scale; the small model's first pass covers K + 1 scales.

``generate_var(..., return_stats=True)`` also returns ``{"forward_passes", "forward_passes_small",
"positions_run", "peak_kv_bytes"}``: passes of each model, sequence positions run (CFG rows included) and the
most bytes held in KV caches at once (under CoDe the large model's cache is freed at the handoff).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tokscale.autoregressive.sample import check_filtering, filter_logits
from tokscale.autoregressive.var import VARCache

VAR_CFG_SCHEDULES = ("linear", "constant")


@dataclass
class VARSampleConfig:
    cfg_scale: float = 1.5  # VAR's t: logits = (1 + t) cond - t uncond; 0 = no guidance (no null half)
    cfg_schedule: str = "linear"  # linear: t_k = cfg_scale * k / (K - 1) (VAR) | constant: t_k = cfg_scale
    temperature: float = 1.0
    top_k: int = 0  # 0: off (VAR's README for FID: 900)
    top_p: float = 1.0  # 1: off (VAR's README: 0.96)
    kv_budget: float = 1.0  # fraction of the finer scales' KV entries each layer keeps (1 = the full cache)
    kv_keep_scales: int = 4  # scales whose entries the budget never evicts
    code_handoff: int = 0  # CoDe: > 0 = the scale from which the small model draws (0 = off)

    def __post_init__(self):
        if self.cfg_schedule not in VAR_CFG_SCHEDULES:
            raise ValueError(
                f"sample.cfg_schedule must be one of {VAR_CFG_SCHEDULES}, got {self.cfg_schedule!r}"
            )
        if self.cfg_scale < 0:
            raise ValueError(f"sample.cfg_scale must be >= 0 (0 = no guidance), got {self.cfg_scale}")
        check_filtering(self.temperature, self.top_k, self.top_p)
        if not 0.0 < self.kv_budget <= 1.0:
            raise ValueError(f"sample.kv_budget must be in (0, 1] (1 = full cache), got {self.kv_budget}")
        if self.kv_keep_scales < 1:
            raise ValueError(f"sample.kv_keep_scales must be >= 1, got {self.kv_keep_scales}")
        if self.code_handoff < 0:
            raise ValueError(f"sample.code_handoff must be >= 0 (0 = off), got {self.code_handoff}")

    @property
    def guided(self) -> bool:
        return self.cfg_scale > 0


def guidance_weights(cfg: VARSampleConfig, num_scales: int) -> list[float]:
    """t_k of each scale (the logits are (1 + t) cond - t uncond)."""
    if cfg.cfg_schedule == "constant":
        return [cfg.cfg_scale] * num_scales
    return [cfg.cfg_scale * k / max(num_scales - 1, 1) for k in range(num_scales)]


class BudgetCache(VARCache):
    """A :class:`VARCache` that keeps, per layer, head and sample, the entries of the first ``keep`` positions
    (the coarse scales) and the ``budget`` fraction of the rest most attended by the current scale's queries.

    ``positions[layer]`` (B, H, n) holds the flat sequence position of each kept entry (for checks)."""

    def __init__(self, depth: int, boundaries: list[int], budget: float, keep_scales: int):
        super().__init__(depth)
        self.boundaries, self.budget = boundaries, budget
        self.protected = boundaries[min(keep_scales, len(boundaries) - 1)]
        self.positions: list[torch.Tensor | None] = [None] * depth
        self.seen: list[int] = [0] * depth  # positions a full cache would hold now

    def append(self, layer: int, k, v):
        b, h, n, _ = k.shape
        new = torch.arange(self.seen[layer], self.seen[layer] + n, device=k.device).expand(b, h, n)
        old = self.positions[layer]
        self.positions[layer] = new if old is None else torch.cat([old, new], dim=2)
        self.seen[layer] += n
        return super().append(layer, k, v)

    def attend(self, layer: int, q, mask) -> torch.Tensor:
        k, v = self.k[layer], self.v[layer]
        scores = (q @ k.transpose(-2, -1)).float()  # cosine attention: no 1/sqrt(d), the scale is in q
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = scores.softmax(-1)
        out = probs.to(v.dtype) @ v
        self._evict(layer, probs.sum(dim=2))  # (B, H, n): attention mass each entry received
        return out

    def _evict(self, layer: int, mass_BHN: torch.Tensor) -> None:
        n = self.k[layer].shape[2]
        fine_seen = self.seen[layer] - self.protected
        keep = math.ceil(self.budget * fine_seen) if fine_seen > 0 else 0
        fine_now = n - self.protected
        if fine_now <= keep:
            return
        # the protected entries sit at the front (appended first, never evicted)
        top = mass_BHN[..., self.protected :].topk(keep, dim=-1).indices.sort(dim=-1).values + self.protected
        head = torch.arange(self.protected, device=top.device).expand(*top.shape[:2], self.protected)
        idx = torch.cat([head, top], dim=-1)  # (B, H, kept)
        gather = idx[..., None].expand(-1, -1, -1, self.k[layer].shape[-1])
        k, v = self.k[layer].gather(2, gather), self.v[layer].gather(2, gather)
        dropped = self.k[layer].numel() + self.v[layer].numel() - k.numel() - v.numel()
        self.bytes -= dropped * k.element_size()
        self.k[layer], self.v[layer] = k, v
        self.positions[layer] = self.positions[layer].gather(2, idx)


def _check(model, quantizer, small_model) -> None:
    scales = list(model.config.scales)
    if list(quantizer.scales) != scales:
        raise ValueError(f"the model's scales {scales} differ from the tokenizer's {list(quantizer.scales)}")
    if small_model is not None:
        for key in ("scales", "vocab_size", "code_dim", "num_classes"):
            a, b = getattr(model.config, key), getattr(small_model.config, key)
            if list(a) != list(b) if key == "scales" else a != b:
                raise ValueError(f"CoDe: the small model's {key}={b} differs from the large model's {a}")


def _new_cache(model, cfg: VARSampleConfig):
    mcfg = model.config
    if cfg.kv_budget < 1.0:
        return BudgetCache(mcfg.depth, mcfg.boundaries, cfg.kv_budget, cfg.kv_keep_scales)
    return VARCache(mcfg.depth)


@torch.no_grad()
def generate_var(
    model,
    quantizer,
    labels_B: torch.Tensor,
    cfg: VARSampleConfig | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    small_model=None,
    return_stats: bool = False,
):
    """Sample flat (B, L) int64 multi-scale codes for class labels (B,) (0 .. num_classes - 1, or the null
    class itself); with ``return_stats`` also the stats dict described in the module docstring."""
    cfg = cfg or VARSampleConfig()
    mcfg = model.config
    if labels_B.ndim != 1 or labels_B.numel() == 0:
        raise ValueError(
            f"labels must be a non-empty 1-D tensor of class indices, got {tuple(labels_B.shape)}"
        )
    if int(labels_B.min()) < 0 or int(labels_B.max()) > mcfg.num_classes:
        raise ValueError(f"labels must be in 0..{mcfg.num_classes} ({mcfg.num_classes} = null class)")
    num_scales = mcfg.num_scales
    if cfg.code_handoff:
        if small_model is None:
            raise ValueError(f"sample.code_handoff={cfg.code_handoff} needs a small model (CoDe's refiner)")
        if not 1 <= cfg.code_handoff < num_scales:
            raise ValueError(f"sample.code_handoff must be in 1..{num_scales - 1}, got {cfg.code_handoff}")
    _check(model, quantizer, small_model if cfg.code_handoff else None)
    device = model.class_embed.weight.device
    labels_B = labels_B.long().to(device)
    b = labels_B.shape[0]
    cond_labels = (
        torch.cat([labels_B, torch.full_like(labels_B, mcfg.null_class)]) if cfg.guided else labels_B
    )
    weights = guidance_weights(cfg, num_scales)
    models = [model, small_model if cfg.code_handoff else None]
    stats = {"forward_passes": 0, "forward_passes_small": 0, "positions_run": 0, "peak_kv_bytes": 0}
    was_training = [m.training if m is not None else False for m in models]
    for m in models:
        if m is not None:
            m.eval()
    try:
        conds = [m.class_embed(cond_labels) if m is not None else None for m in models]
        caches = [_new_cache(m, cfg) if (m is not None and use_cache) else None for m in models]
        bounds = mcfg.boundaries
        f_hat, inputs, codes, peak_large = None, [], [], 0
        for k in range(num_scales):
            small = bool(cfg.code_handoff) and k >= cfg.code_handoff
            which = 1 if small else 0
            if small and k == cfg.code_handoff and caches[0] is not None:
                peak_large, caches[0] = caches[0].peak_bytes, None  # the large model is done: free its cache
            m, cache, cond = models[which], caches[which], conds[which]
            # the small model's first pass, and every pass without a cache, runs the whole prefix 0..k
            first = k if (cache is not None and not (small and k == cfg.code_handoff)) else 0
            x_in = torch.cat(inputs[max(first, 1) - 1 :], dim=1) if k >= max(first, 1) else None
            if x_in is not None and cfg.guided:
                x_in = torch.cat([x_in, x_in])
            logits = m.scale_logits(cond, x_in, first, k, cache)  # (B', p_k^2, V)
            stats["forward_passes_small" if small else "forward_passes"] += 1
            stats["positions_run"] += (bounds[k + 1] - bounds[first]) * cond.shape[0]
            if cfg.guided:
                c, u = logits.chunk(2)
                logits = c * (1 + weights[k]) - u * weights[k]
            logits = filter_logits(logits.flatten(0, 1) / max(cfg.temperature, 1e-5), cfg.top_k, cfg.top_p)
            idx = torch.multinomial(logits.softmax(-1), 1, generator=generator).view(b, -1)
            codes.append(idx)
            f_hat, nxt = quantizer.next_scale(f_hat, idx, k)
            if nxt is not None:
                inputs.append(nxt)
        stats["peak_kv_bytes"] = max([peak_large] + [c.peak_bytes for c in caches if c is not None])
    finally:
        for m, training in zip(models, was_training):
            if m is not None:
                m.train(training)
    out = torch.cat(codes, dim=1)
    return (out, stats) if return_stats else out


# --- `tokscale sample` / `tokscale eval gen` on a VAR run or export ------------------------------------------------
#
# Those commands take LlamaGen's sampler flags (tokscale.autoregressive.sample.SampleConfig) whatever the model, so
# a VAR is sampled through an explicit conversion (:func:`var_sample_config`), never by reading a flag differently:
# - ``--cfg-scale s`` keeps its meaning, the final weight on the conditional logits, s cond - (s - 1) uncond; VAR
#   writes the same mix with t = s - 1 (VAR's cfg 1.5 is ``--cfg-scale 2.5``); s <= 1 samples unguided;
# - ``--cfg-schedule constant`` is t_k = t at every scale; ``linear`` is VAR's ramp t_k = t k / (K - 1), which is
#   GigaTok's linear schedule over scales instead of tokens (but scale 0 is unguided, where the GPT's prefill gets
#   the full scale, and without GigaTok's + 1e-4); ``step`` and ``cfg_interval >= 0`` have no VAR counterpart
#   and are refused;
# - temperature, top-k and top-p are the same filters (tokscale.autoregressive.sample.filter_logits).
# The VAR-only settings (KV budget, CoDe) are :class:`VAROptions`, the job configs' ``var:`` section.


@dataclass
class VAROptions:
    kv_budget: float = 1.0  # VARSampleConfig.kv_budget (1 = the full cache)
    kv_keep_scales: int = 4  # VARSampleConfig.kv_keep_scales
    code_handoff: int = 0  # CoDe: the scale from which small_model draws (0 = off)
    small_model: str = ""  # CoDe's small VAR (a `tokscale train var` run or export); needs code_handoff > 0

    def __post_init__(self):
        VARSampleConfig(
            kv_budget=self.kv_budget, kv_keep_scales=self.kv_keep_scales, code_handoff=self.code_handoff
        )
        if bool(self.code_handoff) != bool(self.small_model):
            raise ValueError(
                f"var.code_handoff={self.code_handoff} and var.small_model={self.small_model!r}: CoDe needs both "
                "(a handoff scale >= 1 and the small model's path) or neither"
            )

    @property
    def is_default(self) -> bool:
        return self.kv_budget == 1.0 and not self.code_handoff and not self.small_model


def var_sample_config(sample, options: VAROptions | None = None) -> VARSampleConfig:
    """The VAR sampler settings equal to a SampleConfig (LlamaGen's guidance convention) plus the VAR options;
    see the comment above for the conversion. Refuses what has no VAR counterpart."""
    options = options or VAROptions()
    if sample.cfg_schedule not in VAR_CFG_SCHEDULES:
        raise ValueError(
            f"sample.cfg_schedule={sample.cfg_schedule!r}: a VAR samples with constant or linear (VAR's ramp over "
            "scales); GigaTok's step schedule has no VAR counterpart"
        )
    if sample.cfg_interval != -1:
        raise ValueError(
            f"sample.cfg_interval={sample.cfg_interval}: LlamaGen's token interval has no VAR counterpart"
        )
    return VARSampleConfig(
        cfg_scale=max(float(sample.cfg_scale) - 1.0, 0.0),
        cfg_schedule=sample.cfg_schedule,
        temperature=sample.temperature,
        top_k=sample.top_k,
        top_p=sample.top_p,
        kv_budget=options.kv_budget,
        kv_keep_scales=options.kv_keep_scales,
        code_handoff=options.code_handoff,
    )


def is_var_model(path) -> bool:
    """Whether ``path`` (a run directory or export) holds a VAR (``schema: var`` in its config.yaml)."""
    from pathlib import Path

    from omegaconf import OmegaConf

    cfg_file = Path(path) / "config.yaml"
    return cfg_file.is_file() and OmegaConf.load(cfg_file).get("schema") == "var"


def check_var_pair(var_path, tokenizer_path, options: VAROptions | None = None):
    """Refuse a VAR (and CoDe's small model) and a tokenizer that do not belong together, from their configs
    alone: not a multi-scale tokenizer, a codebook larger than the vocabulary, other scales or code width.
    Returns the VAR's config."""
    from tokscale.autoregressive.var_train import var_config_from
    from tokscale.tokenizers.load import model_config_from as tokenizer_config_from

    options = options or VAROptions()
    cfg, tok = var_config_from(var_path), tokenizer_config_from(tokenizer_path)
    q = tok.quantizer
    if getattr(q, "kind", "vq") != "multiscale":
        raise ValueError(
            f"tokenizer {tokenizer_path} has quantizer.kind {getattr(q, 'kind', 'vq')!r}; the VAR {var_path} needs a "
            "'multiscale' tokenizer"
        )
    models = [("VAR", var_path, cfg)]
    if options.small_model:
        small = var_config_from(options.small_model)
        models.append(("CoDe small VAR", options.small_model, small))
        if not 1 <= options.code_handoff < len(cfg.scales):
            raise ValueError(
                f"var.code_handoff must be in 1..{len(cfg.scales) - 1}, got {options.code_handoff}"
            )
        if small.num_classes != cfg.num_classes:
            raise ValueError(
                f"the CoDe small VAR {options.small_model} has num_classes {small.num_classes}; the VAR {var_path} "
                f"has {cfg.num_classes}"
            )
    for what, path, m in models:
        if q.codebook_size > m.vocab_size:
            raise ValueError(
                f"tokenizer {tokenizer_path} has codebook_size {q.codebook_size}; the {what} {path} has vocab_size "
                f"{m.vocab_size}"
            )
        if list(q.scales) != list(m.scales):
            raise ValueError(
                f"tokenizer {tokenizer_path} has scales {list(q.scales)}; the {what} {path} has scales {list(m.scales)}"
            )
        if q.code_dim != m.code_dim:
            raise ValueError(
                f"tokenizer {tokenizer_path} has code_dim {q.code_dim}; the {what} {path} has code_dim {m.code_dim}"
            )
    return cfg


class VARGenerator:
    """A VAR with its tokenizer's quantizer (and CoDe's small model) behind tokscale.autoregressive.sample.generate's
    ``generate_tokens`` entry, so ``tokscale sample`` and ``eval gen`` sample it like a GPT. ``stats`` sums
    generate_var's stats over the batches (``peak_kv_bytes``: the largest of one batch)."""

    def __init__(self, model, quantizer, options: VAROptions | None = None, small_model=None):
        self.model, self.quantizer, self.small_model = model, quantizer, small_model
        self.options = options or VAROptions()
        self.stats = {
            "batches": 0,
            "forward_passes": 0,
            "forward_passes_small": 0,
            "positions_run": 0,
            "peak_kv_bytes": 0,
        }

    @property
    def config(self):
        return self.model.config

    def generate_tokens(self, labels_B, cfg=None, generator=None, use_cache: bool = True) -> torch.Tensor:
        from tokscale.autoregressive.sample import SampleConfig

        vcfg = var_sample_config(cfg or SampleConfig(), self.options)
        codes, stats = generate_var(
            self.model,
            self.quantizer,
            labels_B,
            vcfg,
            generator,
            use_cache=use_cache,
            small_model=self.small_model,
            return_stats=True,
        )
        self.stats["batches"] += 1
        for key, value in stats.items():
            self.stats[key] = (
                max(self.stats[key], value) if key == "peak_kv_bytes" else self.stats[key] + value
            )
        return codes


def load_var_generator(path, tokenizer, options: VAROptions | None = None, device="cpu", verify: bool = True):
    """A :class:`VARGenerator` for a VAR run or export and a loaded multi-scale tokenizer (VQTokenizer)."""
    from tokscale.autoregressive.var_train import load_var

    options = options or VAROptions()
    model = load_var(path, device, verify=verify)
    small = load_var(options.small_model, device, verify=verify) if options.small_model else None
    _check(model, tokenizer.quantizer, small)
    return VARGenerator(model, tokenizer.quantizer, options, small)
