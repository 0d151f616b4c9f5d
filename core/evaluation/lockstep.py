"""Helpers that keep ranks in step during evaluation (every rank makes the same number of forward passes).

for batch in lockstep(stream, device):
    if batch is None:        # this rank ran out; a peer has not: run a dummy pass
        ...
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist


def split_batch(batch) -> tuple[torch.Tensor, list[str] | None]:
    """Images and (when present) sample keys from what a stream or loader yields: a tensor, (images, labels)
    or EvalStream's (images, labels, keys)."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, dict):
        return batch["images"], batch.get("keys")
    images = batch[0]
    keys = batch[2] if len(batch) > 2 else None
    return images, keys


def batch_indices(batch) -> torch.Tensor | None:
    """The samples' global dataset indices when the batch carries them (EvalStream's 4th element)."""
    if isinstance(batch, dict):
        return batch.get("indices")
    if isinstance(batch, (tuple, list)) and len(batch) > 3:
        return batch[3]
    return None


def lockstep(batches: Iterable, device) -> Iterator:
    """The batches, then ``None`` until every rank has run out; ends on all ranks together.

    A ZeRO-3 module gathers its parameters with collectives inside forward, so every rank must make the same
    number of forward passes even when the stream gives ranks different batch counts (uneven shares, loader
    workers): an exhausted rank runs a dummy pass for each batch a peer still has. Costs one tiny all_reduce
    per batch; without a process group it is the plain iterator."""
    it = iter(batches)
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    while True:
        batch = next(it, None)
        if distributed:
            active = torch.tensor([0 if batch is None else 1], device=device)
            dist.all_reduce(active)
            if int(active.item()) == 0:
                return
        elif batch is None:
            return
        yield batch
