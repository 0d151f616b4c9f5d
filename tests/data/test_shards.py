"""`tokscale data shards`: image folder / file list -> tar shards with a manifest."""

from __future__ import annotations

import hashlib
import json
import os
import tarfile

import pytest

from tokscale.cli import main
from tokscale.data.samples import iter_raw_samples
from tokscale.data.shards import convert


def test_converter_keeps_original_bytes_class_index_and_stable_key(tmp_path, helpers):
    src = helpers.write_image_folder(tmp_path / "src", num_classes=2, per_class=3)
    manifest = convert(src, tmp_path / "out", samples_per_shard=4, jobs=1, progress=False)
    samples = [
        s for shard in manifest["shards"] for s in iter_raw_samples(str(tmp_path / "out" / shard["name"]))
    ]
    assert manifest["classes"] == ["class0", "class1"]
    assert len(samples) == 6
    by_key = {s.key: s for s in samples}
    assert by_key["class1/img002"].members["png"] == (src / "class1" / "img002.png").read_bytes()
    assert by_key["class1/img002"].members["cls"] == b"1"
    assert by_key["class0/img000"].members["cls"] == b"0"


def test_manifest_records_classes_counts_and_sha256_of_each_shard(tmp_path, helpers):
    src = helpers.write_image_folder(tmp_path / "src", num_classes=3, per_class=5)
    convert(src, tmp_path / "out", samples_per_shard=4, jobs=2, progress=False)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [s["count"] for s in manifest["shards"]] == [4, 4, 4, 3]
    assert manifest["num_samples"] == 15 and manifest["num_classes"] == 3
    assert manifest["pattern"] == "src-{000000..000003}.tar"
    for shard in manifest["shards"]:
        data = (tmp_path / "out" / shard["name"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard["sha256"]


def test_shuffled_order_mixes_classes_across_shards_and_sorted_order_does_not(tmp_path, helpers):
    src = helpers.write_image_folder(tmp_path / "src", num_classes=2, per_class=8)
    shuffled = convert(src, tmp_path / "a", samples_per_shard=8, jobs=1, progress=False)
    ordered = convert(src, tmp_path / "b", samples_per_shard=8, jobs=1, progress=False, shuffle=False)

    def labels(out, manifest):
        return {int(s.members["cls"]) for s in iter_raw_samples(str(out / manifest["shards"][0]["name"]))}

    assert labels(tmp_path / "a", shuffled) == {0, 1}
    assert labels(tmp_path / "b", ordered) == {0}


def test_rerun_skips_complete_shards_and_rewrites_a_missing_one(tmp_path, helpers):
    src = helpers.write_image_folder(tmp_path / "src", num_classes=2, per_class=4)
    out = tmp_path / "out"
    first = convert(src, out, samples_per_shard=3, jobs=1, progress=False)
    names = [s["name"] for s in first["shards"]]
    os.utime(out / names[0], (1, 1))  # a skipped shard keeps this mtime
    (out / names[1]).unlink()
    second = convert(src, out, samples_per_shard=3, jobs=1, progress=False)
    assert os.stat(out / names[0]).st_mtime == 1
    assert (out / names[1]).is_file()
    assert second["shards"] == first["shards"]  # byte-identical rewrite: same sha256
    assert not [p for p in os.listdir(out) if ".tmp" in p]


def test_a_shard_left_under_its_temporary_name_is_not_taken_as_complete(tmp_path, helpers):
    src = helpers.write_image_folder(tmp_path / "src", num_classes=1, per_class=2)
    out = tmp_path / "out"
    out.mkdir()
    (out / "src-000000.tar.tmp-999").write_bytes(b"half a shard")
    manifest = convert(src, out, samples_per_shard=2, jobs=1, progress=False)
    with tarfile.open(out / "src-000000.tar") as tar:
        assert len(tar.getnames()) == 4
    assert manifest["num_samples"] == 2


def test_non_image_and_unreadable_files_are_reported_skipped_and_counted(tmp_path, helpers, caplog):
    src = helpers.write_image_folder(tmp_path / "src", num_classes=2, per_class=10)
    (src / "class0" / "notes.txt").write_text("not an image")
    (src / "class1" / "broken.jpg").write_bytes(helpers.encode_image(1, fmt="JPEG")[:200])
    manifest = convert(
        src, tmp_path / "out", samples_per_shard=8, jobs=1, progress=False, max_bad_fraction=0.2
    )
    assert manifest["num_samples"] == 20
    assert manifest["num_bad_files"] == 2
    bad_paths = sorted(os.path.basename(b["path"]) for b in manifest["bad_files"])
    assert bad_paths == ["broken.jpg", "notes.txt"]
    assert "notes.txt" in caplog.text


def test_conversion_fails_when_bad_files_exceed_the_allowed_fraction(tmp_path, helpers):
    src = helpers.write_image_folder(tmp_path / "src", num_classes=1, per_class=3)
    (src / "class0" / "a.txt").write_text("x")
    with pytest.raises(ValueError, match=r"1 of 4 files .* max_bad_fraction=0.1.*a\.txt"):
        convert(src, tmp_path / "out", samples_per_shard=8, jobs=1, progress=False, max_bad_fraction=0.1)
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert "a.txt" in (tmp_path / "out" / "bad_files.txt").read_text()


def test_a_file_list_with_class_names_becomes_labelled_shards(tmp_path, helpers):
    (tmp_path / "imgs").mkdir()
    lines = []
    for i, name in enumerate(["dog", "cat", "dog", "bird"]):
        (tmp_path / "imgs" / f"x{i}.v1.png").write_bytes(helpers.encode_image(i))
        lines.append(f"imgs/x{i}.v1.png {name}")
    (tmp_path / "val.txt").write_text("# path label\n" + "\n".join(lines) + "\n")
    manifest = convert(tmp_path / "val.txt", tmp_path / "out", samples_per_shard=10, jobs=1, progress=False)
    assert manifest["classes"] == ["bird", "cat", "dog"]
    samples = list(iter_raw_samples(str(tmp_path / "out" / "val-000000.tar")))
    labels = {s.key: int(s.members["cls"]) for s in samples}
    assert labels == {"imgs/x0_v1": 2, "imgs/x1_v1": 1, "imgs/x2_v1": 2, "imgs/x3_v1": 0}


def test_a_missing_source_directory_is_a_clear_error(tmp_path, capsys):
    rc = main(["data", "shards", str(tmp_path / "nope"), str(tmp_path / "out")])
    assert rc == 2
    assert f"source {tmp_path / 'nope'} does not exist" in capsys.readouterr().err


def test_shards_command_prints_a_json_summary(tmp_path, helpers, capsys):
    src = helpers.write_image_folder(tmp_path / "src", num_classes=2, per_class=3)
    rc = main(["data", "shards", str(src), str(tmp_path / "out"), "--samples-per-shard", "2", "--jobs", "1"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["num_shards"] == 3 and summary["num_samples"] == 6 and summary["num_bad_files"] == 0
