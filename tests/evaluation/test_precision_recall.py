"""Improved precision/recall (ADM's k-NN manifolds) and the cached reference-batch activations behind them."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from tokscale.evaluation import reference
from tokscale.evaluation.inception import FEATURE_DIM, load_inception
from tokscale.evaluation.precision_recall import manifold_radii, precision_recall
from tokscale.evaluation.reference import reference_activations


def numpy_precision_recall(real, fake, k=3, strict=False):
    """Independent reference: full float64 difference-based distance matrices and a sort per row."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)

    def sq_dist(a, b):
        return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)

    radii_real = np.sort(sq_dist(real, real), axis=1)[:, k]  # column 0 is the point itself
    radii_fake = np.sort(sq_dist(fake, fake), axis=1)[:, k]
    d = sq_dist(real, fake)
    inside = np.less if strict else np.less_equal
    precision = inside(d, radii_real[:, None]).any(0).mean()
    recall = inside(d, radii_fake[None, :]).any(1).mean()
    return float(precision), float(recall), radii_real


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("block", [10_000, 64, 3])  # 3: tiles narrower than the k + 1 = 4 kept
def test_precision_recall_equal_a_full_matrix_numpy_computation_at_any_block_size(seed, block):
    rng = np.random.default_rng(seed)
    real = rng.normal(size=(200, 16)).astype(np.float32)
    fake = (rng.normal(size=(150, 16)) * 1.3 + 0.4).astype(np.float32)
    p_ref, r_ref, radii_ref = numpy_precision_recall(real, fake)
    assert 0 < p_ref < 1 and 0 < r_ref < 1  # a case where every sample's membership matters
    assert precision_recall(real, fake, block=block) == (p_ref, r_ref)
    np.testing.assert_allclose(manifold_radii(real, block=block), radii_ref, rtol=1e-5)


@pytest.mark.parametrize("k", [1, 5])
def test_other_neighbourhood_sizes_use_the_k_plus_first_smallest_distance_self_included(k):
    rng = np.random.default_rng(3)
    real = rng.normal(size=(60, 8)).astype(np.float32)
    fake = rng.normal(size=(40, 8)).astype(np.float32) + 0.5
    p_ref, r_ref, radii_ref = numpy_precision_recall(real, fake, k=k)
    assert precision_recall(real, fake, k=k, block=16) == (p_ref, r_ref)
    np.testing.assert_allclose(manifold_radii(real, k=k, block=16), radii_ref, rtol=1e-5)


def tied_sets():
    """Small-integer features (every distance exact in float16 and float32) with duplicated points: many
    samples lie exactly on a ball's boundary or at distance 0."""
    rng = np.random.default_rng(4)
    real = rng.integers(0, 3, size=(120, 6)).astype(np.float32)
    real[60:80] = real[:20]  # duplicates within the real set
    fake = rng.integers(0, 3, size=(90, 6)).astype(np.float32)
    fake[:30] = real[30:60]  # generated copies of real points
    return real, fake


@pytest.mark.parametrize("distance_dtype", ["float32", "float16"])
def test_points_on_a_ball_boundary_count_as_inside_like_adm(distance_dtype):
    real, fake = tied_sets()
    expected = numpy_precision_recall(real, fake)[:2]
    strict = numpy_precision_recall(real, fake, strict=True)[:2]
    assert strict != expected  # the ties decide the result, so `<` instead of `<=` would fail here
    assert precision_recall(real, fake, block=25, distance_dtype=distance_dtype) == expected


def test_float16_distances_fall_back_to_float32_when_they_overflow():
    real, fake = tied_sets()
    real, fake = real * 100, fake * 100  # squared distances up to 4e5: inf in float16, exact in float32
    expected = numpy_precision_recall(real, fake)[:2]
    assert expected != (1.0, 1.0)  # what infinite distances and radii would give
    assert precision_recall(real, fake, block=25, distance_dtype="float16") == expected


def test_identical_sets_score_one_and_far_apart_sets_score_zero():
    feats = np.random.default_rng(5).normal(size=(50, 10)).astype(np.float32)
    assert precision_recall(feats, feats.copy(), block=16) == (1.0, 1.0)
    assert precision_recall(torch.from_numpy(feats), torch.from_numpy(feats + 1e3), block=16) == (0.0, 0.0)


def test_precision_and_recall_are_not_symmetric():
    rng = np.random.default_rng(6)
    real = rng.normal(size=(100, 4)).astype(np.float32)
    narrow = (rng.normal(size=(100, 4)) * 0.2).astype(np.float32)  # mode collapse: precise, low recall
    precision, recall = precision_recall(real, narrow)
    assert precision > 0.9 and recall < 0.5


def test_unusable_features_are_refused_with_the_reason():
    real = np.zeros((10, 4), np.float32) + np.arange(10)[:, None]
    with pytest.raises(ValueError, match="more than 3 generated samples, got 3"):
        precision_recall(real, real[:3])
    with pytest.raises(ValueError, match="more than 3 real samples"):
        precision_recall(real[:3], real)
    with pytest.raises(ValueError, match="4 dimensions but generated ones 5"):
        precision_recall(real, np.zeros((10, 5), np.float32))
    bad = real.copy()
    bad[7, 1] = np.nan
    with pytest.raises(ValueError, match="non-finite.*first row 7"):
        precision_recall(real, bad)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        precision_recall(real, real[0])
    with pytest.raises(ValueError, match="distance_dtype"):
        precision_recall(real, real, distance_dtype="bfloat16")
    with pytest.raises(ValueError, match="need more than 3 samples"):
        manifold_radii(real[:3])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_gives_the_cpu_result():
    rng = np.random.default_rng(7)
    real = np.abs(rng.normal(size=(3000, 2048))).astype(np.float32)
    fake = np.abs(rng.normal(size=(2000, 2048)) * 1.1).astype(np.float32)
    assert precision_recall(real, fake, block=1024, device="cuda") == precision_recall(real, fake, block=1024)


# --- reference activations ---------------------------------------------------------------------------------


class CountingInception(torch.nn.Module):
    """Forwards to the real network and counts the images it was given."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.weights_path = net.weights_path
        self.num_images = 0

    def forward(self, images):
        self.num_images += images.shape[0]
        return self.net(images)


@pytest.fixture(scope="module")
def inception(inception_weights):
    return load_inception(inception_weights)


def write_reference(path, seed, num=2, size=16):
    # Few, small images: the network resizes to 299, and costs ~1 s per image on a 2-core CPU.
    images = np.random.default_rng(seed).integers(0, 256, size=(num, size, size, 3), dtype=np.uint8)
    np.savez(path, arr_0=images, mu=np.zeros(FEATURE_DIM), sigma=np.eye(FEATURE_DIM))
    return images


def test_reference_activations_are_the_pool3_features_and_a_second_call_reads_the_cache(
    tmp_path, inception, monkeypatch
):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    npz = tmp_path / "ref" / "VIRTUAL_tiny.npz"
    npz.parent.mkdir()
    images = write_reference(npz, seed=0, num=3)
    net = CountingInception(inception)

    acts = reference_activations(npz, net, "cpu", batch_size=2)  # two batches, the last one short
    assert net.num_images == 3
    direct, _ = inception(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
    assert acts.dtype == np.float32 and acts.shape == (3, FEATURE_DIM)
    np.testing.assert_array_equal(acts, direct.numpy())
    caches = sorted(npz.parent.glob("VIRTUAL_tiny.pool3-*.npy"))
    assert len(caches) == 1 and not list(npz.parent.glob(".*tmp"))

    again = reference_activations(npz, net, "cpu")
    assert net.num_images == 3  # the network did not run
    np.testing.assert_array_equal(again, acts)

    write_reference(npz, seed=1)  # the same name, other images
    changed = reference_activations(npz, net, "cpu")
    assert net.num_images == 5
    assert not np.array_equal(changed, acts)
    assert len(list(npz.parent.glob("VIRTUAL_tiny.pool3-*.npy"))) == 2
    # other Inception weights would be another cache file too
    assert reference.cache_name(npz, "a" * 64, "b" * 64) != reference.cache_name(npz, "a" * 64, "c" * 64)


def test_a_corrupt_cache_is_reported_and_recomputed(tmp_path, inception, caplog):
    npz = tmp_path / "ref.npz"
    write_reference(npz, seed=2)
    net = CountingInception(inception)
    acts = reference_activations(npz, net, "cpu")
    (cache,) = tmp_path.glob("ref.pool3-*.npy")
    cache.write_bytes(b"not an npy file")
    with caplog.at_level(logging.WARNING, logger="tokscale.evaluation.reference"):
        again = reference_activations(npz, net, "cpu")
    assert str(cache) in caplog.text and "corrupt" in caplog.text
    assert net.num_images == 4
    np.testing.assert_array_equal(again, acts)
    np.testing.assert_array_equal(np.load(cache), acts)  # rewritten


def test_a_read_only_reference_folder_caches_under_xdg_cache_home(tmp_path, inception, monkeypatch, caplog):
    npz = tmp_path / "readonly" / "ref.npz"
    npz.parent.mkdir()
    write_reference(npz, seed=3)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    save = reference._save_atomic

    def refuse_the_reference_folder(path, array):  # as a read-only mount would (the tests may run as root)
        if path.parent == npz.parent:
            raise PermissionError(13, "Permission denied", str(path))
        save(path, array)

    monkeypatch.setattr(reference, "_save_atomic", refuse_the_reference_folder)
    net = CountingInception(inception)
    with caplog.at_level(logging.WARNING, logger="tokscale.evaluation.reference"):
        acts = reference_activations(npz, net, "cpu")
    (cache,) = (tmp_path / "xdg" / "tokscale").glob("ref.pool3-*.npy")
    assert str(cache) in caplog.text
    assert not list(npz.parent.glob("*.npy"))
    np.testing.assert_array_equal(reference_activations(npz, net, "cpu"), acts)
    assert net.num_images == 2


def test_a_reference_without_uint8_images_is_refused_naming_the_file(tmp_path, inception):
    stats_only = tmp_path / "stats_only.npz"
    np.savez(stats_only, mu=np.zeros(4), sigma=np.eye(4))
    with pytest.raises(ValueError, match="stats_only.npz.*needs the reference images arr_0"):
        reference_activations(stats_only, inception, "cpu")
    floats = tmp_path / "floats.npz"
    np.savez(floats, arr_0=np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"floats.npz.*uint8 images \(N, H, W, 3\), got float32"):
        reference_activations(floats, inception, "cpu")
    gray = tmp_path / "gray.npz"
    np.savez(gray, arr_0=np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="gray.npz"):
        reference_activations(gray, inception, "cpu")
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        reference_activations(tmp_path / "missing.npz", inception, "cpu")
    not_zip = tmp_path / "text.npz"
    not_zip.write_text("hello")
    with pytest.raises(ValueError, match="text.npz.*not a readable npz"):
        reference_activations(not_zip, inception, "cpu")


def test_the_package_names_resolve_to_the_functions_every_time():
    """A fresh interpreter: the second access once returned the submodule that the first access imported."""
    import subprocess
    import sys

    code = (
        "import tokscale.evaluation as e, types\n"
        "for name in ('precision_recall', 'lockstep'):\n"
        "    assert callable(getattr(e, name)) and callable(getattr(e, name)), name\n"
        "    assert not isinstance(getattr(e, name), types.ModuleType), name\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
