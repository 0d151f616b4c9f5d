"""Convolutional encoder and decoder of the hybrid tokenizer.

The encoder downsamples by 2 per level after the first (16x for five levels), with residual blocks and no
attention. The decoder mirrors it with one more residual block per level, adaptive GroupNorm (scale and shift
predicted from the decoder's input feature map, so every level sees the quantised content) and depth-to-space
upsampling (a convolution to 4x channels followed by pixel shuffle).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass
class CNNConfig:
    channels: int = 128
    channel_mults: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    num_res_blocks: int = 2
    z_channels: int = 256  # channels handed to / taken from the transformer
    num_groups: int = 32

    def __post_init__(self):
        if not self.channel_mults:
            raise ValueError("cnn.channel_mults must list at least one level")
        for c in [self.channels * m for m in self.channel_mults] + [self.z_channels]:
            if c % self.num_groups:
                raise ValueError(f"cnn channel count {c} is not divisible by num_groups={self.num_groups}")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channel_mults) - 1)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, groups: int, cond_channels: int = 0):
        super().__init__()
        self.norm1 = (
            AdaptiveGroupNorm(c_in, groups, cond_channels) if cond_channels else nn.GroupNorm(groups, c_in)
        )
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = (
            AdaptiveGroupNorm(c_out, groups, cond_channels) if cond_channels else nn.GroupNorm(groups, c_out)
        )
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        self.conditioned = cond_channels > 0

    def _norm(self, norm, x, cond):
        return norm(x, cond) if self.conditioned else norm(x)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self._norm(self.norm1, x, cond)))
        h = self.conv2(F.silu(self._norm(self.norm2, h, cond)))
        return self.skip(x) + h


class AdaptiveGroupNorm(nn.Module):
    """GroupNorm whose per-channel scale and shift come from a conditioning map (resized to x)."""

    def __init__(self, channels: int, groups: int, cond_channels: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, affine=False)
        self.to_scale_shift = nn.Conv2d(cond_channels, 2 * channels, 1)
        nn.init.zeros_(self.to_scale_shift.weight)
        nn.init.zeros_(self.to_scale_shift.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        # The 1x1 convolution runs at the conditioning map's (token-grid) resolution and its output is upsampled:
        # identical to convolving the upsampled map (nearest upsampling commutes with 1x1 convolutions), without
        # materialising z_channels x H x W at every full-resolution norm.
        scale_shift = self.to_scale_shift(cond)
        if scale_shift.shape[-2:] != x.shape[-2:]:
            scale_shift = F.interpolate(scale_shift, size=x.shape[-2:], mode="nearest")
        scale, shift = scale_shift.chunk(2, dim=1)
        return self.norm(x) * (1 + scale) + shift


def run_block(block: nn.Module, grad_checkpointing: bool, *args):
    """Run a block, recomputing its activations in the backward pass when checkpointing (the full-resolution
    levels of the CNN hold most of a tokenizer's activation memory at 256 px)."""
    if grad_checkpointing and block.training and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad keeps exact halving for even sizes


class DepthToSpaceUpsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, 4 * c, 3, padding=1)

    def forward(self, x):
        return F.pixel_shuffle(self.conv(x), 2)


class CNNEncoder(nn.Module):
    def __init__(self, cfg: CNNConfig, in_channels: int = 3, grad_checkpointing: bool = False):
        super().__init__()
        self.grad_checkpointing = grad_checkpointing
        g = cfg.num_groups
        chans = [cfg.channels * m for m in cfg.channel_mults]
        self.conv_in = nn.Conv2d(in_channels, chans[0], 3, padding=1)
        blocks: list[nn.Module] = []
        c = chans[0]
        for level, c_out in enumerate(chans):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(c, c_out, g))
                c = c_out
            if level < len(chans) - 1:
                blocks.append(Downsample(c))
        self.down = nn.Sequential(*blocks)
        self.mid = nn.Sequential(ResBlock(c, c, g), ResBlock(c, c, g))
        self.norm_out = nn.GroupNorm(g, c)
        self.conv_out = nn.Conv2d(c, cfg.z_channels, 3, padding=1)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x_BCHW)
        for block in [*self.down, *self.mid]:
            h = run_block(block, self.grad_checkpointing, h)
        return self.conv_out(F.silu(self.norm_out(h)))


class CNNDecoder(nn.Module):
    def __init__(self, cfg: CNNConfig, out_channels: int = 3, grad_checkpointing: bool = False):
        super().__init__()
        self.grad_checkpointing = grad_checkpointing
        g = cfg.num_groups
        chans = [cfg.channels * m for m in cfg.channel_mults][::-1]
        zc = cfg.z_channels
        c = chans[0]
        self.conv_in = nn.Conv2d(zc, c, 3, padding=1)
        self.mid = nn.ModuleList([ResBlock(c, c, g, zc), ResBlock(c, c, g, zc)])
        self.levels = nn.ModuleList()
        for level, c_out in enumerate(chans):
            blocks = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResBlock(c, c_out, g, zc))
                c = c_out
            up = DepthToSpaceUpsample(c) if level < len(chans) - 1 else nn.Identity()
            self.levels.append(nn.ModuleDict({"blocks": blocks, "up": up}))
        self.norm_out = AdaptiveGroupNorm(c, g, zc)
        self.conv_out = nn.Conv2d(c, out_channels, 3, padding=1)

    def forward(self, z_BCHW: torch.Tensor) -> torch.Tensor:
        cond = z_BCHW
        h = self.conv_in(z_BCHW)
        for block in self.mid:
            h = run_block(block, self.grad_checkpointing, h, cond)
        for level in self.levels:
            for block in level["blocks"]:
                h = run_block(block, self.grad_checkpointing, h, cond)
            h = level["up"](h)
        return self.conv_out(F.silu(self.norm_out(h, cond)))
