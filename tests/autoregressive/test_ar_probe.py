"""`tokscale eval ar-probe` (GigaTok's AR linear probe): the features are the GPT's block depth/2 output of the
null-class teacher-forced codes averaged over every position; they do not depend on the batch and are
deterministic in eval mode; the global-batch probe step is BatchNorm + Linear's; the command runs end to end over
the embedded dataset, above chance, writing every field; two ranks train the probe one rank trains; a stopped
run resumes to the same probe; a GPT and a tokenizer that do not match are refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # test_sample_cli's tiny GPT export (--import-mode=importlib)
from test_sample_cli import write_gpt  # noqa: E402

from tokscale.autoregressive.ar_probe import ArProbeConfig, ar_features, main, probe_layer  # noqa: E402
from tokscale.autoregressive.gpt import GPT, GPTConfig, rope_2d  # noqa: E402
from tokscale.evaluation.probe import (  # noqa: E402
    LARS,
    FeatureSet,
    LinearProbe,
    ProbeConfig,
    global_batch_step,
    train_probe_online,
)

CHANCE = 10.0  # the embedded dataset has ten classes
FIELDS = (
    "top1", "top5", "num_train", "num_val", "num_classes", "layer", "block_index", "feature_dim", "epochs",
    "warmup_epochs", "lr", "base_lr", "batch_size_per_rank", "global_batch", "steps_per_epoch", "augmentation",
    "gpt_mode", "precision", "gpt", "tokenizer", "world_size", "seconds",
)  # fmt: skip


class FixedCodes(torch.nn.Module):
    """A stand-in tokenizer: image i -> codes[i] (the image's first pixel holds i)."""

    def __init__(self, codes: torch.Tensor):
        super().__init__()
        self.codes = codes

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.codes[images[:, 0, 0, 0].round().long()]


def tiny_gpt(position: str, depth: int = 4) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(
        width=32, depth=depth, heads=4, vocab_size=50, num_tokens=16, num_classes=7, position=position
    )
    return GPT(cfg).eval()


def images_for(n: int) -> torch.Tensor:
    x = torch.zeros(n, 3, 4, 4)
    x[:, 0, 0, 0] = torch.arange(n).float()
    return x


def write_probe_tokenizer(out: Path, codebook_size: int = 256) -> Path:
    """A small random 2D tokenizer at 32 px (4 tokens) whose codebook is a k-means of its own latents on embedded
    training images. The shared tiny export's random codebook gives nearly one code per image (no probe can
    beat chance on it); these codes group similar patches, so a probe has something to find."""
    import torch.nn.functional as F
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    from tokscale.data.stream import DataConfig, EvalStream, resolve_shards
    from tokscale.tokenizers.model import TokenizerConfig, VQTokenizer
    from tokscale.tokenizers.presets import get_preset

    preset = get_preset("2d-tiny")
    preset.update(image_size=32)
    preset["cnn"].update(num_res_blocks=1, z_channels=16, num_groups=8)
    preset["encoder"].update(width=32, depth=1, heads=2)
    preset["decoder"].update(width=32, depth=1, heads=2)
    preset["quantizer"]["codebook_size"] = codebook_size
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TokenizerConfig), preset))
    torch.manual_seed(0)
    model = VQTokenizer(cfg, with_projector=False).eval()
    shards = "::".join(resolve_shards("embedded", "train", ""))
    stream = EvalStream(
        DataConfig(eval_shards=shards, resolution=32, batch_size=100, num_workers=0), 0, 1, 400
    )
    with torch.no_grad():
        latents = torch.cat([F.normalize(model.encode_latents(b[0]).flatten(0, 1), dim=-1) for b in stream])
        g = torch.Generator().manual_seed(0)
        centres = latents[torch.randperm(latents.shape[0], generator=g)[:codebook_size]].clone()
        for _ in range(10):
            nearest = (latents @ centres.T).argmax(1)
            for k in range(codebook_size):
                if (nearest == k).any():
                    centres[k] = F.normalize(latents[nearest == k].mean(0), dim=0)
        model.quantizer.codebook.weight.copy_(centres)
    out.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    OmegaConf.save(
        OmegaConf.create({"model": OmegaConf.to_container(OmegaConf.structured(cfg))}), out / "config.yaml"
    )
    return out


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("ar-probe")
    return write_gpt(root / "gpt", num_tokens=4), write_probe_tokenizer(root / "tok")


def ar_probe(pair, out, *extra) -> subprocess.CompletedProcess:
    gpt, tok = pair
    cmd = [
        sys.executable, "-m", "tokscale.cli", "eval", "ar-probe", str(gpt), "--tokenizer", str(tok),
        "--train-data", "embedded", "--eval-data", "embedded", "--out", str(out), "--epochs", "5",
        "--warmup-epochs", "1", "--forward-batch", "100", "--workers", "0", *map(str, extra),
    ]  # fmt: skip
    # One thread per process: the tiny convolutions are far slower with two threads on a shared CPU.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.parametrize("position", ["rope2d", "learned"])
def test_the_features_are_block_depth_over_2_of_the_null_class_sequence_averaged_over_every_position(
    position,
):
    gpt = tiny_gpt(position)
    codes = torch.randint(0, 50, (5, 16), generator=torch.Generator().manual_seed(1))
    layer = probe_layer(gpt.config.depth)
    got = ar_features(gpt, FixedCodes(codes), layer)(images_for(5))
    with torch.no_grad():
        null = torch.full((5,), gpt.config.num_classes)  # 7: the class table's extra row
        x = torch.cat([gpt.class_embed(null)[:, None], gpt.token_embed(codes[:, :-1])], dim=1)  # 16 positions
        rope = None
        if position == "learned":
            x = x + gpt.pos_embed[None, :16]  # the table has 1 + T rows; the sequence uses 16
        else:
            rope = rope_2d(torch.arange(16), gpt.config)
        for block in gpt.blocks[:2]:  # block indices 0 and 1 of 4: the output of block n_layer // 2
            x = block(x, rope)
        want = x.mean(1)
    assert layer == 2 and got.shape == (5, 32)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert (probe_layer(12), probe_layer(36), probe_layer(48), probe_layer(12, 3)) == (6, 18, 24, 3)
    with pytest.raises(ValueError, match="blocks 1..4"):
        probe_layer(4, 5)


def test_the_features_do_not_depend_on_the_batch_and_are_deterministic_in_eval_mode():
    gpt = tiny_gpt("rope2d")
    codes = torch.randint(0, 50, (9, 16), generator=torch.Generator().manual_seed(2))
    fn = ar_features(gpt, FixedCodes(codes), probe_layer(4))
    images = images_for(9)
    with torch.no_grad():
        whole = fn(images)
        split = torch.cat([fn(images[:3]), fn(images[3:])])
        perm = torch.tensor([8, 2, 5, 0, 7, 1, 4, 6, 3])
        shuffled = torch.empty_like(whole)
        shuffled[perm] = fn(images[perm])
        alone = fn(images[4:5])
        again = fn(images)
        gpt.train()  # GigaTok's quirk (--gpt-train-mode): dropout makes the training features random
        noisy = fn(images)
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(shuffled, whole, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(alone, whole[4:5], rtol=1e-5, atol=1e-6)
    assert torch.equal(again, whole)
    assert not torch.allclose(noisy, whole, atol=1e-4)


def test_a_global_batch_step_is_a_batchnorm_and_linear_step_and_updates_the_running_statistics():
    x = torch.randn(12, 6) * 3 + 1
    y = torch.randint(0, 4, (12,))
    torch.manual_seed(0)
    ours, ref = LinearProbe(6, 4), LinearProbe(6, 4)
    ref.load_state_dict(ours.state_dict())
    opt_ours, opt_ref = LARS(ours.parameters(), lr=0.5), LARS(ref.parameters(), lr=0.5)
    loss = global_batch_step(ours, opt_ours, x, y, 12, 0.5)
    ref.train()
    ref_loss = torch.nn.functional.cross_entropy(ref(x), y)
    ref_loss.backward()
    opt_ref.step()
    assert loss == pytest.approx(ref_loss.item(), rel=1e-5)
    for a, b in zip(ours.state_dict().values(), ref.state_dict().values()):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-5, atol=1e-6)
    assert ours.norm.eps == 1e-6 and not ours.norm.affine


def test_online_training_recomputes_every_epoch_and_precomputed_views_cycle():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 8, generator=g) * 3
    y = torch.randint(0, 3, (90,), generator=g)
    x = centres[y] + torch.randn(90, 8, generator=g)
    val = FeatureSet(centres[y[:30]] + torch.randn(30, 8, generator=g), y[:30])
    asked = []

    def batches(view):
        asked.append(view)
        for i in range(0, 90, 20):
            yield x[i : i + 20], y[i : i + 20], [], torch.arange(i, min(i + 20, 90))

    # LARS moves a weight by ~lr x 0.001 of its norm per step: a tiny set needs many steps and a large lr.
    cfg = ProbeConfig(epochs=40, warmup_epochs=1, batch_size=8, base_lr=100.0)
    out = train_probe_online(lambda im: im, batches, val, 0, cfg)
    assert asked == list(range(40)) and out["num_classes"] == 3 and out["steps_per_epoch"] == 90 // 8
    assert out["top1"] > 90.0 and out["num_train"] == 90 and out["status"] == "finished"
    asked.clear()
    cached = train_probe_online(lambda im: im, batches, val, 3, cfg, views=2)
    assert asked == [0, 1] and cached["top1"] == out["top1"]  # the views hold the same features here


def test_the_command_writes_every_field_and_beats_chance_on_the_embedded_dataset(pair, tmp_path):
    res = ar_probe(pair, tmp_path / "out", "--batch-size", 32, "--base-lr", 100)
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert [k for k in FIELDS if k not in metrics] == []
    assert metrics["top1"] > CHANCE + 5, metrics  # 26 % measured (chance 10 %) with this random tokenizer
    assert (metrics["num_train"], metrics["num_val"], metrics["num_classes"]) == (1000, 200, 10)
    assert (metrics["layer"], metrics["block_index"], metrics["feature_dim"]) == (1, 0, 64)
    assert metrics["global_batch"] == 32 and metrics["lr"] == pytest.approx(100 * 32 / 256)
    assert metrics["steps_per_epoch"] == 1000 // 32 and metrics["world_size"] == 1
    assert metrics["gpt_mode"] == "eval" and metrics["augmentation"]["train"]["crop"] == "random_resize"
    assert metrics["augmentation"]["features"] == "online (every epoch)"
    assert (tmp_path / "out" / "ar_probe_config.yaml").is_file() and (tmp_path / "out" / "probe.pt").is_file()
    assert not (tmp_path / "out" / "ar_probe_state.pt").exists()
    assert not (tmp_path / "out.ar-probe-job").exists()  # the work folder went once its results moved
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    again = ar_probe(pair, mine, "--batch-size", 32)
    assert again.returncode != 0 and "notes.txt" in again.stderr and "--overwrite" in again.stderr
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


def test_two_ranks_train_the_probe_that_one_rank_trains_with_the_same_global_batch(pair, tmp_path):
    one = ar_probe(pair, tmp_path / "one", "--batch-size", 32, "--base-lr", 30)
    two = ar_probe(pair, tmp_path / "two", "--batch-size", 16, "--base-lr", 30, "--nproc", 2)
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    a = json.loads((tmp_path / "one" / "metrics.json").read_text())
    b = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert (a["world_size"], b["world_size"], a["global_batch"], b["global_batch"]) == (1, 2, 32, 32)
    assert (a["top1"], a["top5"], a["num_train"], a["num_val"]) == (b["top1"], b["top5"], 1000, 200)
    pa, pb = torch.load(tmp_path / "one" / "probe.pt"), torch.load(tmp_path / "two" / "probe.pt")
    for key in pa:  # the same features; only the order of floating-point sums differs
        torch.testing.assert_close(pa[key].float(), pb[key].float(), rtol=1e-4, atol=1e-5)


def run_in_process(pair, out: Path, should_stop=None) -> dict:
    import torch.distributed as dist

    from tokscale.autoregressive.ar_probe import prepare
    from tokscale.config import load_config

    gpt, tok = pair
    cfg = load_config(ArProbeConfig, None, [
        f"gpt={gpt}", f"tokenizer={tok}", f"run_dir={out}", "num_train=200", "num_val=100", "progress=false",
        "data.train_shards=embedded", "data.eval_shards=embedded", "data.resolution=32", "data.batch_size=100",
        "data.num_workers=0", "probe.epochs=3", "probe.warmup_epochs=1", "probe.batch_size=32", "probe.base_lr=10",
    ])  # fmt: skip
    prepare(cfg)
    try:
        return main(cfg, should_stop)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_a_stopped_probe_resumes_after_its_last_epoch_to_the_probe_of_an_uninterrupted_run(pair, tmp_path):
    whole = run_in_process(pair, tmp_path / "whole")
    stopped = run_in_process(pair, tmp_path / "cut", should_stop=lambda: True)
    assert stopped == {"status": "stopped", "epochs_done": 1}
    assert (tmp_path / "cut" / "ar_probe_state.pt").is_file() and not (
        tmp_path / "cut" / "metrics.json"
    ).exists()
    resumed = run_in_process(pair, tmp_path / "cut")
    assert resumed["result"]["top1"] == whole["result"]["top1"]
    pa, pb = torch.load(tmp_path / "whole" / "probe.pt"), torch.load(tmp_path / "cut" / "probe.pt")
    for key in pa:
        torch.testing.assert_close(pa[key], pb[key])


def test_a_gpt_and_a_tokenizer_that_do_not_match_are_refused_before_anything_runs(pair, tmp_path):
    _, tok = pair
    other = write_gpt(tmp_path / "gpt16", num_tokens=16)
    res = ar_probe((other, tok), tmp_path / "out")
    assert res.returncode != 0 and "makes 4 tokens" in res.stderr and "generates 16" in res.stderr
    assert not (tmp_path / "out").exists()


def test_a_var_run_is_refused_naming_it_before_anything_runs(tmp_path):
    """A VAR predicts whole scales under a block-causal mask: no next-token features for the probe."""
    from test_var_sample_cli import write_var
    from test_var_train import write_tokenizer as write_multiscale_tokenizer

    var, tok = write_var(tmp_path / "var", seed=0), Path(write_multiscale_tokenizer(tmp_path / "ms-tok"))
    res = ar_probe((var, tok), tmp_path / "out")
    assert res.returncode == 2, res.stderr[-3000:]
    line = [x for x in res.stderr.splitlines() if x.startswith("tokscale: error:")][-1]
    assert str(var) in line and "is a VAR" in line and "next-token GPT" in line, line
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.ar-probe-job").exists()
