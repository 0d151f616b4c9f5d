"""A tiny runnable (tokscale.registry) for launcher tests that must not wait for a model or a DeepSpeed engine.

``load_config(path, overrides)`` and ``main(cfg, should_stop)``: every step all-reduces a tensor over gloo
(so a wrong rendezvous hangs or fails), rank 0 appends ``{"step", "world_size", "sum"}`` to metrics.jsonl, and
checkpoints are ``run_dir/ckpt/step_XXXXXXXX/COMPLETE`` like the real trainer's, with automatic resume.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ToyLoop:
    max_steps: int = 4
    step_s: float = 0.0  # sleep per step, so a test can signal a run mid-training
    ckpt_every: int = 1000


@dataclass
class ToyConfig:
    run_dir: str = "runs/toy"
    train: ToyLoop = field(default_factory=ToyLoop)

    def __post_init__(self):
        if self.train.max_steps < 1:
            raise ValueError(f"train.max_steps must be >= 1, got {self.train.max_steps}")


def load_config(path, overrides=()) -> ToyConfig:
    from tokscale.config import load_config

    return load_config(ToyConfig, path, overrides)


def _latest(run_dir: Path) -> int:
    steps = [int(p.name[5:]) for p in (run_dir / "ckpt").glob("step_*") if (p / "COMPLETE").is_file()]
    return max(steps, default=0)


def main(cfg: ToyConfig, should_stop=None) -> dict:
    import torch
    import torch.distributed as dist

    from tokscale.distributed import any_rank, barrier, init_distributed

    d = init_distributed()
    run_dir = Path(cfg.run_dir)
    if d.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    barrier()
    step = _latest(run_dir)
    resumed_from = step

    def save(at: int):
        barrier()
        if d.is_main:
            ck = run_dir / "ckpt" / f"step_{at:08d}"
            ck.mkdir(parents=True, exist_ok=True)
            (ck / "COMPLETE").write_text(json.dumps({"step": at, "world_size": d.world_size}))
        barrier()

    status = "done"
    while step < cfg.train.max_steps:
        if any_rank(bool(should_stop and should_stop())):
            save(step)
            status = "stopped"
            break
        t = torch.ones(1) * (d.rank + 1)
        if dist.is_initialized():
            dist.all_reduce(t)
        step += 1
        if d.is_main:
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "world_size": d.world_size, "sum": t.item()}) + "\n")
        if step % cfg.train.ckpt_every == 0 or step == cfg.train.max_steps:
            save(step)
        time.sleep(cfg.train.step_s)
    return {
        "status": status,
        "step": step,
        "resumed_from": resumed_from,
        "rank": d.rank,
        "world_size": d.world_size,
        "host": os.uname().nodename,
        "restart": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
    }
