"""`tokscale data info|embedded` and `tokscale bench data`."""

from __future__ import annotations

import json

from tokscale.cli import main


def test_bench_data_prints_shard_and_folder_throughput_as_json(capsys):
    rc = main(["bench", "data", "--num-images", "16", "--resolution", "32", "--batch-size", "8"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    for key in (
        "shards_1_worker_img_per_s",
        "shards_2_workers_img_per_s",
        "folder_1_worker_img_per_s",
        "folder_2_workers_img_per_s",
    ):
        assert result[key] > 0
    assert result["num_images"] == 16 and result["resolution"] == 32


def test_data_info_reports_shards_and_samples_from_the_manifest(shard_dir, capsys):
    assert main(["data", "info", str(shard_dir)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["num_shards"] == 4 and info["num_samples"] == 24 and info["num_classes"] == 3


def test_data_info_on_a_pattern_that_matches_nothing_exits_2(tmp_path, capsys):
    assert main(["data", "info", str(tmp_path / "x-{0..3}.tar")]) == 2
    assert "matches no shard" in capsys.readouterr().err
