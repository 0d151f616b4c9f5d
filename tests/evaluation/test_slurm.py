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


def test_a_failing_slurm_task_writes_tokscales_one_error_line_and_logs_the_traceback_in_the_run(
    slurm_env, tmp_path
):
    """A reference of another resolution is only found inside the job: its stderr log gets the same
    `tokscale: error:` line as a local run, and the traceback lands in RUN/logs, not only in submitit's log."""
    import numpy as np

    from tokscale.evaluation.fid import StatsMeta, save_stats
    from tokscale.evaluation.inception import write_random_inception_weights

    write_tiny_export(tmp_path / "tok")
    ref = save_stats(
        tmp_path / "ref256.npz", np.zeros(2048), np.eye(2048), StatsMeta(resolution=256, count=10)
    )
    weights = write_random_inception_weights(tmp_path / "inception.pth")
    out = tmp_path / "eval"
    r = subprocess.run(
        [sys.executable, "-m", "tokscale.cli", "eval", "recon", str(tmp_path / "tok"),
         f"data.cache_dir={tmp_path / 'cache'}", "data.num_workers=0", "--data", "embedded", "--no-lpips",
         "--inception-weights", str(weights), "--reference", str(ref), "--num-samples", "4", "--out", str(out),
         "--submit", "--time", "10", "--signal-delay-s", "30"],
        env=slurm_env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    (run,) = json.loads(r.stdout)
    work = Path(str(out) + ".eval-job")
    deadline = time.monotonic() + 240
    while not list((work / "logs").glob("*.log")):
        assert time.monotonic() < deadline, (
            Path(run["stderr"]).read_text() if Path(run["stderr"]).exists() else ""
        )
        time.sleep(1)
    deadline = time.monotonic() + 60
    while "tokscale: error:" not in (text := Path(run["stderr"]).read_text()):
        assert time.monotonic() < deadline, text[-3000:]
        time.sleep(1)
    line = next(x for x in text.splitlines() if "tokscale: error:" in x)
    assert "ref256.npz" in line and "resolution=256" in line and str(work / "logs") in line
    assert "Traceback" in (work / "logs" / "error.log").read_text()
    assert not out.exists()
