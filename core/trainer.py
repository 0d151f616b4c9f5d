"""What a trainer is: a :class:`Task` with its own pieces, plugged into the one shared loop (tokscale.loop).

A task provides its config schema, its model and parameter groups, side modules with their own state (a
discriminator and its optimizer, an EMA copy), its data stream, one ``train_step`` returning detached losses, its
progress-bar keys, and optional hooks for images and in-training evaluation. Everything else (process group,
seeds, run directory, DeepSpeed engine, resume, stop agreement, gradient accumulation, metric averaging,
cadences, atomic saves, the exit) belongs to the loop, written once.

    class MyTask(Task):
        name = "mine"
        config_class = MyConfig          # a dataclass with run_dir, optim: OptimConfig, train: LoopConfig
        def build_model(self): ...
        def data_stream(self): ...
        def train_step(self, engine, batch, step): ...

and one line registers it (pyproject.toml, ``[project.entry-points."tokscale.trainers"]``:
``mine = "my_package.task:MyTask"``), after which ``tokscale train mine CONFIG``, ``tokscale submit mine ...``,
``tokscale config show``, ``tokscale export`` and ``python -m tokscale.train mine CONFIG`` work for it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
SCHEDULES = ("cosine", "constant", "wsd")
DECAY_SHAPES = ("linear", "sqrt", "cosine")


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule, per optimizer step (not per micro-batch).

    - ``cosine``: linear warmup over ``warmup_steps``, then a half cosine from ``lr`` to ``min_lr`` at max_steps;
    - ``constant``: linear warmup, then ``lr``;
    - ``wsd`` (warmup-hold-decay): linear warmup, ``lr`` held, then a decay of shape ``decay_shape`` to ``min_lr``
      over the last ``decay_fraction`` of the steps (GigaTok's AR recipe: sqrt over the last 0.2, to 0).

    Warmup rises from ``warmup_init * lr`` (0: from lr / warmup_steps at the first step).
    """

    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 1e-4
    warmup_steps: int = 0
    min_lr: float = 1e-5  # where cosine and wsd decay to
    grad_clip: float = 10.0
    schedule: str = "cosine"
    warmup_init: float = 0.0
    decay_fraction: float = 0.2  # wsd only
    decay_shape: str = "sqrt"  # wsd only

    def __post_init__(self):
        if len(self.betas) != 2:
            raise ValueError(f"optim.betas must have two values, got {self.betas}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(
                f"optim.lr={self.lr} and optim.min_lr={self.min_lr} need 0 <= min_lr <= lr, lr > 0"
            )
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.decay_shape not in DECAY_SHAPES:
            raise ValueError(f"optim.decay_shape must be one of {DECAY_SHAPES}, got {self.decay_shape!r}")
        if not 0 < self.decay_fraction <= 1:
            raise ValueError(f"optim.decay_fraction must be in (0, 1], got {self.decay_fraction}")
        if not 0 <= self.warmup_init <= 1:
            raise ValueError(f"optim.warmup_init must be in [0, 1], got {self.warmup_init}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")


@dataclass
class LoopConfig:
    """The shared loop's settings (the ``train:`` section of every trainer's config)."""

    max_steps: int = 1_500_000
    seed: int = 0
    zero_stage: int = 0  # 0 = plain data parallel; 1-3 = ZeRO stages
    # auto: bf16 on a GPU that supports it, fp32 otherwise | bf16 | fp32 | fp16: fp32 weights, float16 autocast
    # and dynamic loss scaling (GigaTok's DDP runs), GPU only
    precision: str = "auto"
    grad_accum: int = 1
    # 0: whatever data.batch_size x ranks x grad_accum gives; > 0: the recipe's global batch, checked against that
    # product when the run starts (and when it is submitted), so a recipe keeps its batch on any cluster shape
    global_batch_size: int = 0
    log_every: int = 50
    image_every: int = 1000
    ckpt_every: int = 5000
    keep_last: int = 3
    progress: bool = True
    force_resume: bool = False  # resume even when the saved config changes the model
    # GPU speed options, off by default (today's step exactly); neither changes what the step computes. A task
    # applies them to its networks with apply_speed_options (the tokenizer trainer does).
    # compile: torch.compile of the trained networks' forward, in place (nn.Module.compile: parameter names and
    # checkpoints unchanged); channels_last: 4-D weights and image inputs in NHWC layout for the convolutions
    compile: bool = False
    channels_last: bool = False

    def __post_init__(self):
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"train.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"train.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.global_batch_size < 0:
            raise ValueError(
                f"train.global_batch_size must be >= 0 (0: not checked), got {self.global_batch_size}"
            )
        for key in ("max_steps", "grad_accum", "log_every", "ckpt_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"train.{key} must be >= 1, got {getattr(self, key)}")


def lr_lambda(cfg: OptimConfig, max_steps: int) -> Callable[[int], float]:
    """The schedule as a multiplier of ``cfg.lr`` at optimizer step ``step`` (for LambdaLR)."""
    lo = cfg.min_lr / cfg.lr
    decay_start = max_steps - max(1, round(cfg.decay_fraction * max_steps))

    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return cfg.warmup_init + (1 - cfg.warmup_init) * (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        if cfg.schedule == "cosine":
            progress = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
            cos = 0.5 * (1 + math.cos(math.pi * progress))
            return (cfg.min_lr + (cfg.lr - cfg.min_lr) * cos) / cfg.lr
        # wsd: hold, then decay over the last steps
        start = max(decay_start, cfg.warmup_steps)
        if step < start:
            return 1.0
        t = min(1.0, (step - start) / max(1, max_steps - start))
        left = {"linear": 1 - t, "sqrt": 1 - math.sqrt(t), "cosine": 0.5 * (1 + math.cos(math.pi * t))}
        return lo + (1 - lo) * left[cfg.decay_shape]

    return f


def check_global_batch(cfg: Any, world_size: int) -> None:
    """``train.global_batch_size`` (when set) must equal ``data.batch_size`` x ranks x ``train.grad_accum``."""
    from tokscale.config import ConfigError

    want = cfg.train.global_batch_size
    per_rank = int(getattr(getattr(cfg, "data", None), "batch_size", 1) or 1)
    got = per_rank * world_size * cfg.train.grad_accum
    if want and got != want:
        hint = ""
        if want % (world_size * cfg.train.grad_accum) == 0:
            hint = f"; data.batch_size={want // (world_size * cfg.train.grad_accum)} gives it"
        raise ConfigError(
            f"train.global_batch_size={want} but data.batch_size={per_rank} x {world_size} ranks x "
            f"train.grad_accum={cfg.train.grad_accum} = {got}{hint} (or set train.grad_accum)"
        )


def check_precision(precision: str, cuda: bool | None = None) -> None:
    """fp16 autocast with loss scaling is a GPU mode: refuse it on a machine without CUDA, before any work."""
    from tokscale.config import ConfigError

    cuda = torch.cuda.is_available() if cuda is None else cuda
    if precision == "fp16" and not cuda:
        raise ConfigError(
            "train.precision=fp16 (float16 autocast with loss scaling) needs a CUDA GPU and none is visible; "
            "use train.precision=fp32 (or bf16) on a CPU"
        )


def autocast_fp16(precision: str):
    """The float16 autocast context of ``precision=fp16`` (a no-op context otherwise), for networks a task runs
    outside its engine (the engine's forward is autocast by DeepSpeed's ``torch_autocast``)."""
    import contextlib

    if precision != "fp16":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.float16)


def use_bf16(precision: str) -> bool:
    if precision == "bf16":
        return True
    if precision == "fp32":
        return False
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def profiled(name: str):
    """A torch.profiler range called ``name`` while a profiler runs, else nothing: a range costs ~10 us even
    with no profiler, so the step's part labels (``tokscale bench tokenizer``'s shares) are free in training."""
    if torch._C._autograd._profiler_enabled():
        return torch.profiler.record_function(name)
    return contextlib.nullcontext()


def adamw(params, device: torch.device, **kwargs) -> torch.optim.AdamW:
    """torch's AdamW, with the fused kernel (one launch for all parameters) on a CUDA device; elsewhere torch's
    default implementation, as before."""
    return torch.optim.AdamW(params, fused=True if device.type == "cuda" else None, **kwargs)


def apply_speed_options(
    module: torch.nn.Module, train: LoopConfig, in_engine: bool = False
) -> torch.nn.Module:
    """``train.compile`` and ``train.channels_last`` on a network, in place (returned for chaining).

    A module going into the DeepSpeed engine (``in_engine``) keeps contiguous weights: DeepSpeed views each parameter
    as bytes to broadcast it and flattens them under ZeRO. Its convolutions still run NHWC when the step hands it
    channels-last inputs (a convolution follows its input's layout)."""
    if train.channels_last and not in_engine:
        module.to(memory_format=torch.channels_last)
    if train.compile:
        module.compile()
    return module


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices and convolutions (>= 2-D), none on biases, norms and other 1-D parameters:
    the grouping of LlamaGen, DetailFlow and VAR."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class Task:
    """One trainer's own pieces. The loop constructs it once per process (``Task(cfg, dist)``) and calls, in
    this order: ``build_model``, ``build_side``, ``param_groups``, ``data_stream``, then per optimizer step
    ``train_step`` once per micro-batch, and the hooks at their cadences.

    Class attributes: ``name`` (the registry name, also the conf/ folder of its YAML files), ``config_class``
    (dataclass with ``run_dir``, ``optim: OptimConfig`` and ``train: LoopConfig``), ``presets`` (optional
    ``name -> dict`` merged at ``preset_key``), ``progress_keys`` (progress-bar label -> logged key).
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type]
    presets: ClassVar[Callable[[str], dict] | None] = None
    preset_key: ClassVar[str] = "model.preset"
    progress_keys: ClassVar[dict[str, str]] = {}

    def __init__(self, cfg: Any, dist) -> None:
        self.cfg = cfg
        self.dist = dist  # tokscale.distributed.DistInfo: rank, world_size, local_rank, device

    # -- config -------------------------------------------------------------------------------------------
    @classmethod
    def load_config(cls, path=None, overrides: Iterable[str] = ()) -> Any:
        from tokscale.config import load_config

        presets = cls.presets  # a plain function stored on the class: no binding
        return load_config(
            cls.config_class, path, list(overrides), presets=presets, preset_key=cls.preset_key
        )

    @classmethod
    def resume_conflicts(cls, saved: dict, new: dict) -> list[str]:
        """Keys whose change makes a saved run unfit to resume (default: anything under ``model`` but the
        preset name). The loop refuses such a resume unless ``train.force_resume``."""
        from tokscale.config import diff_keys

        changed = diff_keys(saved.get("model", {}) or {}, new.get("model", {}) or {}, "model.")
        return [k for k in changed if k != "model.preset"]

    # -- what the task builds -----------------------------------------------------------------------------
    def build_model(self) -> torch.nn.Module:
        """The trained module (it goes into the DeepSpeed engine); built after the loop seeded torch."""
        raise NotImplementedError

    def build_side(self) -> dict[str, Any]:
        """Objects outside the engine whose ``state_dict`` is saved by rank 0 with every checkpoint and loaded
        on every rank at resume, by name (a discriminator and its optimizer; an EMA copy). Frozen networks that
        need no saving are built here too and kept on ``self``."""
        return {}

    def param_groups(self, model: torch.nn.Module) -> list[dict]:
        """AdamW parameter groups, each with its ``weight_decay`` (default: one group, ``optim.weight_decay``;
        :func:`decay_groups` for the usual split)."""
        return [{"params": list(model.parameters()), "weight_decay": self.cfg.optim.weight_decay}]

    def data_stream(self):
        """An endless iterable of batches with ``state_dict()`` / ``load_state_dict()`` (its position)."""
        raise NotImplementedError

    # -- the step -----------------------------------------------------------------------------------------
    def train_step(self, engine, batch, step: int) -> dict[str, torch.Tensor]:
        """Forward, ``engine.backward``, ``engine.step`` (and any side optimizer) on one micro-batch; returns
        detached scalar losses (logged as ``train/<key>``, averaged over micro-batches, steps and ranks)."""
        raise NotImplementedError

    def batch_size(self, batch) -> int:
        """Samples in a batch (for ``perf/img_per_s``): the first tensor's leading dimension."""
        first = batch[0] if isinstance(batch, (tuple, list)) else batch
        return int(first.shape[0])

    # -- hooks (optional) ---------------------------------------------------------------------------------
    def log_values(self, engine) -> dict[str, float]:
        """Extra running statistics at each log step (logged as ``train/<key>``, averaged over ranks)."""
        return {}

    def rank_state(self) -> dict:
        """Per-rank state saved with this rank's RNG and data position (default: none)."""
        return {}

    def load_rank_state(self, state: dict) -> None:
        pass

    def on_images(self, step: int, logger) -> None:
        """Rank 0, every ``train.image_every`` steps and at the end: write images (TensorBoard, PNG)."""

    eval_every: int = 0  # steps between in-training evaluations (0: never); a task sets it from its config

    def evaluate(self, engine, step: int, logger) -> None:
        """Every ``eval_every`` steps, on every rank (evaluation may be collective)."""

    # -- publishing ---------------------------------------------------------------------------------------
    @classmethod
    def model_card(cls, cfg: dict, training: dict, metrics: dict, params: int) -> str:
        """README.md of an export (a Hugging Face model card); tasks describe their model."""
        from tokscale.export import generic_model_card

        return generic_model_card(cls.name, cfg, training, metrics, params)
