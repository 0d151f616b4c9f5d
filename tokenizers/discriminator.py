"""PatchGAN discriminator with hinge losses for tokenizer training.

The architecture is the classic N-layer PatchGAN: ``num_layers`` stride-2 4x4 convolutions doubling the width
from ``ndf`` (capped at 8 * ndf), one stride-1 4x4 convolution, and a 4x4 convolution to one logit per patch.
With 3 layers and ndf 64 a 256 px image gives a 30x30 logit map (receptive field 70 px). The GAN term starts at
``start_step`` with a fixed ``weight`` (0.5 from step 20k in GigaTok); before that the discriminator is neither
trained nor used. ``weight: 0`` builds nothing.

``kind: dino`` builds GigaTok's DINO discriminator instead (tokscale.tokenizers.dino_disc: a frozen DINO ViT-S/16
read from ``dino_weights``, a local file, with trainable heads), as GigaTok's ``VQ_BL256_dino_disc`` recipe does
from step 80k.

``diff_aug: true`` passes every image a discriminator sees, real and reconstructed, in both steps, through
GigaTok's DiffAug (tokscale.tokenizers.diffaug, cutout ``diff_aug_cutout``); the dino recipe turns it on.

The discriminator's AdamW follows the generator's learning-rate schedule: its lr at step t is
``lr * schedule(t)``, the multiplier of ``optim`` (GigaTok's ``scheduler_disc``), and its hinge loss is scaled by
``weight`` as GigaTok's is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

NORMS = ("batch", "group", "none")
KINDS = ("patchgan", "dino")


@dataclass
class DiscriminatorConfig:
    """PatchGAN settings and its own AdamW optimiser (it trains outside the tokenizer's engine)."""

    weight: float = 0.5  # weight of both hinge terms once active; 0 turns the GAN off
    start_step: int = (
        20000  # first step (as logged, counting from 1) at which the discriminator trains and counts
    )
    kind: str = "patchgan"  # patchgan | dino (GigaTok's DINO discriminator; needs dino_weights)
    dino_weights: str = ""  # kind=dino: local DINO ViT-S/16 backbone file (never downloaded)
    ndf: int = 64  # width of the first convolution
    num_layers: int = 3  # stride-2 convolutions
    norm: str = "batch"  # batch | group | none, after every convolution but the first and the last
    diff_aug: bool = False  # GigaTok's DiffAug (translation, colour, cutout) on every discriminator input
    diff_aug_cutout: float = 0.2  # cutout side as a fraction of the image side
    lr: float = 1e-4  # peak lr; it follows the generator's schedule (optim.*)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 1e-4

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ValueError(f"gan.weight must be >= 0 (0 turns the GAN off), got {self.weight}")
        if self.start_step < 0:
            raise ValueError(f"gan.start_step must be >= 0, got {self.start_step}")
        if self.ndf < 1 or self.num_layers < 1:
            raise ValueError(f"gan.ndf and gan.num_layers must be >= 1, got {self.ndf} and {self.num_layers}")
        if self.kind not in KINDS:
            raise ValueError(f"gan.kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "dino" and self.weight > 0 and not self.dino_weights:
            raise ValueError(
                "gan.kind=dino needs gan.dino_weights: a local DINO ViT-S/16 file (dino_deitsmall16_pretrain.pth "
                "or timm's vit_small_patch16_224.dino model.safetensors); nothing is downloaded"
            )
        if not 0.0 <= self.diff_aug_cutout <= 1.0:
            raise ValueError(f"gan.diff_aug_cutout must be in [0, 1], got {self.diff_aug_cutout}")
        if self.norm not in NORMS:
            raise ValueError(f"gan.norm must be one of {NORMS}, got {self.norm!r}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"gan.betas must be two values in [0, 1), got {list(self.betas)}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ValueError(
                f"gan.lr must be > 0 and gan.weight_decay >= 0, got {self.lr}, {self.weight_decay}"
            )


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(32, channels), channels)
    return nn.Identity()


class PatchDiscriminator(nn.Module):
    """``forward(images_BCHW in [-1, 1]) -> logits (B, 1, h, w)``, one real/fake logit per overlapping patch."""

    def __init__(self, cfg: DiscriminatorConfig, in_channels: int = 3) -> None:
        super().__init__()
        has_norm = cfg.norm != "none"
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, cfg.ndf, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        width = cfg.ndf
        for n in range(1, cfg.num_layers + 1):
            # The last block keeps the resolution; the others halve it.
            stride = 2 if n < cfg.num_layers else 1
            out = cfg.ndf * min(2**n, 8)
            layers += [
                nn.Conv2d(width, out, 4, stride=stride, padding=1, bias=not has_norm),
                _norm(cfg.norm, out),
                nn.LeakyReLU(0.2, inplace=True),
            ]
            width = out
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.layers = nn.Sequential(*layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # DCGAN initialisation: small random filters, norm scales near one.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4:
            raise ValueError(f"discriminator expects (B, C, H, W) images, got shape {tuple(images.shape)}")
        return self.layers(images.to(self.layers[0].weight.dtype))


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss, the mean of the real and fake halves: 0.5 * (E relu(1 - D(x)) + E relu(1 + D(G)))."""
    real = F.relu(1.0 - logits_real.float()).mean()
    fake = F.relu(1.0 + logits_fake.float()).mean()
    return 0.5 * (real + fake)


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator hinge loss: -E D(G), in float32."""
    return -logits_fake.float().mean()


def gan_weight_at(cfg: DiscriminatorConfig, step: int) -> float:
    """The GAN weight at ``step`` (as logged, from 1): 0 before ``cfg.start_step``, ``cfg.weight`` from it on."""
    return float(cfg.weight) if step >= cfg.start_step else 0.0


def build_discriminator(cfg: DiscriminatorConfig) -> nn.Module | None:
    """The PatchGAN or the DINO discriminator, or None when ``cfg.weight == 0``."""
    if cfg.weight == 0:
        return None
    if cfg.kind == "dino":
        from tokscale.tokenizers.dino_disc import DinoDiscriminator

        return DinoDiscriminator(cfg.dino_weights, weights_key="loss.gan.dino_weights")
    return PatchDiscriminator(cfg)


def trainable_parameters(disc: nn.Module) -> list[nn.Parameter]:
    """What the discriminator's optimiser updates (the DINO discriminator's frozen backbone excluded)."""
    params = getattr(disc, "trainable_parameters", None)
    return list(params() if params is not None else disc.parameters())


def savable(disc: nn.Module | None) -> nn.Module | None:
    """The part of a discriminator a checkpoint keeps: the DINO discriminator's heads (its backbone is a frozen
    file), the whole PatchGAN."""
    return getattr(disc, "heads", disc) if disc is not None else None
