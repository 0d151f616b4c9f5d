"""Training runs of the DetailFlow tokenizer (conf/tokenizer/detailflow-tiny, made smaller): a run stopped and
resumed ends with the same losses, prefix plans and weights as an uninterrupted one; two gloo ranks under ZeRO-3
draw the same plan at every step and resume exactly after a crash mid-save; and it trains as a two-node Slurm
job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_run import StopAfter

from tokscale.checkpoint import latest_checkpoint
from tokscale.export import state_dict_from
from tokscale.tokenizers.detailflow import admissible_lengths, decoder_size
from tokscale.tokenizers.train import load_train_config, main

CONFIG = "tokenizer/detailflow-tiny"


def tiny(run_dir, shards: str, *extra: str) -> list[str]:
    """detailflow-tiny at its 64 px and 32 tokens, one-layer transformers, batch 2, prefixes on half the steps."""
    return [
        f"run_dir={run_dir}",
        f"data.train_shards={shards}",
        f"data.eval_shards={shards}",
        "data.batch_size=2",
        "data.num_workers=0",
        "data.shuffle_buffer=8",
        "data.batches_per_epoch=4",
        "model.encoder.depth=1",
        "model.decoder.depth=1",
        "model.quantizer.codebook_size=256",
        "model.detailflow.degradation_prob=0.5",
        "train.max_steps=6",
        "train.log_every=1",
        "train.ckpt_every=2",
        "train.image_every=1000",
        "train.progress=false",
        "optim.warmup_steps=1",
        "eval.every_steps=0",
        *extra,
    ]


def rows(run_dir) -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "train/loss_total" in r]


KEYS = ("train/loss_total", "train/loss_rec", "train/loss_commit", "train/detailflow_prefix", "train/detailflow_size")


def trajectory(run_rows: list[dict]) -> list[float]:
    """Step, losses and plan of every logged step, flat (what pytest.approx compares)."""
    return [float(v) for r in run_rows for v in (r["step"], *(r[k] for k in KEYS))]


def assert_plans_are_admissible(run_rows: list[dict]) -> None:
    """Every logged prefix (the mean over ranks) is admissible and rendered at its scheduled size: ranks that drew
    different plans would average to sizes that do not match."""
    prefixes = [r["train/detailflow_prefix"] for r in run_rows]
    for r, t in zip(run_rows, prefixes):
        assert t in admissible_lengths(32, 8), r
        assert r["train/detailflow_size"] == decoder_size(int(t), 32, 64), r
    assert min(prefixes) < 32 and len(set(prefixes)) > 1, prefixes  # degraded prefixes, several of them


def test_a_stopped_and_resumed_detailflow_run_ends_with_the_same_plans_losses_and_weights(tmp_path, image_shards):
    full, split = tmp_path / "full", tmp_path / "split"
    assert main(load_train_config(CONFIG, tiny(full, image_shards)))["status"] == "done"
    first = main(load_train_config(CONFIG, tiny(split, image_shards)), should_stop=StopAfter(3))
    assert first["status"] == "stopped" and latest_checkpoint(split)[0] == 3
    assert main(load_train_config(CONFIG, tiny(split, image_shards)))["step"] == 6  # the same command resumes
    assert_plans_are_admissible(rows(full))
    assert trajectory(rows(split)) == pytest.approx(trajectory(rows(full)), rel=1e-6)
    a, b = state_dict_from(split), state_dict_from(full)
    assert a.keys() == b.keys() and any(k.startswith("detailflow.refine") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _train(run_dir, shards, env_extra=None, *extra) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TOKSCALE_FAULT")}
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "tokscale.cli", "train", "tokenizer", CONFIG, *tiny(run_dir, shards, *extra),
         "--nproc", "2"],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip


@pytest.mark.slow
def test_two_ranks_under_zero3_agree_on_plans_and_resume_exactly_after_a_crash_mid_save(tmp_path, image_shards):
    run_dir = tmp_path / "run"
    opts = ("train.zero_stage=3", "train.precision=bf16", "train.max_steps=4")
    # both ranks end mid-save at step 4 (as a SIGKILL would): step 2's checkpoint is the resume point, and steps
    # 1-4 of the uninterrupted run are already logged
    crashed = _train(run_dir, image_shards, {"TOKSCALE_FAULT": "engine_written@4"}, *opts)
    assert crashed.returncode != 0
    assert latest_checkpoint(run_dir)[0] == 2
    resumed = _train(run_dir, image_shards, None, *opts)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert latest_checkpoint(run_dir)[0] == 4
    logged = rows(run_dir)
    assert [r["step"] for r in logged] == [1, 2, 3, 4, 3, 4]
    assert_plans_are_admissible(logged[:4])
    uninterrupted, again = trajectory(logged[2:4]), trajectory(logged[4:])
    assert again == pytest.approx(uninterrupted, rel=1e-6)
    info = json.loads((run_dir / "run_info.jsonl").read_text().splitlines()[-1])
    assert info["world_size"] == 2


@pytest.mark.slurm
@pytest.mark.slow
def test_a_two_node_slurm_job_trains_the_detailflow_tokenizer(slurm_cluster, tmp_path, capsys):
    import submitit

    from tokscale.cli import main as cli_main

    run_dir = tmp_path / "run"
    args = [*tiny(run_dir, "embedded", "train.max_steps=4", "train.zero_stage=2"), "--nodes", "2", "--time", "10",
            "--json"]  # fmt: skip
    assert cli_main(["submit", "tokenizer", CONFIG, *args]) == 0, capsys.readouterr().err
    (run,) = json.loads(capsys.readouterr().out)
    job = submitit.SlurmJob(folder=Path(run["stdout"]).parent, job_id=run["job_id"], tasks=[0, 1])
    results = slurm_cluster.wait_for(job, timeout_s=300)
    assert results == [{"status": "done", "step": 4, "run_dir": str(run_dir)}] * 2
    logged = rows(run_dir)
    assert [r["step"] for r in logged] == [1, 2, 3, 4]
    for r in logged:
        assert r["train/detailflow_prefix"] in admissible_lengths(32, 8)
        assert r["train/detailflow_size"] == decoder_size(int(r["train/detailflow_prefix"]), 32, 64)
    assert json.loads((run_dir / "run_info.jsonl").read_text().splitlines()[-1])["world_size"] == 2
    assert slurm_cluster.final_state(run["job_id"]) == "COMPLETED"
