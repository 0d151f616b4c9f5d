"""``tokscale bench eval``: Inception feature-extraction throughput and the cost of one 2048-d Fréchet distance.

tokscale bench eval --device cuda --batch 100
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tokscale import devices
from tokscale.devices import resolve_device, synchronize
from tokscale.evaluation.fid import GaussianStats, frechet_distance
from tokscale.evaluation.inception import FEATURE_DIM, load_inception, write_random_inception_weights


def run_bench(
    weights: str | None, batch: int, resolution: int, steps: int, device_name: str = "auto"
) -> dict:
    device = resolve_device(device_name)
    with tempfile.TemporaryDirectory() as tmp:
        path = weights or write_random_inception_weights(Path(tmp) / "inception.pth")
        inception = load_inception(path, device)
    images = torch.randint(0, 256, (batch, 3, resolution, resolution), dtype=torch.uint8, device=device)
    stats = GaussianStats(FEATURE_DIM, device)
    pool, _ = inception(images)  # warmup: cuDNN autotuning, allocator
    stats.update(pool)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        pool, _ = inception(images)
        stats.update(pool)  # the float64 running sums are part of the per-image cost
    synchronize(device)
    extract_s = time.perf_counter() - start

    rng = np.random.default_rng(0)
    a = rng.normal(size=(FEATURE_DIM, FEATURE_DIM)) / np.sqrt(FEATURE_DIM)
    b = rng.normal(size=(FEATURE_DIM, FEATURE_DIM)) / np.sqrt(FEATURE_DIM)
    s1, s2 = a @ a.T, b @ b.T + 0.1 * np.eye(FEATURE_DIM)
    mu1, mu2 = rng.normal(size=FEATURE_DIM), rng.normal(size=FEATURE_DIM)
    frechet_distance(mu1[:64], s1[:64, :64], mu2[:64], s2[:64, :64])  # LAPACK warmup
    start = time.perf_counter()
    frechet_distance(mu1, s1, mu2, s2)
    fd_s = time.perf_counter() - start
    return {
        "device": devices.device_name(device),
        "torch_threads": torch.get_num_threads(),
        "weights": "random" if weights is None else str(weights),
        "batch": batch,
        "resolution": resolution,
        "inception_images_per_s": round(batch * steps / extract_s, 2),
        "frechet_seconds_2048": round(fd_s, 3),
    }
