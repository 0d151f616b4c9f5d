"""The tokenizer trainer under ZeRO 1-3 with two real processes over gloo."""

from pathlib import Path

import pytest
import torch
from tiny_run import losses

from tokscale.checkpoint import latest_checkpoint
from tokscale.export import export, state_dict_from
from tokscale.jobs.local import launch_local
from tokscale.tokenizers.load import load_tokenizer

WORKER = str(Path(__file__).with_name("tiny_run.py"))


def run(nproc: int, run_dir: Path, shards: str, stop_after: int, *overrides: str) -> None:
    assert launch_local(nproc, [WORKER, str(run_dir), shards, str(stop_after), *overrides]) == 0


@pytest.mark.slow
# Stage 2 on two ranks is covered by test_a_two_rank_zero2_run_resumes_on_one_rank below and by the two-node
# Slurm job (tests/jobs/test_slurm_tokenizer.py); here the two ends, 1 and 3 (the CI's time budget).
@pytest.mark.parametrize("stage", [1, 3])
def test_zero_stage_on_two_ranks_resumes_exactly_and_exports(stage, tmp_path, image_shards):
    opts = (f"train.zero_stage={stage}", "train.precision=bf16", "train.max_steps=4", "train.ckpt_every=2")
    full, split = tmp_path / "full", tmp_path / "split"
    run(2, full, image_shards, 0, *opts)
    run(2, split, image_shards, 3, *opts)  # interrupted after 3 steps: saves step 3 and stops
    assert latest_checkpoint(split)[0] == 3
    run(2, split, image_shards, 0, *opts)  # the same command resumes and finishes
    assert losses(split) == pytest.approx(losses(full), rel=1e-6)
    a, b = state_dict_from(split), state_dict_from(full)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    tok = load_tokenizer(export(split, tmp_path / "export"))
    assert tok.encode(torch.zeros(1, 3, 32, 32)).shape == (1, 4)


@pytest.mark.slow
def test_a_two_rank_zero2_run_resumes_on_one_rank(tmp_path, image_shards):
    opts = ("train.zero_stage=2", "train.max_steps=4")
    run(2, tmp_path / "run", image_shards, 2, *opts)
    assert latest_checkpoint(tmp_path / "run")[0] == 2
    run(1, tmp_path / "run", image_shards, 0, *opts)
    assert latest_checkpoint(tmp_path / "run")[0] == 4
    assert sorted(losses(tmp_path / "run")) == [1, 2, 3, 4]
