"""`tokscale eval ...` end to end in a real process, on a tiny exported tokenizer and the embedded dataset."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from palette import write_tiny_export

from tokscale.evaluation.fid import StatsMeta, save_stats


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "2d-tiny-32"
    write_tiny_export(out)
    return out


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("data_cache")


def tokscale(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "tokscale.cli", *args], capture_output=True, text=True, timeout=300, env=env
    )


def test_eval_recon_writes_metrics_json_tensorboard_and_a_grid(tiny_export, data_cache, tmp_path):
    out = tmp_path / "recon"
    r = tokscale(
        "eval", "recon", str(tiny_export), f"data.cache_dir={data_cache}", "data.num_workers=0",
        "--data", "embedded", "--no-fid", "--no-lpips", "--num-samples", "8", "--batch-size", "3",
        "--out", str(out),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "metrics.json").read_text())
    m = report["metrics"]
    assert m["num_samples"] == 8 and m["codebook_size"] == 4096
    assert (
        report["weights_sha256"] is None and report["weights_verified"] is False
    )  # no SHA256SUMS: not checked
    assert 0 < m["codebook_usage"] <= 1 and m["ssim_dr2"] > m["ssim_dr1"]
    assert report["protocol"]["resolution"] == 32 and report["protocol"]["crop"] == "adm_center"
    assert (out / "grid.png").is_file() and any((out / "tb").iterdir())
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["eval/num_samples"] == 8


def test_eval_recon_refuses_a_reference_made_at_another_resolution(
    tiny_export, data_cache, tmp_path, inception_weights
):
    ref = save_stats(
        tmp_path / "val256.npz", np.zeros(2048), np.eye(2048), StatsMeta(resolution=256, count=50000)
    )
    r = tokscale(
        "eval", "recon", str(tiny_export), f"data.cache_dir={data_cache}", "data.num_workers=0",
        "--data", "embedded", "--no-lpips", "--inception-weights", str(inception_weights),
        "--reference", str(ref), "--num-samples", "2", "--out", str(tmp_path / "o"),
    )  # fmt: skip
    assert r.returncode == 2
    assert "resolution=256" in r.stderr and "resolution=32" in r.stderr and "--force" in r.stderr


def test_eval_recon_without_inception_weights_names_the_file_and_its_source(
    tiny_export, data_cache, tmp_path
):
    missing = tmp_path / "pt_inception.pth"
    r = tokscale(
        "eval", "recon", str(tiny_export), f"data.cache_dir={data_cache}",
        "--data", "embedded", "--no-lpips", "--inception-weights", str(missing), "--out", str(tmp_path / "o"),
    )  # fmt: skip
    assert r.returncode == 2
    assert str(missing) in r.stderr and "torch-fidelity" in r.stderr


def test_eval_stats_writes_adm_format_statistics_with_the_protocol(data_cache, tmp_path, inception_weights):
    out = tmp_path / "ref.npz"
    r = tokscale(
        "eval", "stats", str(out), f"data.cache_dir={data_cache}", "data.num_workers=0", "--data", "embedded",
        "--inception-weights", str(inception_weights), "--resolution", "16", "--num-samples", "3",
        "--out", str(tmp_path / "o"),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    with np.load(out) as npz:
        assert npz["mu"].shape == (2048,) and npz["sigma"].shape == (2048, 2048)
        meta = json.loads(str(npz["tokscale_meta"]))
    assert meta["count"] == 3 and meta["resolution"] == 16 and meta["crop"] == "adm_center"
    assert "inception" in meta["feature_extractor"]


@pytest.mark.slow  # 1,200 images through the tokenizer, then two probes
def test_eval_probe_trains_on_the_train_split_and_reports_both_probes(tiny_export, data_cache, tmp_path):
    r = tokscale(
        "eval", "probe", str(tiny_export), f"data.cache_dir={data_cache}", "data.num_workers=0",
        "probe.batch_size=128", "--train-data", "embedded", "--eval-data", "embedded", "--epochs", "2",
        "--warmup-epochs", "1", "--save-features", "--out", str(tmp_path / "probe"),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "probe" / "probe.json").read_text())
    assert report["num_classes"] == 10
    assert report["linear_probe"]["num_train"] == 1000 and report["linear_probe"]["num_eval"] == 200
    assert report["logistic_probe"]["top1"] > 10.0  # above chance on encoder features of 10 photo classes
    import torch

    cached = torch.load(tmp_path / "probe" / "features.pt")
    assert cached["train_features"].shape == (1000, 256) and cached["eval_labels"].shape == (200,)


def test_the_eval_runner_has_the_interface_the_slurm_job_runs(tmp_path):
    from tokscale.registry import resolve_runnable

    runner = resolve_runnable("tokscale.tokenizers.eval_runner")
    cfg = runner.load_config(None, ["task=stats", "data.eval_shards=embedded", f"stats_out={tmp_path}/r.npz"])
    assert cfg.run_dir and cfg.task == "stats"
    with pytest.raises(ValueError, match="stats_out"):
        runner.load_config(None, ["task=stats", "data.eval_shards=embedded"])


def test_eval_recon_over_two_local_processes_counts_an_uneven_set_once(tiny_export, data_cache, tmp_path):
    out = tmp_path / "recon2"
    r = tokscale(
        "eval", "recon", str(tiny_export), f"data.cache_dir={data_cache}", "data.num_workers=0",
        "--data", "embedded", "--no-fid", "--no-lpips", "--num-samples", "5", "--batch-size", "2",
        "--out", str(out), "--nproc", "2",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "metrics.json").read_text())
    assert report["world_size"] == 2 and report["metrics"]["num_samples"] == 5
    assert (out / "eval_config.yaml").is_file()


def test_is_and_fid_depend_on_the_images_only_not_on_ranks_or_workers_and_metrics_are_strict_json(
    tiny_export, data_cache, tmp_path, inception_weights
):
    """The defect this guards: IS took its splits by arrival position, so 1 vs 2 ranks or 0 vs 2 workers gave
    1.0371 / 1.0330 / 1.0317 on the same 200 images. 23 images, 10 splits: uneven shares everywhere."""

    def refuse(name):
        raise ValueError(f"metrics.json holds {name}")

    results = {}
    for name, extra in {"one": [], "two-ranks": ["--nproc", "2"], "two-workers": ["--workers", "2"]}.items():
        out = tmp_path / name
        r = tokscale(
            "eval", "recon", str(tiny_export), f"data.cache_dir={data_cache}", "--data", "embedded",
            "--no-lpips", "--inception-weights", str(inception_weights), "--num-samples", "23",
            "--batch-size", "4", "--out", str(out), *(extra or ["--workers", "0"]),
        )  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
        results[name] = json.loads((out / "metrics.json").read_text(), parse_constant=refuse)["metrics"]
    one = results["one"]
    assert one["num_samples"] == 23 and one["is_mean"] > 1
    for other in ("two-ranks", "two-workers"):
        m = results[other]
        assert m["num_samples"] == 23
        # Random Inception weights give IS just above 1: compare the excess. Other batchings change the float32
        # logits in the 7th digit (2.6e-9 on IS); splits taken by position changed the excess by far more.
        assert m["is_mean"] - 1 == pytest.approx(one["is_mean"] - 1, rel=1e-3)
        assert m["is_std"] == pytest.approx(one["is_std"], rel=1e-2)
        # FID of 23 samples in 2048 dimensions is a near-singular sqrtm: float32 batching moves it by ~1.5e-6.
        assert m["rfid"] == pytest.approx(one["rfid"], rel=1e-5)
    few = tmp_path / "few"
    r = tokscale(
        "eval", "recon", str(tiny_export), f"data.cache_dir={data_cache}", "data.num_workers=0", "--data",
        "embedded", "--no-lpips", "--inception-weights", str(inception_weights), "--num-samples", "4",
        "--out", str(few),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((few / "metrics.json").read_text(), parse_constant=refuse)["metrics"]
    assert m["is_mean"] is None and "fewer than is_splits=10" in m["is_undefined_reason"]
    for line in (few / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=refuse)


def test_eval_recon_writes_its_folder_whole_and_never_into_a_folder_of_other_files(
    tiny_export, data_cache, tmp_path
):
    args = [
        "eval", "recon", str(tiny_export), f"data.cache_dir={data_cache}", "data.num_workers=0", "--data",
        "embedded", "--no-fid", "--no-lpips", "--num-samples", "4", "--batch-size", "2",
    ]  # fmt: skip
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "notes.txt").write_text("keep me")
    r = tokscale(*args, "--out", str(mine))
    assert r.returncode != 0 and "notes.txt" in r.stderr and "--overwrite" in r.stderr
    assert (mine / "notes.txt").read_text() == "keep me" and not (mine / "metrics.json").exists()
    assert not (tmp_path / "mine.eval-job" / "eval_config.yaml").exists()  # refused before anything ran

    out = tmp_path / "recon"
    for _ in range(2):  # the second run replaces the first one's folder whole
        r = tokscale(*args, "--out", str(out))
        assert r.returncode == 0, r.stderr[-2000:]
        assert {p.name for p in out.iterdir()} >= {"metrics.json", "grid.png", "eval_config.yaml", "tb"}
        assert not (tmp_path / "recon.eval-job").exists()
    r = tokscale(*args, "--out", str(mine), "--overwrite")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (mine / "notes.txt").read_text() == "keep me" and (mine / "metrics.json").is_file()
    (tmp_path / "afile").write_text("x")
    r = tokscale(*args, "--out", str(tmp_path / "afile"))
    assert r.returncode != 0 and "is a file" in r.stderr
