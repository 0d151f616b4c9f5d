"""Evaluation per prefix length of a 1D tokenizer: DetailFlow's coarse-to-fine curve.

    tokscale eval prefixes runs/detailflow-tiny --data embedded --out eval/prefixes --lengths 1,2,4,8,16,32
    tokscale eval prefixes exports/df-128 --data '/data/in1k/val-{000000..000049}.tar' \\
        --inception-weights pt_inception-2015-12-05-6726825d.pth --out eval/df-128-prefixes --nproc 8

Every evaluation image (ADM centre crop at the tokenizer's resolution H, as ``eval recon``) is encoded once; for
each prefix length t its first t codes are decoded -- at ``decoder_size(t)`` for a DetailFlow tokenizer, at H for
any other 1D tokenizer -- and compared with

- the original at H, after a bicubic upsampling of the decoded prefix: ``psnr``, ``ssim`` (data range 1, eval
  recon's ``ssim_dr1``) and, with Inception weights, ``rfid`` against the same crops (or ``eval.reference_stats``):
  the coarse-to-fine curve a user sees;
- the degraded target the tokenizer was trained towards (the original area-downsampled to R(t), then bicubic-
  upsampled to the decoder size; the original itself for a tokenizer without the schedule): ``target_psnr``,
  ``target_ssim``.

Images go to uint8 first (clamp(127.5 x + 128)), as in ``eval recon``. Ranks evaluate their share of the stream
and merge running sums at the end; rank 0 writes ``metrics.json`` (a row per t: R(t), decoder size, metrics),
``prefixes.csv``, ``curve.png`` (PSNR, and rFID when computed, against t) and ``grid.png`` (a few images decoded
at every t, upsampled to H, beside the original). Lengths must be admissible: 1 .. group, then multiples of
the group for a DetailFlow tokenizer (:func:`tokscale.tokenizers.detailflow.admissible_lengths`), 1 .. N for
another 1D tokenizer; the default is the admissible powers of two and N.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tokscale.evaluation.config import EvalConfig
from tokscale.evaluation.image_metrics import psnr_per_image, ssim_per_image
from tokscale.evaluation.inception import quantize_uint8
from tokscale.tokenizers.detailflow import admissible_lengths, decoder_size, degrade, resolution

log = logging.getLogger(__name__)

# Per-length sums reduced across ranks, in this order (the image count is kept once, beside them).
_SUMS = ("psnr", "ssim", "target_psnr", "target_ssim")
CSV_COLUMNS = ("t", "resolution", "decoder_size", "psnr", "ssim", "target_psnr", "target_ssim", "rfid")


# ----------------------------------------------------------------------------------------------------------------
# which prefixes


def _scale_ends(model_cfg) -> list[int] | None:
    """The code counts that end each scale of a multi-scale tokenizer (1, 5, 14, ..., L), else None."""
    if model_cfg.kind != "2d" or model_cfg.quantizer.kind != "multiscale":
        return None
    ends, total = [], 0
    for p in model_cfg.quantizer.scales:
        total += p * p
        ends.append(total)
    return ends


def allowed_lengths(model_cfg) -> list[int]:
    """The prefix lengths a tokenizer (its TokenizerConfig) decodes: DetailFlow's admissible ones, 1 .. N for
    another 1D tokenizer, the scale boundaries of a multi-scale one (every prefix decodes at full size). Any other
    2D tokenizer decodes only its whole grid: a ValueError."""
    ends = _scale_ends(model_cfg)
    if ends is not None:
        return ends
    if model_cfg.kind != "1d":
        raise ValueError(
            f"prefix evaluation needs a 1D or multi-scale tokenizer; this one is {model_cfg.kind!r} with "
            f"quantizer.kind {model_cfg.quantizer.kind!r}, whose decoder takes exactly its full grid of tokens"
        )
    n = model_cfg.num_tokens
    if model_cfg.detailflow.enabled:
        return admissible_lengths(n, model_cfg.group_size)
    return list(range(1, n + 1))


def prefix_lengths(model_cfg, requested: Sequence[int] | None = None) -> list[int]:
    """The lengths to evaluate, ascending: ``requested`` (each checked against :func:`allowed_lengths`; a
    ValueError names the value and what is allowed) or, when empty, the allowed powers of two and N."""
    allowed = allowed_lengths(model_cfg)
    if not requested and _scale_ends(model_cfg) is not None:
        return allowed  # every scale
    if not requested:
        n = allowed[-1]
        return sorted({t for t in allowed if t & (t - 1) == 0} | {n})
    bad = [t for t in requested if t not in allowed]
    if bad:
        n, g = model_cfg.num_tokens, model_cfg.group_size
        if _scale_ends(model_cfg) is not None:
            what, expected = "a multi-scale tokenizer", f"a scale boundary, one of {allowed}"
        elif model_cfg.detailflow.enabled:
            what, expected = "a DetailFlow tokenizer", f"1..{g}, then multiples of {g} up to {n}"
        else:
            what, expected = "this 1D tokenizer", f"1..{n}"
        raise ValueError(
            f"prefix length {bad[0]} is not admissible for {what} with {n} tokens: expected {expected}"
        )
    return sorted(set(int(t) for t in requested))


def schedule_of(model_cfg, t: int) -> tuple[int, int]:
    """(R(t), decoder size) of prefix t: DetailFlow's schedule, or (H, H) for a tokenizer without one."""
    h = model_cfg.image_size
    d = model_cfg.detailflow
    if not d.enabled:
        return h, h
    n, patch = model_cfg.num_tokens, model_cfg.cnn.downsample
    return resolution(t, n, h, d.power), decoder_size(t, n, h, d.power, patch)


# ----------------------------------------------------------------------------------------------------------------
# the evaluation


@dataclass
class PrefixResult:
    rows: list[dict]  # one per length, ascending t
    num_samples: int
    grid: list[torch.Tensor] | None  # rank 0: per length (K, 3, H, H) uint8 upsampled decodes, then the originals


def _upsample(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size:
        return images
    return F.interpolate(images.float(), size=(size, size), mode="bicubic", align_corners=False)


class PrefixEvaluator:
    """Holds the frozen Inception and the reference statistics (when rFID is computed)."""

    def __init__(self, cfg: EvalConfig, device: str | torch.device = "cpu"):
        from tokscale.evaluation.fid import load_stats
        from tokscale.evaluation.inception import load_inception

        self.cfg = cfg
        self.device = torch.device(device)
        self.inception = load_inception(cfg.inception_weights, self.device) if cfg.compute_fid else None
        self.reference = load_stats(cfg.reference_stats) if cfg.compute_fid and cfg.reference_stats else None

    @torch.no_grad()
    def run(
        self,
        tokenizer,
        batches: Iterable,
        lengths: Sequence[int],
        rank: int = 0,
        progress: bool = True,
        num_grid_images: int = 2,
    ) -> PrefixResult:
        """Collective when torch.distributed is initialised: every rank calls it with its share of the stream
        and gets the same rows."""
        from tokscale.evaluation.fid import FEATURE_DIM, GaussianStats, StatsMeta, check_compatible
        from tokscale.evaluation.lockstep import split_batch

        dev, mcfg = self.device, tokenizer.config
        h = mcfg.image_size
        schedule = {t: schedule_of(mcfg, t) for t in lengths}
        was_training = tokenizer.training
        tokenizer.eval()
        param = next(tokenizer.parameters(), None)
        model_dtype = param.dtype if param is not None else torch.float32
        count = torch.zeros((), dtype=torch.float64, device=dev)
        sums = torch.zeros(len(lengths), len(_SUMS), dtype=torch.float64, device=dev)
        rec_stats = [GaussianStats(FEATURE_DIM, dev) for _ in lengths] if self.inception is not None else None
        crop_stats = None
        if self.inception is not None and self.reference is None:
            crop_stats = GaussianStats(FEATURE_DIM, dev)
        elif self.reference is not None:  # before any work: a reference of another protocol is refused
            check_compatible(self.reference, StatsMeta(resolution=h), force=self.cfg.force)
        grid = [[] for _ in range(len(lengths) + 1)] if rank == 0 and num_grid_images > 0 else None
        bar = None
        if progress and rank == 0:
            from tqdm import tqdm

            total = len(batches) if hasattr(batches, "__len__") else None
            bar = tqdm(desc=f"eval prefixes ({len(lengths)} lengths)", unit="img", total=total)
        for batch in batches:
            images, _ = split_batch(batch)
            images = images.to(dev, non_blocking=True).float()
            if images.shape[-1] != h or images.shape[-2] != h:
                raise ValueError(f"images of {tuple(images.shape[-2:])} px; the tokenizer works at {h}x{h}")
            codes = tokenizer.encode(images.to(model_dtype))
            u_orig = quantize_uint8(images)
            x01 = u_orig.double() / 255.0
            count += images.shape[0]
            if crop_stats is not None:
                crop_stats.update(self.inception(u_orig)[0])
            take = 0
            if grid is not None:
                take = min(images.shape[0], num_grid_images - sum(g.shape[0] for g in grid[-1]))
                if take > 0:
                    grid[-1].append(u_orig[:take].cpu())
            for i, t in enumerate(lengths):
                res, size = schedule[t]
                rec = tokenizer.decode(codes[:, :t]).float()
                if rec.shape[-1] != size:  # an invariant of the tokenizer's prefix decoding
                    raise AssertionError(f"prefix {t} decoded at {rec.shape[-1]} px, the schedule says {size}")
                u_full = quantize_uint8(_upsample(rec, h))
                y01 = u_full.double() / 255.0
                sums[i, 0] += psnr_per_image(x01, y01).sum()
                sums[i, 1] += ssim_per_image(x01, y01, 1.0).sum()
                target01 = quantize_uint8(degrade(images, res, size)).double() / 255.0
                rec01 = quantize_uint8(rec).double() / 255.0
                sums[i, 2] += psnr_per_image(target01, rec01).sum()
                sums[i, 3] += ssim_per_image(target01, rec01, 1.0).sum()
                if rec_stats is not None:
                    rec_stats[i].update(self.inception(u_full)[0])
                if take > 0:
                    grid[i].append(u_full[:take].cpu())
            if bar is not None:
                bar.update(images.shape[0])
        if bar is not None:
            bar.close()
        tokenizer.train(was_training)

        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(count)
            dist.all_reduce(sums)
        num = int(count.item())
        if num == 0:
            raise ValueError("the evaluation stream yielded no images")
        means = (sums / num).tolist()
        rows = []
        for i, t in enumerate(lengths):
            res, size = schedule[t]
            rows.append({"t": t, "resolution": res, "decoder_size": size, **dict(zip(_SUMS, means[i]))})
        if rec_stats is not None:
            from tokscale.evaluation.fid import frechet_distance, warn_if_few_samples

            if self.reference is not None:
                reference = (self.reference.mu, self.reference.sigma)
            else:
                crop_stats.all_reduce()
                reference = crop_stats.mean_cov()
            warn_if_few_samples(num)
            for row, stats in zip(rows, rec_stats):
                stats.all_reduce()
                row["rfid"] = frechet_distance(*stats.mean_cov(), *reference)
        images = [torch.cat(g) for g in grid] if grid and grid[-1] else None
        return PrefixResult(rows=rows, num_samples=num, grid=images)


# ----------------------------------------------------------------------------------------------------------------
# the outputs


def grid_image(columns: list[torch.Tensor], labels: list[str], min_cell: int = 128):
    """A PIL image: one row per image, one column per (K, 3, H, W) uint8 batch, a label above each column.
    Cells below ``min_cell`` px are enlarged (nearest) so that small images stay visible."""
    from PIL import Image, ImageDraw

    from tokscale.plot import font

    k, h = columns[0].shape[0], columns[0].shape[-1]
    scale = max(1, math.ceil(min_cell / h))
    cell, pad, head = h * scale, 4, 36
    img = Image.new("RGB", (len(columns) * (cell + pad) + pad, head + k * (cell + pad) + pad), "white")
    draw = ImageDraw.Draw(img)
    f = font(12)
    for j, (col, label) in enumerate(zip(columns, labels)):
        x = pad + j * (cell + pad)
        for line, text in enumerate(label.split("\n")):
            draw.text((x + cell / 2, 4 + 15 * line), text, fill="black", font=f, anchor="ma")
        for r in range(k):
            tile = Image.fromarray(col[r].permute(1, 2, 0).numpy())
            if scale > 1:
                tile = tile.resize((cell, cell), Image.NEAREST)
            img.paste(tile, (x, head + pad + r * (cell + pad)))
    return img


def curve_image(rows: list[dict], title: str):
    """PSNR (against the original and against the degraded target) and, when computed, rFID against t."""
    from tokscale.plot import Series, line_chart

    ts = [r["t"] for r in rows]
    panels = [
        {
            "series": [
                Series("vs original (prefix upsampled)", ts, [r["psnr"] for r in rows]),
                Series("vs degraded target R(t)", ts, [r["target_psnr"] for r in rows]),
            ],
            "xlabel": "prefix length t (tokens)",
            "ylabel": "PSNR (dB, higher is better)",
            "log2_x": True,
        }
    ]
    if any(r.get("rfid") is not None for r in rows):
        panels.append(
            {
                "series": [Series("rFID vs original crops", ts, [r.get("rfid") for r in rows])],
                "xlabel": "prefix length t (tokens)",
                "ylabel": "rFID (lower is better)",
                "log2_x": True,
            }
        )
    caption = "each prefix decoded at its scheduled size, upsampled (bicubic) to the image size for the comparison"
    return line_chart(panels, title, caption)


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for row in rows:
            writer.writerow(["" if row.get(k) is None else row[k] for k in CSV_COLUMNS])


def run_prefixes(cfg, rank: int, world: int, device) -> dict:
    """The ``prefixes`` task of tokscale.tokenizers.eval_runner: evaluate, then rank 0 writes the outputs into
    ``cfg.run_dir``."""
    from tokscale.data.stream import EvalStream
    from tokscale.export import weights_sha256
    from tokscale.jsonio import strict_dumps
    from tokscale.tokenizers.eval_runner import _checkpoint_step, _load_tokenizer, _stream_cfg

    tok = _load_tokenizer(cfg, device)
    mcfg = tok.config
    lengths = prefix_lengths(mcfg, cfg.prefix_lengths)
    stream = EvalStream(_stream_cfg(cfg), rank, world, max_samples=cfg.eval.num_samples)
    start = time.time()
    result = PrefixEvaluator(cfg.eval, device).run(
        tok, stream, lengths, rank, progress=True, num_grid_images=min(cfg.eval.num_grid_images, 2)
    )
    if rank == 0:
        out = Path(cfg.run_dir)
        out.mkdir(parents=True, exist_ok=True)
        name = Path(str(cfg.tokenizer).rstrip("/")).name
        d = mcfg.detailflow
        report = {
            "rows": result.rows,
            "num_samples": result.num_samples,
            "tokenizer": str(cfg.tokenizer),
            "weights_sha256": weights_sha256(cfg.tokenizer),
            "step": _checkpoint_step(cfg.tokenizer),
            "num_tokens": mcfg.tokens,
            "image_size": mcfg.image_size,
            "schedule": (
                {"power": d.power, "group_size": mcfg.group_size, "patch": mcfg.cnn.downsample}
                if d.enabled else None
            ),  # fmt: skip
            "data": cfg.data.eval_shards,
            "reference": (cfg.eval.reference_stats or "same evaluation crops") if cfg.eval.compute_fid else None,
            "world_size": world,
            "seconds": round(time.time() - start, 1),
        }
        (out / "metrics.json").write_text(strict_dumps(report, indent=2) + "\n")
        write_csv(result.rows, out / "prefixes.csv")
        title = f"{name}: reconstruction from the first t of {mcfg.tokens} tokens ({mcfg.image_size} px)"
        curve_image(result.rows, title).save(out / "curve.png")
        if result.grid is not None:
            labels = [f"t={r['t']}\nR={r['resolution']}, {r['decoder_size']} px" for r in result.rows]
            labels.append(f"original\n{mcfg.image_size} px")
            grid_image(result.grid, labels).save(out / "grid.png")
        log.info("prefix metrics written to %s", out / "metrics.json")
    return {"rows": result.rows, "num_samples": result.num_samples}
