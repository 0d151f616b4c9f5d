"""The embedded demo's tokenizer stage: train 2d-tiny on the embedded real-image dataset and show that it learned.

    tokscale demo --skip-ar                        # this stage alone
    tokscale demo --skip-ar --run-dir runs/demo2 train.max_steps=100

It measures PSNR, SSIM and codebook usage on held-out embedded images with the initial weights, trains
(``conf/tokenizer/demo.yaml``), measures again with the trained weights, and writes into the run directory:
``demo_metrics.json`` (start, end and the gains, and the PSNR of the held-out images' mean image, which a
decoder that ignores its codes reaches), ``demo_reconstruction.png`` (originals above reconstructions, start then
end) and the TensorBoard logs under ``tb/``. `tokscale demo` then runs the AR stages on this tokenizer
(tokscale.autoregressive.demo, which registers the command: the AR side may import this module, not the reverse).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from tokscale.images import image_grid, save_png, to_unit
from tokscale.jsonio import strict_dumps
from tokscale.tokenizers.train import load_train_config, main

NUM_EVAL_IMAGES = 64
METRICS = "demo_metrics.json"


def eval_images(cfg) -> torch.Tensor:
    from tokscale.data.stream import EvalStream

    images = []
    for batch, *_ in EvalStream(cfg.data, rank=0, world_size=1, max_samples=NUM_EVAL_IMAGES):
        images.append(batch)
    return torch.cat(images)


@torch.no_grad()
def measure(model, images: torch.Tensor) -> tuple[dict, torch.Tensor]:
    from tokscale.evaluation.image_metrics import psnr_per_image, ssim_per_image, to_unit_float

    model.eval()
    recons, codes = [], []
    for chunk in images.split(16):
        c = model.encode(chunk)
        codes.append(c)
        recons.append(model.decode(c).float().clamp(-1, 1))
    recon = torch.cat(recons)
    codes = torch.cat(codes)
    x01, r01 = to_unit_float(images), to_unit_float(recon)  # uint8-quantised, as published
    used = codes.unique().numel()
    return {
        "psnr": float(psnr_per_image(x01, r01).mean()),
        "ssim": float(ssim_per_image(x01, r01, data_range=1.0).mean()),
        "codebook_usage": used / model.codebook_size,
        "codes_used": used,
    }, recon


def demo(run_dir: str, overrides: list[str]) -> dict:
    from tokscale.tokenizers.load import load_tokenizer
    from tokscale.tokenizers.model import VQTokenizer

    started = time.time()
    cfg = load_train_config("tokenizer/demo", [f"run_dir={run_dir}", *overrides])
    images = eval_images(cfg)
    torch.manual_seed(cfg.train.seed)  # the same initial weights the trainer starts from
    start, recon_start = measure(VQTokenizer(cfg.model, with_projector=False), images)

    t0 = time.time()
    result = main(cfg)
    seconds = time.time() - t0

    end, recon_end = measure(load_tokenizer(run_dir), images)
    report = {
        "preset": cfg.model.preset,
        "image_size": cfg.model.image_size,
        "steps": result["step"],
        "train_seconds": round(seconds, 1),
        "eval_images": int(images.shape[0]),
        "start": start,
        "end": end,
        "psnr_gain_db": end["psnr"] - start["psnr"],
        "ssim_gain": end["ssim"] - start["ssim"],
        "mean_image_psnr": mean_image_psnr(images),
    }
    out = Path(run_dir)
    grid = image_grid(to_unit(images), to_unit(recon_start), to_unit(recon_end))
    save_png(grid, out / "demo_reconstruction.png")
    report["files"] = {
        "metrics": str(out / METRICS),
        "grid": str(out / "demo_reconstruction.png"),
        "tensorboard": str(out / "tb"),
    }
    report["seconds"] = round(time.time() - started, 1)
    (out / METRICS).write_text(strict_dumps(report, indent=2) + "\n")
    return report


def mean_image_psnr(images: torch.Tensor) -> float:
    """PSNR of the images' per-pixel mean image against each of them: where a decoder that ignores its codes
    ends up (the GigaTok networks at the demo's earlier lr 1e-3 stayed there); the gain beyond it is what the
    codes carry."""
    from tokscale.evaluation.image_metrics import psnr_per_image, to_unit_float

    mean = images.float().mean(0, keepdim=True).expand_as(images)
    return float(psnr_per_image(to_unit_float(images), to_unit_float(mean)).mean())
