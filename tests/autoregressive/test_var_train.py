"""The VAR trainer on the shared loop, with a real multi-scale tokenizer (the tiny one of
conf/tokenizer/multiscale-tiny.yaml, randomly initialised) giving the teacher-forcing input: the validation loss
falls, samples decode to images, a stopped run resumes exactly, two ranks and a two-node Slurm job train, and
shards or tokenizers that do not fit are refused naming the key."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from tokscale.autoregressive.var_train import VARTask
from tokscale.data.tokens import TokenShardWriter, merge_manifests
from tokscale.loop import train

SCALES, L, CODEBOOK, CLASSES = [1, 2, 3, 4, 5, 6, 8], 155, 1024, 4


def write_codes(out: Path, images: int, seed: int, num_tokens: int = L) -> str:
    """Multi-scale codes a VAR can learn: each class its own pattern, 10% of the positions random."""
    rng = np.random.default_rng(seed)
    patterns = np.random.default_rng(0).integers(0, CODEBOOK, size=(CLASSES, num_tokens))
    with TokenShardWriter(out, "toy-ms", CODEBOOK, num_tokens, num_augs=1, samples_per_shard=40) as w:
        for i in range(images):
            codes = patterns[i % CLASSES].copy()
            noise = rng.random(num_tokens) < 0.1
            codes[noise] = rng.integers(0, CODEBOOK, size=noise.sum())
            w.write(f"img{i:05d}", codes[None], i % CLASSES)
    return str(out)


def write_tokenizer(out: Path, overrides=()) -> str:
    from tokscale.export import write_export
    from tokscale.tokenizers.model import VQTokenizer
    from tokscale.tokenizers.train import load_train_config

    cfg = load_train_config("tokenizer/multiscale-tiny", list(overrides))
    torch.manual_seed(0)
    tok = VQTokenizer(cfg.model, with_projector=False)
    out.mkdir(parents=True)
    model = OmegaConf.to_container(OmegaConf.structured(cfg.model))
    write_export(
        out, tok.state_dict(), {"model": model}, "tokenizer", {}, {}, "a random tiny multi-scale tokenizer\n"
    )
    return str(out)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("var")
    return {
        "tokenizer": write_tokenizer(root / "tok"),
        "train": write_codes(root / "train", 64, seed=1),
        "val": write_codes(root / "val", 12, seed=2),
    }


def overrides(run_dir, data, *extra) -> list[str]:
    return [
        f"run_dir={run_dir}",
        f"tokenizer={data['tokenizer']}",
        f"data.train_tokens={data['train']}",
        f"data.val_tokens={data['val']}",
        f"model.num_classes={CLASSES}",
        "model.width=64",
        "model.heads=2",
        "model.depth=1",
        "data.batch_size=8",
        "train.progress=false",
        *extra,
    ]


def cfg(run_dir, data, *extra):
    return VARTask.load_config("var/tiny", overrides(run_dir, data, *extra))


def rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_a_tiny_var_learns_the_codes_its_validation_loss_falls_and_its_samples_decode(data, tmp_path):
    from tokscale.autoregressive.var_sample import VARSampleConfig, generate_var
    from tokscale.autoregressive.var_train import load_var
    from tokscale.tokenizers.load import load_tokenizer

    run = tmp_path / "learn"
    c = cfg(run, data, "train.max_steps=30", "eval.every_steps=15", "optim.lr=1e-2", "optim.warmup_steps=5")
    out = train(VARTask, c)
    assert out["status"] == "done" and out["step"] == 30
    val = [r["val/loss_ce"] for r in rows(run) if "val/loss_ce" in r]
    assert len(val) == 2 and val[1] < val[0] < math.log(CODEBOOK), val
    assert val[1] < 0.5 * math.log(CODEBOOK), val  # the patterns are mostly learnt
    # the trained model samples codes that the tokenizer decodes
    model = load_var(run)
    assert model.config == c.model
    tok = load_tokenizer(data["tokenizer"])
    codes = generate_var(
        model, tok.quantizer, torch.tensor([0, 1]), VARSampleConfig(cfg_scale=1.0, top_k=5), torch.Generator()
    )
    assert codes.shape == (2, L) and int(codes.max()) < CODEBOOK
    with torch.no_grad():
        images = tok.decode(codes)
    size = tok.config.image_size
    assert images.shape == (2, 3, size, size) and torch.isfinite(images).all()
    # the learnt patterns of classes 0 and 1: a large share of the sampled codes are theirs (chance: 1 / 1024)
    pattern = np.random.default_rng(0).integers(0, CODEBOOK, size=(CLASSES, L))
    assert (codes.numpy() == pattern[:2]).mean() > 0.4


def test_a_stopped_var_run_resumes_with_the_same_losses_as_an_uninterrupted_one(data, tmp_path):
    extra = ("train.max_steps=8", "train.ckpt_every=3", "train.log_every=1")
    whole = tmp_path / "whole"
    train(VARTask, cfg(whole, data, *extra))
    split = tmp_path / "split"
    calls = {"n": 0}

    def stop_after_four():
        calls["n"] += 1
        return calls["n"] > 4

    first = train(VARTask, cfg(split, data, *extra), should_stop=stop_after_four)
    assert first["status"] == "stopped" and first["step"] < 8
    assert train(VARTask, cfg(split, data, *extra))["step"] == 8

    def losses(run):
        return {r["step"]: r["train/loss_ce"] for r in rows(run) if "train/loss_ce" in r}

    assert losses(split) == losses(whole) and len(losses(whole)) == 8


def test_two_var_ranks_train_and_validate_through_the_command_line(data, tmp_path):
    run = tmp_path / "two"
    args = ["train", "--nproc", "2", "var", "var/tiny", *overrides(run, data)]
    args += [
        "model.depth=1",
        "data.batch_size=4",
        "train.max_steps=4",
        "eval.every_steps=4",
        "train.ckpt_every=4",
    ]
    res = subprocess.run(
        [sys.executable, "-m", "tokscale.cli", *args], capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((run / "run_info.jsonl").read_text().splitlines()[-1])["world_size"] == 2
    last = rows(run)
    assert any("val/loss_ce" in r for r in last) and last[-1]["step"] == 4


def test_codes_or_a_tokenizer_that_do_not_fit_the_model_are_refused_naming_the_key(data, tmp_path):
    with pytest.raises(ValueError, match="155 tokens per image|model.num_tokens"):
        short = write_codes(tmp_path / "short", 8, seed=3, num_tokens=91)
        train(VARTask, cfg(tmp_path / "a", data, f"data.train_tokens={short}", "train.max_steps=1"))
    with pytest.raises(ValueError, match="quantizer.scales"):
        train(VARTask, cfg(tmp_path / "b", data, "model.scales=[1,2,4,8]", "train.max_steps=1"))
    other = Path(write_codes(tmp_path / "other", 8, seed=4))
    manifest = merge_manifests(other)
    (other / "manifest.json").write_text(json.dumps({**manifest, "scales": [5, 7, 9]}))  # 155 codes too
    with pytest.raises(ValueError, match=r"codes of scales \[5, 7, 9\], but model.scales"):
        train(VARTask, cfg(tmp_path / "o", data, f"data.train_tokens={other}", "train.max_steps=1"))
    with pytest.raises(ValueError, match="tokenizer is empty"):
        train(VARTask, cfg(tmp_path / "c", data, "tokenizer=''", "train.max_steps=1"))


def test_the_var_recipes_carry_vars_settings():
    for depth, lr, batch, alng in ((16, 3e-4, 768, 1e-3), (20, 3e-4, 768, 1e-3), (24, 2.4e-4, 768, 1e-4),
                                    (30, 3.2e-4, 1024, 1e-5)):  # fmt: skip
        c = VARTask.load_config(f"var/var-d{depth}")
        assert (c.model.depth, c.model.width, c.model.heads) == (depth, 64 * depth, depth)
        assert c.optim.lr == pytest.approx(lr) and c.train.global_batch_size == batch
        assert c.model.init_adaln_gamma == pytest.approx(alng) and c.optim.grad_clip == 2.0
        assert c.optim.betas == [0.9, 0.95] and c.optim.weight_decay == 0.05 and c.model.class_dropout == 0.1


@pytest.mark.slurm
@pytest.mark.slow
def test_a_two_node_var_job_trains_through_slurm(slurm_cluster, data, tmp_path, capsys):
    import submitit

    from tokscale.cli import main as cli_main

    run_dir = tmp_path / "slurm"
    args = ["submit", "var", "var/tiny", *overrides(run_dir, data)]
    args += [
        "model.depth=1",
        "data.batch_size=4",
        "train.max_steps=4",
        "train.ckpt_every=2",
        "train.log_every=1",
    ]
    args += ["eval.every_steps=4", "--nodes", "2", "--time", "10", "--signal-delay-s", "60", "--json"]
    assert cli_main(args) == 0, capsys.readouterr().err
    (run,) = json.loads(capsys.readouterr().out)
    job = submitit.SlurmJob(
        folder=Path(run["stdout"]).parent, job_id=run["job_id"], tasks=list(range(run["num_tasks"]))
    )
    results = slurm_cluster.wait_for(job, timeout_s=300)
    assert results == [{"status": "done", "step": 4, "run_dir": str(run_dir)}] * 2
    assert json.loads((run_dir / "run_info.jsonl").read_text().splitlines()[-1])["world_size"] == 2
    metrics = rows(run_dir)
    assert [r["step"] for r in metrics if "train/loss_ce" in r] == [1, 2, 3, 4]
    assert any("val/loss_ce" in r for r in metrics)
    assert slurm_cluster.final_state(run["job_id"]) == "COMPLETED"
