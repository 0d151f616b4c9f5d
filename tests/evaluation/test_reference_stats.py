"""Reference statistics in the ADM evaluator's npz format: written with their protocol, read back, and refused
when the protocol differs from the evaluation's."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from tokscale.evaluation.fid import StatsMeta, check_compatible, load_stats, save_stats


def _stats(dim: int = 2048):
    rng = np.random.default_rng(0)
    return rng.normal(size=dim), np.eye(dim)


def test_saved_statistics_read_back_with_mu_sigma_and_protocol(tmp_path):
    mu, sigma = _stats()
    path = save_stats(tmp_path / "ref.npz", mu, sigma, StatsMeta(resolution=256, count=50000))
    with np.load(path) as npz:  # ADM's evaluator reads exactly these two arrays
        np.testing.assert_array_equal(npz["mu"], mu)
        np.testing.assert_array_equal(npz["sigma"], sigma)
    ref = load_stats(path)
    assert ref.meta == StatsMeta(resolution=256, count=50000)
    np.testing.assert_array_equal(ref.mu, mu)


def test_statistics_at_another_resolution_are_refused_naming_both(tmp_path):
    mu, sigma = _stats()
    ref = load_stats(save_stats(tmp_path / "ref512.npz", mu, sigma, StatsMeta(resolution=512, count=10)))
    with pytest.raises(ValueError) as err:
        check_compatible(ref, StatsMeta(resolution=256))
    assert "resolution=512" in str(err.value) and "resolution=256" in str(err.value)
    assert "ref512.npz" in str(err.value)


def test_statistics_from_another_crop_protocol_are_refused_unless_forced(tmp_path, caplog):
    mu, sigma = _stats()
    meta = StatsMeta(resolution=256, crop="random_resized", count=10)
    ref = load_stats(save_stats(tmp_path / "ref.npz", mu, sigma, meta))
    with pytest.raises(ValueError, match="crop=random_resized"):
        check_compatible(ref, StatsMeta(resolution=256))
    with caplog.at_level(logging.WARNING):
        check_compatible(ref, StatsMeta(resolution=256), force=True)
    assert "comparing anyway" in caplog.text


def test_an_adm_reference_batch_is_accepted_and_its_resolution_checked(tmp_path, caplog):
    mu, sigma = _stats()
    path = tmp_path / "VIRTUAL_tiny64_labeled.npz"
    # ADM reference batches hold the images (arr_0) beside mu/sigma and the spatial statistics.
    np.savez(
        path, arr_0=np.zeros((2, 64, 64, 3), np.uint8), mu=mu, sigma=sigma, mu_s=mu[:7], sigma_s=sigma[:7, :7]
    )
    ref = load_stats(path)
    assert ref.meta.resolution == 64
    check_compatible(ref, StatsMeta(resolution=64))
    with pytest.raises(ValueError, match="resolution=64"):
        check_compatible(ref, StatsMeta(resolution=256))


def test_a_bare_mu_sigma_npz_is_accepted_with_a_warning(tmp_path, caplog):
    mu, sigma = _stats()
    np.savez(tmp_path / "bare.npz", mu=mu, sigma=sigma)
    with caplog.at_level(logging.WARNING):
        check_compatible(load_stats(tmp_path / "bare.npz"), StatsMeta(resolution=256))
    assert "record no protocol" in caplog.text


@pytest.mark.parametrize("missing", ["mu", "sigma"])
def test_a_reference_without_mu_or_sigma_is_an_error_naming_the_missing_key(tmp_path, missing):
    mu, sigma = _stats(8)
    arrays = {"mu": mu, "sigma": sigma}
    del arrays[missing]
    np.savez(tmp_path / "half.npz", **arrays)
    with pytest.raises(ValueError, match=f"has no {missing}"):
        load_stats(tmp_path / "half.npz")


def test_a_missing_reference_file_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokscale eval stats"):
        load_stats(tmp_path / "absent.npz")


def test_statistics_of_another_dimension_are_refused(tmp_path):
    ref = load_stats(save_stats(tmp_path / "small.npz", *_stats(64), StatsMeta(resolution=256)))
    with pytest.raises(ValueError, match="64 dimensions"):
        check_compatible(ref, StatsMeta(resolution=256))
