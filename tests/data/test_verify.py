"""`tokscale data verify` against real converter shards, and the streams' size check when a shard is opened."""

from __future__ import annotations

import itertools
import json
import pickle
import subprocess
import sys

import pytest

from tokscale.data.locations import ManifestCount, manifest_counts
from tokscale.data.samples import ShardError
from tokscale.data.stream import DataConfig, EvalStream, TrainStream


def verify(*args: str) -> tuple[int, dict, str]:
    """(exit status, the JSON object on stdout, stderr) of a real `tokscale data verify` process."""
    proc = subprocess.run(
        [sys.executable, "-m", "tokscale.cli", "data", "verify", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return proc.returncode, json.loads(proc.stdout), proc.stderr


def _manifest(shard_dir) -> dict:
    return json.loads((shard_dir / "manifest.json").read_text())


def _shard(shard_dir, i: int):
    return shard_dir / _manifest(shard_dir)["shards"][i]["name"]


def _error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("tokscale: error: ")]
    assert len(lines) == 1, stderr
    return lines[0]


def test_a_good_set_verifies(shard_dir):
    rc, report, stderr = verify(str(shard_dir), "--workers", "2")
    assert rc == 0, stderr
    assert report["shards"] == 4 and report["ok"] == 4 and report["bad"] == []
    assert "tokscale: error" not in stderr


def test_a_flipped_byte_is_named_with_sha256(shard_dir):
    path = _shard(shard_dir, 1)
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x01  # inside an image member: same size, same tar structure, same count
    path.write_bytes(bytes(data))
    rc, report, stderr = verify(str(shard_dir), "--json")
    assert rc == 2
    assert report["ok"] == 3
    [bad] = report["bad"]
    assert bad["shard"] == str(path)
    assert bad["problem"].startswith("sha256 differs from manifest.json")
    assert _manifest(shard_dir)["shards"][1]["sha256"] in bad["problem"]
    line = _error_line(stderr)
    assert "1 of 4 shards" in line and f"{path}: sha256 differs" in line


def test_a_truncated_shard_is_named_with_its_size(shard_dir):
    path = _shard(shard_dir, 2)
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[:5000])
    rc, report, stderr = verify(str(shard_dir))
    assert rc == 2
    assert report["bad"] == [{"shard": str(path), "problem": f"size 5000 bytes, manifest.json says {size}"}]
    assert str(path) in _error_line(stderr)


def test_a_missing_shard_is_named(shard_dir):
    path = _shard(shard_dir, 3)
    path.unlink()
    pattern = str(shard_dir / _manifest(shard_dir)["pattern"])
    for location in (pattern, str(shard_dir)):  # the pattern names it; the folder's manifest lists it
        rc, report, stderr = verify(location, "--json")
        assert rc == 2
        assert report["shards"] == 4 and report["ok"] == 3
        assert report["bad"] == [{"shard": str(path), "problem": "missing (listed in manifest.json)"}]
        assert "1 of 4 shards" in _error_line(stderr)


def test_a_manifest_count_that_does_not_match_is_named(shard_dir):
    manifest = _manifest(shard_dir)
    manifest["shards"][0]["count"] = 7
    (shard_dir / "manifest.json").write_text(json.dumps(manifest))
    rc, report, _ = verify(str(shard_dir))
    assert rc == 2
    [bad] = report["bad"]
    assert bad["shard"] == str(_shard(shard_dir, 0))
    assert bad["problem"] == "6 samples with an image member, manifest.json says 7"


def test_unlisted_shards_and_shards_without_a_manifest_are_bad(shard_dir, tmp_path, helpers):
    extra = helpers.write_tar(shard_dir / "extra.tar", helpers.labelled_samples(0, 2))
    (tmp_path / "loose").mkdir()
    loose = helpers.write_tar(tmp_path / "loose" / "l-0.tar", helpers.labelled_samples(0, 2))
    rc, report, stderr = verify(f"{shard_dir}::{loose}", "--json")
    assert rc == 2
    assert report["shards"] == 6 and report["ok"] == 4
    assert report["bad"] == [
        {"shard": str(extra), "problem": "not listed in manifest.json"},
        {"shard": str(loose), "problem": "shard has no manifest.json beside it"},
    ]
    assert "2 of 6 shards" in _error_line(stderr)


def test_remote_shards_are_reported_and_do_not_fail(shard_dir):
    remote = f"pipe:cat {_shard(shard_dir, 0)}"
    rc, report, stderr = verify(f"{shard_dir}::{remote}")
    assert rc == 0, stderr
    assert report["shards"] == 5 and report["ok"] == 4 and report["bad"] == []
    assert report["not_checked"] == [{"shard": remote, "problem": "not checked (remote)"}]


def test_a_location_that_names_no_shard_is_an_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "tokscale.cli", "data", "verify", str(tmp_path / "x-{0..3}.tar")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "matches no shard" in proc.stderr


# -- the streams' size check -------------------------------------------------------------------------------


def _cfg(shard_dir, **kw) -> DataConfig:
    base = dict(
        train_shards=str(shard_dir),
        eval_shards=str(shard_dir),
        resolution=8,
        batch_size=4,
        num_workers=0,
        shuffle_buffer=0,
        batches_per_epoch=50,
    )
    return DataConfig(**{**base, **kw})


def _grow(path) -> int:
    """Append zeros after the end of the archive: still a valid tar with every sample, only the size differs."""
    size = path.stat().st_size
    with open(path, "ab") as fh:
        fh.write(b"\0" * 10240)
    return size


@pytest.mark.parametrize("num_workers", [0, 1])
def test_the_training_stream_refuses_a_shard_whose_size_differs_from_the_manifest(shard_dir, num_workers):
    path = _shard(shard_dir, 2)
    size = _grow(path)
    stream = TrainStream(_cfg(shard_dir, num_workers=num_workers), 0, 1)
    # 4 shards x 6 samples, batches of 4: 12 batches read every shard at least once.
    with pytest.raises(ShardError) as info:
        list(itertools.islice(iter(stream), 12))
    message = str(info.value)
    assert f"shard {path}: {size + 10240} bytes" in message
    assert f"records {size} bytes" in message
    assert "tokscale data verify" in message and "tokscale data shards" in message


def test_the_evaluation_stream_refuses_a_truncated_shard_before_reading_it(shard_dir):
    path = _shard(shard_dir, 0)
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[: size - 1024])  # the last sample's end-of-archive blocks
    with pytest.raises(ShardError, match=rf"{path.name}: {size - 1024} bytes, but .* records {size} bytes"):
        list(EvalStream(_cfg(shard_dir), 0, 1))


def test_under_the_skip_policy_a_resized_shard_is_skipped_and_counted(shard_dir):
    _grow(_shard(shard_dir, 1))
    stream = EvalStream(_cfg(shard_dir, bad_sample_policy="skip"), 0, 1)
    keys = [k for _, _, batch, _ in stream for k in batch]
    assert len(keys) == 18 and stream.num_skipped == 1


def test_shards_without_a_manifest_size_are_not_checked(tmp_path, helpers):
    helpers.write_tar(tmp_path / "n-0.tar", helpers.labelled_samples(0, 4))
    assert manifest_counts([str(tmp_path / "n-0.tar")]) == [None]
    keys = [k for _, _, batch, _ in EvalStream(_cfg(tmp_path / "n-0.tar"), 0, 1) for k in batch]
    assert len(keys) == 4


def test_manifest_counts_are_ints_that_carry_the_size_into_spawned_workers(shard_dir):
    [count] = manifest_counts([str(_shard(shard_dir, 0))])
    assert count == 6 and count + 1 == 7 and json.dumps(count) == "6"
    copy = pickle.loads(pickle.dumps(count))
    assert isinstance(copy, ManifestCount)
    assert (int(copy), copy.size, copy.manifest) == (6, _shard(shard_dir, 0).stat().st_size, count.manifest)
