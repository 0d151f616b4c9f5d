"""Data loading benchmark: shards vs one file per image, same decode and crop.

    tokscale bench data --num-images 384 --resolution 256 --batch-size 32

Writes ``num_images`` JPEGs of ImageNet-like size (crops of scikit-image's bundled photographs, long side
500 px) into a temporary folder, converts them into shards with ``tokscale data shards``, then times full
passes of the training pipeline (PIL decode, random crop at 1.1x to ``resolution``, flip, batch) through
``TrainStream`` with 1 and 2 loader workers, and through a plain map-style folder loader with the same decode
and transform. Throughput counts the images after the first batch; the wait for the first batch (worker
start-up, shuffle-buffer fill) is reported apart.
"""

from __future__ import annotations

import os
import random
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from tokscale.data.embedded import PHOTOS, photo_dir
from tokscale.data.samples import RawSample, decode_image
from tokscale.data.shards import convert
from tokscale.data.stream import DataConfig, TrainStream
from tokscale.data.transforms import ImageTransform


def write_bench_images(folder: Path, num_images: int, seed: int = 0) -> list[Path]:
    rng = random.Random(seed)
    photos = [Image.open(photo_dir() / name).convert("RGB") for name in PHOTOS]
    paths = []
    for i in range(num_images):
        label = i % len(photos)
        photo = photos[label]
        w, h = photo.size
        side_w, side_h = int(w * rng.uniform(0.5, 1.0)), int(h * rng.uniform(0.5, 1.0))
        left, top = rng.randint(0, w - side_w), rng.randint(0, h - side_h)
        crop = photo.crop((left, top, left + side_w, top + side_h))
        scale = 500 / max(crop.size)
        crop = crop.resize(
            (max(1, round(crop.size[0] * scale)), max(1, round(crop.size[1] * scale))), Image.BICUBIC
        )
        path = folder / f"c{label:02d}" / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        crop.save(path, quality=90)
        paths.append(path)
    return paths


class FolderImages(Dataset):
    """The baseline: one file per image, read and decoded on demand."""

    def __init__(self, paths: list[Path], transform: ImageTransform, seed: int = 0):
        self.paths, self.transform, self.seed = paths, transform, seed

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        path = self.paths[i]
        raw = RawSample(str(path.parent), path.stem, {"jpg": path.read_bytes()})
        return self.transform(decode_image(raw), random.Random(self.seed * 1_000_003 + i)), int(
            path.parent.name[1:]
        )


def _time_batches(iterator, num_batches: int, batch_size: int) -> tuple[float, float]:
    """(seconds to the first batch, images/s over the remaining batches)."""
    start = time.perf_counter()
    next(iterator)
    first = time.perf_counter()
    for _ in range(num_batches - 1):
        next(iterator)
    return first - start, (num_batches - 1) * batch_size / (time.perf_counter() - first)


def _s(num: int) -> str:
    return "s" if num > 1 else ""


def run(num_images: int = 384, resolution: int = 256, batch_size: int = 32, workers=(1, 2)) -> dict:
    if num_images < 2 * batch_size:
        raise ValueError(f"num_images={num_images}: expected at least two batches of batch_size={batch_size}")
    num_batches = num_images // batch_size
    result: dict = {
        "benchmark": "data",
        "resolution": resolution,
        "batch_size": batch_size,
        "num_images": num_batches * batch_size,
        "source_images": "JPEG q90, long side 500 px",
        "pipeline": "PIL decode + random crop (short side x1.1, BICUBIC) + flip + batch",
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    transform = ImageTransform(resolution, "random", 1.1, True)
    with tempfile.TemporaryDirectory(prefix="tokscale-bench-data-") as tmp:
        folder = Path(tmp, "images")
        paths = write_bench_images(folder, num_images)
        manifest = convert(
            folder, Path(tmp, "shards"), samples_per_shard=max(1, num_images // 4), jobs=1, progress=False
        )
        pattern = str(Path(tmp, "shards", manifest["pattern"]))
        for w in workers:
            cfg = DataConfig(
                train_shards=pattern,
                resolution=resolution,
                batch_size=batch_size,
                num_workers=w,
                shuffle_buffer=min(256, num_images),
                batches_per_epoch=num_batches,
            )
            first, rate = _time_batches(iter(TrainStream(cfg, 0, 1)), num_batches, batch_size)
            result[f"shards_{w}_worker{_s(w)}_img_per_s"] = round(rate, 1)
            result[f"shards_{w}_worker{_s(w)}_first_batch_s"] = round(first, 3)
        for w in workers:
            loader = DataLoader(
                FolderImages(paths, transform),
                batch_size=batch_size,
                shuffle=True,
                num_workers=w,
                generator=torch.Generator().manual_seed(0),
            )
            first, rate = _time_batches(iter(loader), num_batches, batch_size)
            result[f"folder_{w}_worker{_s(w)}_img_per_s"] = round(rate, 1)
            result[f"folder_{w}_worker{_s(w)}_first_batch_s"] = round(first, 3)
    return result
