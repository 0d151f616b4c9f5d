"""One rank of the two-process evaluation tests: ``python dist_worker.py MODE OUT`` with RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT set. Writes what it computed to OUT (a torch file) on rank 0."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from tokscale.shutdown import finish

sys.path.insert(0, str(Path(__file__).resolve().parent))

from palette import PaletteTokenizer, batches, random_images  # noqa: E402

from tokscale.evaluation.config import EvalConfig  # noqa: E402
from tokscale.evaluation.fid import GaussianStats  # noqa: E402
from tokscale.evaluation.image_metrics import CodeUsage  # noqa: E402
from tokscale.evaluation.inception_score import InceptionScore  # noqa: E402
from tokscale.tokenizers.recon_eval import evaluate_reconstruction  # noqa: E402

NUM = 10  # uneven share on purpose at 3 ranks; 5 each at 2


def features(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(NUM, 2048, generator=g, dtype=torch.float64) * 2 + 1, torch.randn(
        NUM, 1008, generator=g
    ) * 3


def stats_mode(rank: int, world: int) -> dict:
    feats, logits = features()
    stats, isc, usage = GaussianStats(), InceptionScore(splits=2, rank=rank, world_size=world), CodeUsage(64)
    mine = list(range(rank, NUM, world))
    stats.update(feats[mine])
    isc.update(logits[mine], torch.tensor(mine))
    usage.update(torch.arange(NUM)[mine] * 5)
    stats.all_reduce()
    usage.all_reduce()
    mu, sigma = stats.mean_cov()
    return {
        "mu": mu,
        "sigma": sigma,
        "count": stats.num_samples,
        "is": isc.compute(),
        "usage": usage.compute(),
    }


def recon_mode(rank: int, world: int) -> dict:
    images = random_images(NUM, size=16, seed=5)
    cfg = EvalConfig(compute_fid=False, compute_lpips=False, batch_size=2)
    return evaluate_reconstruction(
        PaletteTokenizer(), batches(images, 2, rank, world), cfg, rank, world, progress=False
    )


def lockstep_mode(rank: int, world: int) -> dict:
    """Rank 0 has three batches, rank 1 one: both must still make three encode passes (ZeRO-3 safety)."""
    images = random_images(4, size=16, seed=6)
    tok = PaletteTokenizer()
    calls = []
    encode = tok.encode
    tok.encode = lambda x: calls.append(x.shape[0]) or encode(x)
    mine = images[:3] if rank == 0 else images[3:]
    batches = [(mine[i : i + 1], torch.zeros(1), [f"k{i}"]) for i in range(mine.shape[0])]
    cfg = EvalConfig(compute_fid=False, compute_lpips=False)
    metrics = evaluate_reconstruction(tok, batches, cfg, rank, world, progress=False)
    gathered = [None] * world
    dist.all_gather_object(gathered, len(calls))
    return {"metrics": metrics, "encode_calls": gathered}


def blobs(n: int, seed: int, num_classes: int = 4, dim: int = 16):
    """Linearly separable Gaussian blobs: (features, labels)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(123)) * 3
    labels = torch.randint(0, num_classes, (n,), generator=g)
    return centres[labels] + torch.randn(n, dim, generator=g), labels


def probe_mode(rank: int, world: int) -> dict:
    from tokscale.evaluation.probe import FeatureSet, ProbeConfig, train_probe_on_features

    x, y = blobs(203, seed=0)  # uneven shares: rank 0 gets one sample more
    vx, vy = blobs(64, seed=1)
    train = FeatureSet(x[rank::world], y[rank::world])
    val = FeatureSet(vx[rank::world], vy[rank::world])
    out = train_probe_on_features(
        train, val, 4, ProbeConfig(epochs=20, warmup_epochs=1, batch_size=16, base_lr=40.0)
    )
    gathered = [None] * world
    dist.all_gather_object(gathered, out)
    return {"ranks": gathered}


def main() -> None:
    mode, out = sys.argv[1], sys.argv[2]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    result = {"stats": stats_mode, "recon": recon_mode, "probe": probe_mode, "lockstep": lockstep_mode}[mode](
        rank, world
    )
    if rank == 0:
        torch.save(result, out)
    # gloo's threads can abort interpreter teardown (SIGABRT) even after destroy_process_group: leave as every
    # tokscale entry point does (tokscale.shutdown)
    finish(0)


if __name__ == "__main__":
    main()
