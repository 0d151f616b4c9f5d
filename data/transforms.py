"""Image transforms of the reference pipelines, on PIL images, returning float32 CHW tensors in [-1, 1].

- ADM centre crop (the evaluation protocol of ADM, LlamaGen and GigaTok): halve with a BOX filter while the
  short side is at least twice the target, resize the short side to the target with BICUBIC, cut the centre.
- Random crop at a ratio (tokenizer training in LlamaGen and GigaTok): the same resize but to
  ``resolution * crop_ratio`` on the short side, then a uniformly placed ``resolution`` square.
- Random short side (GigaTok's tokenizer training): the short side to a uniform integer in
  [resolution, ceil(resolution * crop_ratio)] (256-320 px for 256 px at ratio 1.25), then a uniformly placed
  ``resolution`` square.
- Horizontal flip with probability 1/2.

Randomness comes from a ``random.Random`` the caller seeds per sample, so a sample's crop does not depend on
which worker decoded it or on what was decoded before it (the resume guarantee relies on that).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

CROPS = ("random", "random_resize", "adm_center")


def _shrink_then_resize(img: Image.Image, short_side: int) -> Image.Image:
    """Short side to ``short_side`` pixels: BOX halvings first (cheap and alias-free), then one BICUBIC resize."""
    while min(img.size) >= 2 * short_side:
        img = img.resize((img.size[0] // 2, img.size[1] // 2), resample=Image.BOX)
    w, h = img.size
    scale = short_side / min(w, h)
    # The short side lands exactly on short_side; the long side rounds.
    size = (
        (short_side, max(short_side, round(h * scale)))
        if w <= h
        else (max(short_side, round(w * scale)), short_side)
    )
    return img.resize(size, resample=Image.BICUBIC)


def adm_center_crop(img: Image.Image, resolution: int) -> np.ndarray:
    """uint8 HWC array of the ADM centre crop."""
    arr = np.asarray(_shrink_then_resize(img, resolution))
    top = (arr.shape[0] - resolution) // 2
    left = (arr.shape[1] - resolution) // 2
    return arr[top : top + resolution, left : left + resolution]


def random_crop_at_ratio(
    img: Image.Image, resolution: int, crop_ratio: float, rng: random.Random
) -> np.ndarray:
    """uint8 HWC array: short side to round(resolution * crop_ratio), then a random resolution square."""
    arr = np.asarray(_shrink_then_resize(img, max(resolution, round(resolution * crop_ratio))))
    top = rng.randint(0, arr.shape[0] - resolution)
    left = rng.randint(0, arr.shape[1] - resolution)
    return arr[top : top + resolution, left : left + resolution]


def random_resize_crop(
    img: Image.Image, resolution: int, crop_ratio: float, rng: random.Random
) -> np.ndarray:
    """uint8 HWC array: short side to a random integer in [resolution, ceil(resolution * crop_ratio)], then a
    random resolution square."""
    short_side = rng.randint(resolution, math.ceil(resolution * crop_ratio - 1e-9))
    arr = np.asarray(_shrink_then_resize(img, short_side))
    top = rng.randint(0, arr.shape[0] - resolution)
    left = rng.randint(0, arr.shape[1] - resolution)
    return arr[top : top + resolution, left : left + resolution]


def to_tensor(arr: np.ndarray) -> torch.Tensor:
    """uint8 HWC -> float32 CHW in [-1, 1] (x / 127.5 - 1, the inverse of the evaluators' clamp(127.5x + 128))."""
    # In numpy, single-threaded: torch's elementwise ops on a permuted view were the slowest step of the
    # pipeline on a busy CPU (thread start-up and strided access per small image).
    chw = np.ascontiguousarray(arr.transpose(2, 0, 1), dtype=np.float32)
    chw /= 127.5
    chw -= 1.0
    return torch.from_numpy(chw)


@dataclass(frozen=True)
class ImageTransform:
    resolution: int = 256
    crop: str = "random"
    crop_ratio: float = 1.1
    hflip: bool = True

    def __post_init__(self) -> None:
        if self.crop not in CROPS:
            raise ValueError(f"crop={self.crop!r}: expected one of {list(CROPS)}")
        if self.resolution < 8:
            raise ValueError(f"resolution={self.resolution}: expected at least 8 pixels")
        if self.crop_ratio < 1.0:
            raise ValueError(f"crop_ratio={self.crop_ratio}: expected >= 1.0")

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        rng = rng or random.Random(0)
        if self.crop == "adm_center":
            arr = adm_center_crop(img, self.resolution)
        elif self.crop == "random_resize":
            arr = random_resize_crop(img, self.resolution, self.crop_ratio, rng)
        else:
            arr = random_crop_at_ratio(img, self.resolution, self.crop_ratio, rng)
        if self.hflip and rng.random() < 0.5:
            arr = arr[:, ::-1]
        return to_tensor(arr)
