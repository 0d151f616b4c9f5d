import os

import pytest

from tokscale.config import ConfigError
from tokscale.jobs.submission import plan_runs, read_sweep_file, slug, sweep_items
from tokscale.registry import resolve_runnable

TOY = os.path.join(os.path.dirname(__file__), "toy_trainer.py")


def test_each_sweep_item_gets_a_readable_folder_name():
    assert slug(["model.preset=1d-S-S"]) == "preset-1d-S-S"
    assert slug(["model.preset=1d-S-B", "optim.lr=1e-4"]) == "preset-1d-S-B_lr-1e-4"
    assert slug(["data.train_shards=/a/b/{000..009}.tar"]) == "train_shards-a-b-000..009-.tar"


def test_sweep_items_split_into_overrides_and_refuse_duplicates():
    assert sweep_items(["a=1 b=2", "a=3"]) == [["a=1", "b=2"], ["a=3"]]
    with pytest.raises(ValueError, match="given twice"):
        sweep_items(["a=1", "a=1"])


def test_a_sweep_file_lists_strings_or_mappings(tmp_path):
    f = tmp_path / "sweep.yaml"
    f.write_text("- model.preset=1d-S-S\n- {model.preset: 1d-S-B, optim.lr: 0.001}\n")
    assert read_sweep_file(f) == ["model.preset=1d-S-S", "model.preset=1d-S-B optim.lr=0.001"]
    f.write_text("model.preset: 1d-S-S\n")
    with pytest.raises(ValueError, match="YAML list"):
        read_sweep_file(f)


def test_sweep_runs_live_under_the_base_run_dir_and_are_all_validated(tmp_path):
    toy = resolve_runnable(TOY)
    runs = plan_runs(toy, None, [f"run_dir={tmp_path}/sweep"], [["train.max_steps=2"], ["train.max_steps=3"]])
    assert [cfg.run_dir for _, cfg in runs] == [
        f"{tmp_path}/sweep/max_steps-2",
        f"{tmp_path}/sweep/max_steps-3",
    ]
    assert [cfg.train.max_steps for _, cfg in runs] == [2, 3]
    # One bad item fails the whole submission before anything is submitted.
    with pytest.raises(ConfigError, match="max_steps"):
        plan_runs(toy, None, [], [["train.max_steps=2"], ["train.max_steps=0"]])
