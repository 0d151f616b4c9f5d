"""The one training loop every trainer runs: ``train(TaskClass, cfg, should_stop)``.

    from tokscale.loop import train
    result = train(TokenizerTask, cfg)          # {"status": "done" | "stopped", "step": N, "run_dir": ...}

It owns the process group, seeds, the run directory (resolved config with its ``schema``, git commit, world
size), the DeepSpeed engine built from the task's parameter groups, resume (newest complete checkpoint; a
universal conversion when the world size changed; RNG and data position), the stop request agreed across ranks,
gradient accumulation, metric averaging, the log / image / eval / checkpoint cadences, atomic saves of the engine
plus every side state of the task, and the clean exit of the loop (bar and loggers closed). The task
(tokscale.trainer.Task) supplies everything model-specific.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tokscale.config import ConfigError, to_dict, to_yaml
from tokscale.trainer import (
    LoopConfig,
    OptimConfig,
    Task,
    adamw,
    check_global_batch,
    check_precision,
    lr_lambda,
    use_bf16,
)

log = logging.getLogger(__name__)

RUN_CONFIG = "config.yaml"
RUN_INFO = "run_info.jsonl"


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_config_yaml(task_cls: type[Task], cfg: Any) -> str:
    """The resolved YAML a run records, led by ``schema: NAME`` so that tools know its trainer."""
    return f"schema: {task_cls.name}\n" + to_yaml(cfg)


def prepare_run_dir(task_cls: type[Task], cfg: Any, world_size: int) -> None:
    """Rank 0: create the run dir, refuse a resume whose config the task calls incompatible, record the
    resolved config, the commit and the world size."""
    from omegaconf import OmegaConf

    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = run_dir / RUN_CONFIG
    if cfg_path.exists():
        old = OmegaConf.to_container(OmegaConf.load(cfg_path), resolve=True)
        changed = task_cls.resume_conflicts(old, to_dict(cfg))
        if changed and not cfg.train.force_resume:
            raise ConfigError(
                f"{cfg_path}: the run directory holds a run whose model differs in {changed}; use another run_dir, "
                "or train.force_resume=true to resume anyway"
            )
    cfg_path.write_text(run_config_yaml(task_cls, cfg))
    info = {
        "trainer": task_cls.name,
        "git_commit": git_commit(),
        "world_size": world_size,
        "argv": sys.argv,
        "time": time.time(),
    }
    with open(run_dir / RUN_INFO, "a") as f:
        f.write(json.dumps(info) + "\n")


def deepspeed_config(cfg: Any, batch_size: int, bf16: bool, load_universal: bool = False) -> dict:
    fp16 = cfg.train.precision == "fp16"
    extra = {"torch_autocast": {"enabled": True, "dtype": "fp16"}} if fp16 else {}
    return {
        **extra,
        "checkpoint": {"load_universal": load_universal},
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.train.zero_stage},
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        "zero_allow_untested_optimizer": True,
    }


def _check_config(cfg: Any) -> None:
    for key, kind in (("optim", OptimConfig), ("train", LoopConfig)):
        if not isinstance(getattr(cfg, key, None), kind):
            raise TypeError(f"a trainer config needs {key}: {kind.__name__} (got {type(cfg).__name__})")
    if not getattr(cfg, "run_dir", ""):
        raise ConfigError("run_dir is empty: expected the run directory")


def _micro_batch_size(cfg: Any) -> int:
    data = getattr(cfg, "data", None)
    return int(getattr(data, "batch_size", 1) or 1)


def every(step: int, n: int, last: int) -> bool:
    """The cadence test: every ``n`` steps, and at the last step."""
    return (n > 0 and step % n == 0) or step == last


def train(task_cls: type[Task], cfg: Any, should_stop: Callable[[], bool] | None = None) -> dict:
    """Train to ``cfg.train.max_steps``, or until ``should_stop()`` is True on any rank (then save and return)."""
    import deepspeed
    from tqdm import tqdm

    from tokscale.checkpoint import (
        latest_checkpoint,
        load_checkpoint,
        needs_universal,
        prepare_universal,
        remove_stale_temporaries,
        rng_state,
        save_checkpoint,
        set_rng_state,
    )
    from tokscale.distributed import all_reduce_mean, any_rank, barrier, init_distributed
    from tokscale.logger import MetricLogger

    _check_config(cfg)
    check_precision(cfg.train.precision)
    d = init_distributed()
    check_global_batch(cfg, d.world_size)
    tc = cfg.train
    if d.is_main:
        prepare_run_dir(task_cls, cfg, d.world_size)
        remove_stale_temporaries(cfg.run_dir)  # so that a rerun after a crash or a full disk has room to save
    barrier()
    bf16 = use_bf16(tc.precision)
    torch.manual_seed(tc.seed)  # identical initial weights on every rank

    task = task_cls(cfg, d)
    model = task.build_model()
    side = task.build_side()
    optimizer = adamw(  # fused on a GPU (one kernel for every parameter); torch's default elsewhere
        task.param_groups(model),
        d.device,
        lr=cfg.optim.lr,
        betas=tuple(cfg.optim.betas),
        weight_decay=cfg.optim.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.optim, tc.max_steps))
    resume = latest_checkpoint(cfg.run_dir)
    universal = resume is not None and needs_universal(resume[1], d.world_size, tc.zero_stage, bf16)
    if universal:
        prepare_universal(resume[1], d.rank)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(cfg, _micro_batch_size(cfg), bf16, universal),
    )
    stream = task.data_stream()

    # float64 sums since the last log, kept on the device (no host sync per step), and how many values each
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    step = 0
    if resume is not None:
        trainer_state, rank_state = load_checkpoint(engine, resume[1], d.rank, d.world_size, universal)
        step = trainer_state["step"]
        for key, obj in side.items():
            if obj is not None and trainer_state.get(key) is not None:
                obj.load_state_dict(trainer_state[key])
        stream.load_state_dict(rank_state["data"])
        if "rng" in rank_state:
            set_rng_state(rank_state["rng"])
            task.load_rank_state(rank_state.get("task", {}))
            saved = rank_state.get("loop", {})
            sums = {k: v.to(d.device) for k, v in saved.get("sums", {}).items()}
            counts = dict(saved.get("counts", {}))
        else:
            log.warning("world size changed since step %d: RNG streams and per-rank task state restart", step)
        log.info("resumed from %s at step %d", resume[1], step)

    def save(at_step: int) -> None:
        save_checkpoint(
            engine,
            cfg.run_dir,
            at_step,
            d.rank,
            d.world_size,
            rank_state={
                "rng": rng_state(),
                "data": stream.state_dict(),
                "task": task.rank_state(),
                # the partial averages of the current log interval, so a resumed run logs what it would have
                "loop": {"sums": {k: v.cpu() for k, v in sums.items()}, "counts": dict(counts)},
            },
            trainer_state={
                "step": at_step,
                **{k: (v.state_dict() if v is not None else None) for k, v in side.items()},
                "config": to_dict(cfg),
            },
            keep_last=tc.keep_last,
        )

    metrics_log = MetricLogger(cfg.run_dir, d.is_main)
    data_it = iter(stream)
    status = "done"
    t_last, samples_since = time.time(), 0
    bar = tqdm(
        total=tc.max_steps, initial=step, disable=not (d.is_main and tc.progress), desc="train", unit="step"
    )
    try:
        while step < tc.max_steps:
            if any_rank(bool(should_stop and should_stop())):
                save(step)
                status = "stopped"
                break
            engine.train()
            for _ in range(tc.grad_accum):
                batch = next(data_it)
                losses = task.train_step(engine, batch, step)
                samples_since += task.batch_size(batch)
                for k, v in losses.items():  # averaged over micro-batches, steps and ranks at the next log
                    v = torch.as_tensor(v).detach().to(torch.float64)
                    sums[k] = sums[k] + v if k in sums else v
                    counts[k] = counts.get(k, 0) + 1
            step += 1
            bar.update(1)

            if every(step, tc.log_every, tc.max_steps):
                now = time.time()
                values = {f"train/{k}": float(v) / counts[k] for k, v in sums.items()}
                values.update({f"train/{k}": float(v) for k, v in task.log_values(engine).items()})
                values["perf/img_per_s"] = samples_since / max(now - t_last, 1e-9) * d.world_size
                values = all_reduce_mean(values, d.device)
                values["train/lr"] = scheduler.get_last_lr()[0]
                metrics_log.scalars(step, values)
                bar.set_postfix(
                    {
                        label: f"{values[key]:.4g}"
                        for label, key in task.progress_keys.items()
                        if key in values
                    }
                )
                sums, counts, t_last, samples_since = {}, {}, now, 0
            if d.is_main and every(step, tc.image_every, tc.max_steps):
                task.on_images(step, metrics_log)
            if task.eval_every > 0 and step % task.eval_every == 0:
                task.evaluate(engine, step, metrics_log)  # every rank: evaluation may be collective
            if every(step, tc.ckpt_every, tc.max_steps):
                save(step)
    finally:
        bar.close()
        metrics_log.close()
    return {"status": status, "step": step, "run_dir": cfg.run_dir}
