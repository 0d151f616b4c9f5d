"""A second trainer in a few lines: linear regression as a tokscale Task, registered from outside the package.

    TOKSCALE_TRAINERS="toy=tests/core/toy_task.py:ToyTask" tokscale train toy toy.yaml [--nproc 2]

It touches no tokenizer file: a model (one Linear layer), a seeded data stream with a position, a side state
(an exponential moving average of the weights, saved with every checkpoint), one train_step, a logged running
value and an image hook. Everything else is the shared loop's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from tokscale.trainer import LoopConfig, OptimConfig, Task

TRUE_W = torch.tensor([[1.5, -2.0, 0.5, 3.0]])


@dataclass
class ToyModelConfig:
    dim: int = 4


@dataclass
class ToyDataConfig:
    batch_size: int = 8
    seed: int = 0


@dataclass
class ToyConfig:
    run_dir: str = "runs/toy"
    model: ToyModelConfig = field(default_factory=ToyModelConfig)
    data: ToyDataConfig = field(default_factory=ToyDataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=0.5, min_lr=0.0, weight_decay=0.0))
    train: LoopConfig = field(
        default_factory=lambda: LoopConfig(
            max_steps=8, log_every=1, ckpt_every=2, keep_last=2, progress=False
        )
    )
    ema_decay: float = 0.9
    step_s: float = 0.0  # sleep per step, so a test can signal a run mid-training


class ToyStream:
    """Batch i of rank r is drawn from a generator seeded with (seed, r, i): resumable by its position alone."""

    def __init__(self, cfg: ToyDataConfig, dim: int, rank: int):
        self.cfg, self.dim, self.rank, self.position = cfg, dim, rank, 0

    def __iter__(self):
        while True:
            g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.rank * 10_007 + self.position)
            x = torch.randn(self.cfg.batch_size, self.dim, generator=g)
            y = x @ TRUE_W[:, : self.dim].T + 0.01 * torch.randn(self.cfg.batch_size, 1, generator=g)
            self.position += 1
            yield x, y

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


class WeightEma:
    """A side state: the moving average of the model's weights."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for k, v in model.state_dict().items():
            self.shadow[k].mul_(self.decay).add_(v.float(), alpha=1 - self.decay)

    def state_dict(self) -> dict:
        return {k: v.clone() for k, v in self.shadow.items()}

    def load_state_dict(self, state: dict) -> None:
        self.shadow = {k: v.clone() for k, v in state.items()}


class ToyTask(Task):
    name = "toy"
    config_class = ToyConfig
    progress_keys = {"loss": "train/loss"}

    def build_model(self):
        self.model = torch.nn.Linear(self.cfg.model.dim, 1)
        return self.model

    def build_side(self):
        self.ema = WeightEma(self.model, self.cfg.ema_decay)
        self.images = 0
        return {"ema": self.ema}

    def data_stream(self):
        return ToyStream(self.cfg.data, self.cfg.model.dim, self.dist.rank)

    def train_step(self, engine, batch, step):
        x, y = (t.to(self.dist.device) for t in batch)
        loss = F.mse_loss(engine(x), y)
        engine.backward(loss)
        engine.step()
        self.ema.update(engine.module)
        time.sleep(self.cfg.step_s)
        return {"loss": loss.detach()}

    def log_values(self, engine):
        return {"rank": float(self.dist.rank)}  # averaged over ranks by the loop: (W - 1) / 2

    def on_images(self, step, logger):
        Path(self.cfg.run_dir, "images.txt").open("a").write(f"{step}\n")
