"""torch.distributed setup from the standard environment variables.

Training reads only RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT, so ``python -m``, torchrun,
the deepspeed launcher, ``tokscale train --nproc N`` and Slurm jobs (jobs/ exports them) all reach the same main().
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> DistInfo:
    """Initialise the default process group (gloo on CPU, nccl on GPU) once; a single process gets a
    world of one so DeepSpeed and the collectives below work unchanged."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available()
    # A cluster that binds one GPU per task shows each rank a single device: use it whatever LOCAL_RANK says.
    gpu = local_rank if use_cuda and torch.cuda.device_count() > 1 else 0
    device = torch.device("cuda", gpu) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        if world == 1 and "MASTER_PORT" not in os.environ:
            os.environ.setdefault("RANK", "0")
            os.environ.setdefault("WORLD_SIZE", "1")
            os.environ.setdefault("LOCAL_RANK", "0")
            # The rendezvous address goes to torch directly, not into the environment: a process started later
            # from this one (a `tokscale` subprocess, a launcher) must not inherit a port this process holds.
            dist.init_process_group(
                backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
            )
            return DistInfo(rank, world, local_rank, device)
        for key in ("MASTER_ADDR", "MASTER_PORT"):
            if key not in os.environ:
                raise ValueError(
                    f"WORLD_SIZE={world} but {key} is not set; launch with torchrun, --nproc or Slurm"
                )
        dist.init_process_group(backend, rank=rank, world_size=world)
    return DistInfo(rank, world, local_rank, device)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Mean of scalar metrics over ranks (one collective for the whole dict)."""
    if not values:
        return {}
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


_HOST_GROUPS: dict[int, object] = {}


def host_group():
    """A gloo process group over every rank, for collectives on host values when the default group is NCCL (None
    when the default group already is gloo). Made on first use, which every rank reaches at the same collective."""
    if dist.get_backend() == "gloo":
        return None
    key = id(dist.distributed_c10d._get_default_group())
    if key not in _HOST_GROUPS:
        _HOST_GROUPS.clear()  # a group of an earlier default group (destroyed since) is never used again
        _HOST_GROUPS[key] = dist.new_group(backend="gloo")
    return _HOST_GROUPS[key]


def any_rank(flag: bool) -> bool:
    """True on every rank when it is True on at least one (e.g. a stop request seen by one process).

    Host-side only: a world of one returns the flag as it is, and several ranks reduce a CPU tensor (over a gloo
    group next to an NCCL one), so that a check made every training step never waits for the GPU's queue."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=host_group())
    return bool(t.item() > 0)
