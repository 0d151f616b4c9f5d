"""The one image-grid helper: rows of images side by side (originals above reconstructions), and a PNG writer.

grid = image_grid(to_unit(images), to_unit(recon))       # (3, 2H, 8W) in [0, 1]
save_png(grid, run_dir / "reconstruction.png")
"""

from __future__ import annotations

from pathlib import Path

import torch


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats or uint8 images -> float32 in [0, 1]."""
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    return images.float().add(1).div(2).clamp(0, 1)


def image_grid(*rows: torch.Tensor, n: int = 8, padding: int = 0, pad_value: float = 1.0) -> torch.Tensor:
    """Each row holds the first ``n`` images of one (B, 3, H, W) batch in [0, 1]; returns (3, H', W')."""
    from torchvision.utils import make_grid

    k = min([n, *(r.shape[0] for r in rows)])
    both = torch.cat([r[:k].float().cpu() for r in rows])
    return make_grid(both, nrow=k, padding=padding, pad_value=pad_value)


def save_png(grid_CHW: torch.Tensor, path: str | Path) -> None:
    from PIL import Image

    arr = (grid_CHW.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    Image.fromarray(arr).save(path)
