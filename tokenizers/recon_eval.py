"""Reconstruction evaluation: rFID, IS, PSNR, SSIM, LPIPS and codebook usage over an evaluation set, across ranks.

The published protocol (GigaTok, LlamaGen): ADM centre crops of the 50,000 ImageNet val images at the tokenizer's
resolution, reconstructed, quantised to uint8 with clamp(127.5 x + 128), and compared against the Inception
statistics of the same crops. Every rank reconstructs its own share of the stream (the stream yields each sample
exactly once across ranks) and keeps only running sums; one all_reduce per statistic merges them at the end.

    from tokscale.evaluation.config import EvalConfig
    from tokscale.tokenizers.recon_eval import evaluate_reconstruction
    metrics = evaluate_reconstruction(tok, stream, EvalConfig(inception_weights="pt_inception.pth"), rank, world)

A trainer keeps one :class:`ReconEvaluator` (Inception loaded once, reference statistics of a fixed subset cached
between evaluations) and calls :func:`evaluate_in_training` every N steps.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tokscale.evaluation.config import EvalConfig
from tokscale.evaluation.fid import (
    GaussianStats,
    StatsMeta,
    check_compatible,
    frechet_distance,
    load_stats,
    warn_if_few_samples,
)
from tokscale.evaluation.image_metrics import CodeUsage, psnr_per_image, ssim_per_image
from tokscale.evaluation.inception import FEATURE_DIM, load_inception, quantize_uint8
from tokscale.evaluation.inception_score import InceptionScore
from tokscale.evaluation.lockstep import batch_indices, lockstep, split_batch
from tokscale.images import image_grid, to_unit

log = logging.getLogger(__name__)

# Per-image sums reduced across ranks, in this order.
_SUMS = ("count", "psnr", "ssim_dr1", "ssim_dr2", "lpips")


@dataclass
class ReconResult:
    metrics: dict[str, float]
    grid: torch.Tensor | None  # (3, H, W) in [0, 1] on rank 0: originals (top row) above reconstructions
    meta: StatsMeta | None
    # (mu, sigma) of the evaluation crops when they were computed in this pass (no reference given)
    crop_stats: tuple | None = None


class ReconEvaluator:
    """Holds the frozen networks (Inception, optional LPIPS) and the reference statistics between calls."""

    def __init__(self, cfg: EvalConfig, device: str | torch.device = "cpu", lpips_module=None):
        self.cfg = cfg
        self.device = torch.device(device)
        self.lpips = lpips_module if cfg.compute_lpips else None
        self.inception = load_inception(cfg.inception_weights, self.device) if cfg.compute_fid else None
        self.reference = load_stats(cfg.reference_stats) if cfg.compute_fid and cfg.reference_stats else None
        # Statistics of a trainer's fixed evaluation subset, computed at its first evaluation and reused.
        self.training_reference: dict[tuple, tuple] = {}

    @torch.no_grad()
    def run(
        self,
        tokenizer,
        batches: Iterable,
        rank: int = 0,
        world_size: int = 1,
        progress: bool = True,
        reference: tuple | None = None,
    ) -> ReconResult:
        """Collective when torch.distributed is initialised. ``reference`` = (mu, sigma) of these very crops
        from an earlier pass, which skips encoding the originals with the Inception again."""
        cfg, dev = self.cfg, self.device
        if self.reference is not None:
            reference = (self.reference.mu, self.reference.sigma)
        was_training = tokenizer.training
        tokenizer.eval()
        param = next(tokenizer.parameters(), None)
        model_dtype = param.dtype if param is not None else torch.float32
        usage = CodeUsage(tokenizer.codebook_size, dev)
        rec_stats = GaussianStats(FEATURE_DIM, dev) if self.inception is not None else None
        crop_stats = (
            GaussianStats(FEATURE_DIM, dev) if self.inception is not None and reference is None else None
        )
        isc = InceptionScore(cfg.is_splits, device=dev, rank=rank, world_size=world_size)
        sums = torch.zeros(len(_SUMS), dtype=torch.float64, device=dev)
        grid_orig, grid_rec, resolution = [], [], None

        bar = None
        if progress and rank == 0:
            from tqdm import tqdm

            bar = tqdm(
                desc="eval recon", unit="img", total=len(batches) if hasattr(batches, "__len__") else None
            )
        for batch in lockstep(batches, dev):
            if batch is None:  # this rank is done, a peer is not: keep the module's collectives matched
                size = resolution or tokenizer.image_size
                tokenizer.decode(
                    tokenizer.encode(torch.zeros(1, 3, size, size, device=dev, dtype=model_dtype))
                )
                continue
            images, _ = split_batch(batch)
            images = images.to(dev, non_blocking=True).float()
            if resolution is None:
                resolution = int(images.shape[-1])
                self._check_reference(resolution)
            codes = tokenizer.encode(images.to(model_dtype))
            recon = tokenizer.decode(codes).float()
            usage.update(codes)

            # Every image metric is computed on the uint8 images the published scripts produce.
            u_orig, u_rec = quantize_uint8(images), quantize_uint8(recon)
            x01, y01 = u_orig.double() / 255.0, u_rec.double() / 255.0
            sums[0] += images.shape[0]
            sums[1] += psnr_per_image(x01, y01).sum()
            sums[2] += ssim_per_image(x01, y01, 1.0).sum()
            sums[3] += ssim_per_image(x01, y01, 2.0).sum()
            if self.lpips is not None:
                to_pm1 = lambda u: u.float() / 127.5 - 1.0  # noqa: E731
                sums[4] += self.lpips(to_pm1(u_orig), to_pm1(u_rec)).double().sum()
            if self.inception is not None:
                # One forward for both halves keeps the GPU busy with twice the batch.
                pool, logits = self.inception(u_rec if crop_stats is None else torch.cat([u_rec, u_orig]))
                n = images.shape[0]
                rec_stats.update(pool[:n])
                isc.update(logits[:n], batch_indices(batch))
                if crop_stats is not None:
                    crop_stats.update(pool[n:])
            if rank == 0 and sum(t.shape[0] for t in grid_orig) < cfg.num_grid_images:
                take = cfg.num_grid_images - sum(t.shape[0] for t in grid_orig)
                grid_orig.append(u_orig[:take].cpu())
                grid_rec.append(u_rec[:take].cpu())
            if bar is not None:
                bar.update(images.shape[0])
        if bar is not None:
            bar.close()
        tokenizer.train(was_training)

        distributed = dist.is_initialized() and dist.get_world_size() > 1
        if distributed:
            dist.all_reduce(sums)
        usage.all_reduce()
        num = int(sums[0].item())
        if num == 0:
            raise ValueError("the evaluation stream yielded no images")
        metrics = {
            "num_samples": num,
            "psnr": float(sums[1] / num),
            "ssim_dr1": float(sums[2] / num),
            "ssim_dr2": float(sums[3] / num),
            **usage.compute(),
            "codebook_size": tokenizer.codebook_size,
        }
        if self.lpips is not None:
            metrics["lpips"] = float(sums[4] / num)
        meta = StatsMeta(resolution=resolution, count=num)
        if self.inception is not None:
            rec_stats.all_reduce()
            metrics["is_mean"], metrics["is_std"] = isc.compute()
            if isc.undefined_reason:
                metrics["is_undefined_reason"] = isc.undefined_reason
            mu, sigma = rec_stats.mean_cov()
            if crop_stats is not None:
                crop_stats.all_reduce()
                reference = crop_stats.mean_cov()
            warn_if_few_samples(num)
            metrics["rfid"] = frechet_distance(mu, sigma, *reference)
        grid = None
        if rank == 0 and grid_orig:
            grid = image_grid(
                to_unit(torch.cat(grid_orig)), to_unit(torch.cat(grid_rec)), n=cfg.num_grid_images, padding=2
            )
        return ReconResult(
            metrics=metrics, grid=grid, meta=meta, crop_stats=reference if crop_stats is not None else None
        )

    def _check_reference(self, resolution: int) -> None:
        if self.reference is not None:
            check_compatible(self.reference, StatsMeta(resolution=resolution), force=self.cfg.force)


def evaluate_reconstruction(
    tokenizer,
    stream_or_loader: Iterable,
    cfg: EvalConfig,
    rank: int = 0,
    world_size: int = 1,
    lpips_module=None,
    progress: bool = True,
    evaluator: ReconEvaluator | None = None,
) -> dict[str, float]:
    """Metrics over everything the stream yields on every rank (rfid, is_mean, is_std, psnr, ssim_dr1,
    ssim_dr2, lpips, codebook_usage, code_entropy [bits], code_perplexity, num_samples). Collective when
    torch.distributed is initialised: every rank calls it and gets the same numbers."""
    if evaluator is None:
        device = next(tokenizer.parameters()).device
        evaluator = ReconEvaluator(cfg, device, lpips_module)
    return evaluator.run(tokenizer, stream_or_loader, rank, world_size, progress).metrics


# Scalars a trainer logs every N steps (the issue asks for rFID, PSNR and usage; the rest are as cheap).
TRAINING_SCALARS = ("rfid", "psnr", "ssim_dr1", "lpips", "codebook_usage", "code_perplexity", "is_mean")


def evaluate_in_training(
    evaluator: ReconEvaluator,
    tokenizer,
    data_cfg,
    step: int,
    logger,
    rank: int,
    world_size: int,
    num_samples: int | None = None,
) -> dict[str, float]:
    """The trainer's periodic evaluation on the first ``num_samples`` evaluation images (default
    ``evaluator.cfg.train_num_samples``): logs ``eval/<metric>`` scalars and an ``eval/reconstructions`` grid
    through the rank-0 MetricLogger and returns the metrics. Collective: every rank calls it."""
    from tokscale.data.stream import EvalStream

    n = num_samples or evaluator.cfg.train_num_samples
    stream = EvalStream(data_cfg, rank, world_size, max_samples=n)
    # The subset is the same at every evaluation (same shards, resolution and count), so its crop statistics
    # are computed once.
    key = (str(data_cfg.eval_shards), int(data_cfg.resolution), n)
    result = evaluator.run(
        tokenizer, stream, rank, world_size, progress=False, reference=evaluator.training_reference.get(key)
    )
    if result.crop_stats is not None:
        evaluator.training_reference[key] = result.crop_stats
    scalars = {
        f"eval/{k}": v
        for k, v in result.metrics.items()
        if k in TRAINING_SCALARS and v is not None and not math.isnan(v)
    }
    logger.scalars(step, scalars)
    if result.grid is not None:
        logger.image(step, "eval/reconstructions", result.grid)
    return result.metrics
