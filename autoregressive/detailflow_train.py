"""The DetailFlow AR trainer: next-detail prediction on a DetailFlow tokenizer's codes, a task of the shared loop.

    tokscale extract TOKENIZER_RUN --data 'shards/train-*.tar' --out runs/df-tokens      # clean, input, label
    tokscale train detailflow detailflow/tiny data.train_tokens=runs/df-tokens data.val_tokens=runs/df-tokens-val
    tokscale train detailflow detailflow/detailflow-L-128 --nproc 8 data.train_tokens=...

It is the class-conditional trainer (tokscale.autoregressive.train.C2ITask: token stream, resume, validation, EMA,
export) with DetailFlow's GPT (tokscale.autoregressive.detailflow) and DetailFlow's self-correction pairs. Token shards
extracted from a tokenizer trained with self-correction hold three streams per crop, one after the other on the
token axis (tokscale.tokenizers.extract): clean codes, the corrupted input (clean prefix, a corrupted span, the tail
re-encoded after it) and the label (clean up to the span's end, then the re-encoded tail). Each training sample
uses (input, label) with probability ``correction_prob`` (DetailFlow: 0.3) and (clean, clean) otherwise, drawn from
torch's CPU generator, which the loop seeds and checkpoints (a resumed run draws the same). Shards of the clean
codes alone train without correction. Validation is the cross-entropy of the clean stream.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tokscale.autoregressive.detailflow import DetailFlowGPTConfig, get_preset
from tokscale.autoregressive.train import C2IConfig, C2ITask
from tokscale.trainer import OptimConfig


@dataclass
class DetailFlowTrainConfig(C2IConfig):
    run_dir: str = "runs/detailflow"
    model: DetailFlowGPTConfig = field(default_factory=DetailFlowGPTConfig)
    # DetailFlow's recipe: AdamW (0.9, 0.95), weight decay 0.05, lr 1e-4, warmup over 5% of the steps from
    # 0.005 lr, then cosine to 0.01 lr, clip 1.0 (the recipes in conf/detailflow set warmup_steps to 5%)
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(
            lr=1e-4,
            betas=[0.9, 0.95],
            weight_decay=0.05,
            schedule="cosine",
            warmup_init=0.005,
            min_lr=1e-6,
            grad_clip=1.0,
        )
    )
    # DetailFlow samples with an EMA of 0.9999 (ema_decay, which the recipes set)
    correction_prob: float = 0.3  # per sample: train on the (corrupted input, corrected label) pair

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.correction_prob <= 1.0:
            raise ValueError(f"correction_prob must be in [0, 1], got {self.correction_prob}")


STREAMS = 3  # clean, input, label (tokscale.tokenizers.detailflow.STREAMS)


def split_streams(tokens_BT: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, ...]:
    """Stored rows (B, S x N), stream-major -> S tensors (B, N)."""
    return tuple(tokens_BT.reshape(tokens_BT.shape[0], -1, num_tokens).unbind(1))


def correction_pairs(tokens_BT: torch.Tensor, num_tokens: int, prob: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(model input, target) of a training batch: per sample (input, label) with probability ``prob`` when the rows
    hold the three streams, else (clean, clean). The draw uses torch's CPU generator (seeded and checkpointed)."""
    streams = split_streams(tokens_BT, num_tokens)
    clean = streams[0]
    if len(streams) == 1:
        return clean, clean
    pick = (torch.rand(clean.shape[0]) < prob).to(clean.device)[:, None]
    return torch.where(pick, streams[1], clean), torch.where(pick, streams[2], clean)


class DetailFlowTask(C2ITask):
    name = "detailflow"
    config_class = DetailFlowTrainConfig
    presets = staticmethod(get_preset)
    progress_keys = {"loss_ce": "ce"}

    def build_model(self):
        from tokscale.autoregressive.detailflow import DetailFlowGPT

        self.model = DetailFlowGPT(self.cfg.model)
        return self.model

    def check_tokens(self, meta: dict, source: str) -> None:
        m = self.cfg.model
        if int(meta["codebook_size"]) > m.vocab_size:
            raise ValueError(
                f"{source}: codebook_size {meta['codebook_size']} (tokenizer {meta['tokenizer_id']!r}) exceeds "
                f"model.vocab_size={m.vocab_size}"
            )
        stored = int(meta["num_tokens"])
        if stored not in (m.num_tokens, STREAMS * m.num_tokens):
            raise ValueError(
                f"{source}: {stored} tokens per crop (tokenizer {meta['tokenizer_id']!r}), but model.num_tokens="
                f"{m.num_tokens} expects {m.num_tokens} (clean codes) or {STREAMS * m.num_tokens} (clean, input and "
                "label streams of a tokenizer trained with self-correction)"
            )

    def split_tokens(self, tokens_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        clean = split_streams(tokens_BT, self.cfg.model.num_tokens)[0]
        return clean, clean

    def train_pair(self, tokens_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return correction_pairs(tokens_BT, self.cfg.model.num_tokens, self.cfg.correction_prob)

    @classmethod
    def model_card(cls, cfg: dict, training: dict, metrics: dict, params: int) -> str:
        m = cfg.get("model", {})
        card = super().model_card(cfg, training, metrics, params).replace(
            "class-conditional GPT", "DetailFlow next-detail GPT", 1
        )
        return card + (
            f"\n## DetailFlow\n\n- groups of {m.get('group_size')} tokens, group-causal attention, 2D RoPE over "
            f"(group, position in group), rope_offset {m.get('rope_offset')}\n- self-correction pairs with "
            f"probability {cfg.get('correction_prob')}\n- sampling: tokscale.autoregressive.detailflow.generate_groups "
            "(a group per forward pass, block KV cache)\n"
        )


def main(cfg: DetailFlowTrainConfig, should_stop=None) -> dict:
    from tokscale.loop import train

    return train(DetailFlowTask, cfg, should_stop)
