"""Inception Score from running sums, so that it too needs no gather of per-sample logits.

IS = exp(E_x KL(p(y|x) || p(y))) per split, reported as mean and std over splits as torch-fidelity does (10
splits, unbiased logits, float64). Within a split,

    E_x KL = (1/n) sum_x sum_y p log p  -  sum_y pbar(y) log pbar(y),   pbar = (1/n) sum_x p(y|x),

so each split needs only its count, the sum of p (1008 numbers) and the sum of p log p (one number), which
all_reduce merges exactly. torch-fidelity assigns samples to splits by a random permutation; here sample i of
rank r goes to split (i * world_size + r) mod splits, an equally arbitrary but rank-count-independent choice.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist

from tokscale.evaluation.inception import NUM_LOGITS


class InceptionScore:
    def __init__(
        self,
        splits: int = 10,
        num_classes: int = NUM_LOGITS,
        device: str | torch.device = "cpu",
        rank: int = 0,
        world_size: int = 1,
    ):
        self.splits = splits
        self.rank, self.world_size = rank, world_size
        self.local_seen = 0
        self.count = torch.zeros(splits, dtype=torch.float64, device=device)
        self.sum_p = torch.zeros(splits, num_classes, dtype=torch.float64, device=device)
        self.sum_plogp = torch.zeros(splits, dtype=torch.float64, device=device)

    def update(self, logits: torch.Tensor, split_ids: torch.Tensor | None = None) -> None:
        logits = logits.to(self.sum_p.device, torch.float64)
        n = logits.shape[0]
        if split_ids is None:
            local = torch.arange(self.local_seen, self.local_seen + n, device=logits.device)
            split_ids = (local * self.world_size + self.rank) % self.splits
        self.local_seen += n
        split_ids = split_ids.to(logits.device, torch.long)
        log_p = logits.log_softmax(dim=1)
        p = log_p.exp()
        self.count.index_add_(0, split_ids, torch.ones(n, dtype=torch.float64, device=logits.device))
        self.sum_p.index_add_(0, split_ids, p)
        self.sum_plogp.index_add_(0, split_ids, (p * log_p).sum(1))

    def all_reduce(self) -> None:
        if dist.is_initialized() and dist.get_world_size() > 1:
            for t in (self.count, self.sum_p, self.sum_plogp):
                dist.all_reduce(t)

    def compute(self) -> tuple[float, float]:
        """(mean, std) of the per-split scores; NaN when a split is empty (fewer samples than splits)."""
        if bool((self.count == 0).any()):
            return math.nan, math.nan
        pbar = self.sum_p / self.count[:, None]
        mean_kl = self.sum_plogp / self.count - (pbar * pbar.clamp_min(1e-300).log()).sum(1)
        scores = mean_kl.exp().cpu().numpy()
        return float(np.mean(scores)), float(np.std(scores))
