"""Where a submitted run stands: its step, its last checkpoint and its Slurm job state.

    tokscale jobs status runs/gigatok_1d_S-S

Reads only the run directory (``slurm/job.json`` written at submission, ``ckpt/step_XXXXXXXX/COMPLETE``,
``metrics.jsonl``, ``config.yaml``) plus ``squeue``/``sacct`` for the state. Without accounting (no slurmdbd)
a job that left squeue's memory is reported UNKNOWN rather than guessed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from tokscale.checkpoint import latest_checkpoint
from tokscale.jobs.submission import JOB_FILE


def last_logged_step(run_dir: Path) -> int | None:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    step = None
    with open(path) as f:
        for line in f:
            try:
                step = int(json.loads(line)["step"])
            except (ValueError, KeyError, TypeError):
                continue  # a line cut by a kill mid-write
    return step


def max_steps(run_dir: Path) -> int | None:
    for name in ("config.yaml", "slurm/config.yaml"):
        path = run_dir / name
        if path.is_file():
            from omegaconf import OmegaConf

            value = OmegaConf.select(OmegaConf.load(path), "train.max_steps", default=None)
            return int(value) if value is not None else None
    return None


def slurm_state(job_id: str) -> str:
    """State from squeue (queued/running/recently ended), else sacct, else UNKNOWN."""
    if shutil.which("squeue"):
        out = subprocess.run(
            ["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        states = out.stdout.split()
        if out.returncode == 0 and states:
            return states[0]
    if shutil.which("sacct"):
        out = subprocess.run(
            ["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        states = out.stdout.split()
        if out.returncode == 0 and states:
            return states[-1].split()[0]  # "CANCELLED by 0" -> CANCELLED
    return "UNKNOWN"


def run_status(run_dir: str | Path) -> dict:
    run_dir = Path(run_dir)
    job_file = run_dir / "slurm" / JOB_FILE
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} not found")
    info = json.loads(job_file.read_text()) if job_file.is_file() else {}
    ckpt = latest_checkpoint(run_dir)  # the trainer resumes from it
    job_id = info.get("job_id")
    return {
        "run_dir": str(run_dir),
        "job_id": job_id,
        "state": slurm_state(job_id) if job_id else "NOT SUBMITTED",
        "step": last_logged_step(run_dir),
        "max_steps": max_steps(run_dir),
        "checkpoint_step": ckpt[0] if ckpt else None,
        "checkpoint": str(ckpt[1]) if ckpt else None,
        "stdout": info.get("stdout"),
        "stderr": info.get("stderr"),
    }


def sweep_runs(run_dir: str | Path) -> list[Path]:
    """The run directories of a sweep submitted with RUN_DIR as its base (each has slurm/job.json)."""
    base = Path(run_dir)
    if (base / "slurm" / JOB_FILE).is_file() or not base.is_dir():
        return []
    return sorted(p for p in base.iterdir() if (p / "slurm" / JOB_FILE).is_file())


def format_status(s: dict) -> str:
    total = f"/{s['max_steps']}" if s["max_steps"] else ""
    lines = [
        f"run_dir:         {s['run_dir']}",
        f"job:             {s['job_id'] or '-'} ({s['state']})",
        f"step:            {s['step'] if s['step'] is not None else '-'}{total} (metrics.jsonl)",
        f"last checkpoint: {s['checkpoint'] or '-'}",
    ]
    if s["stdout"]:
        lines += [f"stdout:          {s['stdout']}", f"stderr:          {s['stderr']}"]
    return "\n".join(lines)
