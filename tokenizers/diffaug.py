"""DiffAug, differentiable augmentation for GAN discriminators (Zhao et al. 2020), as GigaTok applies it.

GigaTok's policy (its copy of StyleGAN-T's): translation by up to 1/8 of the side with zero fill, colour jitter
(brightness, saturation, contrast), then a cutout whose side is a fraction of the image's (0.2 in GigaTok), each
applied to the whole batch with probability ``prob``, its parameters drawn per sample. The tokenizer trainer
applies it to every image a discriminator sees (real and reconstructed, in the discriminator and the generator
step alike) when ``loss.gan.diff_aug`` is on; the generator's gradient flows through it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["diff_aug"]


def _translate(x: torch.Tensor, u_h: torch.Tensor, u_w: torch.Tensor) -> torch.Tensor:
    """Shift each sample by whole pixels, up to round(side / 8) either way, filling with zeros.

    ``u_h``, ``u_w``: (B,) uniforms in [0, 1), mapped to integer shifts uniform on [-delta, delta].
    Output pixel (i, j) is input pixel (i + shift_h, j + shift_w), or 0 where that lies outside.
    """
    b, _, h, w = x.shape
    delta_h, delta_w = round(h * 0.125), round(w * 0.125)  # Python's round, as the reference
    shift_h = (u_h * (2 * delta_h + 1)).floor().long() - delta_h
    shift_w = (u_w * (2 * delta_w + 1)).floor().long() - delta_w
    padded = F.pad(x, (1, 1, 1, 1))  # one zero ring; every out-of-range index is clamped onto it
    rows = (torch.arange(h, device=x.device)[None] + shift_h[:, None] + 1).clamp(0, h + 1)  # (B, H) in padded
    cols = (torch.arange(w, device=x.device)[None] + shift_w[:, None] + 1).clamp(0, w + 1)  # (B, W)
    batch = torch.arange(b, device=x.device)[:, None, None]
    # Advanced indices around the channel slice put their broadcast shape first: (B, H, W, C).
    return padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


def _jitter_colour(x: torch.Tensor, u_b: torch.Tensor, u_s: torch.Tensor, u_c: torch.Tensor) -> torch.Tensor:
    """Per-sample brightness offset in [-0.5, 0.5), saturation factor in [0, 2), contrast factor in [0.5, 1.5)."""
    x = x + (u_b - 0.5).view(-1, 1, 1, 1)
    grey = x.mean(dim=1, keepdim=True)
    x = (x - grey) * (2 * u_s).view(-1, 1, 1, 1) + grey
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (u_c + 0.5).view(-1, 1, 1, 1) + mean


def _cutout(x: torch.Tensor, ratio: float, u_h: torch.Tensor, u_w: torch.Tensor) -> torch.Tensor:
    """Zero one round(ratio * H) x round(ratio * W) rectangle per sample, clipped to the image.

    The rectangle's centre (row ``c``, spanning rows c - size//2 .. c - size//2 + size - 1) is uniform on 0..H-1 for
    an odd size and on 0..H for an even one, so near the border part of it falls outside and fewer pixels go.
    """
    b, _, h, w = x.shape
    size_h, size_w = round(h * ratio), round(w * ratio)
    if size_h == 0 or size_w == 0:
        return x
    top = (u_h * (h + 1 - size_h % 2)).floor().long() - size_h // 2  # (B,)
    left = (u_w * (w + 1 - size_w % 2)).floor().long() - size_w // 2
    rows = torch.arange(h, device=x.device)[None]
    cols = torch.arange(w, device=x.device)[None]
    in_rows = (rows >= top[:, None]) & (rows < top[:, None] + size_h)  # (B, H)
    in_cols = (cols >= left[:, None]) & (cols < left[:, None] + size_w)  # (B, W)
    keep = ~(in_rows[:, :, None] & in_cols[:, None, :])  # (B, H, W)
    return x * keep.unsqueeze(1).to(x.dtype)


def diff_aug(
    x: torch.Tensor, prob: float = 1.0, cutout: float = 0.2, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Translation, then colour jitter, then cutout, each applied to the whole batch with probability ``|prob|``.

    One draw per operation decides for the batch; the parameters (shift, colour factors, cutout position) are drawn
    per sample. A negative ``prob`` keeps translation and colour at probability ``|prob|`` but turns cutout off
    (GigaTok's convention); ``|prob| < 1e-6`` returns the input. ``cutout`` is the rectangle's side as a fraction of
    the image's (0.2 in GigaTok). Differentiable in ``x``; returns float32. Deterministic for a given ``generator``;
    without one the batch decisions come from the global CPU generator and the rest from ``x``'s device's.
    """
    if x.dim() != 4:
        raise ValueError(f"diff_aug expects (B, C, H, W) images, got shape {tuple(x.shape)}")
    if not -1.0 <= prob <= 1.0:
        raise ValueError(f"diff_aug prob must be in [-1, 1] (negative: no cutout), got {prob}")
    if not 0.0 <= cutout <= 1.0:
        raise ValueError(f"diff_aug cutout is a fraction of the image side in [0, 1], got {cutout}")
    x = x.float()
    p = abs(prob)
    if p < 1e-6:
        return x
    # With a generator every draw comes from it (on its device); without, the same stream layout as GigaTok's.
    decide_device = generator.device if generator is not None else torch.device("cpu")
    draw_device = generator.device if generator is not None else x.device
    decide = torch.rand(3, generator=generator, device=decide_device)
    translate, colour, cut = (bool(d) for d in (decide <= p).tolist())
    cut = cut and prob > 0
    if not (translate or colour or cut):
        return x
    # Seven uniforms per sample: two shifts, three colour factors, the cutout's two centre coordinates.
    u = torch.rand(7, x.shape[0], generator=generator, device=draw_device).to(x.device)
    if translate:
        x = _translate(x, u[0], u[1])
    if colour:
        x = _jitter_colour(x, u[2], u[3], u[4])
    if cut:
        x = _cutout(x, cutout, u[5], u[6])
    return x
