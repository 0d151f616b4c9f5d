"""The metric formulas equal their reference implementations (scipy, torch-fidelity, scikit-image) on the same
inputs, with random data and no downloads."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from palette import random_images

from tokscale.evaluation.fid import GaussianStats, frechet_distance
from tokscale.evaluation.image_metrics import CodeUsage, psnr_per_image, ssim_per_image, to_unit_float
from tokscale.evaluation.inception_score import InceptionScore


def _random_stats(dim: int, n: int, seed: int):
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    feats = rng.normal(size=(n, dim)) @ mix + rng.normal(size=dim)
    stats = GaussianStats(dim)
    for chunk in np.array_split(feats, 7):
        stats.update(torch.from_numpy(chunk))
    return feats, stats


def test_running_statistics_equal_numpy_mean_and_unbiased_covariance():
    feats, stats = _random_stats(32, 500, seed=0)
    mu, sigma = stats.mean_cov()
    np.testing.assert_allclose(mu, feats.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(feats, rowvar=False), rtol=1e-10, atol=1e-12)
    assert stats.num_samples == 500


def test_frechet_distance_equals_the_scipy_sqrtm_formula_to_1e6_relative():
    _, a = _random_stats(256, 1000, seed=1)
    _, b = _random_stats(256, 1000, seed=2)
    (mu1, s1), (mu2, s2) = a.mean_cov(), b.mean_cov()
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_of_identical_statistics_is_zero_even_when_singular():
    _, a = _random_stats(64, 20, seed=3)  # 20 samples in 64 dims: rank-deficient covariance
    mu, sigma = a.mean_cov()
    # Zero up to the rounding of the ~1e-16 null-space eigenvalues, relative to the total variance.
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6 * np.trace(sigma)


def test_frechet_distance_refuses_statistics_of_different_dimensions():
    with pytest.raises(ValueError, match="do not match"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


@pytest.mark.parametrize("shuffle", [True, False])
def test_inception_score_equals_torch_fidelity_whatever_order_the_samples_arrive_in(shuffle):
    from torch_fidelity.metric_isc import isc_features_to_metric

    logits = torch.randn(203, 1008, generator=torch.Generator().manual_seed(0)) * 3
    ref = isc_features_to_metric(logits, splits=10, shuffle=shuffle)  # its seed 2020 permutation
    arrival = torch.randperm(203, generator=torch.Generator().manual_seed(1))  # as ranks/workers interleave
    isc = InceptionScore(splits=10, shuffle=shuffle)
    for idx in arrival.split(37):
        isc.update(logits[idx], idx)
    mean, std = isc.compute()
    assert mean == pytest.approx(ref["inception_score_mean"], rel=1e-10)
    assert std == pytest.approx(ref["inception_score_std"], rel=1e-8)
    in_order = InceptionScore(splits=10, shuffle=shuffle)
    in_order.update(logits, torch.arange(203))
    assert in_order.compute() == pytest.approx((mean, std), rel=1e-12)
    if shuffle:  # the permutation matters: contiguous splits of the same images give another score
        plain = isc_features_to_metric(logits, splits=10, shuffle=False)["inception_score_mean"]
        assert abs(plain - mean) > 1e-6


def test_inception_score_is_undefined_with_fewer_samples_than_splits_and_says_why():
    isc = InceptionScore(splits=10)
    isc.update(torch.randn(5, 1008), torch.arange(5))
    assert isc.compute() == (None, None) and "fewer than is_splits=10" in isc.undefined_reason


def test_inception_score_refuses_a_sample_counted_twice():
    isc = InceptionScore(splits=2)
    isc.update(torch.randn(4, 1008), torch.tensor([0, 1, 2, 1]))
    with pytest.raises(ValueError, match="index 1 was counted twice"):
        isc.compute()


def test_strict_json_writes_null_with_the_reason_for_non_finite_numbers():
    import json
    import math

    from tokscale.jsonio import strict_dumps

    def refuse(name):
        raise ValueError(name)

    text = strict_dumps({"a": math.nan, "b": [1.0, math.inf], "c": {"d": -math.inf}, "e": 2.0})
    data = json.loads(text, parse_constant=refuse)
    assert data == {"a": None, "a_undefined": "nan", "b": [1.0, None], "c": {"d": None, "d_undefined": "-inf"},
                    "e": 2.0}  # fmt: skip
    keep = json.loads(strict_dumps({"x": math.nan, "x_undefined": "too few samples"}))
    assert keep == {"x": None, "x_undefined": "too few samples"}


@pytest.mark.parametrize("data_range", [1.0, 2.0])
def test_ssim_equals_scikit_image_on_the_same_images(data_range):
    from skimage.metrics import structural_similarity

    x = random_images(3, size=20, seed=1)
    y = (x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2))).clamp(-1, 1)
    a, b = to_unit_float(x), to_unit_float(y)
    ours = ssim_per_image(a, b, data_range).numpy()
    ref = [
        structural_similarity(
            a[i].permute(1, 2, 0).numpy(),
            b[i].permute(1, 2, 0).numpy(),
            data_range=data_range,
            channel_axis=-1,
        )
        for i in range(3)
    ]
    np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-12)


def test_psnr_equals_scikit_image_on_uint8_quantised_images():
    from skimage.metrics import peak_signal_noise_ratio

    x = random_images(3, size=16, seed=3)
    y = x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    a, b = to_unit_float(x), to_unit_float(y)
    ref = [peak_signal_noise_ratio(a[i].numpy(), b[i].numpy()) for i in range(3)]  # data range 1 for [0, 1]
    np.testing.assert_allclose(psnr_per_image(a, b).numpy(), ref, rtol=1e-12)


def test_uint8_quantisation_maps_crops_of_uint8_pixels_back_to_the_same_pixels():
    u8 = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16).expand(1, 3, 16, 16)
    from tokscale.evaluation.inception import quantize_uint8

    assert torch.equal(quantize_uint8(u8.float() / 127.5 - 1.0), u8)


def test_codebook_usage_entropy_and_perplexity_of_a_known_histogram():
    usage = CodeUsage(codebook_size=8)
    usage.update(torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3]]))  # 4 codes equally used out of 8
    out = usage.compute()
    assert out["codebook_usage"] == 0.5
    assert out["code_entropy"] == pytest.approx(2.0)
    assert out["code_perplexity"] == pytest.approx(4.0)


def test_codebook_usage_refuses_indices_outside_the_codebook():
    with pytest.raises(ValueError, match="outside"):
        CodeUsage(codebook_size=4).update(torch.tensor([4]))
