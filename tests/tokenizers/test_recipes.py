"""GigaTok's recipes (conf/tokenizer/gigatok-*.yaml): their settings equal GigaTok's released configs, and a few-step
run of each at tiny size logs every loss term of that recipe, each switching on and off at its step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from golden_run import write_weights

from tokscale.config import ConfigError
from tokscale.tokenizers.presets import RELEASED_PARAMS, get_preset
from tokscale.tokenizers.train import load_train_config, main
from tokscale.trainer import lr_lambda

REQUIRED = ["data.train_shards=x", "data.eval_shards=y"]

# GigaTok's configs/vq/*.yaml and scripts (REFERENCE.md): global batch, steps (epochs x 5000 x 256 / batch),
# warmup, entropy weight, rotation trick, aux_loss_end, disc type and start.
RELEASED = {
    "1d-S-S": (128, 1_000_000, 0, 0.0, True, 15000, "patchgan", 20000),
    "1d-S-B": (128, 2_000_000, 0, 0.0, True, 15000, "patchgan", 20000),
    "1d-B-L": (256, 1_000_000, 0, 0.0, True, 15000, "patchgan", 20000),
    "1d-B-L-dino-disc": (256, 1_000_000, 0, 0.0, True, 15000, "dino", 80000),
    "1d-B-L-train-new": (256, 1_000_000, 5000, 0.005, False, 0, "patchgan", 20000),
    "1d-XL-XXL": (256, 1_500_000, 5000, 0.005, True, 0, "patchgan", 20000),
    "2d-S-S": (128, 1_000_000, 0, 0.0, True, 15000, "patchgan", 20000),
    "2d-S-B": (128, 2_000_000, 0, 0.0, True, 15000, "patchgan", 20000),
    "2d-B-L": (256, 1_000_000, 0, 0.005, True, 15000, "patchgan", 20000),
}


@pytest.mark.parametrize("recipe", sorted(RELEASED))
def test_recipe_matches_gigatoks_released_config(recipe):
    cfg = load_train_config(f"tokenizer/gigatok-{recipe}", REQUIRED)
    batch, steps, warmup, entropy, rot, aux_end, disc, disc_start = RELEASED[recipe]
    assert cfg.train.global_batch_size == batch and cfg.train.max_steps == steps
    assert cfg.optim.warmup_steps == warmup and cfg.optim.warmup_init == 0.01
    assert (cfg.optim.lr, cfg.optim.min_lr, cfg.optim.weight_decay, cfg.optim.grad_clip) == (
        1e-4,
        1e-5,
        1e-4,
        10.0,
    )
    assert list(cfg.optim.betas) == [0.9, 0.95] and cfg.optim.schedule == "cosine"
    assert cfg.model.quantizer.entropy_weight == entropy and cfg.model.quantizer.rotation_trick is rot
    assert cfg.loss.aux.until_step == aux_end and cfg.loss.aux.feature_weight == 1.0
    gan = cfg.loss.gan
    assert (gan.kind, gan.start_step, gan.weight, gan.lr) == (disc, disc_start, 0.5, 1e-4)
    assert gan.diff_aug is (disc == "dino") and gan.diff_aug_cutout == 0.2
    assert (cfg.loss.rec_weight, cfg.loss.perceptual.weight, cfg.loss.semantic.weight) == (1.0, 1.0, 0.5)
    assert cfg.loss.semantic.decoder_layer == 3
    assert (cfg.data.crop, cfg.data.crop_ratio, cfg.data.hflip) == ("random_resize", 1.25, True)
    # each recipe's model is the released one
    preset = recipe.removesuffix("-dino-disc").removesuffix("-train-new")
    assert cfg.model.preset == preset and preset in RELEASED_PARAMS


def test_a_recipe_refuses_a_global_batch_the_cluster_shape_does_not_give():
    from tokscale.trainer import check_global_batch

    cfg = load_train_config("tokenizer/gigatok-1d-B-L", REQUIRED)  # 256 = 32 per GPU on 8 GPUs
    check_global_batch(cfg, 8)
    with pytest.raises(ConfigError, match=r"train.global_batch_size=256 .* data.batch_size=8 gives it"):
        check_global_batch(cfg, 32)


def test_extends_cycle_and_missing_parent_are_clear_errors(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b\n")
    (tmp_path / "b.yaml").write_text("extends: a\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_train_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("extends: nowhere\n")
    with pytest.raises(ConfigError, match="'nowhere' not found"):
        load_train_config(tmp_path / "c.yaml")


# ---- a few steps of each recipe at tiny size ------------------------------------------------------------------

AUX_KEYS = {"train/loss_aux_rec", "train/loss_aux_lpips", "train/loss_aux_feature"}
GAN_KEYS = {"train/loss_gan_g", "train/loss_gan_d"}
AUX_UNTIL, GAN_FROM, STEPS = 2, 3, 4  # aux at step 1, the GAN at 3-4 (as logged, from 1)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    from tokscale.tokenizers.dino_disc import DinoViTSmall

    folder = tmp_path_factory.mktemp("weights")
    vgg, dino = write_weights(folder)
    torch.manual_seed(2)
    disc = folder / "dino_vits16.pth"
    torch.save(DinoViTSmall().state_dict(), disc)
    return vgg, dino, disc


def tiny_overrides(recipe: str, run_dir: Path, shards: str, weights) -> list[str]:
    """The recipe at tiny size on 32 px images, its term schedule compressed into four steps."""
    vgg, dino, disc = weights
    full = load_train_config(f"tokenizer/gigatok-{recipe}", REQUIRED)
    kind = get_preset(full.model.preset)["kind"]
    q = full.model.quantizer
    out = [
        f"run_dir={run_dir}",
        f"model.preset={kind}-tiny",
        f"model.layer_type={full.model.layers}",  # the released layer type (2D S-S: detr)
        f"model.quantizer.entropy_weight={q.entropy_weight}",
        f"model.quantizer.rotation_trick={q.rotation_trick}",
        "model.image_size=32",
        f"data.train_shards={shards}",
        f"data.eval_shards={shards}",
        "data.batch_size=2",
        "data.num_workers=0",
        "data.shuffle_buffer=4",
        "train.global_batch_size=2",
        f"train.max_steps={STEPS}",
        "train.zero_stage=0",
        "train.precision=fp32",
        "train.log_every=1",
        "train.ckpt_every=100",
        "train.image_every=100",
        "train.progress=false",
        "eval.every_steps=0",
        f"loss.perceptual.vgg_weights={vgg}",
        f"loss.semantic.teacher_weights={dino}",
        "loss.semantic.teacher_arch=vit_small_patch14_dinov2",
        "loss.semantic.teacher_dim=384",
        "loss.semantic.teacher_size=56",  # 4x4 teacher tokens: the schedule, not the teacher, is under test
        "model.semantic_dim=384",
        f"loss.gan.start_step={GAN_FROM}",
        "loss.gan.ndf=16",
        "loss.gan.num_layers=2",
    ]
    if kind == "1d":
        out.append("model.num_tokens=4")  # what a 2x2 grid (32 px) can pool
    if full.loss.aux.until_step:
        out.append(f"loss.aux.until_step={AUX_UNTIL}")
    if full.loss.gan.kind == "dino":
        out.append(f"loss.gan.dino_weights={disc}")
    return out


@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted(RELEASED))
def test_a_few_steps_of_each_recipe_log_its_terms_switching_at_their_steps(
    recipe, tmp_path, image_shards, weights
):
    run_dir = tmp_path / "run"
    cfg = load_train_config(
        f"tokenizer/gigatok-{recipe}", tiny_overrides(recipe, run_dir, image_shards, weights)
    )
    assert main(cfg)["step"] == STEPS
    rows = {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}
    _, _, _, entropy, _, aux_end, disc, _ = RELEASED[recipe]
    for step in range(1, STEPS + 1):
        keys = {k for k in rows[step] if k.startswith("train/loss_")}
        always = {"train/loss_rec", "train/loss_lpips", "train/loss_semantic", "train/loss_commit"}
        assert always <= keys, (step, keys)
        assert ("train/loss_entropy" in keys) is (entropy > 0)
        assert (AUX_KEYS & keys) == (AUX_KEYS if aux_end and step < AUX_UNTIL else set()), (step, keys)
        assert (GAN_KEYS & keys) == (GAN_KEYS if step >= GAN_FROM else set()), (step, keys)
        assert all(v == v and abs(v) < 1e6 for k, v in rows[step].items() if k in keys)  # finite
    # the discriminator's lr follows the generator's schedule: the saved optimiser holds the lr of the last step
    # (cosine over the four steps here, so it is far below the peak)
    state = torch.load(run_dir / "ckpt" / f"step_{STEPS:08d}" / "trainer.pt", weights_only=False)
    lr = state["disc_opt"]["param_groups"][0]["lr"]
    assert lr == pytest.approx(cfg.loss.gan.lr * lr_lambda(cfg.optim, STEPS)(STEPS - 1), rel=1e-9)
    assert lr < 0.5 * cfg.loss.gan.lr
    heads = state["disc"]
    if disc == "dino":  # the checkpoint keeps the DINO discriminator's heads, not its frozen backbone file
        assert sum(v.numel() for k, v in heads.items() if not k.endswith(("_u", "_v"))) > 7_000_000
        assert not any("blocks" in k or "pos_embed" in k for k in heads)
