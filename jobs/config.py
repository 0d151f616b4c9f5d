"""Slurm resources of a job, kept apart from the training config.

The training config says what to train; :class:`JobConfig` says where: nodes, GPUs, partition, time. The same
``TrainConfig`` runs under ``tokscale train --nproc``, torchrun or Slurm; only this file's settings change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class JobConfig:
    nodes: int = 1
    gpus_per_node: int = 0  # 0 on a CPU cluster
    tasks_per_node: int = 0  # 0: one task per GPU, or 1 without GPUs
    cpus_per_task: int = 0  # 0: Slurm's default
    mem_gb: float = 0.0  # per node; 0: Slurm's default
    partition: str = ""  # "": the cluster's default partition
    time_min: int = 60
    account: str = ""
    qos: str = ""
    constraint: str = ""
    # Slurm sends SIGUSR2 this many seconds before the time limit: the job saves a checkpoint and requeues.
    signal_delay_s: int = 120
    folder: str = ""  # submitit's pickles and logs; "": RUN_DIR/slurm/logs
    max_requeues: int = 20  # stop requeueing after this many restarts (SLURM_RESTART_COUNT)
    job_name: str = "tokscale"
    # Any other sbatch option, without the dashes: {"exclusive": true, "mail-type": "END"}.
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        for key in ("nodes", "time_min"):
            if getattr(self, key) < 1:
                raise ValueError(f"job.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("gpus_per_node", "tasks_per_node", "cpus_per_task", "mem_gb", "max_requeues"):
            if getattr(self, key) < 0:
                raise ValueError(f"job.{key} must be >= 0, got {getattr(self, key)}")
        if self.gpus_per_node and self.tasks_per_node and self.tasks_per_node != self.gpus_per_node:
            raise ValueError(
                f"job.tasks_per_node={self.tasks_per_node} with job.gpus_per_node={self.gpus_per_node}: "
                "training runs one task per GPU; leave tasks_per_node at 0"
            )
        if not 0 <= self.signal_delay_s < self.time_min * 60:
            raise ValueError(
                f"job.signal_delay_s={self.signal_delay_s} must be in [0, time_min*60={self.time_min * 60}) "
                "so that the checkpoint signal arrives before the time limit"
            )

    @property
    def ntasks_per_node(self) -> int:
        return self.tasks_per_node or self.gpus_per_node or 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.ntasks_per_node

    def sbatch_options(self) -> dict[str, Any]:
        """sbatch long options (without dashes) for this request; also what ``sbatch --test-only`` checks."""
        opts: dict[str, Any] = {
            "nodes": self.nodes,
            "ntasks-per-node": self.ntasks_per_node,
            "time": self.time_min,
        }
        if self.gpus_per_node:
            opts["gpus-per-node"] = self.gpus_per_node
        if self.cpus_per_task:
            opts["cpus-per-task"] = self.cpus_per_task
        if self.mem_gb:
            opts["mem"] = f"{int(self.mem_gb * 1024)}M"
        for key in ("partition", "account", "qos", "constraint"):
            if getattr(self, key):
                opts[key] = getattr(self, key)
        opts.update(self.extra)
        return opts

    def submitit_parameters(self) -> dict[str, Any]:
        """Keyword arguments of ``submitit.SlurmExecutor.update_parameters``."""
        params: dict[str, Any] = {
            "job_name": self.job_name,
            "nodes": self.nodes,
            "ntasks_per_node": self.ntasks_per_node,
            "time": self.time_min,
            "signal_delay_s": self.signal_delay_s,
        }
        if self.gpus_per_node:
            params["gpus_per_node"] = self.gpus_per_node
        if self.cpus_per_task:
            params["cpus_per_task"] = self.cpus_per_task
        if self.mem_gb:
            params["mem"] = f"{int(self.mem_gb * 1024)}MB"
        for key in ("partition", "account", "qos", "constraint"):
            if getattr(self, key):
                params[key] = getattr(self, key)
        # Requeueable even where the cluster's JobRequeue=0 default would refuse `scontrol requeue`.
        params["additional_parameters"] = {"requeue": True, **self.extra}
        return params
