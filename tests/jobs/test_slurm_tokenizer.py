"""The real tokenizer trainer through ``tokscale submit`` on the local two-node Slurm cluster.

2d-tiny at 32 px on the embedded dataset, a handful of steps: two nodes under ZeRO-2 over gloo, a job
signalled mid-run (under ZeRO-3) that checkpoints, requeues itself and finishes from the checkpoint, and a
preset sweep as one job array.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import submitit

from tokscale.cli import main as cli_main
from tokscale.jobs.status import run_status

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

TINY = [
    "data.train_shards=embedded",
    "data.eval_shards=embedded",
    "model.image_size=32",
    "data.batch_size=4",
    "data.num_workers=0",
    "data.shuffle_buffer=8",
    "data.batches_per_epoch=4",
    "train.log_every=1",
    "train.image_every=1000",
    "train.progress=false",
]
RESOURCES = ["--time", "10", "--signal-delay-s", "60", "--json"]


def submit_cli(capsys, *args: str) -> list[dict]:
    assert cli_main(["submit", "tokenizer", "tokenizer/demo", *args]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def job_of(run: dict) -> submitit.SlurmJob:
    tasks = list(range(run["num_tasks"]))
    return submitit.SlurmJob(folder=Path(run["stdout"]).parent, job_id=run["job_id"], tasks=tasks)


def steps_logged(run_dir) -> list[int]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.is_file() else []


def test_a_two_node_job_trains_2d_tiny_under_zero2_over_gloo(slurm_cluster, tmp_path, capsys):
    run_dir = tmp_path / "run"
    (run,) = submit_cli(
        capsys,
        f"run_dir={run_dir}",
        *TINY,
        "train.max_steps=4",
        "train.ckpt_every=2",
        "train.zero_stage=2",
        "--nodes",
        "2",
        *RESOURCES,
    )
    results = slurm_cluster.wait_for(job_of(run), timeout_s=300)
    assert results == [{"status": "done", "step": 4, "run_dir": str(run_dir)}] * 2
    assert steps_logged(run_dir) == [1, 2, 3, 4]
    info = json.loads((run_dir / "run_info.jsonl").read_text().splitlines()[-1])
    assert info["world_size"] == 2
    # ZeRO-2 partitions the optimizer state: one shard per rank in the final checkpoint.
    shards = sorted(p.name for p in (run_dir / "ckpt" / "step_00000004").rglob("*optim_states.pt"))
    assert len(shards) == 2, shards
    assert slurm_cluster.final_state(run["job_id"]) == "COMPLETED"
    status = run_status(run_dir)
    assert (status["state"], status["step"], status["checkpoint_step"]) == ("COMPLETED", 4, 4)


def test_a_preempted_training_job_saves_requeues_and_finishes_from_its_checkpoint(
    slurm_cluster, tmp_path, capsys
):
    run_dir = tmp_path / "run"
    (run,) = submit_cli(
        capsys,
        f"run_dir={run_dir}",
        *TINY,
        "train.max_steps=20",
        "train.ckpt_every=100",
        "train.zero_stage=3",
        "--nodes",
        "2",
        *RESOURCES,
    )
    job = job_of(run)
    deadline = time.monotonic() + 240
    while len(steps_logged(run_dir)) < 2:
        assert time.monotonic() < deadline, slurm_cluster.job_logs(job)
        time.sleep(0.2)
    # What Slurm sends signal_delay_s before the time limit, sent now.
    subprocess.run(["scancel", "--signal=USR2", run["job_id"]], check=True)
    results = slurm_cluster.wait_for(job, timeout_s=300)
    assert results == [{"status": "done", "step": 20, "run_dir": str(run_dir)}] * 2
    ckpts = sorted(p.name for p in (run_dir / "ckpt").glob("step_*"))
    assert len(ckpts) == 2 and ckpts[-1] == "step_00000020", (
        ckpts
    )  # the signal's checkpoint and the final one
    stopped_at = int(ckpts[0][5:])
    assert 2 <= stopped_at < 20
    assert steps_logged(run_dir) == list(range(1, 21)), "the requeued run went on from the checkpoint"
    assert "JOB REQUEUE" in Path(run["stderr"]).read_text()
    assert f"resumed from {run_dir / 'ckpt' / ckpts[0]}" in Path(run["stderr"]).read_text()
    # ZeRO-3 over gloo may abort in interpreter teardown; the job leaves through finish() and stays COMPLETED.
    assert slurm_cluster.final_state(run["job_id"]) == "COMPLETED"


def test_a_preset_sweep_trains_each_preset_in_its_own_run_dir(slurm_cluster, tmp_path, capsys):
    runs = submit_cli(
        capsys,
        f"run_dir={tmp_path / 'sweep'}",
        *TINY,
        "train.max_steps=2",
        "train.ckpt_every=2",
        "model.num_tokens=4",  # the 1D preset's pooled queries need a grid of 2x2 for 4 tokens (32 px)
        "--sweep",
        "model.preset=2d-tiny",
        "--sweep",
        "model.preset=1d-tiny",
        *RESOURCES,
    )
    assert [Path(r["run_dir"]).name for r in runs] == ["preset-2d-tiny", "preset-1d-tiny"]
    assert runs[0]["job_id"].split("_")[0] == runs[1]["job_id"].split("_")[0], "one job array"
    for r in runs:
        (result,) = slurm_cluster.wait_for(job_of(r), timeout_s=300)
        assert result == {"status": "done", "step": 2, "run_dir": r["run_dir"]}
        preset = r["overrides"][-2].split("=")[1]
        assert f"preset: {preset}" in (Path(r["run_dir"]) / "config.yaml").read_text()
