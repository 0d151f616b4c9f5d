"""Faults during a checkpoint save, made deterministic: the process ends at each point of a save (TOKSCALE_FAULT,
read by tokscale.checkpoint) at one and two ranks, and a full disk (a small tmpfs under the run directory). In
every case the rerun of the same command resumes from the newest complete checkpoint and ends with the same
weights as an uninterrupted run. Real processes; the toy task keeps each run to seconds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from cli_run import tokscale  # noqa: E402

from tokscale.checkpoint import FAULT_ENV, FAULT_EXIT_CODE, FAULT_POINTS, complete_checkpoints
from tokscale.export import state_dict_from


def run_toy(run_dir: Path, nproc: int = 1, fault: str = "", extra=()) -> subprocess.CompletedProcess:
    cfg = run_dir.parent / f"{run_dir.name}.yaml"
    cfg.write_text(f"run_dir: {run_dir}\ntrain:\n  max_steps: 6\n  ckpt_every: 2\n  keep_last: 1\n")
    args = ["train", "toy", str(cfg), *extra] + (["--nproc", str(nproc)] if nproc > 1 else [])
    return tokscale(*args, **{FAULT_ENV: fault})  # an empty TOKSCALE_FAULT is no fault


def weights_equal(a: Path, b: Path) -> bool:
    x, y = state_dict_from(a), state_dict_from(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted runs at one and two ranks."""
    base = tmp_path_factory.mktemp("ref")
    runs = {}
    for nproc in (1, 2):
        out = run_toy(base / f"w{nproc}", nproc)
        assert out.returncode == 0, out.stderr[-3000:]
        runs[nproc] = base / f"w{nproc}"
    return runs


# the newest complete checkpoint after a fault in the save of step 4 (step 2 saved before it; keep_last=1)
RESUME_STEP = {point: 2 for point in FAULT_POINTS} | {"pruning": 4}


# Every point at two ranks (rank files, barriers and the rename all in play); at one rank the truncated engine file
# and the moment before the rename, the two ways a single process leaves a partial save (CI time is bounded).
CASES = [(point, 2) for point in FAULT_POINTS] + [("engine_half", 1), ("before_rename", 1)]


@pytest.mark.slow
@pytest.mark.parametrize("point, nproc", CASES)
def test_a_process_ended_at_any_point_of_a_save_resumes_from_the_newest_complete_checkpoint(
    reference, tmp_path, point, nproc
):
    run_dir = tmp_path / "run"
    crashed = run_toy(run_dir, nproc, fault=f"{point}@4")
    assert crashed.returncode != 0
    if nproc == 1:
        assert crashed.returncode == FAULT_EXIT_CODE
    assert [s for s, _ in complete_checkpoints(run_dir)] == [RESUME_STEP[point]]
    rerun = run_toy(run_dir, nproc)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"at step {RESUME_STEP[point]}" in rerun.stderr  # "resumed from ... at step N"
    assert [s for s, _ in complete_checkpoints(run_dir)] == [6]
    assert not [p for p in (run_dir / "ckpt").iterdir() if p.name.startswith(".tmp_")]
    assert weights_equal(run_dir, reference[nproc])


def test_a_bad_fault_spec_is_an_error_naming_the_points(tmp_path):
    out = run_toy(tmp_path / "run", fault="nowhere@4")
    assert out.returncode != 0 and "TOKSCALE_FAULT" in out.stderr and "engine_half" in out.stderr


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs mounted at RUN_DIR/ckpt; its size is changed with remount(kib)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    run_dir = tmp_path / "run"
    mount = run_dir / "ckpt"
    mount.mkdir(parents=True)

    def remount(kib: int, first: bool = False) -> None:
        opts = f"size={kib}k" if first else f"remount,size={kib}k"
        out = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(mount)], capture_output=True)
        if out.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {out.stderr.decode().strip()}")

    remount(48, first=True)
    yield run_dir, remount
    subprocess.run(["umount", str(mount)], capture_output=True)


def test_a_full_disk_is_refused_before_the_save_naming_the_intact_checkpoint_and_the_rerun_resumes(
    reference, small_disk
):
    run_dir, remount = small_disk  # 48 KiB: one toy checkpoint (~30 KB) fits, a second does not
    out = run_toy(run_dir)
    assert out.returncode == 2, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("tokscale: error:")]
    assert len(errors) == 1 and "cannot save the checkpoint of step 4" in errors[0]
    assert "step_00000002 is intact" in errors[0] and "rerun the same command" in errors[0]
    assert [s for s, _ in complete_checkpoints(run_dir)] == [2]
    assert state_dict_from(run_dir)["weight"].shape == (1, 4)  # the previous checkpoint loads
    remount(256)  # space freed
    rerun = run_toy(run_dir)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "at step 2" in rerun.stderr and weights_equal(run_dir, reference[1])


def test_a_disk_that_fills_during_the_first_save_is_a_clear_error_and_leaves_no_partial_folder(small_disk):
    run_dir, remount = small_disk
    remount(12)  # less than one checkpoint: the write itself fails
    out = run_toy(run_dir)
    assert out.returncode == 2, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("tokscale: error:")]
    assert len(errors) == 1 and "cannot save the checkpoint of step 2" in errors[0], out.stderr[-2000:]
    assert "no complete checkpoint exists yet" in errors[0]
    assert list((run_dir / "ckpt").iterdir()) == []
    remount(256)
    rerun = run_toy(run_dir)
    assert rerun.returncode == 0 and json.loads(rerun.stdout.splitlines()[-1])["step"] == 6
