"""The class-conditional AR trainer: a task of the shared loop (tokscale.loop) that trains the GPT on token shards.

    tokscale train c2i c2i/tiny data.train_tokens='runs/tokens/*.tar' data.val_tokens='runs/tokens-val/*.tar'
    tokscale train c2i c2i/llamagen-B --nproc 8 train.zero_stage=2 data.train_tokens=...

Running the same command again resumes from the newest complete checkpoint in ``run_dir``. The loop owns the
engine, resume, cadences and saves; this module owns the GPT, the token stream (one random augmentation of each
image per epoch, resumable by its batch count, :class:`tokscale.data.tokens.TokenTrainStream`), the next-token
cross-entropy step and the validation cross-entropy on held-out token shards every ``eval.every_steps`` steps
(when ``data.val_tokens`` names them).

The shards name the tokenizer their codes come from; the run keeps that name (``data.tokenizer_id``, filled in
from the shards when empty) and refuses shards of another tokenizer, a codebook larger than the model's
vocabulary or a token count other than the model's, naming both.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from tokscale.autoregressive.gpt import GPTConfig
from tokscale.autoregressive.presets import get_preset
from tokscale.trainer import LoopConfig, OptimConfig, Task


@dataclass
class TokenDataConfig:
    train_tokens: str = ""  # token shards (a pattern, brace range or folder of *.tar) written by extraction
    val_tokens: str = ""  # held-out token shards for the validation cross-entropy ("" = none)
    tokenizer_id: str = ""  # "" = taken from the shards (all must agree); else shards of another are refused
    batch_size: int = 32  # per rank
    seed: int = 0

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {self.batch_size}")


@dataclass
class ValConfig:
    every_steps: int = 0  # validation cross-entropy every this many steps (0: never)
    max_samples: int = 0  # 0 = every held-out sample (augmentation 0 of each image)
    batch_size: int = 64

    def __post_init__(self):
        if self.every_steps < 0 or self.max_samples < 0 or self.batch_size < 1:
            raise ValueError(
                f"eval.every_steps={self.every_steps}, eval.max_samples={self.max_samples} must be >= 0 and "
                f"eval.batch_size={self.batch_size} >= 1"
            )


@dataclass
class C2IConfig:
    run_dir: str = "runs/c2i"
    model: GPTConfig = field(default_factory=GPTConfig)
    data: TokenDataConfig = field(default_factory=TokenDataConfig)
    # LlamaGen's recipe: AdamW (0.9, 0.95), weight decay 0.05 on >= 2-D parameters, constant lr 1e-4, clip 1.0
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(
            lr=1e-4, betas=[0.9, 0.95], weight_decay=0.05, schedule="constant", grad_clip=1.0
        )
    )
    train: LoopConfig = field(default_factory=LoopConfig)
    eval: ValConfig = field(default_factory=ValConfig)
    # > 0: keep a moving average of the weights with this decay (LlamaGen's --ema: 0.9999), saved with every
    # checkpoint and exported with `tokscale export RUN OUT --weights ema`
    ema_decay: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1) (0: no EMA), got {self.ema_decay}")
        if self.ema_decay > 0 and self.train.zero_stage == 3:
            raise ValueError(
                "ema_decay > 0 with train.zero_stage=3: each rank holds only a shard of the weights; use stage 0-2"
            )


def load_train_config(path, overrides=()) -> C2IConfig:
    return C2ITask.load_config(path, overrides)


def main(cfg: C2IConfig, should_stop=None) -> dict:
    from tokscale.loop import train

    return train(C2ITask, cfg, should_stop)


def check_tokens_fit(meta: dict, model: GPTConfig, source: str) -> None:
    """Refuse token shards whose codes the model cannot read (naming both sides)."""
    if int(meta["codebook_size"]) > model.vocab_size:
        raise ValueError(
            f"{source}: codebook_size {meta['codebook_size']} (tokenizer {meta['tokenizer_id']!r}) exceeds "
            f"model.vocab_size={model.vocab_size}"
        )
    if int(meta["num_tokens"]) != model.num_tokens:
        raise ValueError(
            f"{source}: {meta['num_tokens']} tokens per image (tokenizer {meta['tokenizer_id']!r}), but "
            f"model.num_tokens={model.num_tokens}"
        )


class WeightEma:
    """fp32 moving average of the model's weights (the side state ``ema``: name -> tensor, the model's keys).
    Under ZeRO 1-2 every rank holds the full updated weights after the step, so each rank keeps the same average."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for k, v in model.state_dict().items():
            if self.shadow[k].device != v.device:  # built on the CPU; beside the weights from step 1
                self.shadow[k] = self.shadow[k].to(v.device)
            self.shadow[k].mul_(self.decay).add_(v.detach().float(), alpha=1 - self.decay)

    def state_dict(self) -> dict:
        return {k: v.detach().cpu().clone() for k, v in self.shadow.items()}

    def load_state_dict(self, state: dict) -> None:
        self.shadow = {k: v.float().clone() for k, v in state.items()}


def card_text(lines: list[str], metrics: dict) -> str:
    """A model card: its lines, then a Metrics section when there are any (sorted by name)."""
    if metrics:
        lines = [*lines, "", "## Metrics", ""] + [f"- {k}: {v}" for k, v in sorted(metrics.items())]
    return "\n".join(lines) + "\n"


class C2ITask(Task):
    name = "c2i"
    config_class = C2IConfig
    presets = staticmethod(get_preset)
    progress_keys = {"loss_ce": "ce"}

    def __init__(self, cfg: C2IConfig, dist) -> None:
        super().__init__(cfg, dist)
        self.eval_every = cfg.eval.every_steps if cfg.data.val_tokens else 0

    def build_model(self):
        from tokscale.autoregressive.gpt import GPT

        self.model = GPT(self.cfg.model)
        return self.model

    def build_side(self) -> dict:
        self.ema = WeightEma(self.model, self.cfg.ema_decay) if self.cfg.ema_decay > 0 else None
        return {"ema": self.ema} if self.ema is not None else {}

    def param_groups(self, model):
        from tokscale.trainer import decay_groups

        return decay_groups(model, self.cfg.optim.weight_decay)

    def data_stream(self):
        from tokscale.data.tokens import TokenTrainStream

        d = self.cfg.data
        if not d.train_tokens:
            raise ValueError("data.train_tokens is empty: give the token shards to train on")
        stream = TokenTrainStream(
            d.train_tokens,
            batch_size=d.batch_size,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            seed=d.seed,
            tokenizer_id=d.tokenizer_id or None,
        )
        self.check_tokens(stream.meta, d.train_tokens)
        self.tokenizer_id = stream.meta["tokenizer_id"]
        return stream

    def check_tokens(self, meta: dict, source: str) -> None:
        """Refuse token shards this model cannot read."""
        check_tokens_fit(meta, self.cfg.model, source)

    def split_tokens(self, tokens_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(model input, target) of a batch of stored token rows, in validation: the codes themselves."""
        return tokens_BT, tokens_BT

    def train_pair(self, tokens_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(model input, target) of a training batch of stored token rows: the codes themselves."""
        return tokens_BT, tokens_BT

    def train_step(self, engine, batch, step: int) -> dict[str, torch.Tensor]:
        tokens, labels = (t.to(self.dist.device, non_blocking=True) for t in batch)
        inputs, target = self.train_pair(tokens)
        logits = engine(inputs, labels)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
        engine.backward(loss)
        engine.step()
        if self.ema is not None and engine.is_gradient_accumulation_boundary():
            self.ema.update(engine.module)
        return {"loss_ce": loss.detach()}

    @torch.no_grad()
    def evaluate(self, engine, step: int, logger) -> None:
        """Mean next-token cross-entropy over the held-out shards (augmentation 0, the centre crop), split over
        ranks."""
        from tokscale.data.tokens import load_tokens

        cfg, d = self.cfg, self.dist
        val = load_tokens(cfg.data.val_tokens, tokenizer_id=self.tokenizer_id)
        tokens, labels = val["tokens"][:, 0], val["labels"]  # (N, num_augs, T): augmentation 0 of each image
        if cfg.eval.max_samples:
            tokens, labels = tokens[: cfg.eval.max_samples], labels[: cfg.eval.max_samples]
        model = engine.module
        was_training = model.training
        model.eval()
        dtype = next(model.parameters()).dtype
        total = torch.zeros(2, dtype=torch.float64, device=d.device)  # summed CE, token count
        mine = torch.arange(d.rank, len(tokens), d.world_size)
        # every rank runs the same number of batches (ZeRO-3 gathers parameters collectively in forward)
        per_rank = -(-len(tokens) // d.world_size)
        for start in range(0, per_rank, cfg.eval.batch_size):
            idx = mine[start : start + cfg.eval.batch_size]
            if len(idx) == 0:  # this rank's share ran out: a dummy forward keeps the collectives matched
                idx, weight = torch.zeros(1, dtype=torch.long), 0.0
            else:
                weight = 1.0
            (t_in, t), y = self.split_tokens(tokens[idx].to(d.device)), labels[idx].to(d.device)
            with torch.autocast(d.device.type, dtype=dtype, enabled=dtype != torch.float32):
                logits = model(t_in, y)
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), t.reshape(-1), reduction="sum")
            total += torch.stack([ce.double(), torch.tensor(float(t.numel()), device=d.device)]) * weight
        if d.world_size > 1:
            torch.distributed.all_reduce(total)
        model.train(was_training)
        if d.is_main:
            logger.scalars(step, {"val/loss_ce": float(total[0] / total[1].clamp_min(1))})

    @classmethod
    def model_card(cls, cfg: dict, training: dict, metrics: dict, params: int) -> str:
        m, data = cfg.get("model", {}), cfg.get("data", {})
        lines = [
            f"# tokscale class-conditional GPT ({m.get('preset') or 'custom'})",
            "",
            f"- parameters: {params:,}",
            f"- width {m.get('width')}, depth {m.get('depth')}, heads {m.get('heads')}, positions {m.get('position')}",
            f"- vocabulary {m.get('vocab_size')}, {m.get('num_tokens')} tokens, {m.get('num_classes')} classes "
            "(+1 null class for CFG)",
            f"- trained on the codes of tokenizer `{data.get('tokenizer_id') or 'see the token shards'}` "
            f"from `{data.get('train_tokens')}`",
            f"- steps: {training.get('step')}",
        ]
        return card_text(lines, metrics)
