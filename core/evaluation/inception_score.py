"""Inception Score that depends on the images only: the same number at any rank count, worker count or order.

IS = exp(E_x KL(p(y|x) || p(y))) per split, reported as mean and std over splits exactly as torch-fidelity's
``isc_features_to_metric`` (10 splits, float64, unbiased logits): the N samples in dataset order are permuted by
``np.random.RandomState(2020).permutation(N)`` and cut into ``splits`` contiguous parts ``[s*N//splits,
(s+1)*N//splits)``. Within a split,

    E_x KL = (1/n) sum_x sum_y p log p  -  sum_y pbar(y) log pbar(y),   pbar = (1/n) sum_x p(y|x).

Dataset order is the samples' global indices (``EvalStream`` yields them; a sampling job uses the sample
index), not the order in which ranks or data workers happen to see them. Each rank keeps its samples' logits
(float32, on the CPU: 4 KB each) and indices; :meth:`compute` gathers the indices only (8 bytes a sample),
places each of its own samples in its split, and ``all_reduce`` merges per-split sums (count, sum of p, sum of
p log p). With fewer samples than splits a split is empty and the score is undefined: ``compute`` returns
``(None, None)`` and :attr:`undefined_reason` says why.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from tokscale.evaluation.inception import NUM_LOGITS

TORCH_FIDELITY_SEED = 2020


class InceptionScore:
    def __init__(
        self,
        splits: int = 10,
        num_classes: int = NUM_LOGITS,
        device: str | torch.device = "cpu",
        rank: int = 0,
        world_size: int = 1,
        seed: int = TORCH_FIDELITY_SEED,
        shuffle: bool = True,
    ):
        if splits < 1:
            raise ValueError(f"is_splits must be >= 1, got {splits}")
        self.splits, self.num_classes, self.seed, self.shuffle = splits, num_classes, seed, shuffle
        self.device = torch.device(device)
        self.rank, self.world_size = rank, world_size
        self._logits: list[torch.Tensor] = []
        self._indices: list[torch.Tensor] = []
        self._local_seen = 0
        self.undefined_reason: str | None = None

    def update(self, logits: torch.Tensor, indices: torch.Tensor | None = None) -> None:
        """``indices``: the samples' global dataset positions (any distinct integers, ordered as the dataset).
        Without them this rank's k-th sample counts as ``k * world_size + rank``, which only matches another
        rank count when every rank sees the same number of samples in that interleaved order."""
        n = logits.shape[0]
        if indices is None:
            local = torch.arange(self._local_seen, self._local_seen + n)
            indices = local * self.world_size + self.rank
        indices = torch.as_tensor(indices, dtype=torch.long).reshape(-1).cpu()
        if indices.numel() != n:
            raise ValueError(f"{n} logits but {indices.numel()} sample indices")
        self._local_seen += n
        self._logits.append(logits.detach().float().cpu())
        self._indices.append(indices)

    def compute(self) -> tuple[float | None, float | None]:
        """(mean, std) over the splits; collective when made with ``world_size > 1`` (every rank calls it), local
        otherwise, e.g. rank 0 alone scoring every rank's samples."""
        distributed = self.world_size > 1 and dist.is_initialized() and dist.get_world_size() > 1
        logits = torch.cat(self._logits) if self._logits else torch.zeros(0, self.num_classes)
        mine = torch.cat(self._indices).numpy() if self._indices else np.zeros(0, dtype=np.int64)
        if distributed:
            parts: list = [None] * dist.get_world_size()
            dist.all_gather_object(parts, mine)
            every = np.concatenate(parts)
        else:
            every = mine
        order = np.sort(every)
        if len(order) > 1 and bool((order[1:] == order[:-1]).any()):
            dup = int(order[1:][order[1:] == order[:-1]][0])
            raise ValueError(f"Inception Score: sample index {dup} was counted twice (on two ranks or twice)")
        n = len(order)
        position = np.searchsorted(order, mine)  # rank of each of this rank's samples in dataset order
        if self.shuffle:
            perm = np.random.RandomState(self.seed).permutation(n)
            where = np.empty(n, dtype=np.int64)
            where[perm] = np.arange(n)  # torch-fidelity's feature[perm]: sample perm[j] lands at j
            position = where[position]
        bounds = (np.arange(self.splits + 1) * n) // self.splits
        split_ids = torch.from_numpy(np.searchsorted(bounds, position, side="right") - 1)

        dev = self.device if distributed and dist.get_backend() == "nccl" else torch.device("cpu")
        count = torch.zeros(self.splits, dtype=torch.float64, device=dev)
        sum_p = torch.zeros(self.splits, self.num_classes, dtype=torch.float64, device=dev)
        sum_plogp = torch.zeros(self.splits, dtype=torch.float64, device=dev)
        for chunk, ids in zip(logits.split(4096), split_ids.split(4096)):
            log_p = chunk.to(dev, torch.float64).log_softmax(dim=1)
            p = log_p.exp()
            ids = ids.to(dev)
            count.index_add_(0, ids, torch.ones(len(ids), dtype=torch.float64, device=dev))
            sum_p.index_add_(0, ids, p)
            sum_plogp.index_add_(0, ids, (p * log_p).sum(1))
        if distributed:
            for t in (count, sum_p, sum_plogp):
                dist.all_reduce(t)
        if n < self.splits or bool((count == 0).any()):
            self.undefined_reason = f"{n} samples: fewer than is_splits={self.splits}, so a split is empty"
            return None, None
        pbar = sum_p / count[:, None]
        mean_kl = sum_plogp / count - (pbar * pbar.clamp_min(1e-300).log()).sum(1)
        scores = mean_kl.exp().cpu().numpy()
        return float(np.mean(scores)), float(np.std(scores))
