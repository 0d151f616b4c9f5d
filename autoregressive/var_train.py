"""The VAR trainer: next-scale prediction on multi-scale token shards, a task of the shared loop.

    tokscale train var var/tiny data.train_tokens=TOKENS/train data.val_tokens=TOKENS/eval tokenizer=runs/ms-tiny
    tokscale train var var/var-d16 --nproc 8 data.train_tokens=... tokenizer=exports/var-vqvae
    model = load_var("runs/var-tiny")   # eval mode, for tokscale.autoregressive.var_sample.generate_var

It is the class-conditional trainer (tokscale.autoregressive.train.C2ITask: token stream, resume, validation on
held-out shards, EMA, export) with the VAR transformer (tokscale.autoregressive.var) and one difference in what
goes in: the shards hold each image's flat multi-scale codes (scales concatenated coarse to fine, written by
``tokscale extract`` from a ``quantizer.kind=multiscale`` tokenizer), and the model reads, for scales 2..K, the
tokenizer's accumulated f_hat after the scales before, area-downsampled (``MultiScaleQuantizer.var_input``). So
the run loads that tokenizer (``tokenizer``: its run directory or export; only its quantizer is kept, frozen) and
computes the input from the codes on the fly. The loss is the cross-entropy of all L tokens with uniform weights
(VAR's 1/L), teacher-forced in one pass under the block-causal mask.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tokscale.autoregressive.presets import get_var_preset
from tokscale.autoregressive.train import C2ITask, TokenDataConfig, ValConfig, card_text, check_tokens_fit
from tokscale.autoregressive.var import VARConfig
from tokscale.trainer import LoopConfig, OptimConfig


@dataclass
class VARTrainConfig:
    run_dir: str = "runs/var"
    model: VARConfig = field(default_factory=VARConfig)
    data: TokenDataConfig = field(default_factory=TokenDataConfig)
    # the multi-scale tokenizer (run directory or export) whose codes the shards hold: its quantizer gives the
    # teacher-forcing input. Required to train.
    tokenizer: str = ""
    verify_weights: bool = True  # check an exported tokenizer's files against its SHA256SUMS
    # VAR's recipe: AdamW (0.9, 0.95), weight decay 0.05 on >= 2-D parameters, clip 2.0, lr 1e-4 x batch / 256
    # after a warmup over 2% of the steps from 0.5% of lr, held for 5% of the rest, then linear to 1% of lr
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(
            lr=3e-4,
            betas=[0.9, 0.95],
            weight_decay=0.05,
            grad_clip=2.0,
            schedule="wsd",
            decay_shape="linear",
            decay_fraction=0.93,
            min_lr=3e-6,
            warmup_init=0.005,
        )
    )
    train: LoopConfig = field(default_factory=LoopConfig)
    eval: ValConfig = field(default_factory=ValConfig)
    ema_decay: float = 0.0  # > 0: a moving average of the weights (VAR trains without one)

    def __post_init__(self):
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1) (0: no EMA), got {self.ema_decay}")
        if self.ema_decay > 0 and self.train.zero_stage == 3:
            raise ValueError(
                "ema_decay > 0 with train.zero_stage=3: each rank holds only a shard of the weights; use stage 0-2"
            )


def load_quantizer(path: str, model: VARConfig, device, verify: bool = True):
    """The frozen MultiScaleQuantizer of a tokenizer run or export, checked against the model's scales, code
    width and vocabulary."""
    from tokscale.tokenizers.load import load_tokenizer

    if not path:
        raise ValueError(
            "tokenizer is empty: give the multi-scale tokenizer (run dir or export) of the codes"
        )
    tok = load_tokenizer(path, device=device, verify=verify)
    q = tok.quantizer
    if getattr(tok.config.quantizer, "kind", "vq") != "multiscale":
        raise ValueError(
            f"tokenizer {path}: quantizer.kind is {tok.config.quantizer.kind!r}, VAR needs 'multiscale'"
        )
    qc = tok.config.quantizer
    for key, have, want in (
        ("scales", list(q.scales), list(model.scales)),
        ("code_dim", qc.code_dim, model.code_dim),
    ):
        if have != want:
            raise ValueError(f"tokenizer {path}: quantizer.{key}={have}, but model.{key}={want}")
    if qc.codebook_size > model.vocab_size:
        raise ValueError(
            f"tokenizer {path}: codebook_size {qc.codebook_size} exceeds model.vocab_size={model.vocab_size}"
        )
    q.requires_grad_(False)
    return q.eval()


def manifest_scales(source: str) -> list[int] | None:
    """The ``scales`` that ``tokscale extract`` writes into the shard folder's manifest.json (None: not there)."""
    path = Path(source)
    folder = path if path.is_dir() else path.parent
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        return None
    return json.loads(manifest.read_text()).get("scales")


class VARTask(C2ITask):
    name = "var"
    config_class = VARTrainConfig
    presets = staticmethod(get_var_preset)

    def build_model(self):
        from tokscale.autoregressive.var import VAR

        self.model = VAR(self.cfg.model)
        return self.model

    def build_side(self) -> dict:
        # the frozen quantizer is not saved: it is the tokenizer's, named by the config
        self.quantizer = load_quantizer(
            self.cfg.tokenizer, self.cfg.model, self.dist.device, self.cfg.verify_weights
        )
        return super().build_side()

    def param_groups(self, model):
        # VAR's split: no weight decay on 1-D parameters nor on the start, position and level tables
        no_decay = {"start_pos", "pos_embed", "level_embed.weight"}
        decay, rest = [], []
        for name, p in model.named_parameters():
            (rest if p.ndim < 2 or name in no_decay else decay).append(p)
        return [
            {"params": decay, "weight_decay": self.cfg.optim.weight_decay},
            {"params": rest, "weight_decay": 0.0},
        ]

    def check_tokens(self, meta: dict, source: str) -> None:
        check_tokens_fit(meta, self.cfg.model, source)
        scales = meta.get("scales") or manifest_scales(source)
        if scales is not None and list(scales) != list(self.cfg.model.scales):
            raise ValueError(
                f"{source}: codes of scales {list(scales)}, but model.scales={list(self.cfg.model.scales)}"
            )

    @torch.no_grad()
    def var_input(self, tokens_BL: torch.Tensor) -> torch.Tensor:
        bounds = self.cfg.model.boundaries
        idx = [tokens_BL[:, a:b] for a, b in zip(bounds, bounds[1:])]
        return self.quantizer.var_input(idx)

    def split_tokens(self, tokens_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(teacher-forcing input (B, L - p_1^2, code_dim), target codes (B, L))."""
        return self.var_input(tokens_BT), tokens_BT

    def train_pair(self, tokens_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.split_tokens(tokens_BT)

    @classmethod
    def model_card(cls, cfg: dict, training: dict, metrics: dict, params: int) -> str:
        m, data = cfg.get("model", {}), cfg.get("data", {})
        lines = [
            f"# tokscale VAR next-scale transformer ({m.get('preset') or 'custom'})",
            "",
            f"- parameters: {params:,}",
            f"- width {m.get('width')}, depth {m.get('depth')}, heads {m.get('heads')}",
            f"- scales {m.get('scales')}, vocabulary {m.get('vocab_size')}, code width {m.get('code_dim')}, "
            f"{m.get('num_classes')} classes (+1 null class for CFG)",
            f"- tokenizer `{cfg.get('tokenizer')}`; codes `{data.get('train_tokens')}`",
            f"- steps: {training.get('step')}",
        ]
        return card_text(lines, metrics)


def var_config_from(path: str | Path) -> VARConfig:
    """The VARConfig in a ``tokscale train var`` run directory's or export's config.yaml (no weights read)."""
    from omegaconf import OmegaConf

    from tokscale.export import CONFIG

    cfg_file = Path(path) / CONFIG
    if not cfg_file.is_file():
        raise FileNotFoundError(
            f"{cfg_file} not found: expected a `tokscale train var` run directory or export"
        )
    raw = OmegaConf.load(cfg_file)
    if raw.get("schema") not in (None, VARTask.name) or "model" not in raw:
        raise ValueError(f"{cfg_file}: not a VAR run or export (schema {raw.get('schema')!r})")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(VARConfig), raw.model))


def load_var(path: str | Path, device: str | torch.device = "cpu", verify: bool = True):
    """A ready VAR (eval mode) from a ``tokscale train var`` run directory (newest checkpoint) or its export
    (``tokscale export RUN OUT``), with the config it was trained with."""
    from tokscale.autoregressive.var import VAR
    from tokscale.export import state_dict_from

    model = VAR(var_config_from(path))
    model.load_state_dict(state_dict_from(path, verify_export=verify), strict=True)
    return model.to(device).eval()


def load_train_config(path, overrides=()) -> VARTrainConfig:
    return VARTask.load_config(path, overrides)


def main(cfg: VARTrainConfig, should_stop=None) -> dict:
    from tokscale.loop import train

    return train(VARTask, cfg, should_stop)
