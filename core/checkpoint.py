"""Atomic, resumable training checkpoints shared by the trainers.

Layout: ``run_dir/ckpt/step_XXXXXXXX/`` holding

- ``engine/``: the DeepSpeed engine's own checkpoint (model, optimizer and scheduler, ZeRO shards);
- ``rank_XXXXX.pt``: that rank's RNG states, data-stream position and the task's per-rank state;
- ``trainer.pt``: rank-0 extras (step, the task's side states by name, e.g. a discriminator and its optimizer,
  and the config);
- ``COMPLETE``: written last, a JSON line with the step and world size.

A checkpoint is written under ``.tmp_step_XXXXXXXX`` and renamed only after every rank finished and COMPLETE
exists, so a crash or preemption mid-save leaves the previous checkpoint untouched and the newest complete one is
always the resume point. Rename is atomic on a POSIX file system (and on the shared file systems clusters use).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from tokscale.distributed import barrier

log = logging.getLogger(__name__)

STEP_RE = re.compile(r"^step_(\d{8})$")
UNIVERSAL = "universal"  # the world-size-independent copy of an engine checkpoint, beside engine/


def ckpt_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "ckpt"


def step_dir(run_dir: str | Path, step: int) -> Path:
    return ckpt_root(run_dir) / f"step_{step:08d}"


def complete_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first."""
    root = ckpt_root(run_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_RE.match(p.name)
        if m and (p / "COMPLETE").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> tuple[int, Path] | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    engine,
    run_dir: str | Path,
    step: int,
    rank: int,
    world_size: int,
    rank_state: dict,
    trainer_state: dict,
    keep_last: int,
) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint path."""
    final = step_dir(run_dir, step)
    tmp = final.with_name(".tmp_" + final.name)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a previous attempt that died mid-save
        tmp.mkdir(parents=True)
    barrier()
    engine.save_checkpoint(str(tmp), tag="engine", client_state={"step": step})
    torch.save(rank_state, tmp / f"rank_{rank:05d}.pt")
    if rank == 0:
        torch.save(trainer_state, tmp / "trainer.pt")
    barrier()
    if rank == 0:
        with open(tmp / "COMPLETE", "w") as f:
            json.dump({"step": step, "world_size": world_size}, f)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # same step saved again (e.g. a stop right after a cadence save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        prune(run_dir, keep_last)
        log.info("saved checkpoint %s", final)
    barrier()
    return final


def prune(run_dir: str | Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    for _, path in complete_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


def saved_world_size(path: Path) -> int:
    return int(json.loads((path / "COMPLETE").read_text())["world_size"])


def needs_universal(path: Path, world_size: int, zero_stage: int, bf16: bool) -> bool:
    """ZeRO partitions optimizer state by rank: another world size loads through a universal checkpoint."""
    return saved_world_size(path) != world_size and (zero_stage > 0 or bf16)


def prepare_universal(path: Path, rank: int) -> None:
    """Collective: rank 0 converts the engine checkpoint to DeepSpeed's world-size-independent universal format
    (once; kept beside it as ``universal/``), written under a temporary name and renamed when complete."""
    target = path / UNIVERSAL
    if rank == 0 and not target.is_dir():
        import subprocess
        import sys

        tmp = path / (".tmp_" + UNIVERSAL)
        shutil.rmtree(tmp, ignore_errors=True)
        log.info("converting %s to a universal checkpoint for a new world size", path)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "deepspeed.checkpoint.ds_to_universal",
                "--input_folder",
                str(path / "engine"),
                "--output_folder",
                str(tmp),
                "--inject_missing_state",
            ],
            check=True,
            capture_output=True,
        )
        os.replace(tmp, target)
    barrier()



def load_checkpoint(
    engine, path: Path, rank: int, world_size: int, universal: bool = False
) -> tuple[dict, dict | None]:
    """Load engine state; return (trainer_state, this rank's state: RNG and data position; without RNG when the
    world size changed).
    ``universal``: the engine was built with checkpoint.load_universal and prepare_universal() ran."""
    same_world = saved_world_size(path) == world_size
    load_path, _ = engine.load_checkpoint(
        str(path),
        tag=UNIVERSAL if universal else "engine",
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
        load_module_strict=True,
    )
    if load_path is None:
        raise FileNotFoundError(f"{path}/engine: DeepSpeed found no checkpoint to load")
    trainer_state = torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)
    if same_world:
        rank_state = torch.load(path / f"rank_{rank:05d}.pt", map_location="cpu", weights_only=False)
    else:
        # Another world size: RNG streams restart; the data position (batches consumed, equal on every rank)
        # carries over from rank 0 and the stream continues in its new layout.
        rank_state = {
            "data": torch.load(path / "rank_00000.pt", map_location="cpu", weights_only=False)["data"]
        }
    return trainer_state, rank_state


def consolidated_state_dict(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """fp32 model weights from one checkpoint directory, whatever the ZeRO stage and world size it was saved at."""
    engine_dir = Path(ckpt_dir) / "engine"
    if any(engine_dir.glob("*optim_states.pt")) and any(engine_dir.glob("zero_pp_rank_*")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag="engine")
    else:  # plain data parallel (stage 0): the module states hold the weights
        files = sorted(engine_dir.glob("mp_rank_*_model_states.pt"))
        if not files:
            raise FileNotFoundError(f"{engine_dir}: no DeepSpeed model states found")
        state = torch.load(files[0], map_location="cpu", weights_only=False)["module"]
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
