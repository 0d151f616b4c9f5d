"""Linear probes: LARS, the MAE schedule, probes that learn separable features, and two real processes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from dist_worker import blobs

from tokscale.evaluation.probe import (
    LARS,
    FeatureSet,
    LinearProbe,
    ProbeConfig,
    extract_features,
    logistic_probe,
    probe_lr,
    train_probe_on_features,
)


def test_lars_scales_a_weight_step_by_its_trust_ratio_and_leaves_biases_plain():
    w = torch.nn.Parameter(torch.full((2, 2), 3.0))
    b = torch.nn.Parameter(torch.zeros(2))
    w.grad = torch.full((2, 2), 0.5)
    b.grad = torch.ones(2)
    opt = LARS([w, b], lr=0.1, momentum=0.9, weight_decay=0.0, eta=0.001)
    opt.step()
    trust = 0.001 * 6.0 / 1.0  # ||w|| = 6, ||g|| = 1
    torch.testing.assert_close(w.data, torch.full((2, 2), 3.0 - 0.1 * trust * 0.5))
    torch.testing.assert_close(b.data, torch.full((2,), -0.1))


def test_learning_rate_warms_up_linearly_then_follows_a_half_cosine_to_zero():
    assert probe_lr(0, 100, 10, 1.0) == 0.0
    assert probe_lr(5, 100, 10, 1.0) == pytest.approx(0.5)
    assert probe_lr(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert probe_lr(55, 100, 10, 1.0) == pytest.approx(0.5)
    assert probe_lr(100, 100, 10, 1.0) == pytest.approx(0.0, abs=1e-12)


def test_the_probe_head_is_batchnorm_without_affine_then_linear():
    probe = LinearProbe(8, 3)
    assert not probe.norm.affine and probe.head.in_features == 8 and probe.head.out_features == 3


def test_the_mae_protocol_probe_separates_separable_features():
    x, y = blobs(400, seed=0)
    vx, vy = blobs(100, seed=1)
    # LARS moves weights by ~lr x 0.001 of their norm per step: a 400-sample set needs a large lr to converge.
    cfg = ProbeConfig(epochs=20, warmup_epochs=1, batch_size=32, base_lr=10.0)
    out = train_probe_on_features(FeatureSet(x, y), FeatureSet(vx, vy), 4, cfg)
    assert out["top1"] > 90.0
    assert out["lr"] == pytest.approx(10.0 * 32 / 256) and out["num_train"] == 400


def test_the_logistic_probe_separates_separable_features_and_is_near_chance_on_noise():
    x, y = blobs(400, seed=0)
    vx, vy = blobs(100, seed=1)
    assert logistic_probe(FeatureSet(x, y), FeatureSet(vx, vy), 4)["top1"] > 90.0
    noise = logistic_probe(FeatureSet(torch.randn(400, 16), y), FeatureSet(torch.randn(100, 16), vy), 4)
    assert noise["top1"] < 50.0


def test_features_are_extracted_once_per_sample_with_their_labels():
    images = torch.randn(7, 3, 4, 4)
    labels = torch.arange(7)
    batches = [(images[:4], labels[:4], ["a"] * 4), (images[4:], labels[4:], ["b"] * 3)]
    out = extract_features(lambda im: im.mean((2, 3)), batches, "cpu")
    torch.testing.assert_close(out.features, images.mean((2, 3)))
    assert out.labels.tolist() == list(range(7))


def test_a_probe_over_two_processes_with_uneven_shares_agrees_on_every_rank(tmp_path):
    from test_distributed import _run_two_ranks

    out = _run_two_ranks("probe", tmp_path / "out.pt")["ranks"]
    assert out[0] == out[1]
    assert out[0]["num_train"] == 203 and out[0]["num_eval"] == 64
    assert out[0]["global_batch"] == 32 and math.isfinite(out[0]["top1"]) and out[0]["top1"] > 80.0


def test_probe_settings_are_validated():
    with pytest.raises(ValueError, match="warmup_epochs"):
        ProbeConfig(epochs=5, warmup_epochs=6)
    assert Path(__file__).is_file()
