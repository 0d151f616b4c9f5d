"""Per-image reconstruction metrics (PSNR, SSIM) and codebook usage, as the published evaluations compute them.

- PSNR: per image, both images uint8-quantised and scaled to [0, 1], data range 1 (scikit-image's
  ``peak_signal_noise_ratio`` on such images), then averaged over images.
- SSIM: scikit-image's ``structural_similarity`` defaults (7x7 uniform window, K1 0.01, K2 0.03, sample
  covariance, the 3-pixel border left out of the mean, channels averaged). LlamaGen/GigaTok call it with
  ``data_range=2.0`` on [0, 1] images, which inflates it; both that (``ssim_dr2``) and the correct data range 1
  (``ssim_dr1``) are reported.
- Codebook usage: unique codes over the whole evaluation set / K, the entropy of the code histogram in bits and
  its perplexity 2^H (the number of equally used codes with the same entropy).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tokscale.evaluation.inception import quantize_uint8

SSIM_WINDOW = 7


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images -> uint8 quantised -> float64 in [0, 1], the form PSNR/SSIM are computed on."""
    return quantize_uint8(images).to(torch.float64) / 255.0


def psnr_per_image(x01: torch.Tensor, y01: torch.Tensor) -> torch.Tensor:
    """(B,) PSNR in dB between images in [0, 1] (data range 1); inf for identical images."""
    mse = (x01.to(torch.float64) - y01.to(torch.float64)).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(1.0 / mse)


def ssim_per_image(x01: torch.Tensor, y01: torch.Tensor, data_range: float) -> torch.Tensor:
    """(B,) SSIM of (B, C, H, W) images, matching skimage.metrics.structural_similarity(x, y,
    data_range=data_range, channel_axis=-1) with its defaults."""
    if min(x01.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(
            f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {tuple(x01.shape[-2:])}"
        )
    x, y = x01.to(torch.float64), y01.to(torch.float64)

    # A valid (unpadded) 7x7 mean filter gives exactly the pixels skimage keeps after cropping its border.
    def mean_filter(t):
        return F.avg_pool2d(t, SSIM_WINDOW, stride=1)

    ux, uy = mean_filter(x), mean_filter(y)
    uxx, uyy, uxy = mean_filter(x * x), mean_filter(y * y), mean_filter(x * y)
    n = SSIM_WINDOW * SSIM_WINDOW
    cov_norm = n / (n - 1)  # sample covariance, skimage's default
    vx = cov_norm * (uxx - ux * ux)
    vy = cov_norm * (uyy - uy * uy)
    vxy = cov_norm * (uxy - ux * uy)
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


class CodeUsage:
    """Histogram of code indices over the evaluation set, all-reduced across ranks."""

    def __init__(self, codebook_size: int, device: str | torch.device = "cpu"):
        self.codebook_size = codebook_size
        self.hist = torch.zeros(codebook_size, dtype=torch.int64, device=device)

    def update(self, codes: torch.Tensor) -> None:
        flat = codes.reshape(-1).to(self.hist.device, torch.int64)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.codebook_size):
            raise ValueError(
                f"code indices outside [0, {self.codebook_size}): {int(flat.min())}..{int(flat.max())}"
            )
        self.hist += torch.bincount(flat, minlength=self.codebook_size)

    def all_reduce(self) -> None:
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.hist)

    def compute(self) -> dict[str, float]:
        total = int(self.hist.sum())
        if total == 0:
            return {"codebook_usage": 0.0, "code_entropy": 0.0, "code_perplexity": 0.0}
        p = self.hist.to(torch.float64) / total
        nz = p[p > 0]
        entropy_bits = float(-(nz * nz.log2()).sum())
        return {
            "codebook_usage": float((self.hist > 0).sum()) / self.codebook_size,
            "code_entropy": entropy_bits,
            "code_perplexity": 2.0**entropy_bits,
        }
