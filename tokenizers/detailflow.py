"""DetailFlow-style 1D tokenization on tokscale's Q-Former tokenizer: coarse-to-fine token prefixes.

A DetailFlow tokenizer (``model.detailflow.enabled``) is a 1D tokenizer whose first t tokens decode to an image of
a resolution that grows with t, so an AR model generating tokens in order refines the image from a blurry global
layout to its details.

- **Resolution schedule.** With N tokens, image side H and power p (1.5), prefix t stands for the resolution
  ``R(t) = int(H - (H - 1) / (N - 1)^p * (N - t)^p)`` clamped to [1, H]; the decoder renders it on the grid of
  ``R(t)`` rounded up to a multiple of the CNN's downsampling (the "patch", 16), within [patch, H]
  (:func:`resolution`, :func:`decoder_size`, :func:`resolution_schedule`). Admissible prefixes: 1 .. group, then
  multiples of the group size (:func:`admissible_lengths`).
- **Token mask.** The encoder's queries attend group-causally (``model.token_mask: block_causal`` with
  ``causal_prefix == group_size``): the first group token by token, then blocks of ``group_size`` that see
  themselves and all earlier tokens, never a later group. In the Q-Former the image features are the
  cross-attention memory: they never attend to the queries, and every query sees every image position.
- **Prefix decoding.** The decoder's grid queries run on a (size / patch)^2 grid whose positions are the learned
  grid positions resized bilinearly; the CNN decoder upsamples by the patch factor. ``VQTokenizer.decode`` of a
  detailflow tokenizer renders the first t tokens at ``decoder_size(t)``.
- **Training** (:func:`draw_plan`, :func:`forward_train`, :func:`plan_target`): with probability
  ``degradation_prob`` per step, a prefix t uniform in [1, N - group] (rounded up to a multiple of the group when
  t > group) reconstructs the image area-downsampled to R(t) and bicubic-upsampled to ``decoder_size(t)``; else all
  N tokens reconstruct the full image. The first quantised token goes through :class:`DetailFlowHeads`'s global
  projector and is pulled to the teacher's mean-pooled features (negative cosine, :func:`global_loss`).
- **Self-correction** (when ``correction`` and t > 1): a span -- one token inside the first group, otherwise a
  whole later group -- is replaced by codes drawn uniformly from each token's ``top_k`` nearest codes (itself
  included); the tokens after the span are re-encoded from the corrected prefix (the prefix enters as the first
  encoder queries through ``refine_proj``, the rest of the queries are the learned ``refine_queries``) and
  quantised; the decoder trains on the clean and the corrected sequence (the batch doubled, targets repeated). The
  quantizer losses average the clean pass and the re-encoded tokens, weighted by their token counts.
- **Extraction** (:func:`encode_streams`): per image the clean codes, the corrected-input codes (clean prefix, noisy
  span, re-encoded tail) and the label codes (clean up to the span end, re-encoded tail), stream axis last.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

STREAMS = ("clean", "input", "label")  # the token streams extraction stores per image, in this order


@dataclass
class DetailFlowConfig:
    enabled: bool = False
    power: float = 1.5  # the schedule's exponent p (DetailFlow's degradation_power)
    degradation_prob: float = 0.2  # chance per step of a prefix t < N with a degraded target
    correction: bool = True  # self-correction training (and three token streams at extraction)
    top_k: int = 50  # a corrupted token is one of its top_k nearest codes, itself included
    global_loss_weight: float = 1.0  # the first token vs the teacher's mean-pooled features; 0 = off
    global_hidden: int = 1024  # the global projector's hidden width (code_dim -> h -> h -> semantic_dim)

    def __post_init__(self) -> None:
        if self.power <= 0:
            raise ValueError(f"model.detailflow.power must be > 0, got {self.power}")
        if not 0 <= self.degradation_prob <= 1:
            raise ValueError(
                f"model.detailflow.degradation_prob must be in [0, 1], got {self.degradation_prob}"
            )
        if self.top_k < 1:
            raise ValueError(f"model.detailflow.top_k must be >= 1, got {self.top_k}")
        if self.global_loss_weight < 0:
            raise ValueError(
                f"model.detailflow.global_loss_weight must be >= 0, got {self.global_loss_weight}"
            )
        if self.global_hidden < 1:
            raise ValueError(f"model.detailflow.global_hidden must be >= 1, got {self.global_hidden}")


def check_model_config(cfg) -> None:
    """The TokenizerConfig constraints of a detailflow tokenizer (called from its ``__post_init__``)."""
    d = cfg.detailflow
    if not d.enabled:
        return
    if cfg.kind != "1d":
        raise ValueError("model.detailflow.enabled needs a 1D tokenizer (model.kind: 1d)")
    g = cfg.group_size
    if cfg.token_mask != "block_causal" or cfg.causal_prefix != g:
        raise ValueError(
            "model.detailflow.enabled needs the group-causal encoder mask: model.token_mask=block_causal and "
            f"model.causal_prefix == model.group_size (got {cfg.token_mask!r}, {cfg.causal_prefix}, {g})"
        )
    if g < 1 or cfg.num_tokens % g or cfg.num_tokens < 2 * g:
        raise ValueError(
            f"model.num_tokens={cfg.num_tokens} must be a multiple of model.group_size={g} with at least two groups"
        )
    if d.top_k > cfg.quantizer.codebook_size:
        raise ValueError(
            f"model.detailflow.top_k={d.top_k} exceeds quantizer.codebook_size={cfg.quantizer.codebook_size}"
        )
    if d.global_loss_weight > 0 and cfg.semantic_dim < 1:
        raise ValueError(
            "model.detailflow.global_loss_weight > 0 needs model.semantic_dim (the teacher's width)"
        )


def check_train_config(cfg) -> None:
    """The tokenizer TrainConfig constraints of DetailFlow training (called from its ``__post_init__``)."""
    d = cfg.model.detailflow
    if not d.enabled:
        return
    if cfg.loss.semantic.weight > 0:
        raise ValueError(
            "loss.semantic.weight > 0 (decoder-feature alignment) is not supported with model.detailflow: "
            "prefix decoding changes the decoder grid; DetailFlow uses the global-token loss instead "
            "(model.detailflow.global_loss_weight), so set loss.semantic.weight=0"
        )
    if cfg.loss.aux.until_step > 0:
        raise ValueError("loss.aux (GigaTok's CNN shortcut) is not supported with model.detailflow")
    if d.global_loss_weight > 0:
        sem = cfg.loss.semantic
        if not sem.teacher_weights:
            raise ValueError(
                "model.detailflow.global_loss_weight > 0 needs the frozen teacher: set loss.semantic.teacher_weights "
                "(loss.semantic.weight may stay 0), or set the global loss weight to 0"
            )
        if sem.teacher_dim != cfg.model.semantic_dim:
            raise ValueError(
                f"model.semantic_dim={cfg.model.semantic_dim} must equal loss.semantic.teacher_dim={sem.teacher_dim} "
                "(the global projector's output is compared with the teacher's features)"
            )


# ----------------------------------------------------------------------------------------------------------------
# the resolution schedule


def resolution(t: int, num_tokens: int, size: int = 256, power: float = 1.5) -> int:
    """R(t): the image side (pixels) that the first t of num_tokens tokens stand for, in [1, size]."""
    n = num_tokens
    if not 1 <= t <= n:
        raise ValueError(f"prefix length t={t} must be in 1..{n}")
    r = int(size - (size - 1) / (n - 1) ** power * (n - t) ** power)
    return min(max(r, 1), size)


def decoder_size(t: int, num_tokens: int, size: int = 256, power: float = 1.5, patch: int = 16) -> int:
    """The side the decoder renders prefix t at: R(t) rounded up to a multiple of ``patch``, in [patch, size]."""
    r = resolution(t, num_tokens, size, power)
    return min(max(-(-r // patch) * patch, patch), size)


def admissible_lengths(num_tokens: int, group: int = 8) -> list[int]:
    """Prefix lengths a group-causal tokenizer decodes: 1 .. group, then multiples of group up to num_tokens."""
    return list(range(1, group + 1)) + list(range(2 * group, num_tokens + 1, group))


def resolution_schedule(
    num_tokens: int, size: int = 256, power: float = 1.5, patch: int = 16, group: int = 8
) -> dict[int, tuple[int, int]]:
    """{admissible t: (R(t), decoder size)}."""
    return {
        t: (resolution(t, num_tokens, size, power), decoder_size(t, num_tokens, size, power, patch))
        for t in admissible_lengths(num_tokens, group)
    }


def prefix_grid(cfg, t: int) -> int:
    """The decoder's grid side for the first t tokens of the tokenizer configured by ``cfg``."""
    patch = cfg.cnn.downsample
    return decoder_size(t, cfg.num_tokens, cfg.image_size, cfg.detailflow.power, patch) // patch


def group_causal_mask(n: int, group: int = 8, device=None) -> torch.Tensor:
    """(n, n) bool, True = query i may attend to query j: the first group token by token, later tokens by blocks of
    ``group`` (bidirectional inside a block, nothing of a later block). Equals ``token_mask('block_causal', n,
    group, group)``, which the tokenizer uses."""
    pos = torch.arange(n, device=device)
    gid = torch.where(pos < group, pos, group + (pos - group) // group)
    return gid[None, :] <= gid[:, None]


def resize_positions(pos_LD: torch.Tensor, grid: int) -> torch.Tensor:
    """Learned square grid positions (g*g, D) -> (grid*grid, D), bilinear (unchanged when grid == g)."""
    n, d = pos_LD.shape
    g = round(n**0.5)
    if grid == g:
        return pos_LD
    x = pos_LD.t().reshape(1, d, g, g)
    x = F.interpolate(x, size=(grid, grid), mode="bilinear", align_corners=False)
    return x.reshape(d, grid * grid).t()


def degrade(images: torch.Tensor, res: int, size: int) -> torch.Tensor:
    """The degraded target: area-downsample to res x res, then bicubic up to size x size (float32)."""
    x = images.float()
    if res < x.shape[-1]:
        x = F.interpolate(x, size=(res, res), mode="area")
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    return x


# ----------------------------------------------------------------------------------------------------------------
# training


@dataclass(frozen=True)
class StepPlan:
    """What one DetailFlow step decodes: prefix t, its resolution and decoder size / grid, and the corrupted span
    [noise_start, noise_end) (None: no self-correction this step)."""

    t: int
    resolution: int
    size: int
    grid: int
    noise: tuple[int, int] | None = None


def _randrange(n: int, generator: torch.Generator | None) -> int:
    """Uniform in [0, n) from torch's CPU generator (the global one unless given: seeded by the trainer and saved
    with every checkpoint, so a fixed-seed run draws the same plans, and a resumed run continues them)."""
    return int(torch.randint(n, (), generator=generator))


def noise_span(t: int, group: int, generator: torch.Generator | None = None) -> tuple[int, int] | None:
    """The span to corrupt in a prefix of t tokens: inside the first group (t <= group) one token uniform in [0, t);
    otherwise a start uniform in [0, t - group), which inside the first group corrupts that one token and later
    snaps down to its group start and corrupts the whole group. None when t == 1 (nothing after a corruption)."""
    if t <= 1:
        return None
    start = _randrange(t, generator) if t <= group else _randrange(t - group, generator)
    if start < group:
        return start, start + 1
    start -= start % group
    return start, start + group


def draw_plan(cfg, generator: torch.Generator | None = None) -> StepPlan:
    """One step's plan for the tokenizer configured by ``cfg`` (a TokenizerConfig), drawn from torch's CPU
    generator (the global one by default)."""
    d, n, g = cfg.detailflow, cfg.num_tokens, cfg.group_size
    t = n
    if float(torch.rand((), generator=generator)) < d.degradation_prob:
        t = 1 + _randrange(n - g, generator)
        if t > g:
            t = -(-t // g) * g
    patch = cfg.cnn.downsample
    size = decoder_size(t, n, cfg.image_size, d.power, patch)
    noise = noise_span(t, g, generator) if d.correction else None
    return StepPlan(t, resolution(t, n, cfg.image_size, d.power), size, size // patch, noise)


def plan_target(images: torch.Tensor, plan: StepPlan) -> torch.Tensor:
    """The reconstruction target of a step: the degraded image at the plan's size, repeated for the corrected
    sequence when the step self-corrects."""
    target = degrade(images, plan.resolution, plan.size)
    return torch.cat([target, target]) if plan.noise is not None else target


class DetailFlowHeads(nn.Module):
    """The trainable parts a detailflow tokenizer adds: ``refine_proj`` (code_dim -> encoder width) and
    ``refine_queries`` (N, width) for self-correction re-encoding; ``global_projector`` (code_dim -> hidden ->
    hidden -> semantic_dim, SiLU) for the global-token loss."""

    def __init__(self, cfg) -> None:
        super().__init__()
        d, width, code = cfg.detailflow, cfg.encoder.width, cfg.quantizer.code_dim
        self.refine_proj = self.refine_queries = self.global_projector = None
        if d.correction:
            self.refine_proj = nn.Linear(code, width)
            self.refine_queries = nn.Parameter(torch.randn(cfg.num_tokens, width) * width**-0.5)
        if d.global_loss_weight > 0:
            h = d.global_hidden
            self.global_projector = nn.Sequential(
                nn.Linear(code, h), nn.SiLU(), nn.Linear(h, h), nn.SiLU(), nn.Linear(h, cfg.semantic_dim)
            )


def neighbour_codes(
    codes_KD: torch.Tensor, idx: torch.Tensor, top_k: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """For every index, one of the ``top_k`` codes nearest (L2) to its code, uniformly (itself included)."""
    flat = idx.reshape(-1)
    codes = codes_KD.float()
    d = torch.cdist(codes[flat], codes)  # (M, K)
    near = d.topk(min(top_k, codes.shape[0]), dim=1, largest=False).indices
    # drawn on the CPU generator (seeded and checkpointed by the trainer), whatever the device
    pick = torch.randint(near.shape[1], (flat.numel(), 1), generator=generator).to(idx.device)
    return near.gather(1, pick).view_as(idx)


def _encode(model, feat, mask, queries=None):
    """Encoder transformer -> pre-quantisation latents (B, N, code_dim)."""
    return model.to_code(model.encoder.proj_out(model.encoder(feat, mask, queries=queries)))


def _reencode(model, feat, mask, prefix_BND: torch.Tensor, ends_B: torch.Tensor) -> torch.Tensor:
    """Pre-quantisation latents (B, N, code_dim) re-encoded after a corrected prefix: the queries before position
    ``ends_B[b]`` are ``refine_proj`` of ``prefix_BND`` (detached codes; later rows are ignored), the others the
    learned ``refine_queries``. Only the latents from ``ends_B[b]`` on are new tokens."""
    heads = model.detailflow
    pre = heads.refine_proj(prefix_BND.to(heads.refine_proj.weight.dtype))
    rest = heads.refine_queries.to(pre.dtype).expand_as(pre)
    before = (
        torch.arange(pre.shape[1], device=pre.device)[None, :, None] < ends_B.to(pre.device)[:, None, None]
    )
    return _encode(model, feat, mask, torch.where(before, pre, rest))


def _corrupt(model, idx, span, generator=None):
    s, e = span
    return neighbour_codes(model.quantizer.codes(), idx[:, s:e], model.config.detailflow.top_k, generator)


def forward_train(model, images: torch.Tensor, plan: StepPlan) -> dict[str, torch.Tensor]:
    """The training forward of a detailflow tokenizer under ``plan``: ``recon`` (B or 2B, 3, size, size), the
    quantizer losses, ``indices`` (clean) and ``global`` (projected first token) when the head exists."""
    cfg = model.config
    n = cfg.num_tokens
    feat = model.cnn_features(images)
    mask = model._mask(n, feat.device)
    q = model.quantizer(_encode(model, feat, mask))
    z = q["z_q"]
    seqs = [z[:, : plan.t]]
    out = {k: v for k, v in q.items() if k.startswith("loss_")}
    if plan.noise is not None:
        s, e = plan.noise
        with torch.no_grad():
            noisy = model.quantizer.lookup(_corrupt(model, q["indices"], plan.noise)).to(z.dtype)
        prefix = torch.cat([z[:, :s].detach(), noisy, z[:, e:].detach()], 1)
        ends = torch.full((z.shape[0],), e, dtype=torch.long)
        tail = model.quantizer(_reencode(model, feat, mask, prefix, ends)[:, e:])
        seqs.append(torch.cat([z[:, :s], noisy, tail["z_q"]], 1)[:, : plan.t])
        m = n - e  # re-encoded tokens; the clean pass quantised n
        for key in ("loss_commit", "loss_codebook"):
            out[key] = (q[key] * n + tail[key] * m) / (n + m)
    spatial, _ = model.decode_map(torch.cat(seqs), grid=plan.grid)
    out.update(recon=model.cnn_decoder(spatial), indices=q["indices"])
    heads = model.detailflow
    if heads.global_projector is not None:
        out["global"] = heads.global_projector(z[:, 0])
    return out


def global_loss(pred_BD: torch.Tensor, teacher_BND: torch.Tensor) -> torch.Tensor:
    """Negative cosine between the projected first token and the teacher's mean-pooled tokens (float32)."""
    return -F.cosine_similarity(pred_BD.float(), teacher_BND.float().mean(1), dim=-1).mean()


def build_global_teacher(cfg, device):
    """The frozen teacher of the global-token loss (loss.semantic's network and weights) or None: it returns one
    token per image, the mean of its patch tokens (the resampling to a 1 x 1 grid), l2-normalised."""
    d = cfg.model.detailflow
    if not (d.enabled and d.global_loss_weight > 0):
        return None
    from tokscale.tokenizers.semantic import DinoTeacher

    return DinoTeacher(cfg.loss.semantic, grid_size=1).to(device)


def detailflow_losses(task, out: dict, images: torch.Tensor, cfg) -> dict[str, torch.Tensor]:
    """The loss terms DetailFlow adds to the generator step: ``loss_global`` when the head is on."""
    teacher = getattr(task, "global_teacher", None)
    if teacher is None or "global" not in out:
        return {}
    with torch.no_grad():
        target = teacher(images)
    return {"loss_global": cfg.model.detailflow.global_loss_weight * global_loss(out["global"], target)}


def gan_view(images: torch.Tensor, cfg) -> torch.Tensor:
    """What the discriminator sees of a reconstruction or target: a DetailFlow prefix rendered below the image size
    is upsampled (bicubic) to it, so the discriminator (PatchGAN needs >= 32 px; the DINO one works at 224) sees
    one size; anything else passes unchanged."""
    size = cfg.model.image_size
    if not cfg.model.detailflow.enabled or images.shape[-1] == size:
        return images
    return F.interpolate(images.float(), size=(size, size), mode="bicubic", align_corners=False)


def plan_metrics(plan: StepPlan) -> dict[str, torch.Tensor]:
    """What a step decoded, logged beside the losses: the prefix length and the decoder's side in pixels."""
    return {
        "detailflow_prefix": torch.tensor(float(plan.t)),
        "detailflow_size": torch.tensor(float(plan.size)),
    }


# ----------------------------------------------------------------------------------------------------------------
# extraction


@torch.no_grad()
def encode_streams(model, images: torch.Tensor, seeds) -> torch.Tensor:
    """Images (B, 3, H, W) -> int64 codes (B, S, N) in :data:`STREAMS` order: [:, 0] clean, [:, 1] input (clean
    prefix, corrupted span, re-encoded tail), [:, 2] label (clean up to the span end, re-encoded tail); S is 1
    (clean only) for a tokenizer trained without correction. Row b's span (drawn as for t = N) and its corrupted
    codes come from a CPU generator seeded with ``seeds[b]``, so rows of one seed (an image's crops) share their
    span, and the result does not depend on the batching."""
    cfg = model.config
    n = cfg.num_tokens
    feat = model.cnn_features(images)
    mask = model._mask(n, feat.device)
    idx = model.quantizer(_encode(model, feat, mask))["indices"]
    if not cfg.detailflow.correction:
        return idx[:, None]
    corrupted, ends = idx.clone(), torch.empty(idx.shape[0], dtype=torch.long)
    for b, seed in enumerate(seeds):
        gen = torch.Generator().manual_seed(int(seed))
        s, e = noise_span(n, cfg.group_size, gen)
        corrupted[b, s:e] = _corrupt(model, idx[b : b + 1], (s, e), gen)[0]
        ends[b] = e
    latents = _reencode(model, feat, mask, model.quantizer.lookup(corrupted), ends)
    tail = model.quantizer(latents)["indices"]
    before = torch.arange(n, device=idx.device)[None] < ends.to(idx.device)[:, None]
    inp = torch.where(before, corrupted, tail)
    label = torch.where(before, idx, tail)
    return torch.stack([idx, inp, label], 1)
