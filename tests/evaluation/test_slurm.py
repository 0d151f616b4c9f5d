"""`tokscale eval recon --submit` as a real two-node Slurm job (the local cluster of jobs/local_cluster.sh).

Uses the session's cluster (tests/conftest.py: started as root; skipped otherwise, failed under CI=true).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from palette import write_tiny_export

pytestmark = pytest.mark.slurm


@pytest.fixture
def slurm_env(slurm_cluster):
    return {**os.environ, "SLURM_CONF": slurm_cluster.conf}


def test_a_two_node_slurm_evaluation_counts_each_sample_once(slurm_env, tmp_path):
    write_tiny_export(tmp_path / "tok")
    out = tmp_path / "eval"
    r = subprocess.run(
        [sys.executable, "-m", "tokscale.cli", "eval", "recon", str(tmp_path / "tok"),
         f"data.cache_dir={tmp_path / 'cache'}", "data.num_workers=0", "--data", "embedded", "--no-fid",
         "--no-lpips", "--num-samples", "10", "--batch-size", "3", "--out", str(out), "--submit", "--nodes", "2",
         "--time", "10", "--signal-delay-s", "30"],
        env=slurm_env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    (run,) = json.loads(r.stdout)
    assert run["num_tasks"] == 2
    deadline = time.monotonic() + 240
    while not (out / "metrics.json").is_file():
        assert time.monotonic() < deadline, (
            Path(run["stderr"]).read_text() if Path(run["stderr"]).exists() else ""
        )
        time.sleep(2)
    report = json.loads((out / "metrics.json").read_text())
    assert report["world_size"] == 2 and report["metrics"]["num_samples"] == 10
