import json
import shutil

import pytest
import torch
from tiny_run import StopAfter, losses, tiny_cfg

from tokscale.checkpoint import complete_checkpoints, latest_checkpoint
from tokscale.config import ConfigError
from tokscale.export import export, publish, state_dict_from, verify
from tokscale.tokenizers.load import load_tokenizer
from tokscale.tokenizers.train import main


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, image_shards):
    run_dir = tmp_path_factory.mktemp("full") / "run"
    result = main(tiny_cfg(run_dir, image_shards))
    assert result == {"status": "done", "step": 6, "run_dir": str(run_dir)}
    return run_dir


def test_stopped_and_resumed_run_ends_with_the_same_losses_and_weights_as_an_uninterrupted_run(
    full_run, tmp_path, image_shards
):
    run_dir = tmp_path / "run"
    first = main(tiny_cfg(run_dir, image_shards), should_stop=StopAfter(3))
    assert first["status"] == "stopped" and first["step"] == 3
    assert latest_checkpoint(run_dir)[0] == 3
    second = main(tiny_cfg(run_dir, image_shards))  # the same command again resumes
    assert second == {"status": "done", "step": 6, "run_dir": str(run_dir)}
    assert losses(run_dir) == pytest.approx(losses(full_run), rel=1e-6)
    a, b = state_dict_from(run_dir), state_dict_from(full_run)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # what users watch resumes too: the usage window is saved per rank with the checkpoint
    for key in ("train/codebook_usage", "train/codebook_perplexity"):
        assert logged(run_dir, key) == logged(full_run, key), key


def logged(run_dir, key: str) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if key in r}


def test_run_directory_holds_config_commit_logs_grid_and_the_last_checkpoints(full_run):
    assert (full_run / "config.yaml").read_text().count("preset: 2d-tiny") == 1
    info = json.loads((full_run / "run_info.jsonl").read_text().splitlines()[-1])
    assert info["world_size"] == 1 and info["git_commit"]
    assert list((full_run / "tb").iterdir())
    assert (full_run / "reconstruction.png").stat().st_size > 0
    assert [s for s, _ in complete_checkpoints(full_run)] == [4, 6]  # keep_last=2
    row = json.loads((full_run / "metrics.jsonl").read_text().splitlines()[-1])
    for key in (
        "train/loss_rec",
        "train/loss_commit",
        "train/lr",
        "train/grad_norm",
        "train/codebook_usage",
        "train/codebook_perplexity",
        "perf/img_per_s",
    ):
        assert key in row


def test_resuming_with_a_config_that_changes_the_model_is_refused_naming_the_keys(full_run, image_shards):
    with pytest.raises(ConfigError, match="model.decoder.depth"):
        main(tiny_cfg(full_run, image_shards, "model.decoder.depth=2"))


def test_a_crash_mid_save_leaves_the_previous_checkpoint_the_resume_point(full_run, tmp_path):
    run_dir = tmp_path / "copy"
    shutil.copytree(full_run, run_dir)
    partial = run_dir / "ckpt" / ".tmp_step_00000008"
    (partial / "engine").mkdir(parents=True)
    (partial / "rank_00000.pt").write_bytes(b"truncated")
    assert latest_checkpoint(run_dir)[0] == 6
    half_renamed = run_dir / "ckpt" / "step_00000010"  # no COMPLETE marker: not a checkpoint
    half_renamed.mkdir()
    assert latest_checkpoint(run_dir)[0] == 6


def test_export_writes_safetensors_config_card_and_manifest_and_loads_back(full_run, tmp_path):
    out = export(full_run, tmp_path / "export")
    for name in (
        "model.safetensors",
        "config.yaml",
        "training.json",
        "metrics.json",
        "README.md",
        "SHA256SUMS",
    ):
        assert (out / name).is_file(), name
    verify(out)
    assert json.loads((out / "training.json").read_text())["step"] == 6
    assert (out / "README.md").read_text().startswith("---\nlibrary_name: tokscale")
    tok = load_tokenizer(out)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    codes = tok.encode(images)
    assert codes.shape == (2, 4) and codes.dtype == torch.int64
    assert torch.equal(codes, load_tokenizer(full_run).encode(images))
    assert tok.decode(codes).shape == images.shape


def test_a_corrupted_export_fails_verification_naming_the_file(full_run, tmp_path):
    out = export(full_run, tmp_path / "export")
    with open(out / "config.yaml", "a") as f:
        f.write("# edited\n")
    with pytest.raises(ValueError, match="config.yaml"):
        verify(out)


def test_publish_without_credentials_says_what_is_missing(full_run, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    out = export(full_run, tmp_path / "export")
    with pytest.raises(ValueError, match="HF_TOKEN"):
        publish(out, "someone/tokscale-test")


def test_init_from_loads_weights_only_and_starts_at_step_zero(full_run, tmp_path, image_shards):
    run_dir = tmp_path / "init"
    cfg = tiny_cfg(
        run_dir,
        image_shards,
        f"init_from={full_run}",
        "train.max_steps=1",
        "optim.lr=1e-12",
        "optim.min_lr=0",
        "optim.warmup_steps=0",
    )
    assert main(cfg)["step"] == 1
    a, b = state_dict_from(run_dir), state_dict_from(full_run)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_in_training_evaluation_logs_psnr_and_codebook_usage(tmp_path, image_shards):
    run_dir = tmp_path / "eval"
    main(
        tiny_cfg(
            run_dir,
            image_shards,
            "train.max_steps=2",
            "eval.every_steps=2",
            "eval.train_num_samples=8",
            "eval.batch_size=4",
        )
    )
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/psnr" in r]
    assert [r["step"] for r in evals] == [2]
    assert 0 < evals[0]["eval/psnr"] < 100 and 0 < evals[0]["eval/codebook_usage"] <= 1


def test_export_carries_the_newest_evaluation_metrics_into_metrics_json_and_the_card(full_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(full_run, run_dir)
    (run_dir / "eval" / "recon").mkdir(parents=True)
    (run_dir / "eval" / "recon" / "metrics.json").write_text(
        json.dumps({"metrics": {"rfid": 1.2345, "psnr": 21.5}})
    )
    out = export(run_dir, tmp_path / "export")
    assert json.loads((out / "metrics.json").read_text()) == {"rfid": 1.2345, "psnr": 21.5}
    assert "| rfid | 1.234 |" in (out / "README.md").read_text()


def test_gradient_accumulation_takes_one_optimizer_step_per_logged_step(tmp_path, image_shards):
    run_dir = tmp_path / "accum"
    assert main(tiny_cfg(run_dir, image_shards, "train.grad_accum=2", "train.max_steps=3"))["step"] == 3
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["train/lr"] for r in rows if "train/lr" in r]
    # 2 warmup steps then cosine to min_lr at step 3; per micro-batch it would reach min_lr at step 2
    assert lrs == pytest.approx([1e-4, 1e-4, 1e-5])  # conf/tokenizer/demo.yaml: lr 1e-4, min_lr 1e-5
    assert rows[-1]["step"] == 3
