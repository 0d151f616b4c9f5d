"""GigaTok-style hybrid VQ tokenizers: CNN encoder -> transformer encoder -> code projection -> quantizer
-> projection -> transformer decoder -> CNN decoder.

- ``kind="2d"``: the transformers run over the (image_size/16)^2 token grid.
- ``kind="1d"``: a Q-Former encoder. ``num_tokens`` learned queries, initialised by average-pooling the CNN
  features at doubling granularities (1x1, 2x2, 4x4, ... in that order, so early tokens start global and later
  ones local), self-attend under an optional causal / block-causal mask and cross-attend to the CNN features.
  The decoder's grid queries cross-attend to the 1D tokens, so it can decode from any prefix of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from tokscale.tokenizers.cnn import CNNConfig, CNNDecoder, CNNEncoder
from tokscale.tokenizers.quantizer import QuantizerConfig, VectorQuantizer
from tokscale.tokenizers.transformer import Stack, TransformerConfig, token_mask

KINDS = ("2d", "1d")
MASKS = ("none", "causal", "block_causal")


@dataclass
class TokenizerConfig:
    preset: str | None = None  # fills every field below before the YAML and command line apply
    kind: str = "2d"
    image_size: int = 256
    num_tokens: int = 256  # 1D only; a 2D tokenizer has (image_size / 16)^2
    cnn: CNNConfig = field(default_factory=CNNConfig)
    encoder: TransformerConfig = field(default_factory=TransformerConfig)
    decoder: TransformerConfig = field(default_factory=TransformerConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    token_mask: str = "none"  # 1D encoder query mask: none | causal | block_causal
    causal_prefix: int = 8
    group_size: int = 8
    semantic_dim: int = 768  # output width of the semantic-regularization projector (the teacher's width)
    grad_checkpointing: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"model.kind must be one of {KINDS}, got {self.kind!r}")
        if self.token_mask not in MASKS:
            raise ValueError(f"model.token_mask must be one of {MASKS}, got {self.token_mask!r}")
        if self.kind == "2d" and self.token_mask != "none":
            raise ValueError("model.token_mask applies to 1D tokenizers only; use 'none' with kind '2d'")
        if self.image_size % self.cnn.downsample:
            raise ValueError(
                f"model.image_size={self.image_size} must be a multiple of the CNN downsampling {self.cnn.downsample}"
            )
        if self.num_tokens < 1:
            raise ValueError(f"model.num_tokens must be >= 1, got {self.num_tokens}")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.cnn.downsample

    @property
    def tokens(self) -> int:
        return self.grid_size**2 if self.kind == "2d" else self.num_tokens


def multilevel_pool(feat_BCHW: torch.Tensor, n: int) -> torch.Tensor:
    """(B, C, G, G) -> (B, n, C): average pools at 1x1, 2x2, 4x4, ... concatenated coarse-to-fine and cut at n
    (repeating the finest level when n exceeds all levels together)."""
    g = feat_BCHW.shape[-1]
    levels, size = [], 1
    while sum(x.shape[1] for x in levels) < n:
        s = min(size, g)
        levels.append(F.adaptive_avg_pool2d(feat_BCHW, s).flatten(2).transpose(1, 2))
        size *= 2
    return torch.cat(levels, dim=1)[:, :n]


class VQTokenizer(nn.Module):
    def __init__(self, cfg: TokenizerConfig, with_projector: bool = True):
        super().__init__()
        self.config = cfg
        g, zc = cfg.grid_size, cfg.cnn.z_channels
        ew, dw = cfg.encoder.width, cfg.decoder.width
        one_d = cfg.kind == "1d"

        self.cnn_encoder = CNNEncoder(cfg.cnn, grad_checkpointing=cfg.grad_checkpointing)
        self.enc_in = nn.Linear(zc, ew)
        self.enc_pos = nn.Parameter(torch.zeros(1, g * g, ew))
        if one_d:
            self.queries = nn.Parameter(torch.zeros(1, cfg.num_tokens, ew))
        self.encoder = Stack(cfg.encoder, cross=one_d, grad_checkpointing=cfg.grad_checkpointing)
        self.enc_norm = nn.LayerNorm(ew)
        self.to_code = nn.Linear(ew, cfg.quantizer.code_dim)

        self.quantizer = VectorQuantizer(cfg.quantizer)

        self.from_code = nn.Linear(cfg.quantizer.code_dim, dw)
        if one_d:
            self.token_pos = nn.Parameter(torch.zeros(1, cfg.num_tokens, dw))
        self.dec_pos = nn.Parameter(torch.zeros(1, g * g, dw))  # the grid queries of a 1D decoder
        self.decoder = Stack(cfg.decoder, cross=one_d, grad_checkpointing=cfg.grad_checkpointing)
        self.dec_norm = nn.LayerNorm(dw)
        self.dec_out = nn.Linear(dw, zc)
        self.cnn_decoder = CNNDecoder(cfg.cnn, grad_checkpointing=cfg.grad_checkpointing)

        self.semantic_projector = None
        if with_projector and cfg.semantic_dim > 0:
            from tokscale.tokenizers.semantic import SemanticProjector

            self.semantic_projector = SemanticProjector(dw, cfg.semantic_dim)
        self._init_weights()

    def _init_weights(self):
        for name, p in self.named_parameters():
            if name.endswith(("_pos", "queries")):
                nn.init.trunc_normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear) and not m.weight.is_meta:
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

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
    def _encoder_tokens(self, images: torch.Tensor) -> torch.Tensor:
        # inputs follow the weights' dtype (bf16 inside a bf16 engine); the quantizer returns to fp32 itself
        feat = self.cnn_encoder(images.to(self.cnn_encoder.conv_in.weight.dtype))  # (B, zc, g, g)
        x = self.enc_in(feat.flatten(2).transpose(1, 2)) + self.enc_pos
        if self.config.kind == "2d":
            x, _ = self.encoder(x)
        else:
            grid = x.transpose(1, 2).reshape(x.shape[0], -1, *feat.shape[-2:])
            q = multilevel_pool(grid, self.config.num_tokens) + self.queries
            x, _ = self.encoder(q, context=x, mask=self._mask(q.shape[1], q.device))
        return self.enc_norm(x)

    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        """Continuous pre-quantization latents (B, N, code_dim)."""
        return self.to_code(self._encoder_tokens(images))

    def encode_features(self, images: torch.Tensor) -> torch.Tensor:
        """Mean-pooled encoder transformer output (B, encoder.width): the tokenizer's probe features."""
        return self._encoder_tokens(images).mean(1)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> codes (B, num_tokens) int64."""
        return self.quantizer(self.encode_latents(images))["indices"]

    # -- decoder --
    def decode_latents(self, z_q: torch.Tensor, capture_layer: int = 0):
        """Quantized latents (B, N, code_dim) -> (images, captured decoder features or None).
        A 1D tokenizer accepts any prefix N <= num_tokens."""
        B, n, _ = z_q.shape
        tok = self.from_code(z_q.to(self.from_code.weight.dtype))
        if self.config.kind == "2d":
            x, feats = self.decoder(tok + self.dec_pos, capture_layer=capture_layer)
        else:
            if n > self.config.num_tokens:
                raise ValueError(f"got {n} tokens, the tokenizer has {self.config.num_tokens}")
            ctx = tok + self.token_pos[:, :n]
            x, feats = self.decoder(self.dec_pos.expand(B, -1, -1), context=ctx, capture_layer=capture_layer)
        g = self.config.grid_size
        x = self.dec_out(self.dec_norm(x)).transpose(1, 2).reshape(B, -1, g, g)
        return self.cnn_decoder(x), feats

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, N) -> images (B, 3, H, W), roughly in [-1, 1]. A 1D tokenizer decodes any prefix."""
        z_q = self.quantizer.lookup(codes).to(self.from_code.weight.dtype)
        return self.decode_latents(z_q)[0].float()

    def forward(self, images: torch.Tensor, capture_layer: int = 0) -> dict[str, torch.Tensor]:
        """Training forward: reconstruction, quantizer losses and indices, and (when capture_layer > 0 and the
        projector exists) projected decoder features for semantic regularization."""
        q = self.quantizer(self.encode_latents(images))
        recon, feats = self.decode_latents(q["z_q"], capture_layer)
        out = dict(q, recon=recon)
        if feats is not None and self.semantic_projector is not None:
            out["semantic"] = self.semantic_projector(feats)
        return out


def param_counts(model: VQTokenizer) -> dict[str, int]:
    """Parameter counts by part (works on meta-device models)."""

    def n(mods) -> int:
        return sum(
            p.numel()
            for m in mods
            if m is not None
            for p in (m.parameters() if isinstance(m, nn.Module) else [m])
        )

    enc = [
        model.cnn_encoder,
        model.enc_in,
        model.enc_pos,
        getattr(model, "queries", None),
        model.encoder,
        model.enc_norm,
        model.to_code,
    ]
    dec = [
        model.from_code,
        getattr(model, "token_pos", None),
        model.dec_pos,
        model.decoder,
        model.dec_norm,
        model.dec_out,
        model.cnn_decoder,
    ]
    return {
        "params": n([model]),
        "encoder_params": n(enc),
        "decoder_params": n(dec),
        "cnn_encoder_params": n([model.cnn_encoder]),
        "cnn_decoder_params": n([model.cnn_decoder]),
        "codebook_params": n([model.quantizer]),
        "semantic_projector_params": n([model.semantic_projector]),
    }
