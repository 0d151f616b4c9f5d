"""PatchGAN discriminator with hinge losses for tokenizer training.

The architecture is the classic N-layer PatchGAN: ``num_layers`` stride-2 4x4 convolutions doubling the width
from ``ndf`` (capped at 8 * ndf), one stride-1 4x4 convolution, and a 4x4 convolution to one logit per patch.
With 3 layers and ndf 64 a 256 px image gives a 30x30 logit map (receptive field 70 px). The GAN term starts at
``start_step`` with a fixed ``weight`` (0.5 from step 20k in GigaTok); before that the discriminator is neither
trained nor used. ``weight: 0`` builds nothing.

``diff_aug: true`` applies differentiable augmentation (colour, translation, cutout; Zhao et al. 2020,
"Differentiable Augmentation for Data-Efficient GAN Training") to every image the discriminator sees, real and
reconstructed alike, in both the discriminator and the generator step: the generator gradient then flows
through the augmentation, so the discriminator cannot key on augmentation artefacts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

NORMS = ("batch", "group", "none")


@dataclass
class DiscriminatorConfig:
    """PatchGAN settings and its own AdamW optimiser (it trains outside the tokenizer's engine)."""

    weight: float = 0.5  # fixed weight of the generator's hinge term once active; 0 turns the GAN off
    start_step: int = 20000  # first step at which the discriminator trains and the GAN term counts
    ndf: int = 64  # width of the first convolution
    num_layers: int = 3  # stride-2 convolutions
    norm: str = "batch"  # batch | group | none, after every convolution but the first and the last
    diff_aug: bool = False  # DiffAugment (colour, translation, cutout) on every discriminator input
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 1e-4

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ValueError(f"gan.weight must be >= 0 (0 turns the GAN off), got {self.weight}")
        if self.start_step < 0:
            raise ValueError(f"gan.start_step must be >= 0, got {self.start_step}")
        if self.ndf < 1 or self.num_layers < 1:
            raise ValueError(f"gan.ndf and gan.num_layers must be >= 1, got {self.ndf} and {self.num_layers}")
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
        self.diff_aug = cfg.diff_aug
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
        x = images.to(self.layers[0].weight.dtype)
        if self.diff_aug:
            x = diff_augment(x)
        return self.layers(x)


def diff_augment(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Colour jitter, translation by up to 1/8 of the side (zero fill) and a cutout of half the side.

    Every operation is differentiable in ``x`` and draws fresh parameters per sample.
    """
    x = _jitter_colour(x, generator)
    x = _translate(x, 0.125, generator)
    return _cutout(x, 0.5, generator)


def _rand(shape, like: torch.Tensor, generator) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=like.device, dtype=torch.float32).to(like.dtype)


def _jitter_colour(x: torch.Tensor, generator) -> torch.Tensor:
    b = x.shape[0]
    x = x + (_rand((b, 1, 1, 1), x, generator) - 0.5)  # brightness
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (_rand((b, 1, 1, 1), x, generator) * 2) + mean  # saturation
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (_rand((b, 1, 1, 1), x, generator) + 0.5) + mean  # contrast


def _translate(x: torch.Tensor, ratio: float, generator) -> torch.Tensor:
    b, _, h, w = x.shape
    ph, pw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    if ph == 0 and pw == 0:
        return x
    shift_y = torch.randint(-ph, ph + 1, (b, 1), generator=generator, device=x.device)
    shift_x = torch.randint(-pw, pw + 1, (b, 1), generator=generator, device=x.device)
    padded = F.pad(x, [pw, pw, ph, ph])
    rows = torch.arange(h, device=x.device)[None] + ph - shift_y  # (B, H) rows of the padded image
    cols = torch.arange(w, device=x.device)[None] + pw - shift_x  # (B, W)
    batch = torch.arange(b, device=x.device)[:, None, None]
    # Advanced indices around a slice put their broadcast shape (B, H, W) first: the result is B, H, W, C.
    return padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def _cutout(x: torch.Tensor, ratio: float, generator) -> torch.Tensor:
    b, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    top = torch.randint(0, h - ch + 1, (b, 1, 1), generator=generator, device=x.device)
    left = torch.randint(0, w - cw + 1, (b, 1, 1), generator=generator, device=x.device)
    rows = torch.arange(h, device=x.device)[None, :, None]
    cols = torch.arange(w, device=x.device)[None, None, :]
    inside = (rows >= top) & (rows < top + ch) & (cols >= left) & (cols < left + cw)  # (B, H, W)
    return x * (~inside).unsqueeze(1).to(x.dtype)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss, the mean of the real and fake halves: 0.5 * (E relu(1 - D(x)) + E relu(1 + D(G)))."""
    real = F.relu(1.0 - logits_real.float()).mean()
    fake = F.relu(1.0 + logits_fake.float()).mean()
    return 0.5 * (real + fake)


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator hinge loss: -E D(G), in float32."""
    return -logits_fake.float().mean()


def gan_weight_at(cfg: DiscriminatorConfig, step: int) -> float:
    """The GAN weight at ``step``: 0 before ``cfg.start_step``, ``cfg.weight`` from it on."""
    return float(cfg.weight) if step >= cfg.start_step else 0.0


def build_discriminator(cfg: DiscriminatorConfig) -> PatchDiscriminator | None:
    """The PatchGAN, or None when ``cfg.weight == 0``."""
    if cfg.weight == 0:
        return None
    return PatchDiscriminator(cfg)
