"""DetailFlow's next-detail GPT: its presets equal the reference counts; no position attends to a later group and a
group attends to itself both ways; the teacher-forced logits are the ones the sampler reads step by step; the block
KV cache samples exactly the tokens of the uncached sampler in 1 + 7 + (N/8 - 1) forward passes; the trainer mixes
in the self-correction pairs, learns, resumes exactly, runs on two ranks, and its samples decode to images."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from tokscale.autoregressive.detailflow import (
    PARAMS,
    DetailFlowGPT,
    DetailFlowGPTConfig,
    detailflow_config,
    group_rope,
    num_forward_passes,
    sequence_mask,
)
from tokscale.autoregressive.detailflow_train import DetailFlowTask, correction_pairs
from tokscale.autoregressive.gpt import param_counts
from tokscale.autoregressive.sample import SampleConfig, generate
from tokscale.data.tokens import TokenShardWriter
from tokscale.loop import train

VOCAB, N, CLASSES, AUGS = 64, 32, 4, 2


def tiny(num_tokens: int = N, **kw) -> DetailFlowGPT:
    torch.manual_seed(0)
    cfg = DetailFlowGPTConfig(
        width=32, depth=2, heads=2, vocab_size=VOCAB, num_tokens=num_tokens, num_classes=CLASSES, **kw
    )
    model = DetailFlowGPT(cfg)
    torch.nn.init.normal_(model.head.weight, std=0.5)  # a zero head would sample uniformly
    return model.eval()


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_the_presets_have_the_reference_parameter_counts(name):
    for n in (128, 512):  # the count does not depend on the token count
        with torch.device("meta"):
            model = DetailFlowGPT(detailflow_config(name, [f"num_tokens={n}"]))
        assert param_counts(model)["params"] == PARAMS[name]


def test_no_position_attends_to_a_later_group_and_a_group_sees_itself_both_ways():
    g, n = 8, 32
    pos = torch.arange(n)
    m = sequence_mask(pos, pos, g)
    for i in range(n):
        for j in range(n):
            if i < g:
                assert m[i, j] == (j <= i), (i, j)  # the first group: token by token
            else:
                assert m[i, j] == (j // g <= i // g), (i, j)
    # behaviour, not just the table: a later group's input never changes an earlier position's logits, and a
    # block's positions see each other
    model = tiny()
    x, y = torch.randint(0, VOCAB, (1, n)), torch.tensor([1])
    base = model(x, y)
    later = x.clone()
    later[0, 16:24] = (later[0, 16:24] + 1) % VOCAB  # group 2 = input of the block at positions 24..31
    out = model(later, y)
    torch.testing.assert_close(out[:, :24], base[:, :24], rtol=0, atol=0)
    assert (out[:, 24:] - base[:, 24:]).abs().amax(-1).min() > 0  # every position of that block changed
    inside = x.clone()
    inside[0, 4] = (inside[0, 4] + 1) % VOCAB  # z4 sits at position 5 of the causal first group
    out = model(inside, y)
    torch.testing.assert_close(out[:, :5], base[:, :5], rtol=0, atol=0)
    assert (out[:, 5:] - base[:, 5:]).abs().amax(-1).min() > 0


def test_rope_cells_follow_the_reference_offset_or_the_blocks():
    cfg = DetailFlowGPTConfig(width=32, heads=2, num_tokens=32)
    ref = group_rope(torch.arange(32), cfg)
    aligned = group_rope(torch.arange(32), DetailFlowGPTConfig(width=32, heads=2, num_tokens=32, rope_offset=0))
    assert ref[0].abs().max() == 0 and aligned[0].abs().max() == 0  # the class position is not rotated
    # the first rotation pair turns with the row at frequency 1: angle = row; pair head_dim/4 with the column
    q = cfg.head_dim // 4

    def at(table, p, row, col):
        want = torch.tensor([[math.cos(row), math.sin(row)], [math.cos(col), math.sin(col)]])
        return torch.allclose(table[p, [0, q]], want, atol=1e-6)

    assert at(ref, 8, 0, 7) and at(ref, 9, 1, 0)  # position 8 opens block 1 but sits on row 0
    assert at(aligned, 8, 1, 0) and at(aligned, 15, 1, 7)
    assert not at(ref, 8, 1, 0)


def test_the_sampler_reads_the_logits_that_teacher_forcing_trains():
    model = tiny()
    x, y = torch.randint(0, VOCAB, (2, N)), torch.tensor([0, 3])
    full = model(x, y)
    cache = model.new_cache(2)
    known = 0
    while known < N:
        uncached = model.prefix_logits(y, x[:, :known])
        cached = model.cached_logits(cache, y, x[:, :known])
        width = uncached.shape[1]
        assert width == (1 if known < 8 else 8)
        torch.testing.assert_close(uncached, full[:, known : known + width], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cached, uncached, rtol=1e-5, atol=1e-5)
        known += width


@pytest.mark.parametrize("num_tokens, passes", [(128, 23), (256, 39)])
@pytest.mark.parametrize("cfg_scale", [1.0, 1.5])
def test_the_block_kv_cache_samples_the_same_tokens_in_the_stated_forward_passes(num_tokens, passes, cfg_scale):
    model = tiny(num_tokens)
    calls = {"n": 0}
    trunk = model._trunk

    def counted(*args, **kwargs):
        calls["n"] += 1
        return trunk(*args, **kwargs)

    model._trunk = counted
    labels = torch.tensor([0, 1, 2])
    out = {}
    for use_cache in (True, False):
        calls["n"] = 0
        gen = torch.Generator().manual_seed(7)
        out[use_cache] = generate(model, labels, SampleConfig(cfg_scale=cfg_scale, top_k=20), gen, use_cache)
        assert calls["n"] == passes == num_forward_passes(num_tokens)
    assert out[True].shape == (3, num_tokens)
    assert torch.equal(out[True], out[False])
    assert passes * 5 < num_tokens + 1  # against one pass per token: 5.6x fewer at 128, 6.6x at 256


def test_a_config_that_breaks_the_layout_is_refused_naming_the_key():
    with pytest.raises(ValueError, match="model.num_tokens=36"):
        DetailFlowGPTConfig(width=32, heads=2, num_tokens=36)
    with pytest.raises(ValueError, match="model.position"):
        DetailFlowGPTConfig(width=32, heads=2, position="learned")
    with pytest.raises(ValueError, match="model.rope_offset"):
        DetailFlowGPTConfig(width=32, heads=2, rope_offset=2)


def test_correction_pairs_use_the_corrected_streams_at_the_given_rate():
    clean, inp, label = (torch.full((1000, 4), v) for v in (0, 1, 2))
    rows = torch.cat([clean, inp, label], 1)
    torch.manual_seed(0)
    x, t = correction_pairs(rows, 4, 0.3)
    picked = x[:, 0] == 1
    assert torch.equal(t[picked], label[picked]) and torch.equal(t[~picked], clean[~picked])
    assert abs(picked.float().mean().item() - 0.3) < 0.05
    x, t = correction_pairs(clean, 4, 0.3)  # shards of the clean codes alone
    assert torch.equal(x, clean) and torch.equal(t, clean)


# ----------------------------------------------------------------------------------------------------------------
# the trainer


def write_streams(out: Path, images: int, seed: int, streams: int = 3) -> str:
    """Three streams a GPT can learn: each class has its own clean pattern (5% noise); the input stream corrupts one
    group, the label keeps the clean codes."""
    rng = np.random.default_rng(seed)
    patterns = np.random.default_rng(0).integers(0, VOCAB, size=(CLASSES, N))
    with TokenShardWriter(out, "toy-df", VOCAB, streams * N, num_augs=AUGS, samples_per_shard=50) as w:
        for i in range(images):
            label = i % CLASSES
            crops = []
            for aug in range(AUGS):
                clean = (patterns[label] + aug) % VOCAB
                noise = rng.random(N) < 0.05
                clean[noise] = rng.integers(0, VOCAB, size=noise.sum())
                corrupted = clean.copy()
                g = rng.integers(1, N // 8 - 1)
                corrupted[8 * g : 8 * g + 8] = rng.integers(0, VOCAB, size=8)
                crops.append(np.concatenate([clean, corrupted, clean][:streams]))
            w.write(f"img{i:05d}", np.stack(crops), label)
    return str(out)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("df-tokens")
    return write_streams(root / "train", 64, seed=1), write_streams(root / "val", 16, seed=2)


def cfg(run_dir, shards, *overrides):
    train_tokens, val_tokens = shards
    return DetailFlowTask.load_config(
        "detailflow/tiny",
        [
            f"run_dir={run_dir}",
            f"data.train_tokens={train_tokens}",
            f"data.val_tokens={val_tokens}",
            f"model.vocab_size={VOCAB}",
            f"model.num_classes={CLASSES}",
            f"model.num_tokens={N}",
            *("model.width=64", "model.heads=4", "model.depth=2", "data.batch_size=8", "train.progress=false"),
            *overrides,
        ],
    )


def rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_the_detailflow_gpt_learns_the_groups_and_its_validation_loss_falls(shards, tmp_path):
    run = tmp_path / "learn"
    out = train(
        DetailFlowTask,
        cfg(run, shards, "train.max_steps=80", "eval.every_steps=40", "optim.lr=3e-3", "optim.warmup_steps=4"),
    )
    assert out["status"] == "done" and out["step"] == 80
    val = [r["val/loss_ce"] for r in rows(run) if "val/loss_ce" in r]
    assert len(val) == 2 and val[0] > val[-1]
    assert val[-1] < 0.6 * math.log(VOCAB), val  # a fresh model (zero head) predicts uniformly: ln 64
    config = (run / "config.yaml").read_text()
    assert config.startswith("schema: detailflow") and "correction_prob: 0.3" in config


def test_a_stopped_detailflow_run_resumes_with_the_same_losses(shards, tmp_path):
    common = ("train.max_steps=10", "train.ckpt_every=4", "train.log_every=1")
    whole = tmp_path / "whole"
    train(DetailFlowTask, cfg(whole, shards, *common))
    split = tmp_path / "split"
    calls = {"n": 0}

    def stop_after_five():
        calls["n"] += 1
        return calls["n"] > 5

    assert train(DetailFlowTask, cfg(split, shards, *common), should_stop=stop_after_five)["status"] == "stopped"
    assert train(DetailFlowTask, cfg(split, shards, *common))["step"] == 10

    def losses(run):
        return {r["step"]: r["train/loss_ce"] for r in rows(run) if "train/loss_ce" in r}

    assert losses(split) == losses(whole) and len(losses(whole)) == 10


def test_shards_of_another_length_are_refused_naming_both(shards, tmp_path):
    bad = write_streams(tmp_path / "two", 16, seed=3, streams=2)  # 2 x 32 = 64 tokens
    with pytest.raises(ValueError, match=r"64 tokens per crop .* model.num_tokens=32 expects 32 .* or 96"):
        train(DetailFlowTask, cfg(tmp_path / "run", (bad, shards[1]), "train.max_steps=1"))


def test_two_ranks_train_a_detailflow_gpt_through_the_command_line(shards, tmp_path):
    train_tokens, val_tokens = shards
    run = tmp_path / "two"
    args = [
        *("train", "--nproc", "2", "detailflow", "detailflow/tiny", f"run_dir={run}"),
        *(f"data.train_tokens={train_tokens}", f"data.val_tokens={val_tokens}", f"model.vocab_size={VOCAB}"),
        *(f"model.num_classes={CLASSES}", f"model.num_tokens={N}", "model.width=32", "model.heads=2"),
        *("model.depth=1", "data.batch_size=4", "train.zero_stage=1", "train.max_steps=4", "eval.every_steps=4"),
        *("train.ckpt_every=4", "train.progress=false", "train.log_every=2"),
    ]
    res = subprocess.run([sys.executable, "-m", "tokscale.cli", *args], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((run / "run_info.jsonl").read_text().splitlines()[-1])["world_size"] == 2
    last = rows(run)
    assert any("val/loss_ce" in r for r in last) and last[-1]["step"] == 4


def test_samples_of_a_detailflow_gpt_decode_to_images_with_a_detailflow_tokenizer(tmp_path):
    from omegaconf import OmegaConf
    from PIL import Image
    from safetensors.torch import save_file

    from tokscale.export import write_export
    from tokscale.tokenizers.model import VQTokenizer
    from tokscale.tokenizers.train import TokenizerTask

    # a random tiny DetailFlow tokenizer (32 tokens at 64 px, codebook 1024) and a DetailFlow GPT for its codes
    tok_cfg = TokenizerTask.load_config("tokenizer/detailflow-tiny", ["model.encoder.depth=1", "model.decoder.depth=1"])
    torch.manual_seed(0)
    tok = tmp_path / "tok"
    tok.mkdir()
    weights = VQTokenizer(tok_cfg.model, with_projector=False).state_dict()
    save_file({k: v.contiguous() for k, v in weights.items()}, str(tok / "model.safetensors"))
    OmegaConf.save(OmegaConf.create({"model": OmegaConf.to_container(OmegaConf.structured(tok_cfg.model))}), tok / "config.yaml")
    gcfg = DetailFlowGPTConfig(width=32, depth=1, heads=2, vocab_size=1024, num_tokens=32, num_classes=CLASSES)
    gpt_model = DetailFlowGPT(gcfg)
    torch.nn.init.normal_(gpt_model.head.weight, std=0.5)
    gpt = tmp_path / "gpt"
    gpt.mkdir()
    write_export(gpt, gpt_model.state_dict(), {"model": asdict(gcfg)}, "detailflow", {"step": 0}, {}, "# test\n")

    common = ["--tokenizer", tok, "--classes", "0,1", "--num", "1", "--cfg-scale", "1.5", "--seed", "3"]
    codes = {}
    for name, extra in (("cached", []), ("uncached", ["--no-cache"])):
        res = subprocess.run(
            [sys.executable, "-m", "tokscale.cli", "sample", gpt, tmp_path / name, *common, *extra],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert res.returncode == 0, res.stderr[-3000:]
        pngs = [p for p in sorted((tmp_path / name).rglob("*.png")) if "grid" not in p.name]
        assert len(pngs) == 2 and {Image.open(p).size for p in pngs} == {(64, 64)}
        codes[name] = json.loads((tmp_path / name / "samples.json").read_text())["codes"]
    assert len(codes["cached"]) == 2 and len(codes["cached"][0]) == 32
    assert codes["cached"] == codes["uncached"]
