"""`tokscale probe` in real processes: two tiny tokenizers and a tiny multi-scale one through every stage (recon,
extraction, a tiny GPT, its validation loss, gFID, the AR probe; with ``downstream: [gpt, var]`` a tiny VAR and its
gFID on the multi-scale tokenizer's codes, n/a for the other two) on the embedded data, with the GPT's training
killed mid-save on the first run; the rerun skips every finished stage, resumes the training from its checkpoint
and writes a table with every column filled (n/a where no VAR applies) and the trade-off plot; a third run skips
everything. A bad config key or downstream value fails before anything runs. On the local Slurm cluster the
pipeline is a chain of jobs: each stage is followed by a continuation that submits the next, or records a failed
stage's job and stops."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from tokscale.cli import main as cli_main
from tokscale.config import conf_dir, resolve_config_path
from tokscale.jobs.probe import DOWNSTREAM_STAGES, STAGES, load_probe_config, make_plan, stage_argv
from tokscale.jobs.probe_cli import COLUMNS, PALETTE, VAR_COLUMNS, nice_ticks, report_columns, write_report

# position=learned: the multi-scale tokenizer's 1 + 4 codes are no square grid for rope2d
CONFIG = """\
tokenizers:
  - {name: small, path: TOKS/small}
  - TOKS/medium
  - TOKS/ms
recipe: c2i/tiny
recipe_overrides: [train.max_steps=12, train.ckpt_every=4, eval.every_steps=12, model.width=32, model.depth=2,
                   model.heads=2, model.position=learned, train.progress=false]
downstream: [gpt, var]
var_recipe: var/tiny
var_recipe_overrides: [train.max_steps=8, train.ckpt_every=4, eval.every_steps=8, model.width=32, model.depth=1,
                       model.heads=2, data.batch_size=8, train.progress=false]
recon: {num_samples: 20, batch_size: 10, overrides: [data.num_workers=0]}
extract: {train_aug: center}
gen: {num_samples: 8, batch_size: 4, cfg_scale: 1.5, overrides: [is_splits=2]}
gen_var: {num_samples: 10, batch_size: 5, overrides: [is_splits=2]}  # VAR's cfg, ramp, top-k/p, 1 per class
ar_probe: {epochs: 1, warmup_epochs: 0, num_train: 200, num_val: 100, forward_batch: 100,
           overrides: [data.num_workers=0]}
"""
VAR_STAGES = DOWNSTREAM_STAGES["var"]
FAULT = "engine_written@8"  # the GPT's process ends mid-save at step 8; step 4's checkpoint is complete
FINISHED_FILES = ("recon/metrics.json", "tokens-train/manifest.json", "tokens-val/manifest.json")
VAR_FILES = ("var/ckpt/step_00000008/trainer.pt", "var/metrics.jsonl", "gen-var/results.json")


def write_tokenizer(out: Path, width: int, depth: int, seed: int, scales: list[int] | None = None) -> Path:
    """A random 2D tokenizer at 32 px (a 2x2 grid, 256 codes) in the export format: 4 tokens, or with ``scales``
    a multi-scale one (quantizer.kind=multiscale: scales [1, 2] are 1 + 4 = 5 tokens)."""
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    from tokscale.tokenizers.model import TokenizerConfig, VQTokenizer
    from tokscale.tokenizers.presets import get_preset

    preset = get_preset("2d-tiny")
    preset.update(image_size=32)
    preset["cnn"].update(num_res_blocks=1, z_channels=16, num_groups=8)
    preset["encoder"].update(width=width, depth=depth, heads=2)
    preset["decoder"].update(width=width, depth=depth, heads=2)
    preset["quantizer"]["codebook_size"] = 256
    if scales:
        preset["quantizer"].update(kind="multiscale", scales=scales)
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TokenizerConfig), preset))
    torch.manual_seed(seed)
    model = VQTokenizer(cfg, with_projector=False)
    out.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    OmegaConf.save(
        OmegaConf.create({"model": OmegaConf.to_container(OmegaConf.structured(cfg))}), out / "config.yaml"
    )
    return out


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from tokscale.evaluation.inception import write_random_inception_weights

    root = tmp_path_factory.mktemp("probe")
    write_tokenizer(root / "toks" / "small", width=32, depth=1, seed=0)
    write_tokenizer(root / "toks" / "medium", width=64, depth=2, seed=1)
    write_tokenizer(root / "toks" / "ms", width=32, depth=1, seed=2, scales=[1, 2])
    reference = root / "ref.npz"
    np.savez(reference, arr_0=np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8))
    config = root / "probe.yaml"
    config.write_text(CONFIG.replace("TOKS", str(root / "toks")))
    return {
        "root": root,
        "config": config,
        "reference": reference,
        "weights": write_random_inception_weights(root / "inception.pth", seed=0),
    }


def data_flags(assets, out: Path) -> list[str]:
    return [
        "--train-data", "embedded", "--val-data", "embedded", "--reference", str(assets["reference"]),
        "--inception-weights", str(assets["weights"]), "--out", str(out),
    ]  # fmt: skip


def probe(*args, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    # One thread per process: the tiny convolutions are far slower with two threads on a shared CPU.
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, "-m", "tokscale.cli", "probe", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)


def error_line(res) -> str:
    lines = [line for line in res.stderr.splitlines() if line.startswith("tokscale: error:")]
    assert lines, res.stderr[-3000:]
    return lines[-1]


def state_of(out: Path) -> dict:
    return json.loads((out / "probe_state.json").read_text())


def statuses(state: dict, name: str) -> dict:
    return {stage: rec.get("status") for stage, rec in state["tokenizers"][name]["stages"].items()}


def csv_rows(out: Path) -> list[dict]:
    with open(out / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def killed_then_resumed(assets):
    """The pipeline run three times on one folder: first with the GPT's training killed mid-save, then plainly
    (every stage of every tokenizer), then again with everything finished."""
    out = assets["root"] / "out"
    first = probe("--config", assets["config"], *data_flags(assets, out), env={"TOKSCALE_FAULT": FAULT})
    after_first = {
        "state": state_of(out),
        "rows": csv_rows(out),
        "mtimes": {f: (out / "small" / f).stat().st_mtime_ns for f in FINISHED_FILES},
    }
    t0 = time.monotonic()
    second = probe("--config", assets["config"], *data_flags(assets, out))
    after_second = {
        "state": state_of(out),
        "mtimes": {f: (out / "ms" / f).stat().st_mtime_ns for f in VAR_FILES},
    }
    third = probe("--config", assets["config"], *data_flags(assets, out))
    return {
        "out": out,
        "first": first,
        "second": second,
        "third": third,
        "after_first": after_first,
        "after_second": after_second,
        "rerun_s": time.monotonic() - t0,
    }


@pytest.mark.slow
def test_a_stage_that_dies_stops_the_pipeline_with_an_error_naming_the_stage_the_tokenizer_and_the_log(
    killed_then_resumed,
):
    res, out = killed_then_resumed["first"], killed_then_resumed["out"]
    assert res.returncode == 2, res.stderr[-3000:]
    line = error_line(res)
    log_path = out / "small" / "logs" / "train.log"
    assert "stage 'train'" in line and "tokenizer 'small'" in line and str(log_path) in line, line
    assert "TOKSCALE_FAULT" in log_path.read_text()  # the stage's own output is in its log
    state = killed_then_resumed["after_first"]["state"]
    assert statuses(state, "small") == {
        "recon": "done", "extract-train": "done", "extract-val": "done", "train": "failed",
    }  # fmt: skip
    assert statuses(state, "medium") == {} and statuses(state, "ms") == {}  # never started
    train = state["tokenizers"]["small"]["stages"]["train"]
    assert (
        train["exit_code"] == 137
        and train["log"] == str(log_path)
        and "train c2i c2i/tiny" in train["command"]
    )
    assert all(state["tokenizers"]["small"]["stages"][s]["seconds"] > 0 for s in STAGES[:3])
    small, medium, ms = killed_then_resumed["after_first"]["rows"]
    assert float(small["rfid"]) > 0 and small["gfid"] == "" and small["ar_val_loss"] == ""  # the table so far
    assert small["var_gfid"] == "n/a" and ms["var_gfid"] == ""  # n/a from the plan; not run yet: blank
    assert medium["params"] and medium["rfid"] == ""
    warning = [x for x in res.stderr.splitlines() if "WARNING" in x and "not multi-scale" in x]
    assert len(warning) == 2 and "small: stages train-var, gen-var are n/a" in warning[0], res.stderr[-3000:]


@pytest.mark.slow
def test_the_rerun_skips_every_finished_stage_and_resumes_the_training_from_its_checkpoint(
    killed_then_resumed,
):
    res, out = killed_then_resumed["second"], killed_then_resumed["out"]
    assert res.returncode == 0, res.stderr[-3000:]
    mtimes = {f: (out / "small" / f).stat().st_mtime_ns for f in FINISHED_FILES}
    assert mtimes == killed_then_resumed["after_first"]["mtimes"]  # not redone
    state = killed_then_resumed["after_second"]["state"]
    assert statuses(state, "small") == {
        "recon": "skipped", "extract-train": "skipped", "extract-val": "skipped", "train": "done", "gen": "done",
        "ar-probe": "done", "train-var": "n/a", "gen-var": "n/a",
    }  # fmt: skip
    assert statuses(state, "medium") == dict.fromkeys(STAGES, "done") | dict.fromkeys(VAR_STAGES, "n/a")
    assert statuses(state, "ms") == dict.fromkeys(STAGES, "done")  # the GPT's stages and the VAR's
    assert state["tokenizers"]["small"]["stages"]["train"]["attempts"] == 2
    assert [i["mode"] for i in state["invocations"]] == ["local", "local"]
    train_log = (out / "small" / "logs" / "train.log").read_text()
    assert "small train attempt 1" in train_log and "small train attempt 2" in train_log  # both runs kept
    assert "ckpt/step_00000004 at step 4" in train_log.split("attempt 2")[1]  # resumed, not restarted
    assert len((out / "small" / "gpt" / "run_info.jsonl").read_text().splitlines()) == 2
    for name in ("small", "medium", "ms"):
        for stage in STAGES:
            assert (out / name / "logs" / f"{stage}.log").is_file() == (
                name == "ms" or stage not in VAR_STAGES
            )
    summary = json.loads(res.stdout)
    assert [r["tokenizer"] for r in summary["rows"]] == ["small", "medium", "ms"]


@pytest.mark.slow
def test_the_var_stages_train_and_score_a_var_on_the_multiscale_codes_and_are_na_for_the_others(
    killed_then_resumed,
):
    out = killed_then_resumed["out"]
    stages = killed_then_resumed["after_second"]["state"]["tokenizers"]
    train_var, gen_var = stages["ms"]["stages"]["train-var"], stages["ms"]["stages"]["gen-var"]
    assert f"train var var/tiny run_dir={out / 'ms' / 'var'}" in train_var["command"]
    assert (
        f"tokenizer={out.parent / 'toks' / 'ms'}" in train_var["command"]
        and "model.scales=[1,2]" in train_var["command"]
    )
    assert f"eval gen {out / 'ms' / 'var'}" in gen_var["command"]
    for name in ("small", "medium"):
        for stage in VAR_STAGES:
            rec = stages[name]["stages"][stage]
            assert rec["status"] == "n/a" and f"tokenizer '{name}' is not multi-scale" in rec["reason"], rec
            assert not (
                out / name / stage.replace("train-", "")
            ).exists()  # nothing ran: no var/, no gen-var/
    var_cfg = (out / "ms" / "var" / "config.yaml").read_text()
    assert "schema: var" in var_cfg and "max_steps: 8" in var_cfg
    gen = json.loads((out / "ms" / "gen-var" / "results.json").read_text())
    # VAR's own sampling by default: its cfg 1.5 (t = 2.5 - 1) on the linear ramp, top-k 900, top-p 0.96, balanced
    var_sampler = gen["sampler"]["var_sampler"]
    assert var_sampler["cfg_scale"] == 1.5 and var_sampler["cfg_schedule"] == "linear"
    assert (var_sampler["top_k"], var_sampler["top_p"]) == (900, 0.96)
    assert gen["class_rule"] == "balanced" and gen["num_samples"] == 10


@pytest.mark.slow
def test_a_third_run_skips_every_finished_stage_the_var_ones_included(killed_then_resumed):
    res, out = killed_then_resumed["third"], killed_then_resumed["out"]
    assert res.returncode == 0, res.stderr[-3000:]
    state = state_of(out)
    assert statuses(state, "ms") == dict.fromkeys(STAGES, "skipped")
    assert statuses(state, "small") == dict.fromkeys(STAGES, "skipped") | dict.fromkeys(VAR_STAGES, "n/a")
    mtimes = {f: (out / "ms" / f).stat().st_mtime_ns for f in VAR_FILES}
    assert mtimes == killed_then_resumed["after_second"]["mtimes"]  # the VAR not trained or sampled again
    assert "ms train-var attempt 2" not in (out / "ms" / "logs" / "train-var.log").read_text()


@pytest.mark.slow
def test_the_table_has_a_row_per_tokenizer_with_every_column_filled(killed_then_resumed):
    from tokscale.jobs.probe import tokenizer_params

    out = killed_then_resumed["out"]
    rows = csv_rows(out)
    assert list(rows[0]) == [key for key, _, _ in COLUMNS + VAR_COLUMNS]
    assert [r["tokenizer"] for r in rows] == ["small", "medium", "ms"]
    for row in rows:
        assert all(row[key] != "" for key in row), row
        assert int(row["params"]) == tokenizer_params(str(out.parent / "toks" / row["tokenizer"]))
        assert float(row["rfid"]) > 0 and float(row["gfid"]) > 0 and float(row["psnr"]) > 0
        assert 0 < float(row["codebook_usage"]) <= 1 and 0 <= float(row["probe_top1"]) <= 100
        assert 0 <= float(row["precision"]) <= 1 and 0 <= float(row["recall"]) <= 1
        assert 0 < float(row["ar_val_loss"]) < 2 * np.log(256)  # cross-entropy over a 256-code vocabulary
    assert int(rows[0]["params"]) < int(rows[1]["params"])
    gen = json.loads((out / "small" / "gen" / "results.json").read_text())
    assert float(rows[0]["gfid"]) == gen["fid"] and float(rows[0]["is"]) == gen["is_mean"]
    val = [json.loads(line) for line in (out / "small" / "gpt" / "metrics.jsonl").read_text().splitlines()]
    assert float(rows[0]["ar_val_loss"]) == [r["val/loss_ce"] for r in val if "val/loss_ce" in r][-1]
    for row in rows[:2]:
        assert all(row[key] == "n/a" for key, _, _ in VAR_COLUMNS), row
    ms = rows[2]  # the VAR's columns from its own outputs
    gen = json.loads((out / "ms" / "gen-var" / "results.json").read_text())
    assert float(ms["var_gfid"]) == gen["fid"] > 0 and float(ms["var_is"]) == gen["is_mean"]
    assert (float(ms["var_precision"]), float(ms["var_recall"])) == (gen["precision"], gen["recall"])
    val = [json.loads(line) for line in (out / "ms" / "var" / "metrics.jsonl").read_text().splitlines()]
    assert float(ms["var_val_loss"]) == [r["val/loss_ce"] for r in val if "val/loss_ce" in r][-1]
    assert 0 < float(ms["var_val_loss"]) < 2 * np.log(256)
    md = (out / "results.md").read_text().splitlines()
    table = [line for line in md if line.startswith("|")]
    assert table[0] == "| " + " | ".join(h for _, h, _ in COLUMNS + VAR_COLUMNS) + " |"
    assert len(table) == 5 and [line.split("|")[1].strip() for line in table[2:]] == ["small", "medium", "ms"]
    assert all(cell.strip() for line in table[2:] for cell in line.strip("|").split("|"))
    assert table[2].endswith("| n/a | n/a | n/a | n/a | n/a |") and "n/a" not in table[4]
    assert "n/a: the tokenizer is not multi-scale" in md[-1] and md[0].endswith(
        "c2i/tiny + var/tiny on embedded"
    )


@pytest.mark.slow
def test_the_tradeoff_plot_is_a_png_showing_every_tokenizer(killed_then_resumed):
    from PIL import Image

    with Image.open(killed_then_resumed["out"] / "tradeoff.png") as img:
        assert img.format == "PNG" and img.mode == "RGB"
        assert img.size[0] >= 800 and img.size[1] >= 400
        colours = {c for _, c in img.getcolors(maxcolors=1 << 20)}
    for hex_colour in PALETTE[:3]:  # one disc per tokenizer in each panel
        assert tuple(int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)) in colours


@pytest.mark.parametrize(
    "overrides, flags, key",
    [
        (["recon.num_sample=5"], [], "recon.num_sample"),
        ([], ["--recipe-override", "train.max_step=3"], "train.max_step"),
        (["gen.overrides=[is_split=2]"], [], "is_split"),
        (["stage_jobs.train.gpus=8"], [], "gpus"),
        (["last_stage=sample"], [], "last_stage"),
        (["downstream=[gpt,vae]"], [], "downstream: 'vae' is not a downstream model"),
        (["downstream=[]"], [], "downstream is empty"),
        ([], ["--downstream", "var,gpt,var"], "['var'] named twice"),
        ([], ["--downstream", "gpt,"], "downstream: '' is not"),
        (["downstream=[var]", "last_stage=ar-probe"], [], "last_stage='ar-probe'"),
        (
            ["var_recipe_overrides=[tokenizer=x]"],
            [],
            "var_recipe_overrides: tokenizer is set by the pipeline",
        ),
        ([], ["--var-recipe-override", "train.max_step=3"], "var_recipe var/tiny"),
        ([], ["--var-recipe-override", "model.code_dim=16"], "model.code_dim=16, but tokenizer 'ms'"),
        (["gen_var.cfg_schedule=step"], [], "gen_var"),
        (["num_classes=3"], [], "gen_var.num_samples=10 a multiple of num_classes=3"),
    ],
    ids=[
        "probe-key",
        "recipe-key",
        "stage-override-key",
        "stage-jobs-key",
        "value",
        "downstream-unknown",
        "downstream-empty",
        "downstream-twice",
        "downstream-blank",
        "last-stage-not-downstream",
        "var-reserved-key",
        "var-recipe-key",
        "var-sizes",
        "var-step-schedule",
        "var-balanced-classes",
    ],  # fmt: skip
)
def test_a_bad_config_key_fails_before_anything_runs_naming_it(
    assets, tmp_path, capsys, overrides, flags, key
):
    out = tmp_path / "out"
    argv = ["probe", *overrides, "--config", str(assets["config"]), *data_flags(assets, out), *flags]
    assert cli_main(argv) == 2
    line = capsys.readouterr().err.splitlines()[-1]
    assert line.startswith("tokscale: error:") and key in line, line
    assert not out.exists()  # no folder, state, log or job


def test_var_alone_on_tokenizers_none_of_which_is_multiscale_fails_before_anything_runs(
    assets, tmp_path, capsys
):
    out, toks = tmp_path / "out", assets["root"] / "toks"
    argv = ["probe", str(toks / "small"), str(toks / "medium"), "--downstream", "var"]
    assert cli_main([*argv, "--config", str(assets["config"]), *data_flags(assets, out)]) == 2
    line = capsys.readouterr().err.splitlines()[-1]
    assert "downstream=[var]" in line and "['small', 'medium']" in line and "multi-scale" in line, line
    assert not out.exists()


def test_the_var_stages_go_to_slurm_through_submit_var_and_eval_gen_submit(assets, tmp_path):
    """stage_argv of the chain (--submit): the VAR's training through `tokscale submit var`, its sampling through
    `eval gen --submit`; var alone skips the GPT's stages and the extraction of a tokenizer with no VAR."""
    toks = assets["root"] / "toks"
    overrides = [f"tokenizers=[{toks / 'small'},{toks / 'ms'}]", "downstream=[var]", "num_classes=10"]
    overrides += [f"out={tmp_path / 'out'}", "train_data=embedded", "val_data=embedded"]
    overrides += [f"reference={assets['reference']}", f"inception_weights={assets['weights']}"]
    plan = make_plan(load_probe_config(assets["config"], overrides), submit=True)
    assert plan.stages == ("recon", "extract-train", "extract-val", *VAR_STAGES)
    small, ms = plan.tokenizers
    assert sorted(small.not_applicable) == sorted(["extract-train", "extract-val", *VAR_STAGES])
    assert ms.not_applicable == {} and ms.scales == [1, 2] and plan.var_max_steps == 8
    job = tmp_path / "job.yaml"
    train = stage_argv(plan, ms, "train-var", job_config=job)
    assert train[:3] == ["submit", "var", "var/tiny"] and train[-3:] == ["--job-config", str(job), "--json"]
    assert f"run_dir={ms.folder / 'var'}" in train and f"tokenizer={ms.path}" in train
    assert {"model.vocab_size=256", "model.scales=[1,2]", "model.code_dim=8", "model.num_classes=10"} <= set(
        train
    )
    assert train.index("model.num_classes=10") < train.index("train.max_steps=8")  # the recipe overrides last
    gen = stage_argv(plan, ms, "gen-var", job_config=job)
    assert gen[:3] == ["eval", "gen", str(ms.folder / "var")] and gen[-3:] == [
        "--submit",
        "--job-config",
        str(job),
    ]
    flags = {flag: gen[gen.index(flag) + 1] for flag in gen if flag.startswith("--")}
    assert flags["--out"] == str(ms.folder / "gen-var") and flags["--cfg-schedule"] == "linear"
    assert (flags["--cfg-scale"], flags["--top-k"], flags["--class-rule"]) == ("2.5", "900", "balanced")
    local = stage_argv(replace(plan, cfg=replace(plan.cfg, nproc=2)), ms, "train-var")
    assert local[:3] == ["train", "var", "var/tiny"] and local[-2:] == ["--nproc", "2"]


def test_a_bad_key_in_the_config_file_and_a_missing_reference_fail_before_anything_runs(
    assets, tmp_path, capsys
):
    out = tmp_path / "out"
    bad = tmp_path / "bad.yaml"
    bad.write_text(assets["config"].read_text() + "ar_probe_epochs: 3\n")
    assert cli_main(["probe", "--config", str(bad), *data_flags(assets, out)]) == 2
    assert "ar_probe_epochs" in capsys.readouterr().err
    flags = data_flags(assets, out)
    flags[flags.index("--reference") + 1] = str(tmp_path / "missing.npz")
    assert cli_main(["probe", "--config", str(assets["config"]), *flags]) == 2
    assert "missing.npz" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("name", sorted(p.stem for p in (conf_dir() / "probe").glob("*.yaml")))
def test_every_probe_config_in_conf_validates_with_every_stage_job(name):
    cfg = load_probe_config(resolve_config_path(f"probe/{name}"))
    assert len(cfg.entries()) >= 2 and cfg.recipe
    resolve_config_path(cfg.recipe)  # the GPT recipe it names exists
    if "var" in cfg.downstream:
        resolve_config_path(cfg.var_recipe)
    for stage in STAGES:
        assert cfg.job_for(stage).time_min >= 1


def test_nice_ticks_cover_the_values_with_round_steps():
    assert nice_ticks(13.2, 16.1) == [13, 14, 15, 16, 17]
    assert nice_ticks(0.0, 1.2) == [0.0, 0.25, 0.5, 0.75, 1.0, 1.25]
    ticks = nice_ticks(5.0, 5.0)  # one value: a span around it
    assert ticks[0] < 5.0 < ticks[-1]


def test_a_stage_not_run_is_a_blank_cell_and_the_plot_is_still_drawn(tmp_path):
    from PIL import Image

    rows = [
        {key: None for key, _, _ in COLUMNS} | {"tokenizer": "a", "params": 10, "rfid": 2.0, "psnr": 20.0},
        {key: None for key, _, _ in COLUMNS} | {"tokenizer": "b", "params": 20},
    ]
    paths = write_report(rows, tmp_path, "title")
    got = csv_rows(tmp_path)
    assert got[0]["rfid"] == "2.0" and got[0]["gfid"] == "" and got[1]["rfid"] == ""
    assert "| a | 10 | 2.00 | 20.00 |  |" in Path(paths["md"]).read_text()
    with Image.open(paths["png"]) as img:
        assert img.size == (1400, 640)


def test_var_columns_show_na_and_the_plot_draws_the_var_without_a_gpt(tmp_path):
    from PIL import Image

    keys = [key for key, _, _ in COLUMNS + VAR_COLUMNS]
    ms = {"tokenizer": "ms", "params": 10, "rfid": 2.0, "var_gfid": 30.0, "var_is": 1.5, "var_val_loss": 4.0}
    rows = [  # downstream var only: a multi-scale tokenizer with a VAR gFID, a plain one (n/a), one not run yet
        dict.fromkeys(keys) | ms,
        dict.fromkeys(keys)
        | {"tokenizer": "vq", "params": 20, "rfid": 3.0}
        | {k: "n/a" for k, _, _ in VAR_COLUMNS},
        dict.fromkeys(keys) | {"tokenizer": "later", "params": 30},
    ]
    columns = report_columns(["var"])
    assert columns == COLUMNS[:5] + VAR_COLUMNS and report_columns(["gpt"]) == COLUMNS
    paths = write_report(rows, tmp_path, "title", columns)
    got = csv_rows(tmp_path)
    assert list(got[0]) == [key for key, _, _ in columns]
    assert got[0]["var_gfid"] == "30.0" and got[1]["var_gfid"] == "n/a" and got[2]["var_gfid"] == ""
    md = Path(paths["md"]).read_text()
    assert (
        "| ms | 10 | 2.00 |  |  | 4.0000 | 30.00 | 1.50 |  |  |" in md
        and "| vq | 20 | 3.00 |  |  | n/a | n/a |" in md
    )
    assert "n/a: the tokenizer is not multi-scale" in md and "probe top-1" not in md
    rgb = [tuple(int(h[i : i + 2], 16) for i in (1, 3, 5)) for h in PALETTE[:2]]
    with Image.open(paths["png"]) as img:
        for box in ((90, 70, 650, 530), (780, 70, 1340, 530)):  # the panels: gFID, then the VAR's val loss
            colours = {c for _, c in img.crop(box).getcolors(maxcolors=1 << 20)}
            assert rgb[0] in colours and rgb[1] not in colours  # ms's VAR square; nothing for the n/a one


# -- Slurm -----------------------------------------------------------------------------------------------------------
def _cancel_our_jobs(out: Path) -> None:
    """scancel the jobs this test's pipeline submitted (by id) that are still queued."""
    try:
        state = state_of(out)
    except (OSError, ValueError):
        return
    ids = {
        str(rec.get(k))
        for tok in state["tokenizers"].values()
        for rec in tok["stages"].values()
        for k in ("job_id", "continuation_job_id")
        if rec.get(k)
    }
    if ids:
        subprocess.run(["scancel", *sorted(ids)], capture_output=True, timeout=60)


@pytest.mark.slurm
@pytest.mark.slow
def test_as_slurm_jobs_each_stage_is_followed_by_a_continuation_that_submits_the_next_or_records_a_failure(
    slurm_cluster, assets, tmp_path
):
    broken = tmp_path / "broken"
    shutil.copytree(assets["root"] / "toks" / "small", broken)
    weights = broken / "model.safetensors"
    with open(weights, "r+b") as f:  # its config loads (checked before submission); its job fails
        f.truncate(weights.stat().st_size // 2)
    out = tmp_path / "out"
    args = [
        assets["root"] / "toks" / "ms", broken, "--config", assets["config"], *data_flags(assets, out),
        "--submit", "--time", "10",
    ]  # fmt: skip
    env = {"SLURM_CONF": slurm_cluster.conf}
    try:
        res = probe(*args, env=env, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        submitted = json.loads(res.stdout)["tokenizers"]
        assert {n: (s["action"], s["stage"]) for n, s in submitted.items()} == {
            "ms": ("submitted", "recon"),
            "broken": ("submitted", "recon"),
        }
        deadline = time.monotonic() + 420
        while True:
            state = state_of(out)
            done = {n: t.get("status") for n, t in state["tokenizers"].items()}
            if done == {"ms": "done", "broken": "failed"}:
                break
            if time.monotonic() > deadline:
                logs = sorted(str(p) for p in out.rglob("*.err"))
                pytest.fail(f"chain not finished after 420 s: {json.dumps(state, indent=1)[-4000:]}\n{logs}")
            time.sleep(2)
        ms = state["tokenizers"]["ms"]["stages"]
        assert statuses(state, "ms") == dict.fromkeys(STAGES, "done")  # the GPT's stages, then the VAR's
        jobs = [ms[stage]["job_id"] for stage in STAGES]
        assert len(set(jobs)) == len(STAGES)  # one job per stage, each submitted by the previous continuation
        assert "tokscale.cli submit var var/tiny" in ms["train-var"]["command"]
        assert (
            f"eval gen {out / 'ms' / 'var'}" in ms["gen-var"]["command"]
            and "--submit" in ms["gen-var"]["command"]
        )
        assert [i["mode"] for i in state["invocations"]].count("continuation") >= len(STAGES) + 1
        recon = state["tokenizers"]["broken"]["stages"]["recon"]
        assert recon["status"] == "failed" and recon["attempts"] == 1  # recorded once, not resubmitted
        assert f"job {recon['job_id']} ended" in recon["error"] and "SafetensorError" in recon["error"]
        assert Path(recon["log"]).is_file() and list(state["tokenizers"]["broken"]["stages"]) == ["recon"]
        time.sleep(3)  # a continuation that wrongly resubmitted would have queued its job by now
        assert state_of(out)["tokenizers"]["broken"]["stages"]["recon"]["job_id"] == recon["job_id"]
        rows = {r["tokenizer"]: r for r in csv_rows(out)}
        assert all(rows["ms"][key] != "" for key, _, _ in COLUMNS + VAR_COLUMNS), rows["ms"]
        assert all(rows["broken"][key] == "" for key, _, _ in COLUMNS[2:])  # name and size only ...
        assert all(
            rows["broken"][key] == "n/a" for key, _, _ in VAR_COLUMNS
        )  # ... and no VAR: not multi-scale
        assert (out / "tradeoff.png").is_file()
    finally:
        _cancel_our_jobs(out)
