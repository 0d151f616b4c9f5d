"""The Inception feature extractor: torch-fidelity's network from a local file, never downloaded."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from palette import random_images

from tokscale.evaluation.fid import GaussianStats
from tokscale.evaluation.inception import INCEPTION_URL, load_inception, quantize_uint8


def test_features_and_statistics_equal_torch_fidelity_with_the_same_weights(inception_weights):
    from torch_fidelity.metric_fid import fid_features_to_statistics
    from torch_fidelity.utils import create_feature_extractor

    # Few, small images: the Inception costs ~1 s per image on a shared 2-core CPU.
    a = quantize_uint8(random_images(3, size=16, seed=0))
    b = quantize_uint8(random_images(3, size=16, seed=1).mul(0.5))
    ours = load_inception(inception_weights)
    theirs = create_feature_extractor(
        "inception-v3-compat",
        ["2048", "logits_unbiased"],
        cuda=False,
        feature_extractor_weights_path=str(inception_weights),
    )
    pool, logits = ours(torch.cat([a, b]))
    ref_pool, ref_logits = theirs(torch.cat([a, b]))
    torch.testing.assert_close(pool, ref_pool, rtol=0, atol=0)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)
    assert pool.std(0).mean() > 0  # random weights that tell images apart

    # The statistics FID is computed from equal torch-fidelity's (its Fréchet formula is checked in
    # test_numerics at a size where scipy's is affordable).
    stats = GaussianStats()
    stats.update(pool)
    mu, sigma = stats.mean_cov()
    ref = fid_features_to_statistics(ref_pool.double())
    np.testing.assert_allclose(mu, ref["mu"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sigma, ref["sigma"], rtol=1e-9, atol=1e-12)


def test_missing_inception_weights_name_the_file_and_where_to_get_it(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError) as err:
        load_inception(missing)
    assert str(missing) in str(err.value) and INCEPTION_URL in str(err.value)


def test_empty_inception_weights_setting_says_which_key_to_set():
    with pytest.raises(ValueError, match="eval.inception_weights"):
        load_inception("")


def test_weights_of_another_network_are_refused_naming_the_file(tmp_path):
    bad = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="other.pth"):
        load_inception(bad)


def test_inception_refuses_float_images(inception_weights):
    with pytest.raises(ValueError, match="uint8"):
        load_inception(inception_weights)(torch.zeros(1, 3, 8, 8))


def test_random_weights_have_no_all_zero_tensors(inception_weights):
    state = torch.load(inception_weights, weights_only=True)
    zero = [k for k, v in state.items() if v.is_floating_point() and not np.any(v.numpy())]
    assert zero == []
