"""GigaTok's DINO discriminator and the DiffAug policy that feeds it (the ``VQ_BL256_dino_disc`` recipe).

In that recipe the adversarial term (hinge, weight 0.5) starts at step 80k, and every image the discriminator sees,
real or reconstructed, in the discriminator step and in the generator step alike, first goes through
``tokscale.tokenizers.diffaug.diff_aug(x, prob=1.0, cutout=0.2)``. The caller applies the augmentation; :class:`DinoDiscriminator` does not::

    logits_fake = disc(diff_aug(recon))           # generator step: gradients reach recon through both
    loss_d = hinge_d_loss(disc(diff_aug(images)), disc(diff_aug(recon.detach())))

Architecture (the facts of GigaTok's ``discriminator_dino.py``):

* Backbone: DINO ViT-S/16 (width 384, 12 blocks, 6 heads, MLP ratio 4, LayerNorm eps 1e-6; GigaTok runs its MLPs
  with the tanh approximation of GELU, and so does this port), 21.67M parameters, frozen: no parameter requires
  grad, it stays in eval mode whatever ``train()`` is called with, and ``requires_grad_`` on the discriminator only
  reaches the heads. It is still differentiable in its input, so the generator's adversarial gradient flows into the
  reconstruction. It always runs in float32 with autocast off.
* Input: images in [-1, 1], any size, mapped to ImageNet-normalised values and brought to 224 x 224. When both sides
  exceed 224, each call flips one coin (``crop_prob``, 0.5): heads, the whole batch is cropped at one random 224
  window; tails, it is resized (area when H > 224, bicubic otherwise). A 256 px batch is therefore seen either at
  native scale or shrunk by 7/8; a 64 px batch is always upsampled.
* Readouts: the tokens after the positional embedding and after blocks 3, 6, 9 and 12 (0-based indices 2, 5, 8, 11),
  each taken as its 196 patch tokens plus the class token, laid out (B, 384, 196). The final LayerNorm is part of
  the checkpoint but never applied.
* Heads, one per readout (1,477,249 parameters each, 7,386,245 in all): [spectral-normed 1x1 conv, local batch norm,
  LeakyReLU(0.2)], then a residual block of the same with a circular kernel-9 conv along the raster-ordered token
  axis, summed with its input and scaled by 1/sqrt(2), then a spectral-normed 1x1 conv to one logit per token.
  :class:`LocalBatchNorm` always uses the statistics of the current call (no running averages, so train and eval
  agree), per channel over groups of at most 8 consecutive samples and the token axis.
* Output: the five (B, 196) logit maps concatenated, (B, 980).

Weights are read from a local file given as ``weights``; nothing is downloaded. Expected: the state dict of DINO's
ViT-S/16 backbone, 150 tensors named ``cls_token`` (1, 1, 384), ``pos_embed`` (1, 197, 384),
``patch_embed.proj.{weight,bias}``, ``blocks.{0..11}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.{weight,bias}``
and ``norm.{weight,bias}``, as ``.pth`` (torch.save) or ``.safetensors``. Two releases have this layout:

* Meta's ``dino_deitsmall16_pretrain.pth`` (GigaTok's default; what torch.hub's ``facebookresearch/dino``
  ``dino_vits16`` loads), from https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/;
* timm's ``vit_small_patch16_224.dino`` (whose pretrained config points at that same file): ``model.safetensors``
  of the Hugging Face repository ``timm/vit_small_patch16_224.dino``, fetched once on a machine with internet::

      huggingface-cli download timm/vit_small_patch16_224.dino model.safetensors --local-dir weights/dino_vits16

  or ``torch.save`` of that timm model's state dict.

GigaTok zeroes the key bias of every ``attn.qkv`` when loading; that term adds the same amount to all of a query's
logits, which softmax ignores, so it is left as loaded here.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from tokscale.tokenizers.perceptual import IMAGENET_MEAN, IMAGENET_STD, FrozenModule, read_state_dict

__all__ = ["DINO_WEIGHTS_SOURCE", "DinoDiscriminator", "DinoViTSmall", "LocalBatchNorm"]

logger = logging.getLogger(__name__)

DINO_WEIGHTS_SOURCE = (
    "the DINO discriminator needs DINO ViT-S/16 backbone weights: Meta's dino_deitsmall16_pretrain.pth "
    "(https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/) or model.safetensors of the Hugging Face repo "
    "timm/vit_small_patch16_224.dino, fetched once on a machine with internet access"
)


INPUT_SIZE = 224  # the backbone's fixed input side: its positional embedding is a 14 x 14 grid
PATCH_SIZE = 16
WIDTH = 384
DEPTH = 12
NUM_HEADS = 6
MLP_RATIO = 4
READOUT_BLOCKS = (2, 5, 8, 11)  # 0-based block indices read out besides the embedding


class _PatchEmbed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, WIDTH, kernel_size=PATCH_SIZE, stride=PATCH_SIZE)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return self.proj(x_BCHW).flatten(2).transpose(1, 2)  # (B, L, D), L in raster order


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
        self.proj = nn.Linear(WIDTH, WIDTH)

    def forward(self, x_BLD: torch.Tensor) -> torch.Tensor:
        b, n, d = x_BLD.shape
        # qkv packs (3, heads, head_dim) along the last axis, the layout of DINO's and timm's checkpoints.
        q, k, v = self.qkv(x_BLD).view(b, n, 3, NUM_HEADS, d // NUM_HEADS).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(head_dim)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class _Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(WIDTH, MLP_RATIO * WIDTH)
        self.fc2 = nn.Linear(MLP_RATIO * WIDTH, WIDTH)

    def forward(self, x_BLD: torch.Tensor) -> torch.Tensor:
        # DINO was trained with exact GELU; GigaTok's discriminator uses the tanh form, kept for parity with it.
        return self.fc2(F.gelu(self.fc1(x_BLD), approximate="tanh"))


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(WIDTH, eps=1e-6)
        self.attn = _Attention()
        self.norm2 = nn.LayerNorm(WIDTH, eps=1e-6)
        self.mlp = _Mlp()

    def forward(self, x_BLD: torch.Tensor) -> torch.Tensor:
        x_BLD = x_BLD + self.attn(self.norm1(x_BLD))
        return x_BLD + self.mlp(self.norm2(x_BLD))


class DinoViTSmall(FrozenModule):
    """DINO ViT-S/16 without dropout: ``forward(x (B, 3, 224, 224) normalised, blocks) -> readouts``.

    Parameter names and shapes are those of DINO's and timm's ViT-S/16 checkpoints. Random weights until
    :meth:`load_dino_state_dict`; the owner calls :meth:`freeze`.
    """

    def __init__(self) -> None:
        super().__init__()
        num_patches = (INPUT_SIZE // PATCH_SIZE) ** 2
        self.patch_embed = _PatchEmbed()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, WIDTH))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, WIDTH))  # +1: the class token's
        self.blocks = nn.ModuleList(_Block() for _ in range(DEPTH))
        self.norm = nn.LayerNorm(WIDTH, eps=1e-6)  # in the checkpoint; the discriminator never applies it
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def load_dino_state_dict(self, state: dict[str, torch.Tensor], *, where: str) -> None:
        """Load a DINO-format state dict strictly; a mismatch is a ValueError listing the offending keys."""
        expected = self.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        wrong_shape = [
            f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
            for k, v in expected.items()
            if k in state and state[k].shape != v.shape
        ]
        if missing or unexpected or wrong_shape:
            found = {"missing": missing, "unexpected": unexpected, "wrong shape": wrong_shape}
            parts = [
                f"{label} ({len(keys)}): {', '.join(keys[:8])}{', ...' if len(keys) > 8 else ''}"
                for label, keys in found.items()
                if keys
            ]
            raise ValueError(
                f"{where} is not a DINO ViT-S/16 backbone state dict: {'; '.join(parts)}. Expected {len(expected)} "
                f"tensors named like DINO's release (cls_token, pos_embed, patch_embed.proj.*, blocks.N.*, norm.*); "
                f"{DINO_WEIGHTS_SOURCE}"
            )
        self.load_state_dict({k: v.float() for k, v in state.items()})

    def forward(self, x_BCHW: torch.Tensor, readout_blocks: Sequence[int]) -> list[torch.Tensor]:
        """The embedding readout, then one per index in ``readout_blocks``: each (B, D, L), patch + class token."""
        x = self.patch_embed(x_BCHW)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed

        def readout(tokens_BLD: torch.Tensor) -> torch.Tensor:
            return (tokens_BLD[:, 1:] + tokens_BLD[:, :1]).transpose(1, 2)

        readouts = [readout(x)]
        wanted = set(readout_blocks)
        for i, block in enumerate(self.blocks[: max(readout_blocks) + 1]):
            x = block(x)
            if i in wanted:
                readouts.append(readout(x))
        return readouts


class LocalBatchNorm(nn.Module):
    """Batch norm over (B, C, L) with the current call's statistics, per group of ``virtual_batch`` samples.

    The batch is cut into ``ceil(B / virtual_batch)`` groups of consecutive samples; each is standardised per channel
    over its samples and the L axis (biased variance), then the affine scale and shift apply. No running statistics.
    GigaTok requires B to divide evenly into those groups; here an uneven batch gets groups one sample apart in size.
    """

    def __init__(self, num_features: int, virtual_batch: int = 8, eps: float = 1e-6) -> None:
        super().__init__()
        self.virtual_batch = virtual_batch
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def _standardise(self, x_GNCL: torch.Tensor) -> torch.Tensor:
        mean = x_GNCL.mean(dim=(1, 3), keepdim=True)
        var = x_GNCL.var(dim=(1, 3), keepdim=True, unbiased=False)
        return (x_GNCL - mean) * torch.rsqrt(var + self.eps)

    def forward(self, x_BCL: torch.Tensor) -> torch.Tensor:
        x = x_BCL.float()
        b = x.shape[0]
        num_groups = math.ceil(b / self.virtual_batch)
        if b % num_groups == 0:
            x = self._standardise(x.view(num_groups, b // num_groups, *x.shape[1:])).view_as(x)
        else:
            x = torch.cat([self._standardise(g.unsqueeze(0)).squeeze(0) for g in x.tensor_split(num_groups)])
        return x * self.weight[:, None] + self.bias[:, None]


def _conv(c_in: int, c_out: int, kernel_size: int, use_spectral_norm: bool) -> nn.Module:
    # Circular padding along the token axis, as in GigaTok: the 14 x 14 grid is treated as one raster-order ring.
    conv = nn.Conv1d(c_in, c_out, kernel_size, padding=kernel_size // 2, padding_mode="circular")
    return spectral_norm(conv, n_power_iterations=1, eps=1e-12, dim=0) if use_spectral_norm else conv


class _ConvNormAct(nn.Sequential):
    def __init__(self, width: int, kernel_size: int, virtual_batch: int, eps: float, use_spectral_norm: bool):
        super().__init__(
            _conv(width, width, kernel_size, use_spectral_norm),
            LocalBatchNorm(width, virtual_batch, eps),
            nn.LeakyReLU(0.2),
        )


class _Head(nn.Module):
    """(B, D, L) readout -> (B, L) logits."""

    def __init__(self, width: int, kernel_size: int, virtual_batch: int, eps: float, use_spectral_norm: bool):
        super().__init__()
        self.mix = _ConvNormAct(width, 1, virtual_batch, eps, use_spectral_norm)
        self.residual = _ConvNormAct(width, kernel_size, virtual_batch, eps, use_spectral_norm)
        self.out = _conv(width, 1, 1, use_spectral_norm)

    def forward(self, x_BDL: torch.Tensor) -> torch.Tensor:
        x = self.mix(x_BDL)
        x = (self.residual(x) + x) * (1 / math.sqrt(2))  # keeps the variance of the sum near the input's
        return self.out(x).flatten(1)


class DinoDiscriminator(nn.Module):
    """``forward(images (B, 3, H, W) in [-1, 1]) -> logits (B, 5 * 196)``: frozen DINO ViT-S/16 + trainable heads.

    ``weights``: local DINO ViT-S/16 state dict (see the module docstring); None builds a random backbone, for tests
    only. ``weights_key`` names the config entry holding the path in error messages. Optimise only
    :meth:`trainable_parameters`; the backbone's parameters never require grad.
    """

    def __init__(
        self,
        weights: str | os.PathLike | None = None,
        *,
        weights_key: str = "dino_disc.weights",
        readout_blocks: Sequence[int] = READOUT_BLOCKS,
        kernel_size: int = 9,
        virtual_batch: int = 8,
        norm_eps: float = 1e-6,
        use_spectral_norm: bool = True,
        crop_prob: float = 0.5,
    ) -> None:
        super().__init__()
        readout_blocks = tuple(int(i) for i in readout_blocks)
        if not readout_blocks or list(readout_blocks) != sorted(set(readout_blocks)):
            raise ValueError(f"readout_blocks must be distinct and increasing, got {readout_blocks}")
        if readout_blocks[0] < 0 or readout_blocks[-1] >= DEPTH:
            raise ValueError(f"readout_blocks are 0-based indices into {DEPTH} blocks, got {readout_blocks}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
        if virtual_batch < 1:
            raise ValueError(f"virtual_batch must be >= 1, got {virtual_batch}")
        if not 0.0 <= crop_prob <= 1.0:
            raise ValueError(f"crop_prob must be in [0, 1], got {crop_prob}")
        self.readout_blocks = readout_blocks
        self.crop_prob = crop_prob

        self.backbone = DinoViTSmall()
        if weights is None:
            logger.warning("DINO discriminator backbone has random weights (weights=None): for tests only")
        else:
            state = read_state_dict(str(weights), key=weights_key, source=DINO_WEIGHTS_SOURCE)
            self.backbone.load_dino_state_dict(state, where=f"{weights_key}={str(weights)!r}")
            logger.info("DINO discriminator backbone loaded from %s", weights)
        self.backbone.freeze()

        self.heads = nn.ModuleList(
            _Head(WIDTH, kernel_size, virtual_batch, norm_eps, use_spectral_norm)
            for _ in range(len(readout_blocks) + 1)  # +1: the readout before the first block
        )
        # [-1, 1] -> ImageNet-normalised in one affine map: ((x + 1) / 2 - mean) / std = x * 0.5/std + (0.5-mean)/std.
        mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        self.register_buffer("in_scale", 0.5 / std, persistent=False)
        self.register_buffer("in_shift", (0.5 - mean) / std, persistent=False)

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """The heads' parameters: everything the discriminator's optimiser should see."""
        return self.heads.parameters()

    def requires_grad_(self, requires_grad: bool = True) -> DinoDiscriminator:
        # Trainers toggle the whole discriminator around the generator step; the backbone must stay frozen.
        self.heads.requires_grad_(requires_grad)
        return self

    def preprocess(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """[-1, 1] images of any size -> ImageNet-normalised float32 (B, 3, 224, 224), cropped or resized."""
        x = images.float() * self.in_scale + self.in_shift
        h, w = x.shape[-2:]
        s = INPUT_SIZE
        rng_device = generator.device if generator is not None else torch.device("cpu")
        if h > s and w > s and self.crop_prob > 0:
            coin = torch.rand((), generator=generator, device=rng_device).item()
            if coin < self.crop_prob:
                # One window for the whole batch, as torchvision's RandomCrop does on a batched tensor.
                top = int(torch.randint(0, h - s + 1, (), generator=generator, device=rng_device))
                left = int(torch.randint(0, w - s + 1, (), generator=generator, device=rng_device))
                return x[..., top : top + s, left : left + s]
        if (h, w) == (s, s):
            return x
        if h > s:  # GigaTok picks the mode from the height alone
            return F.interpolate(x, size=(s, s), mode="area")
        return F.interpolate(x, size=(s, s), mode="bicubic", align_corners=False)

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"DINO discriminator expects (B, 3, H, W) images, got {tuple(images.shape)}")
        self.backbone.check_fp32()
        with torch.autocast(device_type=images.device.type, enabled=False):
            readouts = self.backbone(self.preprocess(images, generator), self.readout_blocks)
            return torch.cat([head(r) for head, r in zip(self.heads, readouts)], dim=1)
