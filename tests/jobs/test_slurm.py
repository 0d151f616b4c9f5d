"""Through submitit on a real two-node Slurm cluster (tests/conftest.py starts it; root needed).

The toy runnable (tests/jobs/toy_trainer.py: load_config and main, no engine) all-reduces over gloo every
step, so these tests check the Slurm mechanics in seconds: rendezvous across nodes, job arrays, status, refusal
before submission. test_slurm_tokenizer.py runs the real trainer (including preemption and requeue).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tokscale.cli import main as cli_main
from tokscale.jobs.config import JobConfig
from tokscale.jobs.status import run_status
from tokscale.jobs.submission import submit

pytestmark = pytest.mark.slurm


def toy_config(tmp_path: Path, max_steps: int = 3, step_s: float = 0.0) -> str:
    path = tmp_path / "toy.yaml"
    path.write_text(f"run_dir: {tmp_path / 'run'}\ntrain:\n  max_steps: {max_steps}\n  step_s: {step_s}\n")
    return str(path)


def all_job_ids() -> list[str]:
    out = subprocess.run(
        ["squeue", "-h", "-t", "all", "-o", "%i"], capture_output=True, text=True, check=True
    )
    return out.stdout.split()


def test_a_two_node_job_all_reduces_across_both_nodes_and_reports_its_status(slurm_cluster, tmp_path):
    (run,) = submit(
        slurm_cluster.toy_trainer,
        toy_config(tmp_path),
        [],
        JobConfig(nodes=2, time_min=5, signal_delay_s=30),
    )
    results = slurm_cluster.wait_for(run.job, timeout_s=180)
    assert [r["rank"] for r in results] == [0, 1]
    assert all(r["status"] == "done" and r["world_size"] == 2 and r["step"] == 3 for r in results)
    # 1 + 2 summed over the two ranks, at every step: both nodes took part in every collective.
    assert [m["sum"] for m in slurm_cluster.metrics(run.run_dir)] == [3.0, 3.0, 3.0]
    nodes = subprocess.run(
        ["squeue", "-h", "-t", "all", "-j", run.job_id, "-o", "%N"], capture_output=True, text=True
    ).stdout.strip()
    assert nodes == "node[1-2]"
    assert slurm_cluster.final_state(run.job_id) == "COMPLETED"
    status = run_status(run.run_dir)
    assert (status["state"], status["step"], status["checkpoint_step"]) == ("COMPLETED", 3, 3)
    assert Path(status["stdout"]).is_file() and status["job_id"] == run.job_id


def test_jobs_status_prints_the_state_step_and_checkpoint_of_a_run(slurm_cluster, tmp_path, capsys):
    (run,) = submit(
        slurm_cluster.toy_trainer, toy_config(tmp_path), [], JobConfig(time_min=5, signal_delay_s=30)
    )
    slurm_cluster.wait_for(run.job, timeout_s=180)
    slurm_cluster.final_state(run.job_id)
    assert cli_main(["jobs", "status", run.run_dir]) == 0
    out = capsys.readouterr().out
    assert f"job:             {run.job_id} (COMPLETED)" in out
    assert "step:            3/3" in out and "ckpt/step_00000003" in out


def test_a_sweep_is_one_job_array_with_a_run_dir_per_item(slurm_cluster, tmp_path, capsys):
    argv = ["submit", slurm_cluster.toy_trainer, toy_config(tmp_path), "--json"]
    argv += [
        "--time",
        "5",
        "--signal-delay-s",
        "30",
        "--sweep",
        "train.max_steps=2",
        "--sweep",
        "train.max_steps=3",
    ]
    assert cli_main(argv) == 0
    runs = json.loads(capsys.readouterr().out)
    array_id = runs[0]["job_id"].split("_")[0]
    assert [r["job_id"] for r in runs] == [f"{array_id}_0", f"{array_id}_1"]
    assert [r["run_dir"] for r in runs] == [
        str(tmp_path / "run" / "max_steps-2"),
        str(tmp_path / "run" / "max_steps-3"),
    ]
    import submitit

    for r, steps in zip(runs, (2, 3)):
        job = submitit.SlurmJob(folder=Path(r["stdout"]).parent, job_id=r["job_id"])
        (result,) = slurm_cluster.wait_for(job, timeout_s=180)
        assert result["step"] == steps and result["world_size"] == 1
        assert [m["step"] for m in slurm_cluster.metrics(r["run_dir"])] == list(range(1, steps + 1))
        assert json.loads((Path(r["run_dir"]) / "slurm" / "job.json").read_text())["job_id"] == r["job_id"]
    for r in runs:
        slurm_cluster.final_state(r["job_id"])
    assert cli_main(["jobs", "status", str(tmp_path / "run"), "--json"]) == 0
    statuses = json.loads(capsys.readouterr().out)
    assert [(s["job_id"], s["step"], s["state"]) for s in statuses] == [
        (runs[0]["job_id"], 2, "COMPLETED"),
        (runs[1]["job_id"], 3, "COMPLETED"),
    ]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--partition", "nosuch"], "job.partition='nosuch': unknown partition 'nosuch'"),
        (["--nodes", "3"], "job.nodes=3: partition 'debug' has only 2 node"),
        (["--gpus-per-node", "1"], "job.gpus_per_node=1: partition 'debug' has no GPUs"),
        (["--slurm", "nodelist=node9"], "Slurm refuses the job request"),
    ],
)
def test_an_impossible_request_is_refused_at_submission(slurm_cluster, tmp_path, capsys, flags, message):
    before = all_job_ids()
    argv = ["submit", slurm_cluster.toy_trainer, toy_config(tmp_path), *flags]
    assert cli_main(argv) == 2
    assert message in capsys.readouterr().err
    assert all_job_ids() == before and not (tmp_path / "run" / "slurm").exists()


def test_a_config_error_fails_before_anything_is_submitted(slurm_cluster, tmp_path, capsys):
    before = all_job_ids()
    argv = ["submit", slurm_cluster.toy_trainer, toy_config(tmp_path)]
    assert cli_main(argv + ["--sweep", "train.max_steps=2", "--sweep", "train.max_stepz=3"]) == 2
    assert "max_stepz" in capsys.readouterr().err
    assert all_job_ids() == before and not (tmp_path / "run").exists()


def test_sigterm_saves_a_checkpoint_and_ends_the_job_without_requeueing(slurm_cluster, tmp_path):
    # SIGTERM is preemption (Slurm requeues the job itself) or cancellation: save, then stop for good.
    (run,) = submit(
        slurm_cluster.toy_trainer,
        toy_config(tmp_path, max_steps=200, step_s=0.1),
        [],
        JobConfig(nodes=2, time_min=5, signal_delay_s=30),
    )
    deadline = time.monotonic() + 120
    while len(slurm_cluster.metrics(run.run_dir)) < 2:
        assert time.monotonic() < deadline, slurm_cluster.job_logs(run.job)
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=TERM", run.job_id], check=True)
    assert slurm_cluster.final_state(run.job_id, timeout_s=60) == "FAILED"  # exit 143: stopped, not done
    status = run_status(run.run_dir)
    assert 2 <= status["checkpoint_step"] < 200 and status["checkpoint_step"] == status["step"]
    assert not list(Path(run.stdout).parent.glob("*_result.pkl"))
    restarts = subprocess.run(["scontrol", "show", "job", run.job_id], capture_output=True, text=True).stdout
    assert "Restarts=0" in restarts


def test_the_time_limit_signal_saves_a_checkpoint_and_max_requeues_ends_the_job(slurm_cluster, tmp_path):
    # A 1-minute job asking for USR2 45 s before its limit: Slurm signals it 15-45 s in (its time-limit timer
    # runs every ~30 s). With max_requeues=0 the job saves, does not requeue, and returns "stopped". On a loaded
    # machine the two tasks may still be starting when the signal comes: then it stops and saves at step 0.
    (run,) = submit(
        slurm_cluster.toy_trainer,
        toy_config(tmp_path, max_steps=1000, step_s=0.1),
        [],
        JobConfig(nodes=2, time_min=1, signal_delay_s=45, max_requeues=0),
    )
    results = slurm_cluster.wait_for(run.job, timeout_s=120)
    assert all(r["status"] == "stopped" and r["restart"] == 0 for r in results)
    step = results[0]["step"]
    assert 0 <= step < 1000 and run_status(run.run_dir)["checkpoint_step"] == step
    assert slurm_cluster.final_state(run.job_id) == "COMPLETED"


def test_a_registered_toy_task_trains_on_two_nodes_through_tokscale_submit(
    slurm_cluster, tmp_path, monkeypatch, capsys
):
    """The second trainer of tests/core (a Task on the shared loop, a real DeepSpeed engine) on the cluster."""
    import submitit

    from tokscale.registry import TRAINERS_ENV

    toy_task = Path(__file__).resolve().parent.parent / "core" / "toy_task.py"
    monkeypatch.setenv(TRAINERS_ENV, f"toy={toy_task}:ToyTask")
    cfg = tmp_path / "toy.yaml"
    cfg.write_text(f"run_dir: {tmp_path / 'run'}\ntrain:\n  max_steps: 3\n")
    argv = ["submit", "toy", str(cfg), "--nodes", "2", "--time", "5", "--signal-delay-s", "30", "--json"]
    assert cli_main(argv) == 0
    (run,) = json.loads(capsys.readouterr().out)
    job = submitit.SlurmJob(folder=Path(run["stdout"]).parent, job_id=run["job_id"], tasks=(0, 1))
    results = slurm_cluster.wait_for(job, timeout_s=240)
    assert [(r["status"], r["step"]) for r in results] == [("done", 3), ("done", 3)]
    rows = slurm_cluster.metrics(run["run_dir"])
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["train/rank"] == 0.5 for r in rows)
    info = json.loads((Path(run["run_dir"]) / "run_info.jsonl").read_text().splitlines()[-1])
    assert info["trainer"] == "toy" and info["world_size"] == 2
    assert slurm_cluster.final_state(run["job_id"]) == "COMPLETED"
