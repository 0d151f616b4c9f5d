"""Multi-scale residual quantizer for the 2D tokenizers (VAR's tokenizer scheme), ``quantizer.kind=multiscale``.

The 2D tokenizer's latents (B, N = G*G, D), read as a map f (B, D, G, G), are quantized at the scales
p_1 < ... < p_K = G (``quantizer.scales``; 1,2,3,4,5,6,8,10,13,16 by default: 680 tokens for a 16 x 16 grid):

    f_hat = 0, r = f
    for k = 1..K:
        idx_k = nearest codes of area_downsample(r, p_k)             # (B, p_k^2), row-major
        h_k   = phi_k(bicubic_upsample(codes[idx_k], G))            # no upsampling at p_K = G
        f_hat = f_hat + h_k ;  r = r - h_k

phi_k(h) = (1 - phi_mix) h + phi_mix conv3x3(h): ``phi_count`` convolutions shared between the scales, scale k
taking the one whose tick is nearest its ratio (k-1)/(K-1) (ticks evenly spaced over [1/(3n), 1 - 1/(3n)] for
n = 4 convolutions, over [1/(2n), 1 - 1/(2n)] otherwise; with ties the lower). With VAR's defaults (mix 0.5, 4
convolutions, 10 scales) the scales use convolutions 0,0,1,1,1,2,2,3,3,3. ``phi_mix=0`` leaves the identity.

Codes (``indices``) are the per-scale index maps concatenated coarse to fine into one flat (B, L) sequence,
L = sum p_k^2: the scale slices are ``scale_slices()``. Any prefix of whole scales decodes
(``indices_to_fhat``): f_hat of the first k scales is a coarser approximation of f.

The l2-norm question: GigaTok's codes are l2-normalised 8-d vectors matched against l2-normalised latents;
VAR's are 32-d and unnormalised. Here the *lookup* follows ``quantizer.l2_norm`` (with it every code is the
unit vector of its row, exactly the codes VectorQuantizer uses, so ``codes()``, ``lookup`` and the entropy
loss see one code set), while the residual arithmetic is unnormalised: the latents are not normalised (f_hat is
a sum of K codes through phi, so it cannot be a unit vector), and the search picks the code nearest the
residual in plain Euclidean distance. With unit codes the encoder learns latents whose residuals suit unit
steps and the phi convolutions of the fine scales learn to shrink them; ``l2_norm: false`` is VAR's choice
(conf/tokenizer/var-vqvae.yaml).

Training losses (as VAR's): the commitment and codebook terms are averaged over the K partial reconstructions,
beta * mean_k ||f - sg(f_hat_k)||^2 and mean_k ||f_hat_k - sg(f)||^2, so every prefix is pulled towards the
latents; the codebook and the phi convolutions learn through the second term. The decoder receives f_hat with the
gradient reaching the encoder through the rotation trick (or straight-through), as VectorQuantizer does per
code. The optional entropy loss runs over the residual rows of every scale together. Everything runs in fp32.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from tokscale.tokenizers.quantizer import (
    QuantizerConfig,
    VectorQuantizer,
    entropy_loss,
    nearest_code,
    rotate_to,
)


def phi_ticks(count: int) -> list[float]:
    """The ratios the ``count`` shared convolutions stand for (evenly spaced, computed like numpy.linspace)."""
    if count == 1:
        return [0.5]
    margin = 1 / (3 * count) if count == 4 else 1 / (2 * count)
    start, stop = margin, 1 - margin
    step = (stop - start) / (count - 1)
    return [start + i * step for i in range(count - 1)] + [stop]


def phi_index(k: int, num_scales: int, count: int) -> int:
    """Which of ``count`` convolutions scale k (0-based) of ``num_scales`` uses: the tick nearest k/(K-1)."""
    ratio = k / (num_scales - 1) if num_scales > 1 else 0.0
    ticks = phi_ticks(count)
    dist = [abs(t - ratio) for t in ticks]
    return dist.index(min(dist))


def area_down(f_BDGG: torch.Tensor, p: int) -> torch.Tensor:
    """Area (box) downsampling to p x p; the identity at the map's own size."""
    return f_BDGG if f_BDGG.shape[-1] == p else F.interpolate(f_BDGG, size=(p, p), mode="area")


class Phi(nn.Module):
    """(1 - mix) h + mix conv3x3(h), in fp32 whatever the weights' dtype (a bf16 engine stores them in bf16)."""

    def __init__(self, dim: int, mix: float):
        super().__init__()
        self.mix = mix
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, h_BDGG: torch.Tensor) -> torch.Tensor:
        conv = F.conv2d(h_BDGG, self.conv.weight.float(), self.conv.bias.float(), padding=1)
        return (1 - self.mix) * h_BDGG + self.mix * conv


class Quantized(NamedTuple):
    """One residual quantization of a latent map (MultiScaleQuantizer.quantize_map)."""

    indices: list[torch.Tensor]  # per scale (B, p_k^2), row-major
    f_hat: torch.Tensor  # (B, D, G, G), the sum over all scales
    residual: torch.Tensor  # (B, D, G, G), f minus everything subtracted (kept by subtraction, no gradient)
    partial: list[torch.Tensor]  # f_hat after each scale
    rows: list[torch.Tensor]  # per scale, the residual rows searched (B p_k^2, D); empty unless asked for


class MultiScaleQuantizer(VectorQuantizer):
    """VectorQuantizer's codebook, init, ``codes()``, ``lookup`` and usage window, quantizing residually over
    scales. ``forward`` takes and returns what VectorQuantizer's does: z_q (B, N, D) is f_hat, ``indices`` the
    flat (B, L) multi-scale codes."""

    def __init__(self, cfg: QuantizerConfig):
        super().__init__(cfg)
        self.scales: tuple[int, ...] = tuple(cfg.scales)
        self.grid = self.scales[-1]
        self.phis = nn.ModuleList(
            Phi(cfg.code_dim, cfg.phi_mix) for _ in range(cfg.phi_count if cfg.phi_mix > 0 else 0)
        )
        k = len(self.scales)
        self.phi_of_scale: tuple[int, ...] = tuple(phi_index(i, k, cfg.phi_count) for i in range(k))

    # -- the flat sequence --
    @property
    def num_scale_tokens(self) -> int:
        """L = sum p_k^2 (680 for the default scales)."""
        return sum(p * p for p in self.scales)

    @property
    def scale_boundaries(self) -> list[int]:
        """Cumulative token counts [0, p_1^2, p_1^2 + p_2^2, ..., L]: scale k is [b[k], b[k + 1])."""
        out = [0]
        for p in self.scales:
            out.append(out[-1] + p * p)
        return out

    def scale_slices(self) -> list[slice]:
        b = self.scale_boundaries
        return [slice(b[i], b[i + 1]) for i in range(len(self.scales))]

    def split(self, indices_BL: torch.Tensor) -> list[torch.Tensor]:
        """Flat codes (B, L') of the first k whole scales -> [(B, p_1^2), ..., (B, p_k^2)]."""
        n = indices_BL.shape[-1]
        b = self.scale_boundaries
        if n not in b[1:]:
            raise ValueError(
                f"got {n} codes per image: a multi-scale tokenizer decodes a prefix of whole scales, one of "
                f"{b[1:]} codes (scales {list(self.scales)})"
            )
        return [indices_BL[..., s] for s in self.scale_slices()[: b.index(n)]]

    # -- the residual scheme --
    def phi(self, h_BDGG: torch.Tensor, k: int) -> torch.Tensor:
        return self.phis[self.phi_of_scale[k]](h_BDGG) if len(self.phis) else h_BDGG

    def embed_up(self, idx_Bp2: torch.Tensor, k: int) -> torch.Tensor:
        """Scale k's codes (B, p_k^2) -> phi_k(bicubic upsampling of their (B, D, p_k, p_k) map to G), fp32."""
        p = self.scales[k]
        if idx_Bp2.shape[-1] != p * p:
            raise ValueError(f"scale {k} ({p}x{p}) has {p * p} codes per image, got {idx_Bp2.shape[-1]}")
        h = self.codes()[idx_Bp2].transpose(1, 2).reshape(idx_Bp2.shape[0], -1, p, p)
        if p != self.grid:
            h = F.interpolate(h, size=(self.grid, self.grid), mode="bicubic")
        return self.phi(h, k)

    def to_map(self, z_BND: torch.Tensor) -> torch.Tensor:
        """Latents (B, N, D), N = G*G row-major -> (B, D, G, G) fp32."""
        B, N, D = z_BND.shape
        if N != self.grid**2:
            raise ValueError(
                f"the multi-scale quantizer takes a {self.grid}x{self.grid} latent grid ({self.grid**2} "
                f"tokens), got {N}"
            )
        return z_BND.float().transpose(1, 2).reshape(B, D, self.grid, self.grid)

    def quantize_map(self, f_BDGG: torch.Tensor, keep_graph: bool = False, rows: bool = False) -> Quantized:
        """The residual quantization of f (B, D, G, G). The residual is kept by subtraction, f_hat by
        accumulation (residual = f - f_hat up to rounding). ``keep_graph``: f_hat and the partial maps carry
        gradients to the codebook and the convolutions; ``rows``: also return every scale's residual rows with
        the value of the residual and the gradient of f (for the entropy loss)."""
        cfg = self.cfg
        codes = self.codes().detach()
        f = f_BDGG.float()
        B, D = f.shape[:2]
        rest = f.detach().clone()
        f_hat = torch.zeros_like(rest)
        idx_list, partial, row_list = [], [], []
        for k, p in enumerate(self.scales):
            r = area_down(rest, p)
            if rows:
                row_list.append(area_down(rest + (f - f.detach()), p).permute(0, 2, 3, 1).reshape(-1, D))
            idx, _ = nearest_code(r.permute(0, 2, 3, 1).reshape(-1, D), codes, cfg.search_chunk)
            idx = idx.view(B, p * p)
            h = self.embed_up(idx, k)
            if not keep_graph:
                h = h.detach()
            f_hat = f_hat + h
            rest = rest - h.detach()
            idx_list.append(idx)
            partial.append(f_hat)
        return Quantized(idx_list, f_hat, rest, partial, row_list)

    def forward(self, z_BND: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        in_dtype = z_BND.dtype
        f = self.to_map(z_BND)
        want_entropy = cfg.entropy_weight > 0 and self.training
        q = self.quantize_map(f, keep_graph=torch.is_grad_enabled(), rows=want_entropy)
        f_nograd = f.detach()
        commit = sum(F.mse_loss(f, fh.detach()) for fh in q.partial) / len(q.partial)
        codebook = sum(F.mse_loss(fh, f_nograd) for fh in q.partial) / len(q.partial)
        z = f.flatten(2).transpose(1, 2)  # (B, N, D) fp32
        z_q = q.f_hat.flatten(2).transpose(1, 2)
        out_q = rotate_to(z, z_q.detach()) if cfg.rotation_trick else z + (z_q - z).detach()
        idx = torch.cat(q.indices, dim=1)
        result = {
            "z_q": out_q.to(in_dtype),
            "indices": idx,
            "loss_commit": cfg.beta * commit,
            "loss_codebook": cfg.codebook_weight * codebook,
        }
        if want_entropy:
            result["loss_entropy"] = cfg.entropy_weight * entropy_loss(
                torch.cat(q.rows), self.codes(), cfg.entropy_temperature, cfg.search_chunk
            )
        if self.training:
            self._record_usage(idx.detach().flatten())
        return result

    # -- decoding and the AR model's interface --
    def indices_to_fhat(self, idx_list: list[torch.Tensor], grid: int | None = None) -> torch.Tensor:
        """f_hat (B, D, G, G) of the first len(idx_list) scales (any prefix, at least one scale)."""
        if grid is not None and grid != self.grid:
            raise ValueError(f"the multi-scale quantizer's grid is {self.grid}x{self.grid}, got grid={grid}")
        if not 1 <= len(idx_list) <= len(self.scales):
            raise ValueError(f"expected the codes of 1 to {len(self.scales)} scales, got {len(idx_list)}")
        f_hat = None
        for k, idx in enumerate(idx_list):
            h = self.embed_up(idx, k)
            f_hat = h if f_hat is None else f_hat + h
        return f_hat

    def var_input(self, idx_list: list[torch.Tensor]) -> torch.Tensor:
        """VAR's teacher-forcing input (B, L - p_1^2, D): for scales 2..K, the f_hat of the scales before it
        area-downsampled to that scale, row-major, concatenated. Takes the codes of all K scales (the last is not
        needed: K - 1 suffice)."""
        K = len(self.scales)
        if len(idx_list) < K - 1:
            raise ValueError(f"var_input needs the codes of at least {K - 1} scales, got {len(idx_list)}")
        f_hat, out = None, []
        for k in range(K - 1):
            f_hat, nxt = self.next_scale(f_hat, idx_list[k], k)
            out.append(nxt)
        return torch.cat(out, dim=1)

    def next_scale(self, f_hat_BDGG: torch.Tensor | None, idx_k: torch.Tensor, k: int):
        """Sampling step k (0-based): add scale k's codes (B, p_k^2) to f_hat (None = zeros) -> (the new f_hat
        (B, D, G, G), the next scale's input (B, p_{k+1}^2, D), or None after the last scale)."""
        h = self.embed_up(idx_k, k)
        f_hat = h if f_hat_BDGG is None else f_hat_BDGG.float() + h
        if k == len(self.scales) - 1:
            return f_hat, None
        p = self.scales[k + 1]
        return f_hat, area_down(f_hat, p).flatten(2).transpose(1, 2)
