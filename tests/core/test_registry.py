"""A second trainer, added without touching a tokenizer file: the toy task registered through TOKSCALE_TRAINERS
runs through `tokscale train`, `--nproc 2`, `config show` and `export` like the tokenizer (Slurm:
tests/jobs/test_slurm.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from cli_run import TOY_SPEC, tokscale  # noqa: E402

from tokscale.registry import TRAINERS_ENV, resolve_runnable, trainer, trainer_specs  # noqa: E402


def toy_yaml(tmp_path: Path, **train) -> Path:
    path = tmp_path / "toy.yaml"
    lines = [f"run_dir: {tmp_path / 'run'}", "train:"] + [f"  {k}: {v}" for k, v in train.items()]
    path.write_text("\n".join(lines) + "\n" if train else f"run_dir: {tmp_path / 'run'}\n")
    return path


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_the_tokenizer_is_registered_through_its_entry_point():
    assert trainer_specs()["tokenizer"] == "tokscale.tokenizers.train:TokenizerTask"
    assert trainer("tokenizer").config_class.__name__ == "TrainConfig"


def test_the_environment_registers_a_trainer_from_a_file(monkeypatch):
    monkeypatch.setenv(TRAINERS_ENV, TOY_SPEC)
    task = trainer("toy")
    assert task.name == "toy" and task.config_class.__name__ == "ToyConfig"
    assert resolve_runnable("toy").load_config(None, ["train.max_steps=3"]).train.max_steps == 3


def test_a_bad_registry_entry_or_name_is_an_error_naming_it(monkeypatch):
    monkeypatch.setenv(TRAINERS_ENV, "toy")
    with pytest.raises(ValueError, match="TOKSCALE_TRAINERS item 'toy'"):
        trainer_specs()
    monkeypatch.setenv(TRAINERS_ENV, "jobcfg=tokscale.jobs.config:JobConfig")
    with pytest.raises(ValueError, match="not a tokscale.trainer.Task"):
        trainer("jobcfg")


def test_tokscale_train_runs_the_toy_task_and_rerunning_resumes(tmp_path):
    cfg = toy_yaml(tmp_path, max_steps=4, ckpt_every=2)
    out = tokscale("train", "toy", str(cfg))
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {
        "status": "done",
        "step": 4,
        "run_dir": str(tmp_path / "run"),
    }
    out = tokscale("train", "toy", str(cfg), "train.max_steps=6")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from" in out.stderr and [m["step"] for m in metrics(tmp_path / "run")] == list(
        range(1, 7)
    )


def test_tokscale_train_nproc_2_runs_two_ranks_from_one_config_snapshot(tmp_path):
    out = tokscale("train", "toy", str(toy_yaml(tmp_path, max_steps=3)), "data.batch_size=4", "--nproc", "2")
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "run"
    assert "batch_size: 4" in (run / "local" / "config.yaml").read_text()
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["train/rank"] == 0.5 for r in rows)  # rank 0 and rank 1 averaged: both logged every step
    assert json.loads((run / "run_info.jsonl").read_text().splitlines()[-1])["world_size"] == 2


def test_config_show_and_export_work_for_the_toy_trainer(tmp_path):
    cfg = toy_yaml(tmp_path, max_steps=2)
    out = tokscale("config", "show", str(cfg), "model.dim=3", "--schema", "toy")
    assert out.returncode == 0, out.stderr
    assert "dim: 3" in out.stdout and "ema_decay: 0.9" in out.stdout
    bad = tokscale("config", "show", str(cfg), "model.dims=3", "--schema", "toy")
    assert bad.returncode == 2 and "model.dims" in bad.stderr
    # overrides after an option are overrides too; anything else left over is still refused
    after = tokscale("config", "show", str(cfg), "--schema", "toy", "model.dim=5")
    assert after.returncode == 0 and "dim: 5" in after.stdout, after.stderr
    stray = tokscale("config", "show", str(cfg), "--schema", "toy", "--no-such-flag")
    assert stray.returncode == 2 and "unrecognized arguments: --no-such-flag" in stray.stderr
    assert tokscale("train", "toy", str(cfg)).returncode == 0
    # the run's own config.yaml names its schema: no --schema needed
    again = tokscale("config", "show", str(tmp_path / "run" / "config.yaml"))
    assert again.returncode == 0 and "ema_decay: 0.9" in again.stdout
    out = tokscale("export", str(tmp_path / "run"), str(tmp_path / "export"))
    assert out.returncode == 0, out.stderr[-3000:]
    export = tmp_path / "export"
    assert json.loads((export / "training.json").read_text())["trainer"] == "toy"
    assert (export / "README.md").read_text().startswith("---\nlibrary_name: tokscale")
    assert (export / "config.yaml").read_text().startswith("schema: toy")
    from tokscale.export import state_dict_from, verify

    verify(export)
    assert state_dict_from(export)["weight"].shape == (1, 4)


def test_help_lists_the_registered_trainers(tmp_path):
    out = tokscale("train", "--help")
    assert out.returncode == 0 and "tokenizer" in out.stdout and "toy" in out.stdout
    unknown = tokscale("train", "nosuch", str(toy_yaml(tmp_path)))
    assert unknown.returncode == 2 and "unknown trainer 'nosuch'" in unknown.stderr
