"""A tiny stand-in tokenizer and image maker shared by the evaluation tests and their child processes
(which import this file by path, so it stays free of pytest)."""

from __future__ import annotations

import torch
from torch import nn


class PaletteTokenizer(nn.Module):
    """Codes = nearest palette colour of each 4x4 patch mean; decode paints the patches. Deterministic, lossy,
    with the tokenizer interface evaluation relies on (encode, decode, codebook_size, num_tokens, image_size)."""

    def __init__(self, codebook_size: int = 16, image_size: int = 16, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.palette = nn.Parameter(torch.rand(codebook_size, 3, generator=g) * 2 - 1, requires_grad=False)
        self.codebook_size = codebook_size
        self.image_size = image_size
        self.num_tokens = (image_size // 4) ** 2

    def encode_features(self, images: torch.Tensor) -> torch.Tensor:
        return nn.functional.avg_pool2d(images, 4).flatten(1)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        patches = nn.functional.avg_pool2d(images, 4)  # (B, 3, h, w)
        flat = patches.permute(0, 2, 3, 1).reshape(-1, 3)
        codes = torch.cdist(flat, self.palette).argmin(1)
        return codes.reshape(images.shape[0], -1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        b, n = codes.shape
        h = int(n**0.5)
        colours = self.palette[codes].reshape(b, h, h, 3).permute(0, 3, 1, 2)
        return nn.functional.interpolate(colours, scale_factor=4, mode="nearest")


def random_images(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Images in [-1, 1] that came from uint8 pixels, like the evaluation stream's crops."""
    g = torch.Generator().manual_seed(seed)
    u8 = torch.randint(0, 256, (n, 3, size, size), generator=g)
    return u8.float() / 127.5 - 1.0


class PixelTokenizer(nn.Module):
    """A lossless tokenizer: every uint8 subpixel is a code (codebook 256), so reconstructions equal the crops."""

    def __init__(self, image_size: int = 16):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1), requires_grad=False)
        self.codebook_size = 256
        self.image_size = image_size
        self.num_tokens = 3 * image_size * image_size

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return torch.clamp(127.5 * images + 128.0, 0, 255).long().flatten(1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        s = self.image_size
        return codes.reshape(-1, 3, s, s).float() / 127.5 - 1.0


def batches(images: torch.Tensor, batch_size: int, rank: int = 0, world_size: int = 1):
    """(images, labels, keys) batches of this rank's share (sample i goes to rank i mod world_size)."""
    idx = list(range(rank, images.shape[0], world_size))
    for start in range(0, len(idx), batch_size):
        sel = idx[start : start + batch_size]
        yield images[sel], torch.zeros(len(sel), dtype=torch.long), [f"img{i:05d}" for i in sel]


def write_tiny_export(out) -> None:
    """A randomly initialised 32 px 2D tokenizer in the export format (model.safetensors + config.yaml)."""
    from pathlib import Path

    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    from tokscale.tokenizers.model import TokenizerConfig, VQTokenizer
    from tokscale.tokenizers.presets import get_preset

    preset = get_preset("2d-tiny")
    preset.update(image_size=32)
    preset["encoder"]["depth"] = preset["decoder"]["depth"] = 1
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TokenizerConfig), preset))
    torch.manual_seed(0)
    model = VQTokenizer(cfg, with_projector=False)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    OmegaConf.save(
        OmegaConf.create({"model": OmegaConf.to_container(OmegaConf.structured(cfg))}), out / "config.yaml"
    )
