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

import errno
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


FAULT_ENV = "TOKSCALE_FAULT"
FAULT_POINTS = ("tmp_made", "engine_half", "engine_written", "complete_written", "before_rename", "pruning")
FAULT_EXIT_CODE = 137  # what a SIGKILL gives


class CheckpointSpaceError(ValueError):
    """A checkpoint that cannot be written for lack of disk space; the message names the last complete one."""


def fault_point(point: str, step: int, rank: int, path: Path | None = None) -> None:
    """Test hook: ``TOKSCALE_FAULT=POINT[@STEP][:RANK]`` ends this process at once (as a SIGKILL would, no
    cleanup) when a save reaches POINT (one of FAULT_POINTS), at that step and rank only when given.
    ``engine_half`` first truncates the engine's largest file to half its size, as a crash mid-write leaves it."""
    spec = os.environ.get(FAULT_ENV, "")
    if not spec:
        return
    where, _, only_rank = spec.partition(":")
    name, _, at_step = where.partition("@")
    if name not in FAULT_POINTS:
        raise ValueError(
            f"{FAULT_ENV}={spec!r}: expected POINT[@STEP][:RANK] with POINT one of {FAULT_POINTS}"
        )
    if name != point or (at_step and int(at_step) != step) or (only_rank and int(only_rank) != rank):
        return
    if point == "engine_half" and path is not None:
        files = sorted((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
        if files:
            with open(files[-1], "r+b") as f:
                f.truncate(files[-1].stat().st_size // 2)
    log.warning("%s: ending the process at %s (step %d, rank %d)", FAULT_ENV, point, step, rank)
    os._exit(FAULT_EXIT_CODE)


def checkpoint_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _is_no_space(err: BaseException) -> bool:
    text = str(err)
    return (isinstance(err, OSError) and err.errno == errno.ENOSPC) or (
        "No space left" in text or "unexpected pos" in text or "file write failed" in text
    )


def _space_message(root: Path, step: int, free: int | None, need: int | None, last: Path | None) -> str:
    where = f"{root} has {free / 2**20:.1f} MiB free" if free is not None else f"{root} ran out of space"
    size = f" and the last checkpoint took {need / 2**20:.1f} MiB" if need is not None else ""
    keep = (
        f"the last complete checkpoint {last} is intact; free space (or lower train.keep_last) and rerun the same "
        "command to resume from it"
        if last is not None
        else "no complete checkpoint exists yet; free space and rerun the same command"
    )
    return f"cannot save the checkpoint of step {step}: {where}{size}; {keep}"


def remove_stale_temporaries(run_dir: str | Path) -> list[Path]:
    """Rank 0 at start: ``.tmp_*`` folders under ckpt/ are saves or prunes that a crash interrupted; they are
    incomplete by construction (a save is renamed into place only when complete), so they go."""
    root = ckpt_root(run_dir)
    stale = sorted(p for p in root.iterdir() if p.name.startswith(".tmp_")) if root.is_dir() else []
    for p in stale:
        if p.name.startswith(".tmp_replaced_"):  # a complete checkpoint set aside for a same-step save
            original = p.with_name(p.name[len(".tmp_replaced_") :])
            if not original.exists() and (p / "COMPLETE").is_file():
                os.replace(p, original)
                log.info("restored %s, set aside by an interrupted save", original)
                continue
        shutil.rmtree(p, ignore_errors=True)
        log.info("removed %s, left by an interrupted save", p)
    return stale


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
    """Collective: every rank calls it. Returns the final checkpoint path.

    Refuses (:class:`CheckpointSpaceError`, on every rank) when the free space is below the size of the last
    complete checkpoint, and turns a disk that fills during the save into the same error; either way the last
    complete checkpoint is untouched and the partial folder is removed."""
    from tokscale.distributed import any_rank

    root = ckpt_root(run_dir)
    final = step_dir(run_dir, step)
    tmp = final.with_name(".tmp_" + final.name)
    last = latest_checkpoint(run_dir)
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
    barrier()
    need = checkpoint_bytes(last[1]) if last is not None else None
    free = shutil.disk_usage(root).free
    if any_rank(need is not None and free < need):
        raise CheckpointSpaceError(_space_message(root, step, free, need, last[1] if last else None))
    failure: BaseException | None = None
    try:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # a previous attempt that died mid-save
            tmp.mkdir(parents=True)
        barrier()
        fault_point("tmp_made", step, rank)
        engine.save_checkpoint(str(tmp), tag="engine", client_state={"step": step})
        fault_point("engine_half", step, rank, tmp / "engine")
        fault_point("engine_written", step, rank)
        torch.save(rank_state, tmp / f"rank_{rank:05d}.pt")
        if rank == 0:
            torch.save(trainer_state, tmp / "trainer.pt")
    except (OSError, RuntimeError) as err:
        if not _is_no_space(err):
            raise
        failure = err
    if any_rank(failure is not None):  # every rank leaves together, none waits in a barrier
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        message = _space_message(root, step, shutil.disk_usage(root).free, need, last[1] if last else None)
        raise CheckpointSpaceError(message) from failure
    if rank == 0:
        with open(tmp / "COMPLETE", "w") as f:
            json.dump({"step": step, "world_size": world_size}, f)
            f.flush()
            os.fsync(f.fileno())
        fault_point("complete_written", step, rank)
        old = None
        if final.exists():  # same step saved again (a stop right after a cadence save): set it aside first
            old = final.with_name(".tmp_replaced_" + final.name)
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        fault_point("before_rename", step, rank)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        prune(run_dir, keep_last, step)
        log.info("saved checkpoint %s", final)
    barrier()
    return final


def prune(run_dir: str | Path, keep_last: int, step: int = 0) -> None:
    """Remove all but the newest ``keep_last`` complete checkpoints. Each is first renamed out of the way (one
    atomic step), so a crash mid-removal leaves a ``.tmp_`` folder, never a half-deleted checkpoint."""
    if keep_last <= 0:
        return
    for _, path in complete_checkpoints(run_dir)[:-keep_last]:
        doomed = path.with_name(".tmp_pruned_" + path.name)
        os.replace(path, doomed)
        fault_point("pruning", step, 0, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


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
