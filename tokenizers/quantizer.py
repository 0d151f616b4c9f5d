"""Vector quantizer with l2-normalised low-dimensional codes (GigaTok / ViT-VQGAN style).

Shapes: ``z_BLD`` are B sequences of L vectors of the code dimension D; the codebook is (K, D).
The nearest-code search always runs in fp32, even when the engine holds the model in bf16 (a bf16 distance
to 16384 unit vectors in 8 dimensions cannot separate neighbours), and in row chunks so that the (rows, K)
distance matrix stays bounded for large batch x codebook.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class QuantizerConfig:
    codebook_size: int = 16384
    code_dim: int = 8
    l2_norm: bool = True
    beta: float = 0.25  # commitment weight
    codebook_weight: float = 1.0
    rotation_trick: bool = True  # gradient estimator: rotation trick (GigaTok's default) or straight-through
    entropy_weight: float = 0.0  # 0.005 for the billion-scale XL-XXL tokenizer
    entropy_temperature: float = 0.01
    usage_window: int = 65536  # codebook usage over the last this many indices
    search_chunk: int = 16384  # rows of z per distance chunk: memory is search_chunk x codebook_size floats

    def __post_init__(self):
        for key in ("codebook_size", "code_dim", "usage_window", "search_chunk"):
            if getattr(self, key) <= 0:
                raise ValueError(f"quantizer.{key} must be positive, got {getattr(self, key)}")
        if self.entropy_temperature <= 0:
            raise ValueError(f"quantizer.entropy_temperature must be > 0, got {self.entropy_temperature}")


def nearest_code(z_ND: torch.Tensor, codes_KD: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Index and squared distance of the nearest code for every row, in fp32 and row chunks."""
    z = z_ND.float()
    codes = codes_KD.float()
    code_sq = codes.pow(2).sum(1)
    idx_out = torch.empty(z.shape[0], dtype=torch.long, device=z.device)
    dist_out = torch.empty(z.shape[0], dtype=torch.float32, device=z.device)
    for start in range(0, z.shape[0], chunk):
        zc = z[start : start + chunk]
        # ||z - e||^2 = ||z||^2 + ||e||^2 - 2 z.e ; addmm keeps it one fused matmul per chunk
        d = torch.addmm(code_sq.unsqueeze(0), zc, codes.t(), beta=1.0, alpha=-2.0)
        d += zc.pow(2).sum(1, keepdim=True)
        dist, idx = d.min(dim=1)
        idx_out[start : start + chunk] = idx
        dist_out[start : start + chunk] = dist
    return idx_out, dist_out


def entropy_loss(z_ND: torch.Tensor, codes_KD: torch.Tensor, temperature: float, chunk: int) -> torch.Tensor:
    """Mean per-sample entropy minus the entropy of the batch-mean code distribution.

    Probabilities are softmax(-d / temperature) with d the squared L2 distance to the codes. Minimising it makes
    each assignment confident while spreading the batch over the whole codebook.
    """
    z = z_ND.float()
    codes = codes_KD.float()
    code_sq = codes.pow(2).sum(1)
    sample_entropy = z.new_zeros(())
    prob_sum = z.new_zeros(codes.shape[0])
    for start in range(0, z.shape[0], chunk):
        zc = z[start : start + chunk]
        d = torch.addmm(code_sq.unsqueeze(0), zc, codes.t(), beta=1.0, alpha=-2.0) + zc.pow(2).sum(
            1, keepdim=True
        )
        logp = F.log_softmax(-d / temperature, dim=1)
        p = logp.exp()
        sample_entropy = sample_entropy - (p * logp).sum()
        prob_sum = prob_sum + p.sum(0)
    n = z.shape[0]
    avg_p = prob_sum / n
    batch_entropy = -(avg_p * torch.log(avg_p + 1e-5)).sum()  # GigaTok's (and LlamaGen's) epsilon
    return sample_entropy / n - batch_entropy


def rotate_to(z: torch.Tensor, z_q: torch.Tensor) -> torch.Tensor:
    """Rotation-trick estimator: returns z_q in the forward pass; the gradient reaches z through a fixed
    rotation-and-scale that maps z onto z_q (Fifty et al., 2024), instead of the identity of straight-through."""
    eps = 1e-6
    with torch.no_grad():
        z_norm = z.norm(dim=-1, keepdim=True).clamp_min(eps)
        q_norm = z_q.norm(dim=-1, keepdim=True).clamp_min(eps)
        u = z / z_norm
        q = z_q / q_norm
        r = F.normalize(u + q, dim=-1, eps=eps)
        scale = q_norm / z_norm
    # R z with R = I - 2 r r^T + 2 q u^T, applied without forming R
    rz = z - 2 * (z * r).sum(-1, keepdim=True) * r + 2 * (z * u).sum(-1, keepdim=True) * q
    return scale * rz


class VectorQuantizer(nn.Module):
    def __init__(self, cfg: QuantizerConfig):
        super().__init__()
        self.cfg = cfg
        self.codebook = nn.Embedding(cfg.codebook_size, cfg.code_dim)
        self.reset_codebook()
        # Rolling window of recent indices for usage/perplexity (metrics only: not saved, never cast to bf16).
        self.register_buffer(
            "usage_window", torch.full((cfg.usage_window,), -1, dtype=torch.long), persistent=False
        )
        self.register_buffer("usage_pos", torch.zeros((), dtype=torch.long), persistent=False)

    def reset_codebook(self) -> None:
        """GigaTok's init: uniform(+-1/K), stored l2-normalised when the codes are."""
        w = self.codebook.weight
        if w.is_meta:
            return
        with torch.no_grad():
            nn.init.uniform_(w, -1.0 / self.cfg.codebook_size, 1.0 / self.cfg.codebook_size)
            if self.cfg.l2_norm:
                w.copy_(F.normalize(w, dim=-1))

    def codes(self) -> torch.Tensor:
        w = self.codebook.weight.float()
        return F.normalize(w, dim=-1) if self.cfg.l2_norm else w

    def forward(self, z_BLD: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        in_dtype = z_BLD.dtype
        z = z_BLD.float()
        if cfg.l2_norm:
            z = F.normalize(z, dim=-1)
        codes = self.codes()
        flat = z.reshape(-1, cfg.code_dim)
        idx, _ = nearest_code(flat.detach(), codes.detach(), cfg.search_chunk)
        z_q = codes[idx].view_as(z)

        commit = F.mse_loss(z, z_q.detach())
        codebook = F.mse_loss(z_q, z.detach())
        out_q = rotate_to(z, z_q) if cfg.rotation_trick else z + (z_q - z).detach()
        result = {
            "z_q": out_q.to(in_dtype),
            "indices": idx.view(z.shape[:-1]),
            "loss_commit": cfg.beta * commit,
            "loss_codebook": cfg.codebook_weight * codebook,
        }
        if cfg.entropy_weight > 0 and self.training:
            result["loss_entropy"] = cfg.entropy_weight * entropy_loss(
                flat, codes, cfg.entropy_temperature, cfg.search_chunk
            )
        if self.training:
            self._record_usage(idx.detach())
        return result

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes for indices (..., ) -> (..., D), fp32."""
        return self.codes()[indices]

    @torch.no_grad()
    def _record_usage(self, idx: torch.Tensor) -> None:
        n = self.cfg.usage_window
        idx = idx[-n:]
        pos = int(self.usage_pos)
        ar = (torch.arange(idx.numel(), device=idx.device) + pos) % n
        self.usage_window[ar] = idx
        self.usage_pos.fill_((pos + idx.numel()) % n)

    @torch.no_grad()
    def usage_stats(self) -> dict[str, float]:
        """Codebook usage (unique codes in the window / K) and perplexity of the window's code histogram."""
        seen = self.usage_window[self.usage_window >= 0]
        if seen.numel() == 0:
            return {"codebook_usage": 0.0, "codebook_perplexity": 0.0}
        counts = torch.bincount(seen, minlength=self.cfg.codebook_size).double()
        p = counts / counts.sum()
        ent = -(p[p > 0] * p[p > 0].log()).sum().item()
        return {
            "codebook_usage": float((counts > 0).sum().item()) / self.cfg.codebook_size,
            "codebook_perplexity": math.exp(ent),
        }
