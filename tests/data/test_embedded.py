"""The embedded default dataset: real photos, labelled, built once into shards and reused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tokscale.data.embedded import embedded_shards
from tokscale.data.stream import DataConfig, EvalStream, TrainStream


def test_the_embedded_dataset_builds_once_with_labels_and_is_reused(tmp_path):
    train = embedded_shards(str(tmp_path), "train")
    manifest_path = Path(train).parent / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert (
        manifest["num_samples"] == 1000
        and manifest["num_classes"] == 10
        and "astronaut" in manifest["classes"]
    )
    built = os.stat(manifest_path).st_mtime_ns
    assert embedded_shards(str(tmp_path), "train") == train
    assert os.stat(manifest_path).st_mtime_ns == built

    cfg = DataConfig(
        train_shards="embedded",
        eval_shards="embedded",
        cache_dir=str(tmp_path),
        resolution=32,
        batch_size=8,
        num_workers=0,
        shuffle_buffer=50,
        batches_per_epoch=2,
    )
    images, labels = next(iter(TrainStream(cfg, 0, 1)))
    assert images.shape == (8, 3, 32, 32) and images.std() > 0.1 and len(set(labels.tolist())) > 1
    evaluation = EvalStream(cfg, 0, 1)
    assert len(evaluation) == 200


def test_two_processes_building_the_embedded_dataset_at_once_agree(tmp_path):
    code = "import sys; from tokscale.data.embedded import embedded_shards; print(embedded_shards(sys.argv[1], 'eval'))"
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs[0] == outs[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["embedded-v1", "embedded-v1.lock"]
