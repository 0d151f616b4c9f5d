"""`tokscale demo` end to end at a tiny setting: the tokenizer stage, then extraction, a GPT, samples, gFID and the AR
probe write every field of demo_metrics.json's ``ar`` section (strict JSON) and a sample grid with one row per
class; the overrides reach the stage they name, a typo fails before any work, --ar-only needs a tokenizer and
reruns the AR stages on it, and the command is registered by the AR side (tokenizers/ imports nothing of it)."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tokscale.autoregressive.demo import DemoOverrides, run
from tokscale.config import ConfigError

CLASSES = 10  # the embedded dataset
SIZE = 32  # 2d-tiny at 32 px: a 2 x 2 grid of codes
PER_CLASS = 2


def tiny(cache: Path) -> list[str]:
    """Seconds instead of minutes: 2 tokenizer steps, 4 GPT steps, 20 samples against a 20-image reference."""
    return [
        f"data.cache_dir={cache}",
        f"model.image_size={SIZE}",
        "data.batch_size=4",
        "data.num_workers=0",
        "data.shuffle_buffer=8",
        "data.batches_per_epoch=4",
        "train.max_steps=2",
        "train.ckpt_every=2",
        "train.image_every=2",
        "train.progress=false",
        "eval.every_steps=0",
        "c2i.model.num_tokens=4",
        "c2i.model.width=64",
        "c2i.model.depth=2",
        "c2i.model.heads=4",
        "c2i.data.batch_size=8",
        "c2i.train.max_steps=4",
        "c2i.train.ckpt_every=4",
        "c2i.eval.every_steps=2",
        "c2i.optim.warmup_steps=1",
        f"ar.gen_samples={CLASSES * PER_CLASS}",
        f"ar.grid_per_class={PER_CLASS}",
        f"ar.reference_per_class={PER_CLASS}",
        "ar.gen_batch_size=20",
        "ar.probe_epochs=1",
        "ar.probe_warmup_epochs=0",
        "ar.probe_views=1",
        "ar.progress=false",
    ]


def strict_json(path: Path) -> dict:
    def refuse(name):
        raise ValueError(f"{path} holds {name}")

    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    run_dir = root / "run"
    report = run(str(run_dir), tiny(root / "cache"))
    return run_dir, report


@pytest.mark.slow  # the shared tiny demo run: ~40 s on 2 cores
def test_the_demo_writes_the_tokenizer_and_ar_sections_into_strict_json(demo_run):
    run_dir, report = demo_run
    saved = strict_json(run_dir / "demo_metrics.json")
    assert saved["steps"] == 2 and math.isfinite(saved["psnr_gain_db"]) and "mean_image_psnr" in saved
    ar = saved["ar"]
    assert ar["tokens"]["train_images"] == 1000 and ar["tokens"]["eval_images"] == 200
    gpt = ar["gpt"]
    assert gpt["steps"] == 4 and gpt["params"] > 0 and gpt["train_seconds"] > 0
    assert sorted(gpt["val_ce"]) == ["2", "4"] and math.isfinite(gpt["val_ce_end"])
    assert gpt["ln_vocab"] == pytest.approx(math.log(4096)) and 0 < gpt["unigram_ce"] <= gpt["ln_vocab"]
    gen = ar["gen"]
    assert gen["num_samples"] == CLASSES * PER_CLASS and gen["class_rule"] == "balanced"
    assert math.isfinite(gen["gfid"]) and gen["gfid"] >= 0 and math.isfinite(gen["is_mean"])
    assert 0 <= gen["precision"] <= 1 and 0 <= gen["recall"] <= 1
    assert f"{CLASSES * PER_CLASS} images" in gen["reference"]["description"]
    # no Inception file was given: the number is said to come from random weights
    assert gen["inception_weights"]["kind"] == "random" and "RANDOMLY" in gen["inception_weights"]["note"]
    assert math.isfinite(gen["real_floor"]["fid"]) and gen["real_floor"]["num_images"] == CLASSES * PER_CLASS
    probe = ar["ar_probe"]
    assert probe["chance_top1"] == 100 / CLASSES and 0 <= probe["top1"] <= 100 and probe["num_val"] == 200
    assert saved["total_seconds"] >= ar["seconds"] > 0
    assert report["ar"]["gen"]["gfid"] == gen["gfid"]


@pytest.mark.slow  # the shared tiny demo run: ~40 s on 2 cores
def test_the_sample_grid_has_one_row_per_class(demo_run):
    run_dir, _ = demo_run
    saved = strict_json(run_dir / "demo_metrics.json")
    png = Path(saved["files"]["samples"])
    assert png == run_dir / "demo_samples.png" and png.is_file()
    cell = SIZE + 2  # image_grid's padding
    assert Image.open(png).size == (PER_CLASS * cell + 2, CLASSES * cell + 2)
    assert (run_dir / "demo_reconstruction.png").is_file() and (run_dir / "gen" / "samples.npz").is_file()


@pytest.mark.slow  # the shared tiny demo run: ~40 s on 2 cores
def test_ar_only_reruns_the_ar_stages_on_the_tokenizer_in_the_run_dir(demo_run):
    run_dir, _ = demo_run
    before = strict_json(run_dir / "demo_metrics.json")
    ar_overrides = [o for o in tiny(run_dir.parent / "cache") if o.startswith(("c2i.", "ar."))]
    report = run(
        str(run_dir), [*ar_overrides, "c2i.train.max_steps=2", "c2i.eval.every_steps=2"], ar_only=True
    )
    saved = strict_json(run_dir / "demo_metrics.json")
    assert saved["ar"]["gpt"]["steps"] == 2 and report["total_seconds_covers"].startswith(
        "the AR stages only"
    )
    assert saved["psnr_gain_db"] == before["psnr_gain_db"]  # the tokenizer part is kept as it was


def test_ar_only_without_a_tokenizer_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="without --ar-only"):
        run(str(tmp_path / "empty"), ["ar.progress=false"], ar_only=True)


def test_overrides_reach_the_stage_they_name_and_a_typo_fails_before_any_work(tmp_path):
    parts = DemoOverrides.split(["train.max_steps=3", "c2i.train.max_steps=5", "ar.gen_samples=30"])
    assert parts.tokenizer == ["train.max_steps=3"]
    assert parts.c2i == ["train.max_steps=5"] and parts.ar == ["gen_samples=30"]
    for typo in ("c2i.train.max_stepz=5", "ar.gen_sample=30"):
        with pytest.raises(ConfigError):
            run(str(tmp_path / "never"), [typo])
        assert not (tmp_path / "never").exists()


def test_the_demo_command_is_registered_by_the_ar_side_with_its_flags():
    out = subprocess.run(
        [sys.executable, "-m", "tokscale.cli", "demo", "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0
    for flag in ("--run-dir", "--skip-ar", "--ar-only", "--inception-weights"):
        assert flag in out.stdout
    tokenizers = Path(__file__).parents[2] / "tokenizers"
    for source in tokenizers.glob("*.py"):
        imports = re.findall(r"^\s*(?:from|import) (tokscale\.autoregressive\S*)", source.read_text(), re.M)
        assert not imports, f"{source} imports {imports}"
