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

:func:`train_probe_online` is the protocol with training augmentation (GigaTok's AR probe): the features of an
augmented image change every epoch, so they are recomputed every epoch from ``train_batches(view)`` (or
``views`` augmented copies are computed once and cycled). It is independent of the rank count: each step's global
batch is drawn from one permutation of every rank's sample indices seeded by (seed, epoch), each rank
contributes the members it holds, the BatchNorm statistics are those of the whole global batch (summed across
ranks) and the gradients are summed, so N ranks compute what one process computes, up to the order of
floating-point sums.

    result = train_probe_online(features_fn, lambda view: stream_of(view), val, 1000, ProbeConfig(epochs=90))
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
    indices: torch.Tensor | None = None  # (N,) int64 global sample indices, when the stream carries them


@torch.no_grad()
def extract_features(
    features_fn: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable,
    device,
    progress: bool = False,
    image_shape: tuple[int, int, int] | None = None,
    desc: str = "probe features",
    total: int | None = None,
    leave: bool = True,
) -> FeatureSet:
    """Frozen features of everything a stream yields on this rank ((images, labels[, keys[, indices]])
    batches), on CPU, with the samples' global indices when every batch carries them (EvalStream's 4th element).
    Collective under torch.distributed: ranks make the same number of ``features_fn`` calls."""
    feats, labels, indices = [], [], []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc=desc, unit="img", total=total, leave=leave)
    from tokscale.evaluation.lockstep import batch_indices, lockstep

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
        ids = batch_indices(batch)
        indices.append(None if ids is None else torch.as_tensor(ids, dtype=torch.long).cpu())
        if bar is not None:
            bar.update(images.shape[0])
    if bar is not None:
        bar.close()
    if not feats:
        return FeatureSet(
            torch.zeros(0, 0), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
        )
    ids = torch.cat(indices) if all(i is not None for i in indices) else None
    return FeatureSet(torch.cat(feats), torch.cat(labels), ids)


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


def _sample_ids(local: FeatureSet) -> torch.Tensor:
    """This rank's samples' global ids: the stream's indices when every rank's stream gave them, else positions
    in rank order (rank 0's samples first). Collective."""
    rank, world = _world()
    n = local.labels.shape[0]
    has = int(_all_reduce(torch.tensor([int(local.indices is not None)]), dist.ReduceOp.MIN).item())
    if has:
        return local.indices.long()
    counts = torch.zeros(world, dtype=torch.long)
    counts[rank] = n
    start = int(_all_reduce(counts)[:rank].sum())
    return torch.arange(start, start + n)


def _every_id(local_ids: torch.Tensor) -> torch.Tensor:
    """Every rank's sample ids, sorted (the same tensor on every rank). Collective."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, local_ids.cpu())
        ids = torch.cat(parts)
    else:
        ids = local_ids.cpu()
    ids = ids.sort().values
    if ids.numel() and bool((ids[1:] == ids[:-1]).any()):
        raise ValueError("two probe samples carry the same global index: the ranks' shares overlap")
    return ids


def epoch_order(ids: torch.Tensor, seed: int, epoch: int) -> torch.Tensor:
    """The epoch's order of the (sorted) global sample ids: a permutation seeded by (seed, epoch) alone."""
    import numpy as np

    mixed = int(np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return ids[torch.randperm(ids.numel(), generator=torch.Generator().manual_seed(mixed))]


def global_batch_step(
    model: LinearProbe, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, n: int, lr: float
) -> float:
    """One optimizer step on a global batch of ``n`` samples of which this rank holds ``(x, y)`` (possibly none);
    returns the batch's mean loss. Collective: the same on every rank, and the same as one process holding all n.

    The BatchNorm statistics are the global batch's (sums in float64 across ranks): its output is normalised
    with the biased variance and its running statistics move as nn.BatchNorm1d's would (momentum, unbiased
    variance). The norm has no parameters and the features no gradient, so the statistics need no backward.
    The head's gradients are the global batch's mean: local sums over n, summed across ranks."""
    norm = model.norm
    d = norm.num_features
    x64 = x.double().reshape(-1, d)
    stats = torch.cat([x64.sum(0), x64.pow(2).sum(0)])
    _all_reduce(stats)
    mean = stats[:d] / n
    var = (stats[d:] / n - mean.pow(2)).clamp_min(0.0)
    with torch.no_grad():
        m = norm.momentum
        norm.running_mean.mul_(1 - m).add_(mean.to(norm.running_mean.dtype), alpha=m)
        norm.running_var.mul_(1 - m).add_((var * n / max(n - 1, 1)).to(norm.running_var.dtype), alpha=m)
        norm.num_batches_tracked.add_(1)
    normed = ((x64 - mean) * torch.rsqrt(var + norm.eps)).float()
    loss_sum = nn.functional.cross_entropy(model.head(normed), y, reduction="sum")
    opt.zero_grad(set_to_none=False)
    (loss_sum / n).backward()
    params = list(model.parameters())
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params] + [loss_sum.detach().reshape(1)])
    _all_reduce(flat)
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
        offset += p.numel()
    for g in opt.param_groups:
        g["lr"] = lr
    opt.step()
    return float(flat[-1]) / n


def _new_probe(dim: int, num_classes: int, seed: int, device) -> LinearProbe:
    """The probe's initialisation from ``seed`` alone (not from whatever used the global generator before),
    broadcast from rank 0 all the same."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LinearProbe(dim, num_classes)
    model = model.to(device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        for p in model.parameters():
            dist.broadcast(p.data, src=0)
    return model


def train_probe_online(
    features_fn: Callable[[torch.Tensor], torch.Tensor],
    train_batches: Callable[[int], Iterable],
    val: FeatureSet,
    num_classes: int,
    cfg: ProbeConfig,
    device: str | torch.device = "cpu",
    *,
    views: int = 0,
    progress: bool = False,
    image_shape: tuple[int, int, int] | None = None,
    samples_per_epoch: int | None = None,
    state: dict | None = None,
    save_state: Callable[[dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> dict:
    """The MAE-protocol probe on features recomputed from augmented images; collective when distributed.

    ``train_batches(view)`` gives this rank's share of the training set in augmentation ``view`` (batches with
    global indices, like EvalStream's, keep the result independent of the rank count). ``views=0``: view e in
    epoch e, every epoch freshly computed (the online protocol); ``views=K``: views 0..K-1 are computed once, kept
    in memory (K x this rank's share x D floats) and epoch e trains on view e mod K. An epoch's global batches
    (``cfg.batch_size`` x world size samples; the last incomplete one is dropped, as MAE's loader does) come
    from :func:`epoch_order`, and each is one :func:`global_batch_step`.

    ``num_classes=0``: the largest label of the training and validation sets + 1. ``state`` (from ``save_state``,
    which gets it after every epoch on every rank) resumes after the epoch it records; ``should_stop()`` is polled
    after every epoch (any rank's request stops all). Returns top-1/top-5 on ``val`` after the last epoch, the
    settings and the trained probe (``"probe"``, a LinearProbe) with ``status`` "finished", or
    ``{"status": "stopped", "epochs_done": e}``."""
    rank, world = _world()
    if views < 0:
        raise ValueError(f"views={views}: expected 0 (online) or a positive number of precomputed views")
    global_batch = cfg.batch_size * world
    peak_lr = cfg.base_lr * global_batch / 256
    device = torch.device(device)
    cache: dict[int, tuple[FeatureSet, torch.Tensor, torch.Tensor]] = {}

    def epoch_data(epoch: int):
        view = epoch if views == 0 else epoch % views
        if view in cache:
            return cache[view]
        local = extract_features(
            features_fn,
            train_batches(view),
            device,
            progress=progress and rank == 0,
            image_shape=image_shape,
            desc=f"epoch {epoch + 1}/{cfg.epochs} features",
            total=samples_per_epoch,
            leave=False,
        )
        ids = _sample_ids(local)
        entry = (local, ids, _every_id(ids))
        if views:
            cache[view] = entry
        return entry

    model = opt = None

    def build(dim: int, classes: int):
        probe = _new_probe(dim, classes, cfg.seed, device)
        return probe, LARS(
            probe.parameters(), lr=peak_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )

    start_epoch, step = 0, 0
    if state is not None:
        start_epoch, step = int(state["epoch"]), int(state["step"])
        model, opt = build(int(state["dim"]), int(state["num_classes"]))
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        num_classes = int(state["num_classes"])
        log.info("linear probe resumes after epoch %d (step %d)", start_epoch, step)
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(desc="linear probe", unit="epoch", total=cfg.epochs, initial=start_epoch)
    steps_per_epoch = 0
    for epoch in range(start_epoch, cfg.epochs):
        local, ids, every = epoch_data(epoch)
        if every.numel() == 0:
            raise ValueError("the probe's training set is empty")
        dim = _feature_dim(local)
        if model is None:
            if num_classes == 0:
                top = max([int(t.max()) for t in (local.labels, val.labels) if t.numel()], default=0)
                num_classes = int(_all_reduce(torch.tensor([top]), dist.ReduceOp.MAX).item()) + 1
            model, opt = build(dim, num_classes)
        elif dim != model.norm.num_features:
            raise ValueError(
                f"the features are {dim}-d; the probe being resumed is {model.norm.num_features}-d"
            )
        steps_per_epoch = max(1, every.numel() // global_batch)
        total, warmup = steps_per_epoch * cfg.epochs, steps_per_epoch * cfg.warmup_epochs
        feats = local.features if local.features.numel() else torch.zeros(0, dim)
        row_of = torch.full((int(every[-1]) + 1,), -1, dtype=torch.long)
        row_of[ids] = torch.arange(ids.numel())
        order = epoch_order(every, cfg.seed, epoch)
        model.train()
        loss_total = 0.0
        for i in range(steps_per_epoch):
            members = order[i * global_batch : (i + 1) * global_batch]
            rows = row_of[members]
            rows = rows[rows >= 0]
            x, y = feats[rows].to(device), local.labels[rows].to(device)
            lr = probe_lr(step, total, warmup, peak_lr)
            loss_total += global_batch_step(model, opt, x, y, members.numel(), lr)
            step += 1
        loss = loss_total / steps_per_epoch
        log.info("probe epoch %d/%d: loss %.4f, lr %.4g", epoch + 1, cfg.epochs, loss, lr)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=loss)
        if save_state is not None:
            save_state(
                {"epoch": epoch + 1, "step": step, "dim": dim, "num_classes": num_classes, "loss": loss,
                 "model": model.state_dict(), "optimizer": opt.state_dict()}
            )  # fmt: skip
        if should_stop is not None and epoch + 1 < cfg.epochs:
            flag = torch.tensor([1.0 if should_stop() else 0.0])
            if _all_reduce(flag, dist.ReduceOp.MAX).item() > 0:
                if bar is not None:
                    bar.close()
                return {"status": "stopped", "epochs_done": epoch + 1}
    if bar is not None:
        bar.close()
    if model is None:
        raise ValueError("the probe trained no epoch: probe.epochs must be >= 1")
    out = probe_accuracy(model, val, device)
    n_train = (
        int(_all_reduce(torch.tensor([local.labels.shape[0]])).item()) if start_epoch < cfg.epochs else None
    )
    return {
        "status": "finished",
        **out,
        "num_train": n_train,
        "num_classes": num_classes,
        "feature_dim": model.norm.num_features,
        "lr": peak_lr,
        "global_batch": global_batch,
        "steps_per_epoch": steps_per_epoch or None,
        "epochs": cfg.epochs,
        "probe": model,
    }


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
