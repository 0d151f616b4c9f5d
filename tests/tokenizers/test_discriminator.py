"""PatchGAN discriminator, hinge losses, start step and DiffAugment."""

import pytest
import torch

from tokscale.tokenizers.discriminator import (
    DiscriminatorConfig,
    PatchDiscriminator,
    build_discriminator,
    gan_weight_at,
    hinge_d_loss,
    hinge_g_loss,
)


def test_default_patchgan_maps_256px_to_a_30x30_logit_map():
    disc = build_discriminator(DiscriminatorConfig())
    assert isinstance(disc, PatchDiscriminator)
    logits = disc(torch.zeros(1, 3, 256, 256))
    assert logits.shape == (1, 1, 30, 30)
    widths = [m.out_channels for m in disc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert widths == [64, 128, 256, 512, 1]


@pytest.mark.parametrize("norm", ["batch", "group", "none"])
def test_small_discriminator_gives_one_logit_per_patch_for_each_norm(norm):
    disc = PatchDiscriminator(DiscriminatorConfig(ndf=8, num_layers=2, norm=norm))
    logits = disc(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert logits.shape == (2, 1, 6, 6)


def test_hinge_discriminator_loss_matches_the_formula_on_known_logits():
    real = torch.tensor([2.0, 0.5, -1.0])  # hinge terms relu(1 - x): 0, 0.5, 2
    fake = torch.tensor([-3.0, 0.0, 1.0])  # hinge terms relu(1 + x): 0, 1, 2
    expected = 0.5 * ((0 + 0.5 + 2) / 3 + (0 + 1 + 2) / 3)
    assert hinge_d_loss(real, fake).item() == pytest.approx(expected)
    assert hinge_d_loss(torch.full((4,), 1.5), torch.full((4,), -1.5)).item() == 0.0


def test_hinge_generator_loss_is_minus_the_mean_fake_logit():
    assert hinge_g_loss(torch.tensor([1.0, 2.0, -0.5])).item() == pytest.approx(-2.5 / 3)
    assert hinge_g_loss(torch.tensor([1.0], dtype=torch.bfloat16)).dtype == torch.float32


def test_gradients_reach_the_discriminator_and_the_generator_output():
    torch.manual_seed(0)
    disc = PatchDiscriminator(DiscriminatorConfig(ndf=8, num_layers=2))
    real = torch.rand(2, 3, 32, 32) * 2 - 1
    fake = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_(True)
    hinge_d_loss(disc(real), disc(fake.detach())).backward()
    # Every filter gets a gradient (the last bias can get exactly zero: while all logits lie inside the
    # hinge margin its real and fake gradients cancel).
    assert all(p.grad is not None for p in disc.parameters())
    assert all(p.grad.abs().sum() > 0 for p in disc.parameters() if p.dim() == 4)
    hinge_g_loss(disc(fake)).backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0


def test_gan_weight_is_zero_before_the_start_step_and_the_weight_from_it():
    cfg = DiscriminatorConfig(weight=0.5, start_step=20000)
    assert gan_weight_at(cfg, 0) == 0.0
    assert gan_weight_at(cfg, 19999) == 0.0
    assert gan_weight_at(cfg, 20000) == 0.5
    assert gan_weight_at(cfg, 100000) == 0.5


def test_weight_zero_builds_no_discriminator():
    assert build_discriminator(DiscriminatorConfig(weight=0.0)) is None


def test_dino_kind_needs_a_local_weights_file_and_kinds_are_checked():
    with pytest.raises(ValueError, match="gan.dino_weights"):
        DiscriminatorConfig(kind="dino")
    with pytest.raises(ValueError, match="gan.kind"):
        DiscriminatorConfig(kind="stylegan")
    with pytest.raises(FileNotFoundError, match="loss.gan.dino_weights"):
        build_discriminator(DiscriminatorConfig(kind="dino", dino_weights="/nonexistent/dino_vits16.pth"))


def test_bf16_discriminator_accepts_fp32_images():
    disc = PatchDiscriminator(DiscriminatorConfig(ndf=8, num_layers=2, norm="group")).to(torch.bfloat16)
    assert disc(torch.zeros(1, 3, 32, 32)).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"norm": "layer"}, "gan.norm"),
        ({"weight": -1.0}, "gan.weight"),
        ({"betas": [0.9]}, "gan.betas"),
        ({"start_step": -5}, "gan.start_step"),
    ],
)
def test_invalid_settings_are_rejected_naming_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        DiscriminatorConfig(**kwargs)
