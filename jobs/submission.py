"""Submitting training runs to Slurm through submitit: one job, or a job array over a sweep.

    tokscale submit tokenizer tokenizer/gigatok-1d-S-S data.batch_size=8 --nodes 2 --gpus-per-node 8 -p gpu
    tokscale submit tokenizer tokenizer/gigatok --sweep model.preset=1d-S-S --sweep model.preset=1d-S-B

What runs is any runnable of tokscale.registry: a registered trainer (by name) or a module offering
``load_config`` and ``main`` (the evaluation jobs).

Order matters: every training config of the submission is loaded and validated first, then the cluster is
asked whether it can run the request, and only then is anything written or submitted.

Each run directory gets ``slurm/config.yaml`` (the resolved config the job loads; editing the source YAML later
does not change a queued or requeued job) and ``slurm/job.json`` (job id, log paths, resources), which
``tokscale jobs status RUN_DIR`` reads.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tokscale.jobs.config import JobConfig
from tokscale.jobs.training_job import TrainingJob

log = logging.getLogger(__name__)

JOB_FILE = "job.json"


@dataclass
class SubmittedRun:
    job_id: str
    run_dir: str
    stdout: str
    stderr: str
    overrides: list[str]
    num_tasks: int = 1  # Slurm tasks (= torch.distributed ranks) of the job
    job: object = None  # the submitit Job (not serialised)

    def describe(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "job"}


def slug(overrides: list[str]) -> str:
    """A folder name for one sweep item: ``model.preset=1d-S-S train.lr=1e-4`` -> ``preset-1d-S-S_lr-1e-4``."""
    parts = []
    for item in overrides:
        key, _, value = item.partition("=")
        parts.append(f"{key.rsplit('.', 1)[-1]}-{value}")
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", "_".join(parts))
    return re.sub(r"-{2,}", "-", name).strip("-") or "run"


def sweep_items(items: list[str]) -> list[list[str]]:
    """``--sweep "a=1 b=2"`` items -> lists of overrides; duplicates are a mistake."""
    runs = [item.split() for item in items]
    seen = set()
    for run in runs:
        if not run:
            raise ValueError("an empty --sweep item: give overrides like model.preset=1d-S-S")
        key = tuple(run)
        if key in seen:
            raise ValueError(f"--sweep item {' '.join(run)!r} is given twice")
        seen.add(key)
    return runs


def read_sweep_file(path: str | Path) -> list[str]:
    """A YAML list whose items are override strings or mappings (``- {model.preset: 1d-S-S}``)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"sweep file {p} not found")
    data = OmegaConf.load(p)
    if not isinstance(data, ListConfig):
        raise ValueError(f"{p}: a sweep file is a YAML list of override strings or key: value mappings")
    items = []
    for entry in data:
        if isinstance(entry, DictConfig):
            items.append(" ".join(f"{k}={v}" for k, v in OmegaConf.to_container(entry).items()))
        else:
            items.append(str(entry))
    return items


def plan_runs(
    runnable, config: str, overrides: list[str], sweep: list[list[str]] | None
) -> list[tuple[list[str], object]]:
    """(overrides, validated config) per run; a sweep puts each run in BASE_RUN_DIR/<slug of its overrides>."""
    base = runnable.load_config(config, overrides)
    if not sweep:
        return [(list(overrides), base)]
    runs = []
    names = set()
    for item in sweep:
        extra = list(item)
        if not any(o.startswith("run_dir=") for o in item):
            name = slug(item)
            if name in names:
                raise ValueError(f"two sweep items map to the run directory {name!r}; set run_dir= in them")
            names.add(name)
            extra.append(f"run_dir={Path(base.run_dir) / name}")
        runs.append((list(overrides) + extra, runnable.load_config(config, list(overrides) + extra)))
    return runs


def write_job_file(run_dir: Path, run: SubmittedRun, job_cfg: JobConfig, config: str, trainer: str) -> None:
    info = {
        **run.describe(),
        "config": config,
        "trainer": trainer,
        "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "resources": asdict(job_cfg),
    }
    (run_dir / "slurm").mkdir(parents=True, exist_ok=True)
    (run_dir / "slurm" / JOB_FILE).write_text(json.dumps(info, indent=2) + "\n")


def submit(
    trainer: str,
    config: str,
    overrides: list[str],
    job_cfg: JobConfig,
    sweep: list[list[str]] | None = None,
    validate_cluster: bool = True,
) -> list[SubmittedRun]:
    """Validate, then submit one job (or one array job for a sweep) of ``trainer`` (a registered name or a
    runnable's spec); returns immediately after sbatch."""
    import submitit
    from submitit.core.utils import JobPaths

    from tokscale.config import to_yaml
    from tokscale.jobs.cluster import require_slurm, validate
    from tokscale.registry import resolve_runnable, runnable_spec
    from tokscale.trainer import check_global_batch

    runnable = resolve_runnable(trainer)
    spec = runnable_spec(runnable)  # what the node imports
    runs = plan_runs(runnable, config, overrides, sweep)  # every config error surfaces before any submission
    for _, cfg in runs:
        if hasattr(getattr(cfg, "train", None), "global_batch_size"):
            check_global_batch(cfg, job_cfg.world_size)
    require_slurm()
    if validate_cluster:
        validate(job_cfg)

    base_dir = Path(runs[0][1].run_dir) if not sweep else Path(runs[0][1].run_dir).parent
    folder = Path(job_cfg.folder) if job_cfg.folder else base_dir / "slurm" / "logs"
    executor = submitit.SlurmExecutor(folder=folder / "%j", max_num_timeout=job_cfg.max_requeues)
    executor.update_parameters(**job_cfg.submitit_parameters())

    jobs_in = []
    for run_overrides, cfg in runs:
        run_dir = Path(cfg.run_dir).resolve()
        (run_dir / "slurm").mkdir(parents=True, exist_ok=True)
        snapshot = run_dir / "slurm" / "config.yaml"
        snapshot.write_text(to_yaml(cfg))
        jobs_in.append((run_overrides, run_dir, TrainingJob(str(snapshot), spec, job_cfg.max_requeues)))

    if len(jobs_in) == 1:
        jobs = [executor.submit(jobs_in[0][2])]
    else:
        with executor.batch():
            pending = [executor.submit(job) for _, _, job in jobs_in]
        jobs = pending

    submitted = []
    for (run_overrides, run_dir, _), job in zip(jobs_in, jobs):
        rank0 = JobPaths(folder / "%j", job_id=job.job_id, task_id=0)  # the logs of global rank 0
        run = SubmittedRun(
            job_id=str(job.job_id),
            run_dir=str(run_dir),
            stdout=str(rank0.stdout),
            stderr=str(rank0.stderr),
            overrides=run_overrides,
            num_tasks=job_cfg.world_size,
            job=job,
        )
        write_job_file(run_dir, run, job_cfg, config, trainer)
        submitted.append(run)
        log.info("submitted job %s for %s", run.job_id, run_dir)
    return submitted
