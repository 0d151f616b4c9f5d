"""Bad input: each case is a clear error or, under bad_sample_policy=skip, a counted skip naming shard and key."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from tokscale.data.locations import expand_shards
from tokscale.data.samples import BadSampleError, ShardError, iter_raw_samples
from tokscale.data.stream import DataConfig, EvalStream, TrainStream


def _cfg(location, **kw) -> DataConfig:
    base = dict(
        train_shards=str(location),
        eval_shards=str(location),
        resolution=8,
        batch_size=4,
        num_workers=0,
        shuffle_buffer=0,
        batches_per_epoch=4,
    )
    return DataConfig(**{**base, **kw})


def _eval_keys(stream) -> list[str]:
    return [k for _, _, keys, _ in stream for k in keys]


def _with_bad_sample(helpers, tmp_path, bad_members: dict[str, bytes]):
    samples = helpers.labelled_samples(0, 3) + [("bad", bad_members)] + helpers.labelled_samples(3, 3)
    return helpers.write_tar(tmp_path / "mixed.tar", samples)


def test_a_missing_directory_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"shard directory {tmp_path / 'gone'} does not exist"):
        TrainStream(_cfg(tmp_path / "gone" / "train-000000.tar"), 0, 1)


def test_an_empty_location_says_what_is_expected():
    with pytest.raises(ValueError, match="no shard location given"):
        EvalStream(_cfg(""), 0, 1)


def test_a_brace_pattern_that_matches_no_shard_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train-\{000000..000009\}\.tar' matches no shard"):
        expand_shards(str(tmp_path / "train-{000000..000009}.tar"))


def test_a_brace_pattern_with_some_shards_missing_names_one(tmp_path, helpers):
    helpers.write_tar(tmp_path / "t-0.tar", helpers.labelled_samples(0, 2))
    with pytest.raises(FileNotFoundError, match=r"1 of 2 shards .* missing, e\.g\. .*t-1\.tar"):
        expand_shards(str(tmp_path / "t-{0..1}.tar"))


def test_a_glob_and_a_directory_with_no_tar_are_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="matches no shard"):
        expand_shards(str(tmp_path / "*.tar"))
    with pytest.raises(FileNotFoundError, match="holds no"):
        expand_shards(str(tmp_path))


def test_pipe_locations_are_streamed_through_the_command(tmp_path, helpers):
    helpers.write_tar(tmp_path / "p-0.tar", helpers.labelled_samples(0, 3))
    helpers.write_tar(tmp_path / "p-1.tar", helpers.labelled_samples(3, 2))
    location = f"pipe:cat {tmp_path}/p-{{0..1}}.tar"
    assert len(expand_shards(location)) == 2
    assert sorted(_eval_keys(EvalStream(_cfg(location), 0, 1))) == [f"s{i:05d}" for i in range(5)]


def test_a_failing_pipe_command_is_a_shard_error(tmp_path):
    with pytest.raises(ShardError, match="pipe:cat"):
        list(iter_raw_samples(f"pipe:cat {tmp_path}/absent.tar"))


def test_a_tar_truncated_inside_a_member_names_the_shard_and_last_good_key(tmp_path, helpers):
    path = helpers.write_tar(tmp_path / "cut.tar", helpers.labelled_samples(0, 4))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ShardError, match=r"cut\.tar: truncated or corrupt tar after key 's0000\d'"):
        _eval_keys(EvalStream(_cfg(path), 0, 1))


def test_a_tar_cut_at_a_member_boundary_is_caught_by_the_manifest_count(shard_dir):
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    path = shard_dir / manifest["shards"][1]["name"]
    data = path.read_bytes()
    # Keep the first two samples exactly (each: header + padded image + header + padded cls).
    offsets = []
    import tarfile

    with tarfile.open(path) as tar:
        offsets = [m.offset for m in tar.getmembers()]
    path.write_bytes(data[: offsets[4]])
    with pytest.raises(ShardError, match=r"read 2 samples but its manifest records 6"):
        list(iter_raw_samples(str(path), 6))
    with pytest.raises(ShardError, match=manifest["shards"][1]["name"]):
        _eval_keys(EvalStream(_cfg(shard_dir), 0, 1))


def test_a_corrupt_tar_header_is_an_error_not_a_silent_end(shard_dir):
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    path = shard_dir / manifest["shards"][0]["name"]
    data = bytearray(path.read_bytes())
    import tarfile

    with tarfile.open(path) as tar:
        third = tar.getmembers()[4].offset
    data[third : third + 100] = b"\xff" * 100  # garbage where the fifth member's header was
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=manifest["shards"][0]["name"]):
        _eval_keys(EvalStream(_cfg(shard_dir), 0, 1))


def test_a_truncated_shard_is_skipped_and_counted_under_the_skip_policy(tmp_path, helpers):
    helpers.write_tar(tmp_path / "a-0.tar", helpers.labelled_samples(0, 4))
    path = helpers.write_tar(tmp_path / "a-1.tar", helpers.labelled_samples(4, 4))
    path.write_bytes(path.read_bytes()[:3000])
    stream = EvalStream(_cfg(tmp_path / "a-{0..1}.tar", bad_sample_policy="skip"), 0, 1)
    keys = _eval_keys(stream)
    assert keys[:4] == [f"s{i:05d}" for i in range(4)] and len(keys) < 8
    assert stream.num_skipped == 1


def test_a_sample_without_an_image_member_is_an_error_naming_shard_and_key(tmp_path, helpers):
    path = _with_bad_sample(helpers, tmp_path, {"txt": b"hello", "cls": b"1"})
    with pytest.raises(BadSampleError, match=r"mixed\.tar key 'bad': no image member \(has \['cls', 'txt'\]"):
        _eval_keys(EvalStream(_cfg(path), 0, 1))


def test_an_image_that_fails_to_decode_is_an_error_naming_shard_and_key(tmp_path, helpers):
    path = _with_bad_sample(
        helpers, tmp_path, {"jpg": b"\xff\xd8\xff\xe0 definitely not a jpeg", "cls": b"0"}
    )
    with pytest.raises(BadSampleError, match=r"mixed\.tar key 'bad': image member \.jpg fails to decode"):
        _eval_keys(EvalStream(_cfg(path), 0, 1))
    with pytest.raises(BadSampleError, match="key 'bad'"):
        list(itertools.islice(iter(TrainStream(_cfg(path), 0, 1)), 2))


def test_a_decode_error_in_a_loader_worker_reaches_the_trainer_with_shard_and_key(tmp_path, helpers):
    path = _with_bad_sample(helpers, tmp_path, {"png": b"\x89PNG broken", "cls": b"0"})
    with pytest.raises(ValueError, match=r"mixed\.tar key 'bad'"):
        list(itertools.islice(iter(TrainStream(_cfg(path, num_workers=1), 0, 1)), 2))


def test_a_truncated_image_never_becomes_a_blank_image(tmp_path, helpers):
    truncated = helpers.encode_image(7, size=(64, 64), fmt="JPEG")[:-200]
    path = _with_bad_sample(helpers, tmp_path, {"jpg": truncated, "cls": b"0"})
    with pytest.raises(BadSampleError, match="key 'bad'"):
        _eval_keys(EvalStream(_cfg(path), 0, 1))


def test_bad_samples_are_skipped_and_counted_under_the_skip_policy(tmp_path, helpers, caplog):
    path = _with_bad_sample(helpers, tmp_path, {"jpg": b"garbage", "cls": b"0"})
    stream = EvalStream(_cfg(path, bad_sample_policy="skip"), 0, 1)
    keys = _eval_keys(stream)
    assert "bad" not in keys and len(keys) == 6 and stream.num_skipped == 1
    assert "key 'bad'" in caplog.text


def test_training_batches_keep_their_size_when_a_bad_sample_is_skipped(tmp_path, helpers):
    path = _with_bad_sample(helpers, tmp_path, {"txt": b"no image", "cls": b"2"})
    stream = TrainStream(_cfg(path, bad_sample_policy="skip", batch_size=7, batches_per_epoch=1), 0, 1)
    images, labels = next(iter(stream))
    assert images.shape[0] == 7 and stream.num_skipped == 1
    assert all(img.abs().sum() > 0 for img in images)  # no zero image stands in for the bad sample
    assert not any(torch.equal(img, torch.zeros_like(img)) for img in images)


def test_a_missing_class_label_is_a_bad_sample(tmp_path, helpers):
    path = _with_bad_sample(helpers, tmp_path, {"png": helpers.encode_image(3)})
    with pytest.raises(BadSampleError, match="key 'bad': no class label"):
        _eval_keys(EvalStream(_cfg(path), 0, 1))


def test_http_locations_are_streamed_and_a_missing_url_is_a_shard_error(tmp_path, helpers):
    import functools
    import http.server
    import threading

    helpers.write_tar(tmp_path / "h-0.tar", helpers.labelled_samples(0, 3))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        keys = _eval_keys(EvalStream(_cfg(f"{base}/h-0.tar"), 0, 1))
        assert keys == ["s00000", "s00001", "s00002"]
        with pytest.raises(ShardError, match="h-9.tar"):
            list(iter_raw_samples(f"{base}/h-9.tar"))
    finally:
        server.shutdown()
        server.server_close()


def test_resume_stays_exact_when_bad_samples_are_skipped(tmp_path, helpers):
    samples = helpers.labelled_samples(0, 5) + [("bad", {"jpg": b"junk", "cls": b"0"})]
    helpers.write_tar(tmp_path / "k-0.tar", samples + helpers.labelled_samples(5, 4))
    helpers.write_tar(tmp_path / "k-1.tar", helpers.labelled_samples(9, 6))
    cfg = _cfg(
        tmp_path / "k-{0..1}.tar", bad_sample_policy="skip", num_workers=2, shuffle_buffer=4, batch_size=3
    )
    uninterrupted = TrainStream(cfg, 0, 1)
    reference = list(itertools.islice(iter(uninterrupted), 7))
    assert uninterrupted.num_skipped >= 1  # the bad sample was met (and skipped) in these batches
    first = TrainStream(cfg, 0, 1)
    list(itertools.islice(iter(first), 3))
    resumed = TrainStream(cfg, 0, 1)
    resumed.load_state_dict(first.state_dict())
    rest = list(itertools.islice(iter(resumed), 4))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(rest, reference[3:]))
