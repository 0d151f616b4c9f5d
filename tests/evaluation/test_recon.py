"""Reconstruction evaluation end to end on a stand-in tokenizer: every metric, each sample once."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from palette import PaletteTokenizer, PixelTokenizer, batches, random_images

from tokscale.evaluation.config import EvalConfig
from tokscale.evaluation.fid import StatsMeta, dataset_stats, save_stats
from tokscale.evaluation.image_metrics import psnr_per_image, ssim_per_image, to_unit_float
from tokscale.tokenizers.recon_eval import ReconEvaluator, evaluate_reconstruction


def test_metrics_average_per_image_values_over_every_sample_once(palette_tokenizer):
    images = random_images(7, size=16, seed=0)
    cfg = EvalConfig(compute_fid=False, compute_lpips=False)
    m = evaluate_reconstruction(palette_tokenizer, batches(images, 3), cfg, progress=False)
    recon = palette_tokenizer.decode(palette_tokenizer.encode(images))
    a, b = to_unit_float(images), to_unit_float(recon)
    assert m["num_samples"] == 7
    assert m["psnr"] == pytest.approx(psnr_per_image(a, b).mean().item(), rel=1e-12)
    assert m["ssim_dr1"] == pytest.approx(ssim_per_image(a, b, 1.0).mean().item(), rel=1e-12)
    assert m["ssim_dr2"] > m["ssim_dr1"]  # the published data range 2.0 inflates SSIM
    codes = palette_tokenizer.encode(images)
    assert m["codebook_usage"] == pytest.approx(codes.unique().numel() / 16)
    assert "rfid" not in m and "lpips" not in m


def test_lpips_equals_the_lpips_package_with_the_same_weights(tmp_path, palette_tokenizer):
    import lpips
    import torchvision

    from tokscale.tokenizers.perceptual import PerceptualConfig, build_lpips

    torch.manual_seed(0)
    trunk = torchvision.models.vgg16().features  # random trunk: only the features.* tensors are read
    torch.save({f"features.{k}": v for k, v in trunk.state_dict().items()}, tmp_path / "vgg16.pth")
    module = build_lpips(PerceptualConfig(weight=1.0, vgg_weights=str(tmp_path / "vgg16.pth")))
    images = random_images(4, size=32, seed=1)
    tok = PaletteTokenizer(image_size=32)
    m = evaluate_reconstruction(
        tok, batches(images, 2), EvalConfig(compute_fid=False), lpips_module=module, progress=False
    )

    ref_net = lpips.LPIPS(net="vgg", version="0.1", pnet_rand=True, verbose=False).eval()
    ref_net.net.load_state_dict(
        {
            f"slice{i}.{k}": v
            for i, s in enumerate(ref_net.net.children(), 1)
            for k, v in _slice_state(trunk, s).items()
        }
    )
    from tokscale.evaluation.inception import quantize_uint8

    to_pm1 = lambda x: quantize_uint8(x).float() / 127.5 - 1  # noqa: E731  (metrics use the uint8 images)
    with torch.no_grad():
        ref = ref_net(to_pm1(images), to_pm1(tok.decode(tok.encode(images)))).flatten().mean().item()
    assert m["lpips"] == pytest.approx(ref, rel=1e-5)
    assert m["lpips"] > 0


def _slice_state(trunk, lpips_slice) -> dict:
    """lpips keeps each VGG layer's index in `features` as its name inside the slice."""
    return {
        f"{idx}.{kind}": getattr(trunk[int(idx)], kind)
        for idx, layer in lpips_slice.named_children()
        for kind in ("weight", "bias")
        if hasattr(layer, kind)
    }


@pytest.mark.slow  # Inception passes and 2048-d eigendecompositions on a shared 2-core CPU
def test_a_lossless_tokenizer_scores_zero_rfid_and_a_lossy_one_more(inception_weights, caplog):
    images = random_images(4, size=16, seed=2)
    cfg = EvalConfig(inception_weights=str(inception_weights), compute_lpips=False, is_splits=2)
    evaluator = ReconEvaluator(cfg)
    with caplog.at_level(logging.WARNING):
        exact = evaluator.run(PixelTokenizer(), batches(images, 2), progress=False)
    assert "rFID from 4 samples" in caplog.text  # fewer than a stable FID needs, with the count
    assert abs(exact.metrics["rfid"]) < 1e-4  # zero up to the rounding of a rank-3 covariance in 2048 dims
    assert np.isinf(exact.metrics["psnr"]) and exact.metrics["ssim_dr1"] == pytest.approx(1.0)
    assert exact.crop_stats is not None and np.isfinite(exact.metrics["is_mean"])

    lossy = evaluator.run(PaletteTokenizer(), batches(images, 2), progress=False, reference=exact.crop_stats)
    assert lossy.metrics["rfid"] > 1e-3
    assert lossy.grid is not None and lossy.grid.shape[0] == 3


@pytest.mark.slow  # Inception passes and 2048-d eigendecompositions on a shared 2-core CPU
def test_a_reference_file_of_the_same_crops_gives_the_same_rfid_as_computing_it_in_the_pass(
    tmp_path, inception_weights
):
    images = random_images(4, size=16, seed=3)
    base = EvalConfig(inception_weights=str(inception_weights), compute_lpips=False, is_splits=2)
    evaluator = ReconEvaluator(base)
    stats, resolution = dataset_stats(batches(images, 4), evaluator.inception, "cpu")
    mu, sigma = stats.mean_cov()
    ref = save_stats(tmp_path / "ref.npz", mu, sigma, StatsMeta(resolution=resolution, count=4))
    from_file = ReconEvaluator(EvalConfig(**{**base.__dict__, "reference_stats": str(ref)}))
    a = from_file.run(PaletteTokenizer(), batches(images, 4), progress=False).metrics
    b = evaluator.run(PaletteTokenizer(), batches(images, 4), progress=False, reference=(mu, sigma)).metrics
    assert a["rfid"] == pytest.approx(b["rfid"], rel=1e-12) and a["rfid"] > 0


def test_a_reference_made_at_another_resolution_stops_the_evaluation(tmp_path, inception_weights):
    ref = save_stats(
        tmp_path / "ref.npz", np.zeros(2048), np.eye(2048), StatsMeta(resolution=256, count=50000)
    )
    cfg = EvalConfig(inception_weights=str(inception_weights), reference_stats=str(ref), compute_lpips=False)
    with pytest.raises(ValueError, match="resolution=256.*resolution=16"):
        evaluate_reconstruction(PaletteTokenizer(), batches(random_images(2), 2), cfg, progress=False)


def test_an_empty_stream_is_an_error(palette_tokenizer):
    with pytest.raises(ValueError, match="no images"):
        evaluate_reconstruction(palette_tokenizer, [], EvalConfig(compute_fid=False), progress=False)


@pytest.mark.slow  # two evaluations with Inception passes and 2048-d eigendecompositions
def test_in_training_evaluation_logs_scalars_and_a_grid_and_reuses_the_subset_reference(
    tmp_path, inception_weights
):
    from tokscale.data.stream import DataConfig
    from tokscale.logger import MetricLogger
    from tokscale.tokenizers.recon_eval import evaluate_in_training

    data = DataConfig(eval_shards="embedded", resolution=16, num_workers=0, cache_dir=str(tmp_path / "cache"))
    cfg = EvalConfig(inception_weights=str(inception_weights), compute_lpips=False, is_splits=2, batch_size=2)
    evaluator = ReconEvaluator(cfg)
    logger = MetricLogger(tmp_path / "run", enabled=True)
    first = evaluate_in_training(evaluator, PaletteTokenizer(), data, 100, logger, 0, 1, num_samples=3)
    assert len(evaluator.training_reference) == 1  # the subset's crop statistics, kept for the next call
    second = evaluate_in_training(evaluator, PaletteTokenizer(), data, 200, logger, 0, 1, num_samples=3)
    logger.close()
    assert first["num_samples"] == 3 and second["rfid"] == pytest.approx(first["rfid"], rel=1e-9)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    logged = json.loads(lines[0])
    assert logged["step"] == 100 and {"eval/rfid", "eval/psnr", "eval/codebook_usage"} <= set(logged)
