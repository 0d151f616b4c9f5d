"""The class-conditional AR trainer on the shared loop: it learns from token shards (validation cross-entropy
falls clearly), resumes exactly after a stop, streams each image once per epoch in one of its augmentations,
splits batches across ranks without overlap, and refuses shards that do not fit the model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tokscale.autoregressive.train import C2ITask
from tokscale.data.tokens import TokenShardWriter, TokenTrainStream
from tokscale.loop import train

VOCAB, T, CLASSES, AUGS = 64, 16, 4, 3


def write_tokens(out: Path, images: int, seed: int, tokenizer_id: str = "toy-tok", num_tokens: int = T):
    """Codes with structure a GPT can learn: each class has its own token pattern, each augmentation shifts it
    by one, and 10% of the positions are random."""
    rng = np.random.default_rng(seed)
    patterns = np.random.default_rng(0).integers(0, VOCAB, size=(CLASSES, num_tokens))
    with TokenShardWriter(out, tokenizer_id, VOCAB, num_tokens, num_augs=AUGS, samples_per_shard=50) as w:
        for i in range(images):
            label = i % CLASSES
            crops = []
            for aug in range(AUGS):
                codes = (patterns[label] + aug) % VOCAB
                noise = rng.random(num_tokens) < 0.1
                codes[noise] = rng.integers(0, VOCAB, size=noise.sum())
                crops.append(codes)
            w.write(f"img{i:05d}", np.stack(crops), label)
    return str(out)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokens")
    return write_tokens(root / "train", 96, seed=1), write_tokens(root / "val", 16, seed=2)


def cfg(run_dir, shards, *overrides):
    train_tokens, val_tokens = shards
    return C2ITask.load_config(
        "c2i/tiny",
        [
            f"run_dir={run_dir}",
            f"data.train_tokens={train_tokens}",
            f"data.val_tokens={val_tokens}",
            f"model.vocab_size={VOCAB}",
            f"model.num_classes={CLASSES}",
            "model.width=64",
            "model.heads=4",
            "model.depth=2",
            "data.batch_size=8",
            "train.progress=false",
            *overrides,
        ],
    )


def rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_a_tiny_gpt_learns_the_codes_and_its_validation_loss_falls(shards, tmp_path):
    run = tmp_path / "learn"
    out = train(
        C2ITask,
        cfg(
            run, shards, "train.max_steps=150", "eval.every_steps=75", "optim.lr=3e-3", "optim.warmup_steps=5"
        ),
    )
    assert out["status"] == "done" and out["step"] == 150
    val = [r["val/loss_ce"] for r in rows(run) if "val/loss_ce" in r]
    assert len(val) == 2
    # a fresh model (zero head) predicts uniformly: ln(64) = 4.16; the patterns are mostly learnable
    assert val[-1] < 0.6 * math.log(VOCAB), val
    ce = [r["train/loss_ce"] for r in rows(run) if "train/loss_ce" in r]
    assert abs(ce[0] - math.log(VOCAB)) < 0.2 and ce[-1] < 0.6 * ce[0]


def test_a_stopped_run_resumes_with_the_same_losses_as_an_uninterrupted_one(shards, tmp_path):
    whole = tmp_path / "whole"
    train(C2ITask, cfg(whole, shards, "train.max_steps=12", "train.ckpt_every=4", "train.log_every=1"))
    split = tmp_path / "split"
    calls = {"n": 0}

    def stop_after_five():
        calls["n"] += 1
        return calls["n"] > 5

    first = train(
        C2ITask,
        cfg(split, shards, "train.max_steps=12", "train.ckpt_every=4", "train.log_every=1"),
        should_stop=stop_after_five,
    )
    assert first["status"] == "stopped" and first["step"] < 12
    assert (
        train(C2ITask, cfg(split, shards, "train.max_steps=12", "train.ckpt_every=4", "train.log_every=1"))[
            "step"
        ]
        == 12
    )

    def losses(run):
        return {r["step"]: r["train/loss_ce"] for r in rows(run) if "train/loss_ce" in r}

    assert losses(split) == losses(whole)


def test_every_image_once_per_epoch_in_one_augmentation_the_same_whatever_the_rank_count(tmp_path):
    rng = np.random.default_rng(0)
    stored = rng.integers(0, VOCAB, size=(96, AUGS, T))
    stored[:, :, 0], stored[:, :, 1] = np.arange(96)[:, None] % VOCAB, np.arange(96)[:, None] // VOCAB
    stored[:, :, 2] = np.arange(AUGS)  # each row tells its image (tokens 0, 1) and augmentation (token 2)
    with TokenShardWriter(tmp_path, "toy-tok", VOCAB, T, num_augs=AUGS, samples_per_shard=40) as w:
        for i in range(96):
            w.write(f"img{i:05d}", stored[i], i % CLASSES)
    train_tokens = str(tmp_path)
    one = TokenTrainStream(train_tokens, batch_size=16, seed=3)
    assert one.tokens.shape == (96, AUGS, T) and one.batches_per_epoch == 6

    def drawn(batches) -> list[tuple[int, int]]:
        out = []
        for tokens, labels in batches:
            assert tokens.dtype == torch.int64 and tokens.shape[1:] == (T,)
            for t, y in zip(tokens.numpy(), labels.tolist()):
                image, aug = int(t[0] + VOCAB * t[1]), int(t[2])
                assert np.array_equal(t, stored[image, aug]) and y == image % CLASSES
                out.append((image, aug))
        return out

    it = iter(one)
    epochs = [drawn(next(it) for _ in range(6)) for _ in range(3)]
    for epoch in epochs:
        assert sorted(image for image, _ in epoch) == list(range(96))  # each image exactly once
        assert {aug for _, aug in epoch} == set(range(AUGS))  # augmentations are drawn, not always the first
    choices = [tuple(aug for _, aug in sorted(epoch)) for epoch in epochs]
    assert len(set(choices)) == 3  # each epoch draws the images' augmentations anew
    assert len({tuple(image for image, _ in epoch) for epoch in epochs}) == 3  # and a new order
    # two ranks of 8: global batch b is rank 0's part then rank 1's, the very images and crops of one rank of 16
    streams = [TokenTrainStream(train_tokens, batch_size=8, rank=r, world_size=2, seed=3) for r in range(2)]
    assert streams[0].batches_per_epoch == 6  # 96 images / (8 x 2)
    its = [iter(s) for s in streams]
    both = [x for _ in range(18) for x in drawn([next(its[0]), next(its[1])])]
    assert both == [x for epoch in epochs for x in epoch]  # so ranks never overlap either
    assert np.array_equal(streams[1].epoch_order(2)[1], one.epoch_order(2)[1])


def test_the_stream_position_resumes_and_a_changed_layout_is_refused(shards):
    train_tokens, _ = shards
    a = TokenTrainStream(train_tokens, batch_size=8, seed=0)
    it = iter(a)
    for _ in range(7):
        next(it)
    state = a.state_dict()
    want = next(it)[0]
    b = TokenTrainStream(train_tokens, batch_size=8, seed=0)
    b.load_state_dict(state)
    assert torch.equal(next(iter(b))[0], want)
    with pytest.raises(ValueError, match="batch_size"):
        TokenTrainStream(train_tokens, batch_size=4, seed=0).load_state_dict(state)


def test_shards_that_do_not_fit_the_model_are_refused_naming_both(shards, tmp_path):
    with pytest.raises(ValueError, match="codebook_size 64 .* exceeds model.vocab_size=32"):
        train(C2ITask, cfg(tmp_path / "v", shards, "model.vocab_size=32", "train.max_steps=1"))
    with pytest.raises(ValueError, match="16 tokens per image .* model.num_tokens=64"):
        train(C2ITask, cfg(tmp_path / "t", shards, "model.num_tokens=64", "train.max_steps=1"))
    with pytest.raises(ValueError, match="tokenizer_id is 'toy-tok', expected 'other'"):
        train(C2ITask, cfg(tmp_path / "i", shards, "data.tokenizer_id=other", "train.max_steps=1"))


def test_two_ranks_under_zero_2_train_and_validate_through_the_command_line(shards, tmp_path):
    import subprocess
    import sys

    train_tokens, val_tokens = shards
    run = tmp_path / "zero2"
    args = [
        *("train", "--nproc", "2", "c2i", "c2i/tiny"),
        f"run_dir={run}",
        f"data.train_tokens={train_tokens}",
        f"data.val_tokens={val_tokens}",
        *(f"model.vocab_size={VOCAB}", f"model.num_classes={CLASSES}", "model.width=64", "model.depth=2"),
        *("data.batch_size=4", "train.zero_stage=2", "train.max_steps=6", "eval.every_steps=6"),
        *("train.ckpt_every=6", "train.progress=false", "train.log_every=3"),
    ]
    res = subprocess.run(
        [sys.executable, "-m", "tokscale.cli", *args], capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stderr[-3000:]
    last = rows(run)
    assert json.loads((run / "run_info.jsonl").read_text().splitlines()[-1])["world_size"] == 2
    assert any("val/loss_ce" in r for r in last) and last[-1]["step"] == 6


@pytest.mark.parametrize(
    "name, preset, lr, schedule, warmup, steps, batch",
    [
        ("llamagen-B", "gpt-B", 1e-4, "constant", 0, 1_500_000, 256),
        ("llamagen-XL", "gpt-XL", 2e-4, "constant", 0, 1_500_000, 256),
        ("gigatok-B-1d", "gpt-B-1d", 1e-4, "wsd", 5000, 1_500_000, 256),
        ("gigatok-XXL-1d", "gpt-XXL-1d", 1e-4, "wsd", 200, 750_000, 512),
        ("gigatok-probe-B", "gpt-B-1d", 1e-4, "constant", 0, 250_000, 256),
    ],
)
def test_the_reference_recipes_carry_their_settings(name, preset, lr, schedule, warmup, steps, batch):
    c = C2ITask.load_config(f"c2i/{name}")
    assert (c.model.preset, c.optim.lr, c.optim.schedule, c.optim.warmup_steps) == (
        preset,
        lr,
        schedule,
        warmup,
    )
    assert (c.train.max_steps, c.train.global_batch_size) == (steps, batch)
    assert c.optim.betas == [0.9, 0.95] and c.optim.weight_decay == 0.05 and c.optim.grad_clip == 1.0
    assert (c.model.vocab_size, c.model.num_tokens, c.model.num_classes) == (16384, 256, 1000)
    if schedule == "wsd":  # GigaTok: warmup from lr / 100, sqrt decay to 0 over the last 20 %
        assert (c.optim.warmup_init, c.optim.decay_fraction, c.optim.decay_shape, c.optim.min_lr) == (
            0.01,
            0.2,
            "sqrt",
            0.0,
        )


def test_the_ema_of_the_weights_resumes_exactly_and_exports_with_weights_ema(shards, tmp_path):
    from safetensors.torch import load_file

    from tokscale.checkpoint import latest_checkpoint
    from tokscale.export import export

    over = ("train.max_steps=6", "train.ckpt_every=3", "ema_decay=0.5")
    whole = tmp_path / "whole"
    train(C2ITask, cfg(whole, shards, *over))
    split = tmp_path / "split"
    calls = {"n": 0}

    def stop_after_four():
        calls["n"] += 1
        return calls["n"] > 4

    train(C2ITask, cfg(split, shards, *over), should_stop=stop_after_four)
    train(C2ITask, cfg(split, shards, *over))

    def ema_of(run):
        return torch.load(latest_checkpoint(run)[1] / "trainer.pt", weights_only=False)["ema"]

    a, b = ema_of(whole), ema_of(split)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    out = export(whole, tmp_path / "export-ema", weights="ema")
    weights = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(weights[k], a[k]) for k in a)
    plain = load_file(str(export(whole, tmp_path / "export", weights="model") / "model.safetensors"))
    assert not torch.equal(plain["blocks.0.attn.qkv.weight"], weights["blocks.0.attn.qkv.weight"])
    assert json.loads((out / "training.json").read_text())["weights"] == "ema"
    with pytest.raises(ValueError, match="no EMA of the weights"):
        export(_run_without_ema(shards, tmp_path), tmp_path / "x", weights="ema")
    with pytest.raises(ValueError, match="zero_stage=3"):
        cfg(tmp_path / "z3", shards, "ema_decay=0.9", "train.zero_stage=3")


def _run_without_ema(shards, tmp_path):
    run = tmp_path / "no-ema"
    train(C2ITask, cfg(run, shards, "train.max_steps=1", "train.ckpt_every=1"))
    return run
