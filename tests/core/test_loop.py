"""The shared loop with a toy task: it trains, stops on request, resumes exactly, keeps the last k checkpoints,
and saves and restores the task's side state. Schedules and parameter groups of the shared OptimConfig."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from toy_task import ToyTask  # noqa: E402

from tokscale.checkpoint import complete_checkpoints, latest_checkpoint  # noqa: E402
from tokscale.config import ConfigError  # noqa: E402
from tokscale.export import state_dict_from  # noqa: E402
from tokscale.loop import train  # noqa: E402
from tokscale.trainer import OptimConfig, decay_groups, lr_lambda  # noqa: E402


def cfg(run_dir, *overrides):
    return ToyTask.load_config(None, [f"run_dir={run_dir}", *overrides])


class StopAfter:
    def __init__(self, n: int):
        self.n, self.calls = n, 0

    def __call__(self) -> bool:
        self.calls += 1
        return self.calls > self.n


def rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in rows(run_dir)}


def ema(run_dir) -> dict:
    return torch.load(latest_checkpoint(run_dir)[1] / "trainer.pt", weights_only=False)["ema"]


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("toy") / "full"
    assert train(ToyTask, cfg(run_dir)) == {"status": "done", "step": 8, "run_dir": str(run_dir)}
    return run_dir


def test_the_loop_trains_the_toy_task_and_logs_every_step(full):
    got = losses(full)
    assert sorted(got) == list(range(1, 9))
    assert got[8] < 0.5 * got[1]
    last = rows(full)[-1]
    assert last["train/rank"] == 0.0 and last["perf/img_per_s"] > 0 and "train/lr" in last
    assert (full / "images.txt").read_text().split() == ["8"]  # image_every=1000: only at the end


def test_the_run_directory_records_schema_config_commit_and_world_size(full):
    assert (full / "config.yaml").read_text().startswith("schema: toy\n")
    info = json.loads((full / "run_info.jsonl").read_text().splitlines()[-1])
    assert info["trainer"] == "toy" and info["world_size"] == 1 and info["git_commit"]


def test_the_loop_keeps_the_last_k_checkpoints(full, tmp_path):
    assert [s for s, _ in complete_checkpoints(full)] == [6, 8]  # ckpt_every=2, keep_last=2
    run_dir = tmp_path / "k3"
    train(ToyTask, cfg(run_dir, "train.keep_last=3", "train.ckpt_every=1"))
    assert [s for s, _ in complete_checkpoints(run_dir)] == [6, 7, 8]


def test_a_stop_request_saves_and_the_rerun_resumes_exactly_with_the_side_state(full, tmp_path):
    run_dir = tmp_path / "split"
    first = train(ToyTask, cfg(run_dir), should_stop=StopAfter(3))
    assert first == {"status": "stopped", "step": 3, "run_dir": str(run_dir)}
    assert latest_checkpoint(run_dir)[0] == 3
    stopped_ema = ema(run_dir)
    assert train(ToyTask, cfg(run_dir))["status"] == "done"
    assert losses(run_dir) == losses(full)  # bit-identical: weights, optimizer, schedule, data position
    a, b = state_dict_from(run_dir), state_dict_from(full)
    assert all(torch.equal(a[k], b[k]) for k in a)
    final_a, final_b = ema(run_dir), ema(full)
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)
    assert not all(torch.equal(stopped_ema[k], final_a[k]) for k in final_a)  # the EMA did move after resume


def test_a_resume_between_log_steps_logs_the_same_interval_averages(tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    train(ToyTask, cfg(full, "train.log_every=3", "train.max_steps=6"))
    train(ToyTask, cfg(split, "train.log_every=3", "train.max_steps=6"), should_stop=StopAfter(2))
    train(ToyTask, cfg(split, "train.log_every=3", "train.max_steps=6"))
    assert sorted(losses(full)) == [3, 6]
    assert losses(split) == losses(full)  # steps 1-2 of the first interval came back with the checkpoint


def test_stale_temporary_folders_of_a_crashed_save_are_removed_at_start(full, tmp_path):
    import shutil

    run_dir = tmp_path / "stale"
    shutil.copytree(full, run_dir)
    (run_dir / "ckpt" / ".tmp_step_00000010" / "engine").mkdir(parents=True)
    (run_dir / "ckpt" / ".tmp_pruned_step_00000004").mkdir()
    train(ToyTask, cfg(run_dir, "train.max_steps=10"))
    assert sorted(p.name for p in (run_dir / "ckpt").iterdir()) == ["step_00000008", "step_00000010"]


def test_without_the_saved_side_state_the_resume_would_differ(full, tmp_path):
    """The side-state test above could not pass by luck: drop the EMA from the checkpoint and it diverges."""
    run_dir = tmp_path / "lost"
    train(ToyTask, cfg(run_dir), should_stop=StopAfter(3))
    path = latest_checkpoint(run_dir)[1] / "trainer.pt"
    state = torch.load(path, weights_only=False)
    state["ema"] = None
    torch.save(state, path)
    train(ToyTask, cfg(run_dir))
    assert not all(torch.equal(ema(run_dir)[k], ema(full)[k]) for k in ema(full))


def test_gradient_accumulation_averages_the_micro_batches_and_steps_the_schedule_once(tmp_path):
    run_dir = tmp_path / "accum"
    train(ToyTask, cfg(run_dir, "train.grad_accum=2", "train.max_steps=3", "optim.warmup_steps=2"))
    lrs = [r["train/lr"] for r in rows(run_dir)]
    assert lrs == pytest.approx([0.5, 0.5, 0.0])  # warmup 2 steps, then cosine to min_lr=0 at step 3
    assert ToyTask(cfg(run_dir), None).batch_size((torch.zeros(8, 4), None)) == 8


def test_resuming_with_a_config_that_changes_the_model_is_refused_naming_the_key(full):
    with pytest.raises(ConfigError, match="model.dim"):
        train(ToyTask, cfg(full, "model.dim=3"))


def test_a_config_without_the_shared_sections_is_an_error():
    with pytest.raises(TypeError, match="optim: OptimConfig"):
        train(ToyTask, object())


def test_schedules_warmup_cosine_constant_and_warmup_hold_decay():
    cos = lr_lambda(OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=2), 10)
    assert [cos(0), cos(1)] == [0.5, 1.0]
    assert cos(2) == pytest.approx(1.0) and cos(10) == pytest.approx(0.1)
    assert cos(6) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    const = lr_lambda(OptimConfig(lr=1.0, min_lr=0.0, warmup_steps=4, schedule="constant"), 100)
    assert [const(0), const(3), const(50), const(99)] == [0.25, 1.0, 1.0, 1.0]
    # GigaTok's AR recipe: warmup from lr/100, hold, sqrt decay over the last 20% to 0
    wsd = lr_lambda(OptimConfig(lr=1.0, min_lr=0.0, warmup_steps=10, warmup_init=0.01, schedule="wsd"), 100)
    assert wsd(0) == pytest.approx(0.01 + 0.99 * 0.1)
    assert wsd(9) == wsd(10) == wsd(80) == 1.0
    assert wsd(85) == pytest.approx(1 - math.sqrt(5 / 20)) and wsd(100) == 0.0
    lin = lr_lambda(
        OptimConfig(lr=1.0, min_lr=0.2, schedule="wsd", decay_shape="linear", decay_fraction=0.5), 10
    )
    assert [lin(4), lin(5), lin(10)] == pytest.approx([1.0, 1.0, 0.2])
    assert lin(7) == pytest.approx(0.2 + 0.8 * 0.6)


def test_bad_schedule_settings_are_rejected_naming_the_key():
    with pytest.raises(ValueError, match="optim.schedule"):
        OptimConfig(schedule="linear")
    with pytest.raises(ValueError, match="optim.decay_fraction"):
        OptimConfig(schedule="wsd", decay_fraction=0)


def test_decay_groups_put_weight_decay_on_matrices_only():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    decay, no_decay = decay_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert [p.shape for p in decay["params"]] == [torch.Size([3, 4])]
    assert len(no_decay["params"]) == 3  # the bias and the norm's weight and bias


def test_fp16_is_refused_on_a_machine_without_cuda_before_any_work(tmp_path):
    run_dir = tmp_path / "fp16"
    with pytest.raises(ConfigError, match=r"train.precision=fp16 .* needs a CUDA GPU"):
        train(ToyTask, cfg(run_dir, "train.precision=fp16"))
    assert not run_dir.exists()


def test_fp16_trains_under_deepspeed_autocast_with_a_loss_scaler(tmp_path, monkeypatch):
    # The GPU mode's DeepSpeed config run for real: CPU autocast and GradScaler stand in for CUDA's here (the
    # refusal above is lifted for this test only).
    import deepspeed.runtime.torch_autocast as ds_autocast

    import tokscale.loop

    # DeepSpeed records autocast in module globals; restore them so later in-process engines are not affected
    monkeypatch.setattr(ds_autocast, "TORCH_AUTOCAST_INITIALIZED", ds_autocast.TORCH_AUTOCAST_INITIALIZED)
    monkeypatch.setattr(ds_autocast, "TORCH_AUTOCAST_DTYPE", ds_autocast.TORCH_AUTOCAST_DTYPE)
    seen = {}

    class Fp16Probe(ToyTask):
        def train_step(self, engine, batch, step):
            seen["scaler"] = engine.torch_autocast_z0_gradscaler
            seen["out"] = engine(batch[0]).dtype
            seen["weights"] = next(engine.module.parameters()).dtype
            return super().train_step(engine, batch, step)

    monkeypatch.setattr(tokscale.loop, "check_precision", lambda precision: None)
    run_dir = tmp_path / "fp16"
    assert train(Fp16Probe, cfg(run_dir, "train.precision=fp16"))["step"] == 8
    assert seen["out"] == torch.float16 and seen["weights"] == torch.float32
    assert seen["scaler"] is not None and seen["scaler"].is_enabled()
    got = losses(run_dir)
    assert got[8] < 0.5 * got[1]
