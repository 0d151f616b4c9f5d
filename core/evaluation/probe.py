"""Linear probes on frozen features: the MAE/GigaTok protocol, distributed, and a fast logistic-regression check.

The protocol (MAE's linear probing, which GigaTok uses for its AR-model probe): BatchNorm1d without affine
parameters followed by a Linear layer, trained with LARS (momentum 0.9, weight decay 0), learning rate
base_lr x global_batch / 256 with base_lr 0.1, linear warmup for ``warmup_epochs`` then a half cosine to 0,
``epochs`` epochs (90 with 10 warmup in the papers).

Features come from any ``features_fn(images) -> (B, D)``; they are frozen, so each image is encoded once
(centre crop, no augmentation) and the probe trains on the cached features, each rank on its own share. Ranks
step in lockstep (the same number of steps per epoch, gradients averaged with all_reduce, BatchNorm running
statistics averaged after every epoch), so the result is one probe whatever the rank count.

    from tokscale.evaluation.probe import ProbeConfig, extract_features, train_probe_on_features
    train = extract_features(tok.encode_features, train_stream, device)
    val = extract_features(tok.encode_features, eval_stream, device)
    result = train_probe_on_features(train, val, num_classes=1000, cfg=ProbeConfig(epochs=90))

:func:`logistic_probe` is the quick check: multinomial logistic regression by full-batch L-BFGS on standardised
cached features, seconds instead of 90 epochs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)


@dataclass
class ProbeConfig:
    epochs: int = 90
    warmup_epochs: int = 10
    base_lr: float = 0.1  # scaled by global batch / 256
    batch_size: int = 256  # per rank
    weight_decay: float = 0.0
    momentum: float = 0.9
    seed: int = 0

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(
                f"probe.epochs and probe.batch_size must be >= 1, got {self.epochs}, {self.batch_size}"
            )
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise ValueError(
                f"probe.warmup_epochs must be in 0..epochs={self.epochs}, got {self.warmup_epochs}"
            )
        if self.base_lr <= 0:
            raise ValueError(f"probe.base_lr must be > 0, got {self.base_lr}")


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling (You et al. 2017) with momentum, as MAE's probes use it.

    For weight matrices the step is scaled by trust = eta * ||w|| / ||g + wd w||; biases and other 1-d
    parameters get plain momentum SGD without weight decay."""

    def __init__(
        self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.001
    ):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:
                    update = update.add(p, alpha=group["weight_decay"])
                    w_norm, u_norm = torch.norm(p), torch.norm(update)
                    trust = torch.where(
                        (w_norm > 0) & (u_norm > 0), group["eta"] * w_norm / u_norm, torch.ones_like(w_norm)
                    )
                    update = update * trust
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(update)
                p.add_(mu, alpha=-group["lr"])


class LinearProbe(nn.Module):
    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x))


def probe_lr(step: int, total_steps: int, warmup_steps: int, peak_lr: float) -> float:
    """Linear warmup to peak_lr, then a half cosine to 0."""
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class FeatureSet:
    features: torch.Tensor  # (N, D) float32, this rank's share
    labels: torch.Tensor  # (N,) int64


@torch.no_grad()
def extract_features(
    features_fn: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable,
    device,
    progress: bool = False,
    image_shape: tuple[int, int, int] | None = None,
) -> FeatureSet:
    """Frozen features of everything a stream yields on this rank ((images, labels[, keys]) batches), on CPU.
    Collective under torch.distributed: ranks make the same number of ``features_fn`` calls."""
    feats, labels = [], []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc="probe features", unit="img")
    from tokscale.evaluation.lockstep import lockstep

    shape = tuple(image_shape) if image_shape else None
    for batch in lockstep(batches, device):
        if batch is None:  # peers still encode: match their forward passes (ZeRO-3 gathers inside forward)
            if shape is None:
                raise ValueError(
                    "a rank with no probe images needs image_shape=(3, H, W) for its matching passes"
                )
            features_fn(torch.zeros(1, *shape, device=device))
            continue
        images, y = batch[0], batch[1]
        shape = shape or tuple(images.shape[1:])
        f = features_fn(images.to(device))
        feats.append(f.float().reshape(f.shape[0], -1).cpu())
        labels.append(y.long().cpu())
        if bar is not None:
            bar.update(images.shape[0])
    if bar is not None:
        bar.close()
    if not feats:
        return FeatureSet(torch.zeros(0, 0), torch.zeros(0, dtype=torch.long))
    return FeatureSet(torch.cat(feats), torch.cat(labels))


def _world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In place for tensors already on the backend's device; CPU bookkeeping tensors make a round trip to the
    GPU under NCCL (which reduces only CUDA tensors). Use the return value."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return t
    if dist.get_backend() == "nccl" and not t.is_cuda:
        moved = t.cuda()
        dist.all_reduce(moved, op=op)
        t.copy_(moved.cpu())
        return t
    dist.all_reduce(t, op=op)
    return t


def _feature_dim(local: FeatureSet) -> int:
    """The feature width, known even on a rank whose share is empty."""
    d = local.features.shape[1] if local.features.numel() else 0
    return int(_all_reduce(torch.tensor([d]), dist.ReduceOp.MAX).item())


@torch.no_grad()
def probe_accuracy(model: nn.Module, data: FeatureSet, device, batch_size: int = 1024) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) over every rank's share. Collective."""
    model.eval()
    counts = torch.zeros(3, dtype=torch.float64)
    for start in range(0, data.features.shape[0], batch_size):
        x = data.features[start : start + batch_size].to(device)
        y = data.labels[start : start + batch_size].to(device)
        logits = model(x)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        counts[0] += (top[:, 0] == y).sum().item()
        counts[1] += (top == y[:, None]).any(1).sum().item()
        counts[2] += y.shape[0]
    _all_reduce(counts)
    n = max(counts[2].item(), 1.0)
    return {
        "top1": 100.0 * counts[0].item() / n,
        "top5": 100.0 * counts[1].item() / n,
        "num_eval": int(counts[2]),
    }


def train_probe_on_features(
    train: FeatureSet,
    val: FeatureSet,
    num_classes: int,
    cfg: ProbeConfig,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict[str, float]:
    """MAE-protocol linear probe on this rank's share of cached features; collective when distributed.
    Returns top-1/top-5 on ``val`` after the last epoch, the learning rate used and the sample counts."""
    rank, world = _world()
    dim = _feature_dim(train)
    model = LinearProbe(dim, num_classes).to(device)
    if world > 1:  # every rank starts from rank 0's initialisation
        for p in model.parameters():
            dist.broadcast(p.data, src=0)
    global_batch = cfg.batch_size * world
    peak_lr = cfg.base_lr * global_batch / 256
    opt = LARS(model.parameters(), lr=peak_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    # Lockstep: every rank takes the same number of steps per epoch (the smallest share decides; a rank never
    # waits in an all_reduce its peers will not make).
    local_steps = (
        max(1, math.ceil(train.features.shape[0] / cfg.batch_size)) if train.features.shape[0] else 0
    )
    steps_per_epoch = int(_all_reduce(torch.tensor([local_steps]), dist.ReduceOp.MIN).item())
    if steps_per_epoch == 0:
        raise ValueError("the probe's training set is empty on at least one rank")
    total, warmup = steps_per_epoch * cfg.epochs, steps_per_epoch * cfg.warmup_epochs
    gen = torch.Generator().manual_seed(cfg.seed + rank)
    loss_fn = nn.CrossEntropyLoss()
    step = 0
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(desc="linear probe", unit="epoch", total=cfg.epochs)
    for _ in range(cfg.epochs):
        model.train()
        order = torch.randperm(train.features.shape[0], generator=gen)
        for i in range(steps_per_epoch):
            idx = order[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            x, y = train.features[idx].to(device), train.labels[idx].to(device)
            for g in opt.param_groups:
                g["lr"] = probe_lr(step, total, warmup, peak_lr)
            loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=False)
            loss.backward()
            if world > 1:
                for p in model.parameters():
                    _all_reduce(p.grad).div_(world)
            opt.step()
            step += 1
        if world > 1:  # BatchNorm statistics are per rank during the epoch; evaluate with their mean
            for buf in (model.norm.running_mean, model.norm.running_var):
                _all_reduce(buf).div_(world)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=float(loss.detach()))
    if bar is not None:
        bar.close()
    out = probe_accuracy(model, val, device)
    n_train = int(_all_reduce(torch.tensor([train.features.shape[0]])).item())
    return {**out, "num_train": n_train, "lr": peak_lr, "global_batch": global_batch, "epochs": cfg.epochs}


def train_linear_probe(
    features_fn: Callable[[torch.Tensor], torch.Tensor],
    train_batches: Iterable,
    eval_batches: Iterable,
    num_classes: int,
    cfg: ProbeConfig,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict[str, float]:
    """Features of both streams (each rank its share), then :func:`train_probe_on_features`."""
    train = extract_features(features_fn, train_batches, device, progress)
    val = extract_features(features_fn, eval_batches, device, progress)
    return train_probe_on_features(train, val, num_classes, cfg, device, progress)


def gather_features(local: FeatureSet) -> FeatureSet:
    """Every rank's share on every rank (for the quick logistic probe on small sets). Collective."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return local
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (local.features, local.labels))
    return FeatureSet(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))


def logistic_probe(
    train: FeatureSet, val: FeatureSet, num_classes: int, l2: float = 1e-4, max_iter: int = 200
) -> dict[str, float]:
    """Multinomial logistic regression by full-batch L-BFGS on standardised features (float64); a quick check,
    not the published protocol. Runs locally on the features it is given."""
    x = train.features.double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    x = (x - mean) / std
    y = train.labels
    w = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(x @ w + b, y) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        logits = ((val.features.double() - mean) / std) @ w + b
        top = logits.topk(min(5, num_classes), dim=1).indices
        yv = val.labels
        n = max(yv.shape[0], 1)
        return {
            "top1": 100.0 * (top[:, 0] == yv).sum().item() / n,
            "top5": 100.0 * (top == yv[:, None]).any(1).sum().item() / n,
            "num_train": int(y.shape[0]),
            "num_eval": int(yv.shape[0]),
        }
