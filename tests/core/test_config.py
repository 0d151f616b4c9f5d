import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tokscale.config import ConfigError, conf_dir, schema_task
from tokscale.tokenizers.train import TrainConfig, load_train_config


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "tokscale.cli", *args], capture_output=True, text=True)


def all_yaml():
    """Every trainer's YAML in conf/ (conf/probe/ holds `tokscale probe` pipelines: tests/jobs/test_probe.py)."""
    return sorted(
        p.relative_to(conf_dir())
        for p in conf_dir().rglob("*.yaml")
        if p.relative_to(conf_dir()).parts[0] != "probe"
    )


@pytest.mark.parametrize("rel", all_yaml(), ids=str)
def test_every_yaml_in_conf_validates_against_its_schema(rel):
    task = schema_task(rel.parts[0])
    # mandatory paths (???) are the user's to fill: give them a value, everything else must validate as is
    paths = ["data.train_shards=/x/train-{0..1}.tar", "data.eval_shards=/x/val-{0..1}.tar"]
    schema = OmegaConf.structured(task.config_class)
    paths = [p for p in paths if OmegaConf.select(schema, p.split("=")[0], default=None) is not None]
    cfg = task.load_config(conf_dir() / rel, paths)
    assert isinstance(cfg, task.config_class)


def test_preset_then_yaml_then_command_line_take_precedence_in_that_order():
    cfg = load_train_config("tokenizer/demo", ["model.decoder.depth=2"])
    assert cfg.model.preset == "2d-tiny"
    assert cfg.model.encoder.depth == 4  # from the preset
    assert cfg.model.image_size == 64  # YAML over preset
    assert cfg.model.decoder.depth == 2  # command line over both
    assert cfg.data.resolution == 64  # interpolated from model.image_size


def test_unknown_key_is_an_error_naming_the_key():
    with pytest.raises(ConfigError, match="model.decoder.dept"):
        load_train_config("tokenizer/demo", ["model.decoder.dept=2"])


def test_wrong_type_is_an_error_naming_the_key():
    with pytest.raises(ConfigError, match="train.max_steps"):
        load_train_config("tokenizer/demo", ["train.max_steps=many"])


def test_invalid_value_is_an_error_naming_the_key():
    with pytest.raises(ConfigError, match="train.zero_stage"):
        load_train_config("tokenizer/demo", ["train.zero_stage=4"])
    with pytest.raises(ConfigError, match="model.preset"):
        load_train_config("tokenizer/demo", ["model.preset=2d-huge"])


def test_config_show_prints_resolved_yaml_and_exits_zero():
    res = run_cli("config", "show", "tokenizer/demo", "model.decoder.depth=3")
    assert res.returncode == 0, res.stderr
    assert "depth: 3" in res.stdout and "preset: 2d-tiny" in res.stdout
    assert "${" not in res.stdout


def test_config_show_with_a_bad_key_exits_nonzero_and_names_it_on_stderr():
    res = run_cli("config", "show", "tokenizer/demo", "model.nope=1")
    assert res.returncode != 0
    assert "model.nope" in res.stderr


def test_missing_config_file_is_named(tmp_path: Path):
    res = run_cli("config", "show", str(tmp_path / "missing.yaml"))
    assert res.returncode != 0 and "missing.yaml" in res.stderr


def test_every_subcommand_has_help():
    for args in (
        ["--help"],
        ["config", "show", "--help"],
        ["model", "info", "--help"],
        ["train", "tokenizer", "--help"],
        ["bench", "tokenizer", "--help"],
        ["demo", "--help"],
        ["export", "--help"],
    ):
        res = run_cli(*args)
        assert res.returncode == 0 and "usage" in res.stdout.lower(), args


def test_train_config_is_a_dataclass_schema():
    assert TrainConfig().model.kind == "2d"
