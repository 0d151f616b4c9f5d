"""Two real processes (gloo), two loader workers each: exact evaluation split, equal training batches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

WORKER = Path(__file__).with_name("distributed_worker.py")


def _run_two_ranks(tmp_path: Path, shards: str) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(WORKER),
                str(rank),
                "2",
                str(tmp_path / "init"),
                shards,
                str(tmp_path / f"r{rank}.json"),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=120)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, p in enumerate(procs):
        assert p.returncode == 0, f"rank {rank} failed:\n{outputs[rank]}"
    return [json.loads((tmp_path / f"r{rank}.json").read_text()) for rank in range(2)]


def test_two_ranks_with_two_workers_each_see_disjoint_eval_samples_covering_the_set_once_and_equal_train_batches(
    tmp_path, helpers
):
    # Three shards of uneven size (7 + 4 + 6 = 17 samples): neither ranks nor workers divide it evenly.
    helpers.write_tar(tmp_path / "d-0.tar", helpers.labelled_samples(0, 7))
    helpers.write_tar(tmp_path / "d-1.tar", helpers.labelled_samples(7, 4))
    helpers.write_tar(tmp_path / "d-2.tar", helpers.labelled_samples(11, 6))
    r0, r1 = _run_two_ranks(tmp_path, str(tmp_path / "d-{0..2}.tar"))

    keys0, keys1 = set(r0["eval_keys"]), set(r1["eval_keys"])
    assert not keys0 & keys1
    assert sorted(keys0 | keys1) == [f"s{i:05d}" for i in range(17)]
    assert len(r0["eval_keys"]) + len(r1["eval_keys"]) == 17  # no padded duplicates
    assert [r0["eval_len"], r1["eval_len"]] == [len(keys0), len(keys1)] == [8, 9]
    assert r0["all_eval_keys"] == r1["all_eval_keys"]

    assert r0["train_steps"] == r1["train_steps"] == 8  # two epochs of batches_per_epoch=4 on each rank
    assert r0["state"]["batches_consumed"] == r1["state"]["batches_consumed"] == 8
    assert r0["train_labels"] != r1["train_labels"]
