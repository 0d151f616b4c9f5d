"""The AR half through Slurm on the local two-node cluster: ``tokscale submit c2i`` trains a tiny GPT on two
nodes under ZeRO-2 over gloo (``submit detailflow`` a DetailFlow GPT on its three token streams), and ``tokscale sample --submit`` samples across two nodes, each image once, the
same images as one local process; ``tokscale eval gen --submit`` scores across two nodes with the numbers of one
local process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import submitit
import torch

from tokscale.cli import main as cli_main
from tokscale.data.tokens import TokenShardWriter

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

VOCAB, T, CLASSES = 64, 16, 4
RESOURCES = ["--time", "10", "--signal-delay-s", "60", "--json"]


def write_tokens(out: Path, images: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    with TokenShardWriter(out, "toy-tok", VOCAB, T, samples_per_shard=40) as w:
        for i in range(images):
            w.write(f"img{i:05d}", rng.integers(0, VOCAB, size=T), i % CLASSES)
    return str(out)


def job_of(run: dict) -> submitit.SlurmJob:
    tasks = list(range(run["num_tasks"]))
    return submitit.SlurmJob(folder=Path(run["stdout"]).parent, job_id=run["job_id"], tasks=tasks)


def test_a_two_node_c2i_job_trains_a_tiny_gpt_under_zero2(slurm_cluster, tmp_path, capsys):
    run_dir = tmp_path / "c2i"
    args = [
        "submit", "c2i", "c2i/tiny", f"run_dir={run_dir}",
        f"data.train_tokens={write_tokens(tmp_path / 'train', 64, 1)}",
        f"data.val_tokens={write_tokens(tmp_path / 'val', 8, 2)}",
        f"model.vocab_size={VOCAB}", f"model.num_classes={CLASSES}", "model.width=32", "model.heads=2",
        "model.depth=2", "data.batch_size=4", "train.max_steps=4", "train.ckpt_every=2", "train.log_every=1",
        "eval.every_steps=4", "train.zero_stage=2", "train.progress=false", "--nodes", "2", *RESOURCES,
    ]  # fmt: skip
    assert cli_main(args) == 0, capsys.readouterr().err
    (run,) = json.loads(capsys.readouterr().out)
    results = slurm_cluster.wait_for(job_of(run), timeout_s=300)
    assert results == [{"status": "done", "step": 4, "run_dir": str(run_dir)}] * 2
    info = json.loads((run_dir / "run_info.jsonl").read_text().splitlines()[-1])
    assert info["world_size"] == 2
    shards = sorted((run_dir / "ckpt" / "step_00000004").rglob("*optim_states.pt"))
    assert len(shards) == 2, shards  # ZeRO-2: one optimizer partition per rank
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss_ce" in r] == [1, 2, 3, 4]
    assert any("val/loss_ce" in r for r in rows)
    assert slurm_cluster.final_state(run["job_id"]) == "COMPLETED"


def test_a_two_node_detailflow_job_trains_on_the_three_token_streams(slurm_cluster, tmp_path, capsys):
    n = 16  # two groups of 8; the shards hold clean, input and label streams: 3 x 16 tokens a crop
    streams = []
    for name, images, seed in (("train", 32, 1), ("val", 8, 2)):
        rng = np.random.default_rng(seed)
        with TokenShardWriter(tmp_path / f"df-{name}", "toy-df", VOCAB, 3 * n, samples_per_shard=20) as w:
            for i in range(images):
                w.write(f"img{i:05d}", rng.integers(0, VOCAB, size=3 * n), i % CLASSES)
        streams.append(str(tmp_path / f"df-{name}"))
    run_dir = tmp_path / "detailflow"
    args = [
        "submit", "detailflow", "detailflow/tiny", f"run_dir={run_dir}", f"data.train_tokens={streams[0]}",
        f"data.val_tokens={streams[1]}", f"model.vocab_size={VOCAB}", f"model.num_classes={CLASSES}",
        f"model.num_tokens={n}", "model.width=32", "model.heads=2", "model.depth=1", "data.batch_size=4",
        "train.max_steps=3", "train.ckpt_every=3", "train.log_every=1", "eval.every_steps=3", "train.progress=false",
        "--nodes", "2", *RESOURCES,
    ]  # fmt: skip
    assert cli_main(args) == 0, capsys.readouterr().err
    (run,) = json.loads(capsys.readouterr().out)
    results = slurm_cluster.wait_for(job_of(run), timeout_s=300)
    assert results == [{"status": "done", "step": 3, "run_dir": str(run_dir)}] * 2
    assert json.loads((run_dir / "run_info.jsonl").read_text().splitlines()[-1])["world_size"] == 2
    assert (run_dir / "config.yaml").read_text().startswith("schema: detailflow")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss_ce" in r] == [1, 2, 3]
    assert any("val/loss_ce" in r for r in rows)


def tiny_pair(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny tokenizer export (4 tokens an image) and a GPT export for it."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "evaluation"))
    from palette import write_tiny_export

    from tokscale.autoregressive.gpt import GPT, GPTConfig
    from tokscale.export import write_export

    tok = tmp_path / "tok"
    write_tiny_export(tok)
    torch.manual_seed(0)
    gcfg = GPTConfig(width=32, depth=2, heads=2, vocab_size=4096, num_tokens=4, num_classes=3)
    model = GPT(gcfg)
    torch.nn.init.normal_(model.head.weight, std=0.5)
    gpt = tmp_path / "gpt"
    gpt.mkdir()
    write_export(gpt, model.state_dict(), {"model": asdict(gcfg)}, "gpt", {"step": 0}, {}, "# test GPT\n")
    return tok, gpt


def test_sampling_as_a_two_node_job_gives_the_images_of_one_local_process(slurm_cluster, tmp_path):
    tok, gpt = tiny_pair(tmp_path)
    common = [
        "--tokenizer",
        str(tok),
        "--classes",
        "all",
        "--num",
        "3",
        "--cfg-scale",
        "2",
        "--batch-size",
        "2",
    ]
    env = {"SLURM_CONF": slurm_cluster.conf}
    local = subprocess.run(
        [sys.executable, "-m", "tokscale.cli", "sample", str(gpt), str(tmp_path / "local"), *common],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert local.returncode == 0, local.stderr[-2000:]
    r = subprocess.run(
        [sys.executable, "-m", "tokscale.cli", "sample", str(gpt), str(tmp_path / "slurm"), *common,
         "--submit", "--nodes", "2", "--time", "10"],
        capture_output=True, text=True, timeout=120, env={**os.environ, **env},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    (run,) = json.loads(r.stdout)
    assert run["num_tasks"] == 2
    results = slurm_cluster.wait_for(job_of(run), timeout_s=300)
    assert sorted(x["made_here"] for x in results) == [4, 5] and {x["status"] for x in results} == {
        "finished"
    }
    deadline = time.monotonic() + 30
    while not (tmp_path / "slurm" / "samples.json").is_file():
        assert time.monotonic() < deadline
        time.sleep(0.5)

    def codes(folder):
        return json.loads((tmp_path / folder / "samples.json").read_text())["codes"]

    assert codes("slurm") == codes("local") and len(codes("local")) == 9


def test_eval_gen_as_a_two_node_job_gives_the_numbers_of_one_local_process(slurm_cluster, tmp_path):
    from tokscale.evaluation.inception import write_random_inception_weights

    tok, gpt = tiny_pair(tmp_path)
    weights = write_random_inception_weights(tmp_path / "inception.pth", seed=0)
    reference = tmp_path / "ref.npz"
    np.savez(reference, arr_0=np.random.default_rng(0).integers(0, 256, (12, 32, 32, 3), dtype=np.uint8))
    common = [
        "--tokenizer", str(tok), "--reference", str(reference), "--inception-weights", str(weights),
        "--num-samples", "10", "--batch-size", "3", "--cfg-scale", "2", "--device", "cpu",
    ]  # fmt: skip
    local = subprocess.run(
        [sys.executable, "-m", "tokscale.cli", "eval", "gen", str(gpt), "--out", str(tmp_path / "local"), *common],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert local.returncode == 0, local.stderr[-2000:]
    r = subprocess.run(
        [sys.executable, "-m", "tokscale.cli", "eval", "gen", str(gpt), "--out", str(tmp_path / "slurm"), *common,
         "--submit", "--nodes", "2", "--time", "10"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "SLURM_CONF": slurm_cluster.conf},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    (run,) = json.loads(r.stdout)
    assert run["num_tasks"] == 2
    results = slurm_cluster.wait_for(job_of(run), timeout_s=300)
    assert {x["status"] for x in results} == {"finished"}
    deadline = time.monotonic() + 30
    while not (tmp_path / "slurm" / "results.json").is_file():
        assert time.monotonic() < deadline
        time.sleep(0.5)
    a, b = (json.loads((tmp_path / f / "results.json").read_text()) for f in ("local", "slurm"))
    assert b["world_size"] == 2 and a["world_size"] == 1
    for key in ("fid", "is_mean", "is_std", "precision", "recall", "num_samples"):
        assert a[key] == b[key], key
