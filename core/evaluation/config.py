"""Settings for reconstruction evaluation (``tokscale eval recon`` and the trainer's periodic evaluation)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EvalConfig:
    # Local path to torch-fidelity's converted TF Inception (weights-inception-2015-12-05-6726825d.pth);
    # required for rFID and IS. Never downloaded.
    inception_weights: str = ""
    # An ADM-format npz (mu, sigma) to compare against; "" computes the reference from the same evaluation
    # crops in the same pass (the published rFID protocol).
    reference_stats: str = ""
    # How many evaluation images (the stream stops there); published rFID uses the 50,000 ImageNet val images.
    num_samples: int = 50000
    # Images per rank per forward pass of the tokenizer and the Inception.
    batch_size: int = 50
    # Compare against reference statistics made with another resolution or protocol anyway.
    force: bool = False
    # Inception Score splits (torch-fidelity and the ADM evaluator use 10).
    is_splits: int = 10
    # Metrics to skip: LPIPS needs the VGG weights; FID/IS need the Inception weights.
    compute_fid: bool = True
    compute_lpips: bool = True
    # Local torchvision vgg16 state dict for LPIPS (tokscale.tokenizers.perceptual reads it); required when
    # compute_lpips is set and the caller does not pass its own LPIPS module.
    lpips_vgg_weights: str = ""
    # Images per rank 0 shown as originals beside reconstructions in the grid.
    num_grid_images: int = 8
    # Trainer cadence: evaluate every N optimizer steps on the first `train_num_samples` images (0 = never).
    every_steps: int = 0
    train_num_samples: int = 1000

    def __post_init__(self):
        for key in ("num_samples", "batch_size", "is_splits"):
            if getattr(self, key) < 1:
                raise ValueError(f"eval.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("num_grid_images", "every_steps", "train_num_samples"):
            if getattr(self, key) < 0:
                raise ValueError(f"eval.{key} must be >= 0, got {getattr(self, key)}")
