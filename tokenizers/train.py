"""Tokenizer trainer: DeepSpeed engine, generator and discriminator steps, atomic checkpoints, automatic resume.

    tokscale train tokenizer tokenizer/demo train.max_steps=300
    tokscale train tokenizer tokenizer/gigatok_1d_S-S --nproc 2 train.zero_stage=2
    torchrun --nproc_per_node 8 -m tokscale.tokenizers.train tokenizer/gigatok_1d_B-L train.zero_stage=3

Running the same command again resumes from the newest complete checkpoint in ``run_dir``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from tokscale.config import ConfigError, diff_keys, load_config, to_dict, to_yaml
from tokscale.data.stream import DataConfig
from tokscale.evaluation.config import EvalConfig
from tokscale.tokenizers.discriminator import DiscriminatorConfig
from tokscale.tokenizers.model import TokenizerConfig
from tokscale.tokenizers.perceptual import PerceptualConfig
from tokscale.tokenizers.presets import get_preset
from tokscale.tokenizers.semantic import SemanticConfig

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "bf16", "fp32")


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 1e-4
    warmup_steps: int = 0
    min_lr: float = 1e-5  # cosine decays to this
    grad_clip: float = 10.0

    def __post_init__(self):
        if len(self.betas) != 2:
            raise ValueError(f"optim.betas must have two values, got {self.betas}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(
                f"optim.lr={self.lr} and optim.min_lr={self.min_lr} need 0 <= min_lr <= lr, lr > 0"
            )


@dataclass
class LossConfig:
    rec_weight: float = 1.0  # L2 reconstruction
    perceptual: PerceptualConfig = field(default_factory=PerceptualConfig)
    gan: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    semantic: SemanticConfig = field(default_factory=SemanticConfig)


@dataclass
class LoopConfig:
    max_steps: int = 1_500_000
    seed: int = 0
    zero_stage: int = 0  # 0 = plain data parallel; 1-3 = ZeRO stages
    precision: str = "auto"  # auto: bf16 on a GPU that supports it, fp32 otherwise
    grad_accum: int = 1
    log_every: int = 50
    image_every: int = 1000
    ckpt_every: int = 5000
    keep_last: int = 3
    progress: bool = True
    force_resume: bool = False  # resume even when the saved config changes the model

    def __post_init__(self):
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"train.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"train.precision must be one of {PRECISIONS}, got {self.precision!r}")
        for key in ("max_steps", "grad_accum", "log_every", "ckpt_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"train.{key} must be >= 1, got {getattr(self, key)}")


@dataclass
class TrainConfig:
    run_dir: str = "runs/tokenizer"
    init_from: str = ""  # weights only: a run dir or an exported tokenizer (resume is automatic and separate)
    model: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    eval: EvalConfig = field(
        default_factory=EvalConfig
    )  # eval.every_steps > 0: rFID/PSNR/usage during training

    def __post_init__(self):
        if self.data.resolution != self.model.image_size:
            raise ValueError(
                f"data.resolution={self.data.resolution} differs from model.image_size={self.model.image_size}"
            )
        if (
            self.loss.semantic.weight > 0
            and not 1 <= self.loss.semantic.decoder_layer <= self.model.decoder.depth
        ):
            raise ValueError(
                f"loss.semantic.decoder_layer={self.loss.semantic.decoder_layer} must be in 1..{self.model.decoder.depth}"
            )

    presets = staticmethod(get_preset)


def load_train_config(path, overrides=()) -> TrainConfig:
    return load_config(TrainConfig, path, overrides, presets=get_preset)


# ----------------------------------------------------------------------------------------------------------------
# building blocks


def lr_lambda(cfg: OptimConfig, max_steps: int) -> Callable[[int], float]:
    """Linear warmup then cosine from lr to min_lr, as a multiplier of lr (for LambdaLR)."""

    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
        cos = 0.5 * (1 + math.cos(math.pi * progress))
        return (cfg.min_lr + (cfg.lr - cfg.min_lr) * cos) / cfg.lr

    return f


def use_bf16(precision: str) -> bool:
    if precision == "bf16":
        return True
    if precision == "fp32":
        return False
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def deepspeed_config(cfg: TrainConfig, bf16: bool, load_universal: bool = False) -> dict:
    return {
        "checkpoint": {"load_universal": load_universal},
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.train.zero_stage},
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        "zero_allow_untested_optimizer": True,
    }


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


def prepare_run_dir(cfg: TrainConfig, world_size: int) -> None:
    """Rank 0: create the run dir, refuse a resume whose config changes the model, record config and commit."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = run_dir / "config.yaml"
    new = to_dict(cfg)
    if cfg_path.exists():
        from omegaconf import OmegaConf

        old = OmegaConf.to_container(OmegaConf.load(cfg_path), resolve=True)
        changed = [k for k in diff_keys(old.get("model", {}), new["model"], "model.") if k != "model.preset"]
        if changed and not cfg.train.force_resume:
            raise ConfigError(
                f"{cfg_path}: the run directory holds a run whose model differs in {changed}; use another run_dir, "
                "or train.force_resume=true to resume anyway"
            )
    cfg_path.write_text(to_yaml(cfg))
    info = {"git_commit": git_commit(), "world_size": world_size, "argv": sys.argv, "time": time.time()}
    with open(run_dir / "run_info.jsonl", "a") as f:
        f.write(json.dumps(info) + "\n")


def image_grid(originals: torch.Tensor, recons: torch.Tensor, n: int = 8) -> torch.Tensor:
    """Originals (top row) above reconstructions (bottom row), in [0, 1]: (3, 2H, nW)."""
    a = originals[:n].float().add(1).div(2).clamp(0, 1)
    b = recons[:n].float().add(1).div(2).clamp(0, 1)
    top = torch.cat(list(a), dim=-1)
    bottom = torch.cat(list(b), dim=-1)
    return torch.cat([top, bottom], dim=-2)


def save_png(grid_CHW: torch.Tensor, path: str | Path) -> None:
    from PIL import Image

    arr = (grid_CHW.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    Image.fromarray(arr).save(path)


@dataclass
class Frozen:
    """Networks that stay outside every engine: never cast to bf16, never sharded."""

    lpips: torch.nn.Module | None
    teacher: torch.nn.Module | None


def build_frozen(cfg: TrainConfig, device) -> Frozen:
    from tokscale.tokenizers.perceptual import build_lpips
    from tokscale.tokenizers.semantic import build_teacher

    lpips = build_lpips(cfg.loss.perceptual)
    teacher = build_teacher(cfg.loss.semantic, cfg.model.grid_size)
    return Frozen(
        lpips=lpips.to(device) if lpips is not None else None,
        teacher=teacher.to(device) if teacher is not None else None,
    )


# ----------------------------------------------------------------------------------------------------------------
# the two steps


def generator_step(engine, frozen: Frozen, disc, images, step: int, cfg: TrainConfig, bf16: bool):
    """Forward, backward and optimizer step of the tokenizer; returns detached losses."""
    from tokscale.tokenizers.discriminator import gan_weight_at, hinge_g_loss
    from tokscale.tokenizers.semantic import semantic_loss

    lc = cfg.loss
    capture = lc.semantic.decoder_layer if frozen.teacher is not None else 0
    out = engine(images.to(torch.bfloat16) if bf16 else images, capture_layer=capture)
    recon = out["recon"].float()
    losses = {"loss_rec": lc.rec_weight * F.mse_loss(recon, images)}
    losses["loss_commit"] = out["loss_commit"]
    losses["loss_codebook"] = out["loss_codebook"]
    if "loss_entropy" in out:
        losses["loss_entropy"] = out["loss_entropy"]
    if frozen.lpips is not None:
        losses["loss_lpips"] = lc.perceptual.weight * frozen.lpips(recon, images).mean()
    if frozen.teacher is not None:
        with torch.no_grad():
            target = frozen.teacher(images)
        losses["loss_semantic"] = lc.semantic.weight * semantic_loss(out["semantic"].float(), target)
    gan_w = gan_weight_at(lc.gan, step) if disc is not None else 0.0
    if gan_w > 0:
        disc.requires_grad_(False)
        losses["loss_gan_g"] = gan_w * hinge_g_loss(disc(recon))
        disc.requires_grad_(True)
    total = sum(losses.values())
    engine.backward(total)
    # ZeRO and bf16 optimizers report the global norm after the step; the plain fp32 engine does not, and its
    # (already all-reduced) gradients are on the parameters until the step.
    plain = engine.zero_optimization_stage() == 0 and not engine.bfloat16_enabled()
    norm = _grad_norm(engine.module) if plain and engine.is_gradient_accumulation_boundary() else None
    engine.step()
    if norm is None:
        norm = engine.get_global_grad_norm()
    result = {k: v.detach() for k, v in losses.items()}
    result["loss_total"] = total.detach()
    if norm is not None:
        result["grad_norm"] = torch.as_tensor(float(norm))
    return result, recon.detach(), out["indices"].detach()


def _grad_norm(module: torch.nn.Module) -> torch.Tensor:
    grads = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return torch.stack(grads).norm() if grads else torch.zeros(())


def discriminator_step(disc, disc_opt, images, recon, cfg: TrainConfig):
    """Hinge-loss step of the PatchGAN; gradients averaged over ranks by hand (it lives outside the engine)."""
    import torch.distributed as dist

    from tokscale.tokenizers.discriminator import hinge_d_loss

    loss = hinge_d_loss(disc(images), disc(recon))
    disc_opt.zero_grad(set_to_none=True)
    loss.backward()
    if dist.is_initialized() and dist.get_world_size() > 1:
        for p in disc.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= dist.get_world_size()
    torch.nn.utils.clip_grad_norm_(disc.parameters(), cfg.optim.grad_clip)
    disc_opt.step()
    return {"loss_gan_d": loss.detach()}


# ----------------------------------------------------------------------------------------------------------------
# main


def main(cfg: TrainConfig, should_stop: Callable[[], bool] | None = None) -> dict:
    """Train to cfg.train.max_steps (or until should_stop() is True on any rank: then save and return)."""
    import deepspeed
    from tqdm import tqdm

    from tokscale.checkpoint import (
        latest_checkpoint,
        load_checkpoint,
        needs_universal,
        prepare_universal,
        rng_state,
        save_checkpoint,
        set_rng_state,
    )
    from tokscale.data.stream import TrainStream
    from tokscale.distributed import all_reduce_mean, any_rank, barrier, init_distributed
    from tokscale.logger import MetricLogger
    from tokscale.tokenizers.discriminator import build_discriminator, gan_weight_at
    from tokscale.tokenizers.model import VQTokenizer

    d = init_distributed()
    tc = cfg.train
    if d.is_main:
        prepare_run_dir(cfg, d.world_size)
    barrier()
    bf16 = use_bf16(tc.precision)
    torch.manual_seed(tc.seed)  # identical initial weights on every rank

    model = VQTokenizer(cfg.model, with_projector=cfg.loss.semantic.weight > 0)
    if cfg.init_from:
        from tokscale.tokenizers.load import load_weights

        load_weights(model, cfg.init_from)
    frozen = build_frozen(cfg, d.device)
    disc = build_discriminator(cfg.loss.gan)
    disc_opt = None
    if disc is not None:
        disc = disc.to(d.device)
        disc_opt = torch.optim.AdamW(
            disc.parameters(),
            lr=cfg.loss.gan.lr,
            betas=tuple(cfg.loss.gan.betas),
            weight_decay=cfg.loss.gan.weight_decay,
        )
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay
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
        config=deepspeed_config(cfg, bf16, universal),
    )
    stream = TrainStream(cfg.data, d.rank, d.world_size)

    step = 0
    if resume is not None:
        trainer_state, rank_state = load_checkpoint(engine, resume[1], d.rank, d.world_size, universal)
        step = trainer_state["step"]
        if disc is not None and trainer_state.get("disc") is not None:
            disc.load_state_dict(trainer_state["disc"])
            disc_opt.load_state_dict(trainer_state["disc_opt"])
        stream.load_state_dict(rank_state["data"])
        if "rng" in rank_state:
            set_rng_state(rank_state["rng"])
        else:
            log.warning("world size changed since step %d: RNG streams restart", step)
        log.info("resumed from %s at step %d", resume[1], step)

    metrics_log = MetricLogger(cfg.run_dir, d.is_main)
    evaluator = None
    if cfg.eval.every_steps > 0:
        from tokscale.evaluation.recon import ReconEvaluator, evaluate_in_training

        evaluator = ReconEvaluator(cfg.eval, d.device, frozen.lpips)
    data_it = iter(stream)
    quantizer = engine.module.quantizer
    status = "done"
    t_last, imgs_since = time.time(), 0
    sums: dict[str, float] = {}
    n_sums = 0
    bar = tqdm(
        total=tc.max_steps, initial=step, disable=not (d.is_main and tc.progress), desc="train", unit="step"
    )

    def save(at_step: int):
        save_checkpoint(
            engine,
            cfg.run_dir,
            at_step,
            d.rank,
            d.world_size,
            rank_state={"rng": rng_state(), "data": stream.state_dict()},
            trainer_state={
                "step": at_step,
                "disc": disc.state_dict() if disc is not None else None,
                "disc_opt": disc_opt.state_dict() if disc_opt is not None else None,
                "config": to_dict(cfg),
            },
            keep_last=tc.keep_last,
        )

    while step < tc.max_steps:
        if any_rank(bool(should_stop and should_stop()), d.device):
            save(step)
            status = "stopped"
            break
        engine.train()
        for _ in range(tc.grad_accum):
            images, _labels = next(data_it)
            images = images.to(d.device, non_blocking=True)
            losses, recon, indices = generator_step(engine, frozen, disc, images, step, cfg, bf16)
            if disc is not None and gan_weight_at(cfg.loss.gan, step) > 0:
                losses.update(discriminator_step(disc, disc_opt, images, recon, cfg))
            imgs_since += images.shape[0]
        step += 1
        bar.update(1)
        for k, v in losses.items():  # loss_* and grad_norm, averaged over the logging interval
            sums[k] = sums.get(k, 0.0) + float(v)
        n_sums += 1

        if step % tc.log_every == 0 or step == tc.max_steps:
            now = time.time()
            values = {f"train/{k}": v / n_sums for k, v in sums.items()}
            values.update({f"train/{k}": v for k, v in quantizer.usage_stats().items()})
            values["perf/img_per_s"] = imgs_since / max(now - t_last, 1e-9) * d.world_size
            values = all_reduce_mean(values, d.device)
            values["train/lr"] = scheduler.get_last_lr()[0]
            metrics_log.scalars(step, values)
            bar.set_postfix(
                rec=f"{values['train/loss_rec']:.4f}", usage=f"{values['train/codebook_usage']:.3f}"
            )
            sums, n_sums, t_last, imgs_since = {}, 0, now, 0
        if d.is_main and (step % tc.image_every == 0 or step == tc.max_steps):
            grid = image_grid(images, recon)
            metrics_log.image(step, "train/reconstruction", grid)
            save_png(grid, Path(cfg.run_dir) / "reconstruction.png")
        if evaluator is not None and step % cfg.eval.every_steps == 0:
            # collective (ZeRO-3 gathers parameters inside the module's forward hooks): every rank evaluates
            evaluate_in_training(evaluator, engine.module, cfg.data, step, metrics_log, d.rank, d.world_size)
        if step % tc.ckpt_every == 0 or step == tc.max_steps:
            save(step)
    bar.close()
    metrics_log.close()
    return {"status": status, "step": step, "run_dir": cfg.run_dir}


def cli_main(argv: list[str] | None = None) -> int:
    """``python -m tokscale.tokenizers.train CONFIG [OVERRIDES...]`` (what torchrun and --nproc workers run)."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(__doc__)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    cfg = load_train_config(argv[0], argv[1:])
    result = main(cfg)
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    from tokscale.jobs.shutdown import finish

    # finish(): barrier, flush, os._exit, skipping the interpreter teardown that races gloo's threads (jobs/README)
    finish(cli_main())
