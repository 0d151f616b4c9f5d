"""Semantic regularization: decoder features aligned to a frozen DINOv2 teacher's patch tokens.

The output of one decoder transformer layer (``decoder_layer``, 1-based; 3 in GigaTok) goes through
:class:`SemanticProjector` (width -> 4 width -> 4 width -> 768, SiLU) and is pulled towards the teacher's
l2-normalised patch tokens by :func:`semantic_loss`, the mean per-token negative cosine similarity (weight 0.5).

The teacher is timm's DINOv2 ViT-B/14 run at 224 px, its positional embedding resampled from the checkpoint's
grid (37x37 for the 518 px release) to 16x16 when loading, so it yields 16x16 = 256 patch tokens; for a
student grid other than 16 the token map is resampled to the student grid.

Teacher weights are read from ``teacher_weights``, a local file; nothing is downloaded. Either format works:

* timm's release, the ``model.safetensors`` of the Hugging Face repository
  ``timm/vit_base_patch14_dinov2.lvd142m``, fetched once on a machine with internet access::

      huggingface-cli download timm/vit_base_patch14_dinov2.lvd142m model.safetensors --local-dir weights/dinov2

  (or any ``torch.save(model.state_dict(), ...)`` of that timm model);
* Meta's original ``dinov2_vitb14_pretrain.pth`` (https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/),
  whose key names timm's checkpoint filter converts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tokscale.tokenizers.perceptual import IMAGENET_MEAN, IMAGENET_STD, FrozenModule, read_state_dict

logger = logging.getLogger(__name__)

TEACHER_WEIGHTS_SOURCE = (
    "DINOv2 ViT-B/14 weights come from timm's release (on a machine with internet: download model.safetensors "
    "from the Hugging Face repo timm/vit_base_patch14_dinov2.lvd142m, or torch.save the state dict of that timm "
    "model) or from Meta's dinov2_vitb14_pretrain.pth; point semantic.teacher_weights at the file"
)


@dataclass
class SemanticConfig:
    """Semantic regularization against a frozen DINOv2 teacher; weight 0 turns it off (no teacher, no file)."""

    weight: float = 0.5
    # Local timm-format (or Meta-format) DINOv2 state dict, .pth or .safetensors; required when weight > 0.
    teacher_weights: str = ""
    teacher_arch: str = "vit_base_patch14_dinov2"  # a timm VisionTransformer architecture name
    teacher_size: int = 224  # teacher input side in pixels; a multiple of its patch size (14)
    decoder_layer: int = 3  # 1-based decoder transformer layer whose output is aligned
    teacher_dim: int = 768  # teacher token width = projector output width

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ValueError(f"semantic.weight must be >= 0 (0 turns it off), got {self.weight}")
        if self.teacher_size < 1:
            raise ValueError(f"semantic.teacher_size must be a positive pixel count, got {self.teacher_size}")
        if self.decoder_layer < 1:
            raise ValueError(f"semantic.decoder_layer is 1-based and must be >= 1, got {self.decoder_layer}")
        if self.teacher_dim < 1:
            raise ValueError(f"semantic.teacher_dim must be >= 1, got {self.teacher_dim}")


class SemanticProjector(nn.Module):
    """``(B, N, width) -> (B, N, out_dim)``: three linear layers, width -> 4 width -> 4 width -> out_dim, SiLU.

    Trainable and part of the tokenizer (its parameters count in the published totals: 6.8M at width 512).
    """

    def __init__(self, width: int, out_dim: int = 768) -> None:
        super().__init__()
        hidden = 4 * width
        self.layers = nn.Sequential(
            nn.Linear(width, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, out_dim),
        )

    def forward(self, x_BNC: torch.Tensor) -> torch.Tensor:
        return self.layers(x_BNC)


def semantic_loss(student_BNC: torch.Tensor, teacher_BNC: torch.Tensor) -> torch.Tensor:
    """Mean over batch and tokens of the negative cosine similarity, in float32 (-1 when aligned)."""
    if student_BNC.shape != teacher_BNC.shape:
        raise ValueError(
            f"semantic loss needs student and teacher tokens of one shape (B, N, C), got "
            f"{tuple(student_BNC.shape)} and {tuple(teacher_BNC.shape)}"
        )
    return -F.cosine_similarity(student_BNC.float(), teacher_BNC.float(), dim=-1).mean()


def resample_token_grid(tokens_BNC: torch.Tensor, grid_size: int) -> torch.Tensor:
    """Resample a square token map (B, g*g, C) to (B, grid_size**2, C).

    Area averaging when shrinking (each student token sees the mean of the teacher patches it covers),
    bilinear when growing, where area would just repeat tokens in blocks.
    """
    b, n, c = tokens_BNC.shape
    g = int(round(n**0.5))
    if g * g != n:
        raise ValueError(f"{n} tokens do not form a square grid")
    if g == grid_size:
        return tokens_BNC
    grid = tokens_BNC.transpose(1, 2).reshape(b, c, g, g)
    if grid_size < g:
        grid = F.interpolate(grid, size=(grid_size, grid_size), mode="area")
    else:
        grid = F.interpolate(grid, size=(grid_size, grid_size), mode="bilinear", align_corners=False)
    return grid.reshape(b, c, grid_size * grid_size).transpose(1, 2)


class DinoTeacher(FrozenModule):
    """Frozen timm ViT: ``forward(images in [-1, 1], any size) -> (B, G*G, dim)`` l2-normalised patch tokens.

    Images are mapped to [0, 1], resized to ``teacher_size`` (bicubic, antialiased), normalised with the ImageNet
    mean and std, and run through the ViT in float32 with autocast off (under bf16 autocast with ``bf16=True``); the
    final-norm patch tokens (class and register tokens dropped) are resampled to the student grid ``grid_size`` and
    l2-normalised in float32. No gradients.
    """

    def __init__(self, cfg: SemanticConfig, grid_size: int) -> None:
        super().__init__()
        if grid_size < 1:
            raise ValueError(f"student grid_size must be >= 1, got {grid_size}")
        state = read_state_dict(
            cfg.teacher_weights, key="semantic.teacher_weights", source=TEACHER_WEIGHTS_SOURCE
        )
        import timm
        from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

        try:
            # Random initialisation here; the weights come from the local file below.
            model = timm.create_model(cfg.teacher_arch, img_size=cfg.teacher_size, num_classes=0)
        except RuntimeError as err:  # timm's "Unknown model"
            raise ValueError(f"semantic.teacher_arch={cfg.teacher_arch!r}: {err}") from err
        if not isinstance(model, VisionTransformer):
            raise ValueError(f"semantic.teacher_arch={cfg.teacher_arch!r} is not a timm VisionTransformer")
        patch = model.patch_embed.patch_size[0]
        if cfg.teacher_size % patch:
            raise ValueError(
                f"semantic.teacher_size={cfg.teacher_size} must be a multiple of the teacher's patch size {patch}"
            )
        if model.embed_dim != cfg.teacher_dim:
            raise ValueError(
                f"semantic.teacher_dim={cfg.teacher_dim} but {cfg.teacher_arch} has width {model.embed_dim}"
            )
        # timm's own loading path: converts Meta's key names and resamples the positional embedding
        # (bicubic, antialiased) from the checkpoint's grid to teacher_size / patch.
        state = checkpoint_filter_fn(dict(state), model)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"semantic.teacher_weights={cfg.teacher_weights!r} does not match {cfg.teacher_arch}: "
                f"missing {sorted(missing)[:4]} ({len(missing)}), unexpected {sorted(unexpected)[:4]} "
                f"({len(unexpected)}); {TEACHER_WEIGHTS_SOURCE}"
            )
        self.model = model
        self.teacher_size = cfg.teacher_size
        self.grid_size = grid_size
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.freeze()
        logger.info(
            "DINOv2 teacher %s loaded from %s (%d px, %d tokens -> grid %d)",
            cfg.teacher_arch,
            cfg.teacher_weights,
            cfg.teacher_size,
            (cfg.teacher_size // patch) ** 2,
            grid_size,
        )

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images of any size -> ImageNet-normalised float32 at teacher_size."""
        x = (images.float() + 1) / 2
        if x.shape[-2:] != (self.teacher_size, self.teacher_size):
            x = F.interpolate(
                x,
                size=(self.teacher_size, self.teacher_size),
                mode="bicubic",
                align_corners=False,
                antialias=True,
            )
        return (x - self.mean) / self.std

    @torch.no_grad()
    def forward(self, images: torch.Tensor, bf16: bool = False) -> torch.Tensor:
        """``bf16``: the ViT under bf16 autocast (``loss.frozen_precision``); the preprocessing, the resampling and
        the normalisation of its tokens stay float32."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"teacher expects (B, 3, H, W) images, got shape {tuple(images.shape)}")
        self.check_fp32()
        with torch.autocast(device_type=images.device.type, enabled=False):
            x = self.preprocess(images)
            with torch.autocast(device_type=images.device.type, dtype=torch.bfloat16, enabled=bf16):
                tokens = self.model.forward_features(x)
            tokens = tokens[:, self.model.num_prefix_tokens :].float()
            tokens = resample_token_grid(tokens, self.grid_size)
            return F.normalize(tokens, dim=-1)


def build_teacher(cfg: SemanticConfig, grid_size: int) -> DinoTeacher | None:
    """The frozen teacher for a student token grid of ``grid_size`` x ``grid_size``; None when weight == 0."""
    if cfg.weight == 0:
        return None
    return DinoTeacher(cfg, grid_size)
