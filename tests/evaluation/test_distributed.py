"""Statistics and metrics merged over two real gloo processes equal the single-process values."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from palette import PaletteTokenizer, batches, random_images

from tokscale.evaluation.config import EvalConfig
from tokscale.evaluation.fid import GaussianStats
from tokscale.evaluation.image_metrics import CodeUsage
from tokscale.tokenizers.recon_eval import evaluate_reconstruction

WORKER = Path(__file__).resolve().parent / "dist_worker.py"


def _run_two_ranks(mode: str, out: Path) -> dict:
    from tokscale.distributed import free_port

    port = str(free_port())
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
        }
        procs.append(subprocess.Popen([sys.executable, str(WORKER), mode, str(out)], env=env))
    codes = []
    try:
        codes = [p.wait(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert codes == [0, 0]
    return torch.load(out, weights_only=False)


def test_feature_statistics_merged_over_two_processes_equal_single_process_statistics(tmp_path):
    merged = _run_two_ranks("stats", tmp_path / "out.pt")
    sys.path.insert(0, str(WORKER.parent))
    from dist_worker import features

    feats, _ = features()
    single = GaussianStats()
    single.update(feats)
    mu, sigma = single.mean_cov()
    assert merged["count"] == feats.shape[0]
    np.testing.assert_allclose(merged["mu"], mu, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(merged["sigma"], sigma, rtol=1e-10, atol=1e-12)
    usage = CodeUsage(64)
    usage.update(torch.arange(feats.shape[0]) * 5)
    assert merged["usage"] == usage.compute()
    assert all(np.isfinite(merged["is"]))


def test_reconstruction_metrics_over_two_processes_count_each_sample_once_and_equal_one_process(tmp_path):
    merged = _run_two_ranks("recon", tmp_path / "out.pt")
    images = random_images(10, size=16, seed=5)
    cfg = EvalConfig(compute_fid=False, compute_lpips=False)
    single = evaluate_reconstruction(PaletteTokenizer(), batches(images, 4), cfg, progress=False)
    assert merged["num_samples"] == single["num_samples"] == 10
    for key in ("psnr", "ssim_dr1", "ssim_dr2", "codebook_usage", "code_entropy"):
        assert merged[key] == pytest.approx(single[key], rel=1e-12), key


def test_a_rank_with_fewer_batches_keeps_forward_passes_in_step_with_its_peers(tmp_path):
    out = _run_two_ranks("lockstep", tmp_path / "out.pt")
    assert out["encode_calls"] == [3, 3]  # rank 1 ran two dummy passes after its one batch
    assert out["metrics"]["num_samples"] == 4  # the dummy passes count for nothing
