"""The tokenizer trainer: a task of the shared loop (tokscale.loop) with a generator and a discriminator step.

    tokscale train tokenizer tokenizer/demo train.max_steps=300
    tokscale train tokenizer tokenizer/gigatok-1d-S-S --nproc 2 data.batch_size=64 train.zero_stage=2
    torchrun --nproc_per_node 8 -m tokscale.train tokenizer tokenizer/gigatok-1d-XL-XXL data.batch_size=32

Running the same command again resumes from the newest complete checkpoint in ``run_dir``. The loop owns the
engine, resume, cadences and saves; this module owns the tokenizer's pieces: the model, the frozen LPIPS and
DINOv2 teacher (fp32, outside every engine), the discriminator (PatchGAN or GigaTok's DINO discriminator) with its
own optimizer and loss scaler (saved as the side states ``disc``, ``disc_opt`` and ``disc_scaler``), the two
steps, the reconstruction grid and the in-training evaluation.

Terms that switch on or off are counted in logged steps (the first step is 1), as GigaTok counts them: the GAN
(``loss.gan.start_step``) from its start step on, GigaTok's auxiliary losses (``loss.aux.until_step``) while the
step is below their end. Each term is logged under its own key only while it is active.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from tokscale.data.stream import DataConfig
from tokscale.evaluation.config import EvalConfig
from tokscale.tokenizers.discriminator import DiscriminatorConfig
from tokscale.tokenizers.model import TokenizerConfig
from tokscale.tokenizers.perceptual import PerceptualConfig
from tokscale.tokenizers.presets import get_preset
from tokscale.tokenizers.semantic import SemanticConfig
from tokscale.trainer import LoopConfig, OptimConfig, Task, adamw, apply_speed_options, profiled, use_bf16


@dataclass
class AuxConfig:
    """GigaTok's auxiliary losses of the first steps (its ``aux_loss_end``, 15k in the released recipes but
    XL-XXL's): the CNN shortcut ``cnn_decoder(cnn_encoder(x))`` trained with the reconstruction and perceptual
    losses at their weights (``loss_aux_rec``, ``loss_aux_lpips``), and an MSE between the transformer decoder's
    output map and the detached CNN encoder features (``loss_aux_feature``)."""

    until_step: int = 0  # active while the step (as logged, from 1) is below it; 0 = off
    feature_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.until_step < 0 or self.feature_weight < 0:
            raise ValueError(
                f"loss.aux.until_step and loss.aux.feature_weight must be >= 0, got {self.until_step}, "
                f"{self.feature_weight}"
            )

    def active(self, step: int) -> bool:
        return step < self.until_step


FROZEN_PRECISIONS = ("auto", "fp32", "bf16")  # loss.frozen_precision


@dataclass
class LossConfig:
    rec_weight: float = 1.0  # L2 reconstruction
    perceptual: PerceptualConfig = field(default_factory=PerceptualConfig)
    gan: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    semantic: SemanticConfig = field(default_factory=SemanticConfig)
    aux: AuxConfig = field(default_factory=AuxConfig)
    # The frozen DINOv2 teacher and LPIPS's VGG trunk in the training step: "auto" runs them under bf16 autocast
    # when the generator trains in bf16 (their features, distances and heads stay float32), "fp32" always in
    # float32, "bf16" always under bf16 autocast. LPIPS as an evaluation metric is float32 whatever this says.
    frozen_precision: str = "auto"

    def __post_init__(self):
        if self.frozen_precision not in FROZEN_PRECISIONS:
            raise ValueError(
                f"loss.frozen_precision={self.frozen_precision!r}: expected one of {FROZEN_PRECISIONS}"
            )


def frozen_in_bf16(frozen_precision: str, train_precision: str) -> bool:
    """Whether the step runs the frozen teacher and LPIPS trunk under bf16 autocast (``loss.frozen_precision``)."""
    return frozen_precision == "bf16" or (frozen_precision == "auto" and use_bf16(train_precision))


@dataclass
class TrainConfig:
    run_dir: str = "runs/tokenizer"
    init_from: str = ""  # weights only: a run dir or an exported tokenizer (resume is automatic and separate)
    model: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)  # eval.every_steps > 0: rFID/PSNR/usage in training

    def __post_init__(self):
        aux, gan = self.loss.aux, self.loss.gan
        if aux.until_step > 0 and gan.weight > 0 and gan.start_step < aux.until_step:
            raise ValueError(
                f"loss.gan.start_step={gan.start_step} is below loss.aux.until_step={aux.until_step}: GigaTok's "
                "adversarial term on the CNN shortcut (used only when the two overlap, never in its recipes) is not "
                "implemented; start the GAN at or after the end of the auxiliary losses"
            )
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
        from tokscale.tokenizers.detailflow import check_train_config

        check_train_config(self)


def load_train_config(path, overrides=()) -> TrainConfig:
    return TokenizerTask.load_config(path, overrides)


def main(cfg: TrainConfig, should_stop=None) -> dict:
    """Train to cfg.train.max_steps (or until should_stop() is True on any rank: then save and return)."""
    from tokscale.loop import train

    return train(TokenizerTask, cfg, should_stop)


class TokenizerTask(Task):
    name = "tokenizer"
    config_class = TrainConfig
    presets = staticmethod(get_preset)
    progress_keys = {"rec": "train/loss_rec", "usage": "train/codebook_usage"}

    def build_model(self):
        from tokscale.tokenizers.model import VQTokenizer

        cfg = self.cfg
        model = VQTokenizer(cfg.model, with_projector=cfg.loss.semantic.weight > 0)
        if cfg.init_from:
            from tokscale.tokenizers.load import load_weights

            load_weights(model, cfg.init_from)
        self.quantizer = model.quantizer
        if cfg.train.channels_last:
            from tokscale.tokenizers.cnn import DepthToSpaceUpsample

            for module in model.modules():  # the CNN decoder's levels after an upsample stay NHWC too
                if isinstance(module, DepthToSpaceUpsample):
                    module.keep_channels_last = True
        return apply_speed_options(model, cfg.train, in_engine=True)

    def build_side(self) -> dict:
        """The frozen LPIPS and teacher (not saved), the discriminator, its optimizer and its loss scaler (saved),
        the evaluator."""
        from tokscale.tokenizers.discriminator import build_discriminator, savable, trainable_parameters
        from tokscale.tokenizers.perceptual import build_lpips
        from tokscale.tokenizers.semantic import build_teacher
        from tokscale.trainer import lr_lambda

        cfg, device = self.cfg, self.dist.device
        self.lpips = build_lpips(cfg.loss.perceptual)
        self.teacher = build_teacher(cfg.loss.semantic, cfg.model.grid_size)
        self.frozen_bf16 = frozen_in_bf16(cfg.loss.frozen_precision, cfg.train.precision)
        self.lpips = self.lpips.to(device) if self.lpips is not None else None
        if self.lpips is not None and cfg.train.channels_last:
            self.lpips.to(memory_format=torch.channels_last)  # VGG convolutions on the NHWC reconstruction
        self.teacher = self.teacher.to(device) if self.teacher is not None else None
        from tokscale.tokenizers.detailflow import build_global_teacher

        self.global_teacher = build_global_teacher(cfg, device)  # DetailFlow's global-token loss (or None)
        self.disc = build_discriminator(cfg.loss.gan)
        self.disc_opt = self.disc_scaler = None
        # the discriminator follows the generator's schedule
        self.lr_at = lr_lambda(cfg.optim, cfg.train.max_steps)
        if self.disc is not None:
            self.disc = apply_speed_options(self.disc.to(device), cfg.train)
            gan = cfg.loss.gan
            self.disc_opt = adamw(
                trainable_parameters(self.disc),
                device,
                lr=gan.lr,
                betas=tuple(gan.betas),
                weight_decay=gan.weight_decay,
            )
            # float16 loss scaling for the discriminator, which trains outside the engine (a no-op otherwise)
            self.disc_scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16")
        self.eval_every = cfg.eval.every_steps
        self.evaluator = None
        if self.eval_every > 0:
            from tokscale.tokenizers.recon_eval import ReconEvaluator

            self.evaluator = ReconEvaluator(cfg.eval, device, self.lpips)
        self.last = None  # (images, recon) of the latest step, for the grid
        return {"disc": savable(self.disc), "disc_opt": self.disc_opt, "disc_scaler": self.disc_scaler}

    def data_stream(self):
        from tokscale.data.stream import TrainStream

        return TrainStream(self.cfg.data, self.dist.rank, self.dist.world_size)

    def train_step(self, engine, batch, step: int) -> dict[str, torch.Tensor]:
        from tokscale.tokenizers.discriminator import gan_weight_at

        images = batch[0].to(self.dist.device, non_blocking=True)
        n = step + 1  # the step being taken, as logged
        # target: the images, or (DetailFlow) the step's degraded target that the reconstruction is compared with
        losses, recon, target = generator_step(engine, self, images, n, self.cfg)
        if self.disc is not None and gan_weight_at(self.cfg.loss.gan, n) > 0:
            lr = self.cfg.loss.gan.lr * self.lr_at(step)  # the multiplier the generator's LambdaLR uses now
            losses.update(discriminator_step(self, target, recon, lr, self.cfg))
        self.last = (target, recon)
        return losses

    def log_values(self, engine) -> dict[str, float]:
        return self.quantizer.usage_stats()

    def rank_state(self) -> dict:
        """This rank's codebook-usage window (a metric only, so not in the weights): logged usage and
        perplexity resume exactly."""
        q = self.quantizer
        return {"usage_window": q.usage_window.cpu(), "usage_pos": q.usage_pos.cpu()}

    def load_rank_state(self, state: dict) -> None:
        q = self.quantizer
        window = state.get("usage_window")
        if window is not None and window.shape == q.usage_window.shape:
            q.usage_window.copy_(window)
            q.usage_pos.copy_(state["usage_pos"])

    def on_images(self, step: int, logger) -> None:
        from tokscale.images import image_grid, save_png, to_unit

        if self.last is None:
            return
        grid = image_grid(to_unit(self.last[0]), to_unit(self.last[1]))
        logger.image(step, "train/reconstruction", grid)
        save_png(grid, Path(self.cfg.run_dir) / "reconstruction.png")

    def evaluate(self, engine, step: int, logger) -> None:
        # collective (ZeRO-3 gathers parameters inside the module's forward hooks): every rank evaluates
        from tokscale.tokenizers.recon_eval import evaluate_in_training

        d = self.dist
        evaluate_in_training(self.evaluator, engine.module, self.cfg.data, step, logger, d.rank, d.world_size)

    @classmethod
    def model_card(cls, cfg: dict, training: dict, metrics: dict, params: int) -> str:
        from tokscale.tokenizers.export import model_card

        return model_card(cfg, training, metrics, params)


# ----------------------------------------------------------------------------------------------------------------
# the two steps


def generator_step(engine, task: TokenizerTask, images, step: int, cfg: TrainConfig):
    """Forward, backward and optimizer step of the tokenizer at ``step`` (as logged, from 1); returns detached
    losses, the reconstruction and its target (the images; a DetailFlow step's degraded, possibly doubled,
    target)."""
    from tokscale.tokenizers.detailflow import (
        detailflow_losses,
        draw_plan,
        gan_view,
        plan_metrics,
        plan_target,
    )
    from tokscale.tokenizers.discriminator import gan_weight_at, hinge_g_loss
    from tokscale.tokenizers.semantic import semantic_loss
    from tokscale.trainer import autocast_fp16

    lc, disc = cfg.loss, task.disc
    capture = lc.semantic.decoder_layer if task.teacher is not None else 0
    aux = lc.aux.active(step)
    x = images.to(torch.bfloat16) if engine.bfloat16_enabled() else images
    if cfg.train.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    # DetailFlow: this step's prefix, size and corrupted span (tokscale.tokenizers.detailflow)
    plan = draw_plan(cfg.model) if cfg.model.detailflow.enabled else None
    out = engine(x, capture_layer=capture, aux=aux) if plan is None else engine(x, plan=plan)
    recon = out["recon"].float()
    rec_target = images if plan is None else plan_target(images, plan)
    losses = {"loss_rec": lc.rec_weight * F.mse_loss(recon, rec_target)}
    losses["loss_commit"] = out["loss_commit"]
    losses["loss_codebook"] = out["loss_codebook"]
    if "loss_entropy" in out:
        losses["loss_entropy"] = out["loss_entropy"]
    if task.lpips is not None:
        with profiled("lpips"):
            losses["loss_lpips"] = (
                lc.perceptual.weight * task.lpips(recon, rec_target, task.frozen_bf16).mean()
            )
    if plan is not None:
        losses.update(detailflow_losses(task, out, images, cfg))
    if task.teacher is not None:
        with torch.no_grad(), profiled("teacher"):
            target = task.teacher(images, task.frozen_bf16)
        losses["loss_semantic"] = lc.semantic.weight * semantic_loss(out["semantic"].float(), target)
    if aux:
        shortcut = out["shortcut_recon"].float()
        losses["loss_aux_rec"] = lc.rec_weight * F.mse_loss(shortcut, images)
        if task.lpips is not None:
            with profiled("lpips"):
                losses["loss_aux_lpips"] = (
                    lc.perceptual.weight * task.lpips(shortcut, images, task.frozen_bf16).mean()
                )
        losses["loss_aux_feature"] = lc.aux.feature_weight * F.mse_loss(
            out["spatial"].float(), out["cnn_features"].float()
        )
    gan_w = gan_weight_at(lc.gan, step) if disc is not None else 0.0
    if gan_w > 0:
        disc.requires_grad_(False)
        with autocast_fp16(cfg.train.precision), profiled("discriminator"):
            losses["loss_gan_g"] = gan_w * hinge_g_loss(disc(disc_input(gan_view(recon, cfg), lc.gan)))
        disc.requires_grad_(True)
    total = sum(losses.values())
    engine.backward(total)
    # ZeRO and bf16 optimizers report the global norm after the step; the plain fp32 engine does not, and its
    # (already all-reduced) gradients are on the parameters until the step (scaled by the loss scale under fp16).
    with profiled("optimizer"):
        plain = engine.zero_optimization_stage() == 0 and not engine.bfloat16_enabled()
        norm = _grad_norm(engine.module) if plain and engine.is_gradient_accumulation_boundary() else None
        scaler = getattr(engine, "torch_autocast_z0_gradscaler", None)
        if norm is not None and scaler is not None:
            norm = norm / scaler.get_scale()
        engine.step()
        if norm is None:
            norm = engine.get_global_grad_norm()
    result = {k: v.detach() for k, v in losses.items()}
    result["loss_total"] = total.detach()
    if norm is not None:
        # a tensor stays where it is (float() would wait for the device every step; the loop reads at log time)
        result["grad_norm"] = norm.detach().float() if torch.is_tensor(norm) else torch.tensor(float(norm))
    if plan is not None:
        result.update(plan_metrics(plan))
    return result, recon.detach(), rec_target


def disc_input(images: torch.Tensor, gan) -> torch.Tensor:
    """What the discriminator sees: the images, through GigaTok's DiffAug when ``gan.diff_aug`` is on."""
    if not gan.diff_aug:
        return images
    from tokscale.tokenizers.diffaug import diff_aug

    return diff_aug(images, prob=1.0, cutout=gan.diff_aug_cutout)


def _grad_norm(module: torch.nn.Module) -> torch.Tensor:
    grads = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return torch.stack(grads).norm() if grads else torch.zeros(())


def discriminator_step(task: TokenizerTask, images, recon, lr: float, cfg: TrainConfig):
    """Hinge-loss step of the discriminator at learning rate ``lr``, its loss scaled by ``gan.weight`` (as
    GigaTok's); gradients averaged over ranks by hand (it lives outside the engine)."""
    import torch.distributed as dist

    from tokscale.tokenizers.detailflow import gan_view
    from tokscale.tokenizers.discriminator import hinge_d_loss
    from tokscale.trainer import autocast_fp16

    gan, disc, opt, scaler = cfg.loss.gan, task.disc, task.disc_opt, task.disc_scaler
    for group in opt.param_groups:
        group["lr"] = lr
    with autocast_fp16(cfg.train.precision), profiled("discriminator"):
        real = disc(disc_input(gan_view(images, cfg), gan))
        fake = disc(disc_input(gan_view(recon.detach(), cfg), gan))
        loss = gan.weight * hinge_d_loss(real, fake)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    params = [p for group in opt.param_groups for p in group["params"]]
    if dist.is_initialized() and dist.get_world_size() > 1:
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= dist.get_world_size()
    with profiled("optimizer"):
        torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        scaler.step(opt)
        scaler.update()
    return {"loss_gan_d": loss.detach()}


if (
    __name__ == "__main__"
):  # python -m tokscale.tokenizers.train CONFIG [OVERRIDES...] = python -m tokscale.train tokenizer ...
    import sys

    from tokscale.shutdown import finish
    from tokscale.train import cli_main

    finish(cli_main(["tokenizer", *sys.argv[1:]]))
