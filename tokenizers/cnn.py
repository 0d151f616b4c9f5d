"""Convolutional encoder and decoder of the hybrid tokenizer, as GigaTok builds them.

Encoder: a 3x3 stem, then per level ``num_res_blocks`` residual blocks and (all levels but the last) a stride-2
3x3 convolution on a (0, 1, 0, 1)-padded map, two middle residual blocks, GroupNorm + swish and a 3x3
convolution to ``z_channels``. No attention anywhere.

Decoder: a 3x3 convolution from ``z_channels``, two middle residual blocks, then per level (widest first) one
adaptive GroupNorm, ``num_res_blocks + 1`` residual blocks and (all levels but the last) depth-to-space
upsampling: a 3x3 convolution to 4x channels rearranged in DCR order (TensorFlow's ``depth_to_space``). The
adaptive GroupNorm normalises without affine and then scales and shifts every channel by two linear maps of the
decoder *input*'s per-channel spatial statistics (std -> scale, mean -> shift): one style vector per image,
computed once, applied once per level. Every other norm is a plain affine GroupNorm(32, eps 1e-6).
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
    num_res_blocks: int = 2  # per encoder level; the decoder has one more per level
    z_channels: int = 256  # channels handed to / taken from the transformers
    num_groups: int = 32
    eps: float = 1e-6  # GroupNorm epsilon

    def __post_init__(self):
        if not self.channel_mults:
            raise ValueError("cnn.channel_mults must list at least one level")
        if self.num_res_blocks < 1:
            raise ValueError(f"cnn.num_res_blocks must be >= 1, got {self.num_res_blocks}")
        for c in [self.channels * m for m in self.channel_mults]:
            if c % self.num_groups:
                raise ValueError(
                    f"cnn channel count {c} is not divisible by cnn.num_groups={self.num_groups}"
                )
        if self.eps <= 0:
            raise ValueError(f"cnn.eps must be > 0, got {self.eps}")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channel_mults) - 1)


def group_norm(cfg: CNNConfig, channels: int, affine: bool = True) -> nn.GroupNorm:
    return nn.GroupNorm(cfg.num_groups, channels, eps=cfg.eps, affine=affine)


class ResBlock(nn.Module):
    """norm -> swish -> conv3x3 -> norm -> swish -> conv3x3, plus the input (1x1 conv when widths differ)."""

    def __init__(self, cfg: CNNConfig, c_in: int, c_out: int):
        super().__init__()
        self.norm1 = group_norm(cfg, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = group_norm(cfg, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.shortcut is None else self.shortcut(x)) + h


class AdaptiveGroupNorm(nn.Module):
    """GroupNorm without affine, then ``scale * x + shift`` with per-channel scale and shift predicted from a
    style map's per-channel spatial std (unbiased variance + eps, square-rooted) and mean."""

    def __init__(self, cfg: CNNConfig, style_channels: int, channels: int):
        super().__init__()
        self.norm = group_norm(cfg, channels, affine=False)
        self.eps = cfg.eps
        self.to_scale = nn.Linear(style_channels, channels)
        self.to_shift = nn.Linear(style_channels, channels)

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        flat = style.flatten(2)
        # a 1x1 style map (a DetailFlow prefix decoded at one patch) has no unbiased variance: use 0 there
        scale = self.to_scale((flat.var(dim=-1, correction=int(flat.shape[-1] > 1)) + self.eps).sqrt())
        shift = self.to_shift(flat.mean(dim=-1))
        return scale[..., None, None] * self.norm(x) + shift[..., None, None]


def depth_to_space(x: torch.Tensor, block: int = 2, keep_channels_last: bool = False) -> torch.Tensor:
    """(B, b*b*C, H, W) -> (B, C, b*H, b*W) in DCR order: input channel (i*b + j)*C + c lands at (i, j) of
    output channel c's b x b cell (not torch's pixel_shuffle, which reads channel c*b*b + i*b + j).
    ``keep_channels_last``: a channels-last input gives a channels-last output (the same values); otherwise the
    output is contiguous NCHW whatever the input's layout."""
    b, c, h, w = x.shape
    c_out = c // (block * block)
    if keep_channels_last and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        # the same rearrangement in NHWC memory, so that a channels-last decoder stays channels-last after it
        x = x.permute(0, 2, 3, 1).view(b, h, w, block, block, c_out).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(b, h * block, w * block, c_out).permute(0, 3, 1, 2)
    x = x.view(b, block, block, c_out, h, w).permute(0, 3, 4, 1, 5, 2)
    return x.reshape(b, c_out, h * block, w * block)


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
        # train.channels_last sets it (tokscale.tokenizers.train): the levels after this one stay NHWC. Off, the
        # output is NCHW as always, so that the default step's arithmetic does not move.
        self.keep_channels_last = False

    def forward(self, x):
        return depth_to_space(self.conv(x), 2, self.keep_channels_last)


def run_block(block: nn.Module, grad_checkpointing: bool, *args):
    """Run a block, recomputing its activations in the backward pass when checkpointing (the full-resolution
    levels of the CNN hold most of a tokenizer's activation memory at 256 px)."""
    if grad_checkpointing and block.training and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)


class CNNEncoder(nn.Module):
    def __init__(self, cfg: CNNConfig, in_channels: int = 3, grad_checkpointing: bool = False):
        super().__init__()
        self.grad_checkpointing = grad_checkpointing
        chans = [cfg.channels * m for m in cfg.channel_mults]
        self.conv_in = nn.Conv2d(in_channels, cfg.channels, 3, padding=1)
        self.levels = nn.ModuleList()
        c = cfg.channels
        for i, c_out in enumerate(chans):
            level = nn.Module()
            level.blocks = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                level.blocks.append(ResBlock(cfg, c, c_out))
                c = c_out
            level.down = Downsample(c) if i < len(chans) - 1 else None
            self.levels.append(level)
        self.mid = nn.ModuleList([ResBlock(cfg, c, c), ResBlock(cfg, c, c)])
        self.norm_out = group_norm(cfg, c)
        self.conv_out = nn.Conv2d(c, cfg.z_channels, 3, padding=1)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x_BCHW)
        for level in self.levels:
            for block in level.blocks:
                h = run_block(block, self.grad_checkpointing, h)
            if level.down is not None:
                h = level.down(h)
        for block in self.mid:
            h = run_block(block, self.grad_checkpointing, h)
        return self.conv_out(F.silu(self.norm_out(h)))


class CNNDecoder(nn.Module):
    def __init__(self, cfg: CNNConfig, out_channels: int = 3, grad_checkpointing: bool = False):
        super().__init__()
        self.grad_checkpointing = grad_checkpointing
        chans = [cfg.channels * m for m in cfg.channel_mults][::-1]
        zc = cfg.z_channels
        c = chans[0]
        self.conv_in = nn.Conv2d(zc, c, 3, padding=1)
        self.mid = nn.ModuleList([ResBlock(cfg, c, c), ResBlock(cfg, c, c)])
        self.levels = nn.ModuleList()
        for i, c_out in enumerate(chans):
            level = nn.Module()
            level.style_norm = AdaptiveGroupNorm(cfg, zc, c)
            level.blocks = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                level.blocks.append(ResBlock(cfg, c, c_out))
                c = c_out
            level.up = DepthToSpaceUpsample(c) if i < len(chans) - 1 else None
            self.levels.append(level)
        self.norm_out = group_norm(cfg, c)
        self.conv_out = nn.Conv2d(c, out_channels, 3, padding=1)

    def forward(self, z_BCHW: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z_BCHW)
        for block in self.mid:
            h = run_block(block, self.grad_checkpointing, h)
        for level in self.levels:
            h = level.style_norm(h, z_BCHW)
            for block in level.blocks:
                h = run_block(block, self.grad_checkpointing, h)
            if level.up is not None:
                h = level.up(h)
        return self.conv_out(F.silu(self.norm_out(h)))
