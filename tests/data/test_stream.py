"""Training and evaluation streams in one process: determinism, fixed epochs, exact resume, exact eval split."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from PIL import Image

from tokscale.data.stream import DataConfig, EvalStream, TrainStream
from tokscale.data.transforms import ImageTransform, adm_center_crop


def _cfg(shard_dir, **kw) -> DataConfig:
    base = dict(
        train_shards=str(shard_dir),
        eval_shards=str(shard_dir),
        resolution=16,
        batch_size=4,
        num_workers=2,
        shuffle_buffer=5,
        batches_per_epoch=5,
    )
    return DataConfig(**{**base, **kw})


def _take(stream, n):
    return list(itertools.islice(iter(stream), n))


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


def test_training_batches_are_images_in_minus_one_to_one_and_int64_labels(shard_dir):
    images, labels = next(iter(TrainStream(_cfg(shard_dir), 0, 1)))
    assert images.shape == (4, 3, 16, 16) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and set(labels.tolist()) <= {0, 1, 2}
    assert images.min() >= -1 and images.max() <= 1 and images.std() > 0.1


def test_the_training_stream_is_the_same_for_the_same_seed_and_differs_for_another(shard_dir):
    a = _take(TrainStream(_cfg(shard_dir), 0, 1), 6)
    b = _take(TrainStream(_cfg(shard_dir), 0, 1), 6)
    c = _take(TrainStream(_cfg(shard_dir, seed=1), 0, 1), 6)
    assert _same(a, b)
    assert not _same(a, c)


def test_ranks_of_one_job_receive_different_batches(shard_dir):
    a = _take(TrainStream(_cfg(shard_dir), 0, 2), 3)
    b = _take(TrainStream(_cfg(shard_dir), 1, 2), 3)
    assert not _same(a, b)


def test_the_training_stream_never_runs_dry_and_counts_epochs_of_fixed_length(shard_dir):
    stream = TrainStream(_cfg(shard_dir, batches_per_epoch=3), 0, 1)
    batches = _take(stream, 20)  # 80 samples from a 24-sample set
    assert len(batches) == 20
    assert stream.state_dict()["batches_consumed"] == 20 and stream.epoch == 6


@pytest.mark.parametrize(
    "stop", [1, 3, 5, 7]
)  # odd positions: the next batch is worker 1's; 5: an epoch edge
@pytest.mark.parametrize("rank,world_size", [(0, 1), (1, 2)])
def test_a_resumed_stream_continues_exactly_where_the_saved_position_left_off(
    shard_dir, stop, rank, world_size
):
    cfg = _cfg(shard_dir)
    reference = _take(TrainStream(cfg, rank, world_size), stop + 4)
    first = TrainStream(cfg, rank, world_size)
    it = iter(first)
    for _ in range(stop):
        next(it)
    state = first.state_dict()
    assert state["batches_consumed"] == stop
    resumed = TrainStream(cfg, rank, world_size)
    resumed.load_state_dict(state)
    assert _same(_take(resumed, 4), reference[stop:])


def test_the_saved_position_is_json_serialisable_and_small(shard_dir):
    import json

    stream = TrainStream(_cfg(shard_dir), 0, 1)
    _take(stream, 2)
    text = json.dumps(stream.state_dict())
    assert len(text) < 400 and json.loads(text)["batches_consumed"] == 2


def test_resuming_with_another_world_size_or_worker_count_keeps_the_batch_count(shard_dir, caplog):
    saved = TrainStream(_cfg(shard_dir), 0, 2)
    _take(saved, 3)
    resumed = TrainStream(_cfg(shard_dir, num_workers=1), 1, 3)
    resumed.load_state_dict(saved.state_dict())
    batches = _take(resumed, 3)
    assert len(batches) == 3 and resumed.state_dict()["batches_consumed"] == 6
    assert "different layout" in caplog.text


def test_a_state_from_another_format_is_refused(shard_dir):
    with pytest.raises(ValueError, match="version"):
        TrainStream(_cfg(shard_dir), 0, 1).load_state_dict({"step": 3})


def test_the_evaluation_stream_yields_every_sample_once_in_a_stable_order(shard_dir):
    cfg = _cfg(shard_dir, num_workers=2, batch_size=5)
    stream = EvalStream(cfg, 0, 1)
    keys = [k for _, _, ks, _ in stream for k in ks]
    again = [k for _, _, ks, _ in EvalStream(cfg, 0, 1) for k in ks]
    assert len(stream) == 24 and len(keys) == 24 and len(set(keys)) == 24
    assert keys == again


def test_evaluation_splits_across_ranks_without_padding_even_when_uneven(shard_dir):
    cfg = _cfg(shard_dir, num_workers=2, batch_size=4)
    per_rank = [[k for _, _, ks, _ in EvalStream(cfg, r, 5) for k in ks] for r in range(5)]
    assert [len(k) for k in per_rank] == [len(EvalStream(cfg, r, 5)) for r in range(5)] == [4, 5, 5, 5, 5]
    flat = [k for keys in per_rank for k in keys]
    assert len(flat) == len(set(flat)) == 24


def test_evaluation_max_samples_caps_the_total_across_ranks(shard_dir):
    cfg = _cfg(shard_dir)
    lengths = [len(EvalStream(cfg, r, 2, max_samples=7)) for r in range(2)]
    keys = [k for r in range(2) for _, _, ks, _ in EvalStream(cfg, r, 2, max_samples=7) for k in ks]
    assert lengths == [3, 4] and len(set(keys)) == 7


def test_evaluation_images_are_adm_centre_crops_without_flip(shard_dir):
    cfg = _cfg(shard_dir, num_workers=0, batch_size=24)
    a = next(iter(EvalStream(cfg, 0, 1)))[0]
    b = next(iter(EvalStream(cfg, 0, 1)))[0]
    assert a.shape == (24, 3, 16, 16) and torch.equal(a, b)


def test_one_shard_with_two_workers_and_two_ranks_still_yields_all_samples(tmp_path, helpers):
    helpers.write_tar(tmp_path / "only.tar", helpers.labelled_samples(0, 5))
    cfg = DataConfig(
        train_shards=str(tmp_path / "only.tar"),
        eval_shards=str(tmp_path / "only.tar"),
        resolution=8,
        batch_size=2,
        num_workers=2,
        shuffle_buffer=2,
        batches_per_epoch=3,
    )
    keys = [k for r in range(2) for _, _, ks, _ in EvalStream(cfg, r, 2) for k in ks]
    assert sorted(keys) == [f"s{i:05d}" for i in range(5)]
    assert len(_take(TrainStream(cfg, 1, 2), 4)) == 4


def test_adm_centre_crop_halves_large_images_then_cuts_the_centre():
    img = Image.new("RGB", (1200, 600), (10, 20, 30))
    img.paste((200, 0, 0), (540, 240, 660, 360))  # a red patch at the centre
    arr = adm_center_crop(img, 64)
    assert arr.shape == (64, 64, 3)
    assert tuple(arr[32, 32]) == (200, 0, 0) and tuple(arr[0, 0]) == (10, 20, 30)


def test_random_crop_resizes_the_short_side_to_ratio_times_resolution_and_crops_a_square():
    img = Image.new("RGB", (300, 200))
    transform = ImageTransform(resolution=100, crop="random", crop_ratio=1.1, hflip=True)
    outs = [transform(img, random.Random(i)) for i in range(3)]
    assert all(o.shape == (3, 100, 100) for o in outs)
    with pytest.raises(ValueError, match="crop"):
        ImageTransform(crop="center")


def test_random_resize_draws_the_short_side_uniformly_between_resolution_and_ratio_times_it(monkeypatch):
    # GigaTok's training crop: short side uniform in [256, 320] for 256 px (ratio 1.25), then a random square
    from tokscale.data import transforms

    seen = []
    real = transforms._shrink_then_resize
    monkeypatch.setattr(
        transforms, "_shrink_then_resize", lambda img, side: seen.append(side) or real(img, side)
    )
    transform = ImageTransform(resolution=16, crop="random_resize", crop_ratio=1.25, hflip=False)
    img = Image.new("RGB", (60, 40))
    outs = [transform(img, random.Random(i)) for i in range(200)]
    assert all(o.shape == (3, 16, 16) for o in outs)
    assert set(seen) == set(range(16, 21))  # ceil(16 * 1.25) = 20, both ends included


def test_config_rejects_unknown_policy_and_crop_naming_the_key():
    with pytest.raises(ValueError, match="bad_sample_policy"):
        DataConfig(bad_sample_policy="ignore")
    with pytest.raises(ValueError, match="data.crop"):
        DataConfig(crop="centre")
