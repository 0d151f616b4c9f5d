"""GigaTok's hybrid VQ tokenizers, module for module: CNN encoder -> transformer encoder -> 1x1 projection to
the code dimension -> quantizer -> 1x1 projection back -> transformer decoder -> CNN decoder.

Both transformers start with a LayerNorm (``ln_pre``) over the CNN's ``z_channels`` and a linear embedding to
their width, and end with a LayerNorm (``ln_post``) and a convolution back to ``z_channels`` (1x1 in the
encoder, 3x3 over the token grid in the decoder).

- ``kind="2d"``: the transformers run over the (image_size/16)^2 token grid. ``layer_type="plain"`` (GigaTok's
  2D S-B, B-L) adds the grid positions once and stacks pre-norm self-attention layers; ``layer_type="detr"``
  (GigaTok's released 2D S-S) uses DETR decoder layers whose memory is the layer's own input, positions added at
  every layer.
- ``kind="1d"``: a Q-Former. The ``num_tokens`` queries are not learned: the embedded CNN features are average
  pooled row-first into levels of 1, 1, 2, 4, ..., N/2 cells (tokens 0 and 1 are both the global mean; every
  level covers the whole image), concatenated and passed through ``global_proj``. Each layer self-attends over
  the queries (optionally under a causal / block-causal mask) and cross-attends to the CNN features, positions
  DETR-style at every layer. The decoder's grid queries all start as copies of the first 1D token and
  cross-attend to the 1D tokens, so it decodes from any prefix of them.

``quantizer.kind="multiscale"`` (2D only, tokscale.tokenizers.multiscale): VAR's residual quantizer over scales
1..G of the latent grid. The codes are the scales' index maps in one flat sequence (sum of p_k^2 codes, 680 for
VAR's scales at 256 px); ``decode`` takes any prefix of whole scales and runs the decoder on that prefix's
f_hat over the full G x G grid; ``encode_scales`` / ``decode_scales`` work with the per-scale list.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from tokscale.tokenizers.cnn import CNNConfig, CNNDecoder, CNNEncoder
from tokscale.tokenizers.detailflow import DetailFlowConfig, check_model_config
from tokscale.tokenizers.quantizer import QuantizerConfig, VectorQuantizer
from tokscale.tokenizers.transformer import (
    Attention,
    PlainLayer,
    QFormerLayer,
    TransformerConfig,
    run_layer,
    token_mask,
)
from tokscale.trainer import profiled

KINDS = ("2d", "1d")
MASKS = ("none", "causal", "block_causal")
LAYER_TYPES = {"2d": ("plain", "detr"), "1d": ("qformer",)}


@dataclass
class TokenizerConfig:
    preset: str | None = None  # fills every field below before the YAML and command line apply
    kind: str = "2d"
    image_size: int = 256
    num_tokens: int = 256  # 1D only (a power of two); a 2D tokenizer has (image_size / 16)^2
    layer_type: str = ""  # "" = the kind's own: 2D "plain" (or "detr", GigaTok's 2D S-S), 1D "qformer"
    cnn: CNNConfig = field(default_factory=CNNConfig)
    encoder: TransformerConfig = field(default_factory=TransformerConfig)
    decoder: TransformerConfig = field(default_factory=TransformerConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    token_mask: str = "none"  # 1D encoder query mask: none | causal | block_causal
    causal_prefix: int = 8
    group_size: int = 8
    semantic_dim: int = 768  # output width of the semantic-regularization projector (the teacher's width)
    # DetailFlow's coarse-to-fine prefixes (tokscale.tokenizers.detailflow); off by default
    detailflow: DetailFlowConfig = field(default_factory=DetailFlowConfig)
    grad_checkpointing: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"model.kind must be one of {KINDS}, got {self.kind!r}")
        if self.layer_type and self.layer_type not in LAYER_TYPES[self.kind]:
            raise ValueError(
                f"model.layer_type must be one of {LAYER_TYPES[self.kind]} for kind {self.kind!r}, "
                f"got {self.layer_type!r}"
            )
        if self.token_mask not in MASKS:
            raise ValueError(f"model.token_mask must be one of {MASKS}, got {self.token_mask!r}")
        if self.kind == "2d" and self.token_mask != "none":
            raise ValueError("model.token_mask applies to 1D tokenizers only; use 'none' with kind '2d'")
        if self.image_size % self.cnn.downsample:
            raise ValueError(
                f"model.image_size={self.image_size} must be a multiple of the CNN downsampling {self.cnn.downsample}"
            )
        if self.kind == "1d":
            n = self.num_tokens
            if n < 2 or n & (n - 1):
                raise ValueError(
                    f"model.num_tokens must be a power of two >= 2 (the pooled query pyramid 1, 1, 2, 4, ... "
                    f"sums to it), got {n}"
                )
            finest = 2 ** (round(math.log2(n)) // 2)  # cells across the finest pooling level
            if finest > self.grid_size:
                raise ValueError(
                    f"model.num_tokens={n} needs a token grid of at least {finest}x{finest}; "
                    f"image_size={self.image_size} gives {self.grid_size}x{self.grid_size}"
                )
        check_model_config(self)
        q = self.quantizer
        if q.kind == "multiscale":
            if self.kind != "2d":
                raise ValueError("model.quantizer.kind='multiscale' needs a 2D tokenizer (model.kind: 2d)")
            if q.scales[-1] != self.grid_size:
                raise ValueError(
                    f"model.quantizer.scales must end at the token grid side {self.grid_size} (image_size "
                    f"{self.image_size} / {self.cnn.downsample}), got {list(q.scales)}"
                )

    @property
    def grid_size(self) -> int:
        return self.image_size // self.cnn.downsample

    @property
    def layers(self) -> str:
        """The transformer layer type in use ("" resolves to the kind's own)."""
        return self.layer_type or LAYER_TYPES[self.kind][0]

    @property
    def tokens(self) -> int:
        """Codes per image: the grid, the 1D tokens, or the multi-scale sequence (sum of the scales' squares)."""
        if self.quantizer.kind == "multiscale":
            return sum(p * p for p in self.quantizer.scales)
        return self.grid_size**2 if self.kind == "2d" else self.num_tokens


def multilevel_pool(feat_BCHW: torch.Tensor, n: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, n, C), n a power of two: average pools at levels of 1, 1, 2, 4, ..., n/2 cells,
    concatenated coarse-to-fine. Level l > 0 splits the map into 2^ceil(l/2) columns and 2^floor(l/2) rows
    (columns first), each level read row by row; the first two tokens are both the global mean."""
    _, _, h, w = feat_BCHW.shape
    out = []
    for group in range(round(math.log2(n)) + 1):
        level = max(group - 1, 0)
        cols, rows = 2 ** ((level + 1) // 2), 2 ** (level // 2)
        pooled = F.avg_pool2d(feat_BCHW, kernel_size=(h // rows, w // cols))
        out.append(pooled.flatten(2).transpose(1, 2))
    return torch.cat(out, dim=1)


def _positions(n: int, width: int) -> nn.Parameter:
    return nn.Parameter(torch.randn(n, width) * width**-0.5)


def _build_stack(module: nn.Module, cfg: TokenizerConfig, t, global_proj: bool) -> None:
    """The parts the encoder and decoder transformers share, in GigaTok's order (the order of the random
    draws): ``ln_pre`` over z_channels, the embedding, grid positions, 1D token positions (and the encoder's
    ``global_proj``), the layers, ``ln_post``."""
    zc, g = cfg.cnn.z_channels, cfg.grid_size
    module.kind, module.layer_type = cfg.kind, cfg.layers
    module.grad_checkpointing = cfg.grad_checkpointing
    module.ln_pre = nn.LayerNorm(zc)
    module.embed = nn.Linear(zc, t.width)
    module.pos = _positions(g * g, t.width)
    if cfg.kind == "1d":
        module.token_pos = _positions(cfg.num_tokens, t.width)
        if global_proj:
            module.global_proj = nn.Linear(t.width, t.width)
    layer = PlainLayer if cfg.layers == "plain" else QFormerLayer
    module.layers = nn.ModuleList(layer(t) for _ in range(t.depth))
    module.ln_post = nn.LayerNorm(t.width)


class TokenEncoder(nn.Module):
    """Transformer encoder: CNN features (B, zc, G, G) -> (B, N, width) after ``ln_post``."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        t = cfg.encoder
        _build_stack(self, cfg, t, global_proj=True)
        self.proj_out = nn.Linear(t.width, cfg.cnn.z_channels)  # GigaTok's 1x1 conv_out

    def forward(self, feat_BCHW: torch.Tensor, mask=None, queries=None) -> torch.Tensor:
        """``queries`` (B, N, width), 1D only: start from these instead of the pooled image features
        (DetailFlow's re-encoding after a corrected prefix)."""
        x = self.embed(self.ln_pre(feat_BCHW.flatten(2).transpose(1, 2)))
        if self.kind == "1d":
            grid = x.transpose(1, 2).reshape(x.shape[0], -1, *feat_BCHW.shape[-2:])
            q = queries
            if q is None:
                q = self.global_proj(multilevel_pool(grid, self.token_pos.shape[0]))
            for layer in self.layers:
                q = run_layer(layer, self.grad_checkpointing, q, x, self.token_pos, self.pos, mask)
            return self.ln_post(q)
        if self.layer_type == "plain":
            x = x + self.pos
            for layer in self.layers:
                x = run_layer(layer, self.grad_checkpointing, x)
        else:
            for layer in self.layers:
                x = run_layer(layer, self.grad_checkpointing, x, x, self.pos, self.pos)
        return self.ln_post(x)


class TokenDecoder(nn.Module):
    """Transformer decoder: tokens (B, n, zc) -> grid map (B, zc, G, G), and the grid stream after layer
    ``capture_layer`` (1-based; 0 = none) for semantic regularization."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        t = cfg.decoder
        self.grid = cfg.grid_size
        _build_stack(self, cfg, t, global_proj=False)
        self.conv_out = nn.Conv2d(t.width, cfg.cnn.z_channels, 3, padding=1)

    def forward(self, tokens_BNC: torch.Tensor, capture_layer: int = 0, grid: int | None = None):
        """``grid`` (1D only): decode on a grid x grid map, the grid positions resized bilinearly (DetailFlow's
        prefix decoding at a lower resolution); None = the configured grid."""
        x = self.embed(self.ln_pre(tokens_BNC))
        B, n, _ = x.shape
        captured = None
        g, pos = self.grid, self.pos
        if self.kind == "1d":
            if grid is not None and grid != g:
                from tokscale.tokenizers.detailflow import resize_positions

                g, pos = grid, resize_positions(self.pos, grid)
            memory, memory_pos = x, self.token_pos[:n]
            x = x[:, :1].expand(B, g**2, -1)
        elif self.layer_type == "plain":
            x = x + self.pos
        for i, layer in enumerate(self.layers, start=1):
            if self.kind == "1d":
                x = run_layer(layer, self.grad_checkpointing, x, memory, pos, memory_pos)
            elif self.layer_type == "plain":
                x = run_layer(layer, self.grad_checkpointing, x)
            else:
                x = run_layer(layer, self.grad_checkpointing, x, x, self.pos, self.pos)
            if i == capture_layer:
                captured = x
        x = self.ln_post(x).transpose(1, 2).reshape(B, -1, g, g)
        return self.conv_out(x), captured


class VQTokenizer(nn.Module):
    def __init__(self, cfg: TokenizerConfig, with_projector: bool = True):
        super().__init__()
        self.config = cfg
        zc, dim = cfg.cnn.z_channels, cfg.quantizer.code_dim
        self.cnn_encoder = CNNEncoder(cfg.cnn, grad_checkpointing=cfg.grad_checkpointing)
        self.encoder = TokenEncoder(cfg)
        self.to_code = nn.Linear(zc, dim)  # GigaTok's quant_conv
        if cfg.quantizer.kind == "multiscale":
            from tokscale.tokenizers.multiscale import MultiScaleQuantizer

            self.quantizer = MultiScaleQuantizer(cfg.quantizer)
        else:
            self.quantizer = VectorQuantizer(cfg.quantizer)
        self.from_code = nn.Linear(dim, zc)  # GigaTok's post_quant_conv
        self.decoder = TokenDecoder(cfg)
        self.cnn_decoder = CNNDecoder(cfg.cnn, grad_checkpointing=cfg.grad_checkpointing)
        self.semantic_projector = None
        if with_projector and cfg.semantic_dim > 0:
            from tokscale.tokenizers.semantic import SemanticProjector

            self.semantic_projector = SemanticProjector(cfg.decoder.width, cfg.semantic_dim)
        self.detailflow = None
        if cfg.detailflow.enabled:
            from tokscale.tokenizers.detailflow import DetailFlowHeads

            self.detailflow = DetailFlowHeads(cfg)
        self._init_weights()

    def _init_weights(self):
        """GigaTok's init: trunc-normal(0.02) linear and conv weights with zero biases; attention
        in-projections xavier-uniform (torch's MultiheadAttention); positions N(0, 1/width); the code
        projections keep torch's default init and the codebook its own."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)) and not m.weight.is_meta:
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, Attention) and not m.in_proj.weight.is_meta:
                m.reset_in_proj()
        for m in (self.to_code, self.from_code):
            if not m.weight.is_meta:
                m.reset_parameters()

    # -- properties used by evaluation and export --
    @property
    def codebook_size(self) -> int:
        return self.config.quantizer.codebook_size

    @property
    def num_tokens(self) -> int:
        return self.config.tokens

    @property
    def image_size(self) -> int:
        return self.config.image_size

    def _mask(self, n: int, device) -> torch.Tensor | None:
        c = self.config
        return token_mask(c.token_mask, n, c.causal_prefix, c.group_size, device=device)

    # -- encoder --
    def cnn_features(self, images: torch.Tensor) -> torch.Tensor:
        """CNN encoder output (B, z_channels, G, G); inputs follow the weights' dtype (bf16 in a bf16 engine)."""
        return self.cnn_encoder(images.to(self.cnn_encoder.conv_in.weight.dtype))

    def _encoder_tokens(self, feat: torch.Tensor) -> torch.Tensor:
        return self.encoder(feat, self._mask(self.num_tokens, feat.device))

    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        """Continuous pre-quantization latents (B, N, code_dim)."""
        return self.to_code(self.encoder.proj_out(self._encoder_tokens(self.cnn_features(images))))

    def encode_features(self, images: torch.Tensor) -> torch.Tensor:
        """Mean-pooled encoder transformer output after ln_post (B, encoder.width): the probe features."""
        return self._encoder_tokens(self.cnn_features(images)).mean(1)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> codes (B, num_tokens) int64 (multi-scale: the scales' index maps
        concatenated coarse to fine, each row-major)."""
        return self.quantizer(self.encode_latents(images))["indices"]

    @property
    def multiscale(self) -> bool:
        return self.config.quantizer.kind == "multiscale"

    def _check_multiscale(self) -> None:
        if not self.multiscale:
            raise ValueError("encode_scales/decode_scales need a multi-scale tokenizer (model.quantizer.kind)")

    @torch.no_grad()
    def encode_scales(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Multi-scale only: images -> the codes of every scale, [(B, p_k^2)] coarse to fine."""
        self._check_multiscale()
        return self.quantizer.split(self.encode(images))

    # -- decoder --
    def decode_map(self, z_q: torch.Tensor, capture_layer: int = 0, grid: int | None = None):
        """Quantized latents (B, N, code_dim) -> (the transformer decoder's z_channels map (B, zc, G, G),
        captured decoder features or None). A 1D tokenizer accepts any prefix N <= num_tokens; a detailflow
        tokenizer decodes it on its scheduled grid unless ``grid`` is given."""
        n = z_q.shape[1]
        if self.config.kind == "1d" and n > self.config.num_tokens:
            raise ValueError(f"got {n} tokens, the tokenizer has {self.config.num_tokens}")
        if self.config.kind == "2d" and n != self.config.grid_size**2:
            raise ValueError(f"got {n} tokens, the 2D tokenizer decodes exactly {self.config.grid_size**2}")
        if grid is None and self.detailflow is not None:
            from tokscale.tokenizers.detailflow import prefix_grid

            grid = prefix_grid(self.config, n)
        return self.decoder(self.from_code(z_q.to(self.from_code.weight.dtype)), capture_layer, grid)

    def decode_latents(self, z_q: torch.Tensor, capture_layer: int = 0, grid: int | None = None):
        """Quantized latents (B, N, code_dim) -> (images, captured decoder features or None)."""
        spatial, feats = self.decode_map(z_q, capture_layer, grid)
        return self.cnn_decoder(spatial), feats

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, N) -> images (B, 3, H, W), roughly in [-1, 1]. A 1D tokenizer decodes any prefix; a
        multi-scale one any prefix of whole scales (N a scale boundary), its f_hat decoded on the full grid."""
        if self.multiscale:
            return self.decode_scales(self.quantizer.split(codes))
        z_q = self.quantizer.lookup(codes).to(self.from_code.weight.dtype)
        return self.decode_latents(z_q)[0].float()

    @torch.no_grad()
    def decode_scales(self, codes: list[torch.Tensor]) -> torch.Tensor:
        """Multi-scale only: the codes of the first k scales [(B, p_1^2), ..., (B, p_k^2)] -> images."""
        self._check_multiscale()
        f_hat = self.quantizer.indices_to_fhat(list(codes))  # (B, D, G, G)
        z_q = f_hat.flatten(2).transpose(1, 2).to(self.from_code.weight.dtype)
        return self.decode_latents(z_q)[0].float()

    def forward(
        self, images: torch.Tensor, capture_layer: int = 0, aux: bool = False, plan=None
    ) -> dict[str, torch.Tensor]:
        """Training forward: reconstruction, quantizer losses and indices, and (when capture_layer > 0 and the
        projector exists) projected decoder features for semantic regularization. ``aux`` adds GigaTok's
        early-training shortcut: ``shortcut_recon`` = the CNN decoder on the CNN encoder's features, and the
        pair ``spatial`` (the transformer decoder's map) / ``cnn_features`` (detached) for the feature MSE.
        ``plan`` (a detailflow.StepPlan): DetailFlow's training forward instead (prefix, size, self-correction)."""
        if plan is not None:
            from tokscale.tokenizers.detailflow import forward_train

            return forward_train(self, images, plan)
        # profiler ranges of `tokscale bench tokenizer`'s per-part shares (nothing unless a profiler runs)
        with profiled("encoder"):
            feat = self.cnn_features(images)
            latents = self.to_code(self.encoder.proj_out(self._encoder_tokens(feat)))
        with profiled("quantizer"):
            q = self.quantizer(latents)
        with profiled("decoder"):
            spatial, feats = self.decode_map(q["z_q"], capture_layer)
            out = dict(q, recon=self.cnn_decoder(spatial))
            if feats is not None and self.semantic_projector is not None:
                out["semantic"] = self.semantic_projector(feats)
            if aux:
                out["shortcut_recon"] = self.cnn_decoder(feat)
                out["spatial"] = spatial
                out["cnn_features"] = feat.detach()
        return out


def param_counts(model: VQTokenizer) -> dict[str, int]:
    """Parameter counts by part (works on meta-device models)."""

    def n(*mods) -> int:
        return sum(p.numel() for m in mods if m is not None for p in m.parameters())

    return {
        "params": n(model),
        "encoder_params": n(model.cnn_encoder, model.encoder, model.to_code),
        "decoder_params": n(model.from_code, model.decoder, model.cnn_decoder),
        "cnn_encoder_params": n(model.cnn_encoder),
        "cnn_decoder_params": n(model.cnn_decoder),
        "codebook_params": n(model.quantizer),
        "semantic_projector_params": n(model.semantic_projector),
    }
