"""DINO discriminator and DiffAug: shapes, frozen backbone, offline DINO-format loading, GigaTok's sizes and rules.

The backbone is the real ViT-S/16 (21.7M parameters) with random weights, built once per module; every forward pass
runs at batch 2 so the file stays within a few seconds on CPU.
"""

import re

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from tokscale.tokenizers.diffaug import _translate, diff_aug
from tokscale.tokenizers.dino_disc import DinoDiscriminator, LocalBatchNorm

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
NUM_TOKENS = (224 // 16) ** 2  # 196 patch tokens at the backbone's fixed 224 px input
NUM_READOUTS = 5  # the embedding + blocks 2, 5, 8, 11 (0-based)


def images(seed: int, size: int, batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=g) * 2 - 1


def normalise(x: torch.Tensor) -> torch.Tensor:
    return ((x + 1) / 2 - MEAN) / STD


@pytest.fixture(scope="module")
def disc():
    torch.manual_seed(0)
    return DinoDiscriminator().eval()


@pytest.fixture(scope="module")
def backbone_state(disc):
    return {k: v.clone() for k, v in disc.backbone.state_dict().items()}


@pytest.mark.parametrize("size", [64, 256])
def test_logits_hold_one_value_per_token_and_readout_at_any_input_size(disc, size):
    logits = disc(images(1, size))
    assert logits.shape == (2, NUM_READOUTS * NUM_TOKENS)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_generator_gradient_reaches_images_and_heads_but_no_backbone_parameter(disc):
    disc.zero_grad(set_to_none=True)
    x = images(2, 64).requires_grad_()
    (-disc(diff_aug(x, generator=torch.Generator().manual_seed(0))).mean()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    heads = list(disc.trainable_parameters())
    assert heads and all(p.grad is not None and p.grad.abs().sum() > 0 for p in heads)
    assert all(not p.requires_grad and p.grad is None for p in disc.backbone.parameters())
    disc.zero_grad(set_to_none=True)


def test_train_mode_reaches_the_heads_but_leaves_the_backbone_in_eval_mode(disc):
    disc.train()
    try:
        assert disc.training and all(m.training for m in disc.heads.modules())
        assert not any(m.training for m in disc.backbone.modules())
    finally:
        disc.eval()


def test_toggling_requires_grad_around_the_generator_step_never_unfreezes_the_backbone(disc):
    disc.requires_grad_(False)
    assert not any(p.requires_grad for p in disc.parameters())
    disc.requires_grad_(True)
    assert all(p.requires_grad for p in disc.trainable_parameters())
    assert not any(p.requires_grad for p in disc.backbone.parameters())


def test_trainable_parameters_are_exactly_the_heads(disc):
    trainable = {id(p) for p in disc.trainable_parameters()}
    assert trainable == {id(p) for p in disc.parameters() if p.requires_grad}
    assert trainable.isdisjoint(id(p) for p in disc.backbone.parameters())


def test_parameter_counts_follow_gigatok_architecture(disc):
    d, k = 384, 9  # ViT-S width; kernel of the residual conv
    # One head: 1x1 conv (d*d + d) + BN (2d), k-conv (d*d*k + d) + BN (2d), 1x1 conv to one logit (d + 1).
    per_head = (d * d + d) + 2 * d + (d * d * k + d) + 2 * d + (d + 1)
    assert sum(p.numel() for p in disc.trainable_parameters()) == NUM_READOUTS * per_head == 7_386_245
    # ViT-S/16: patch conv (3*16*16*d + d), class token d, 197 positions, 12 blocks of [2 LayerNorms (4d),
    # qkv (d*3d + 3d), proj (d*d + d), fc1 (d*4d + 4d), fc2 (4d*d + d)], final LayerNorm 2d.
    block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d)
    backbone = (3 * 16 * 16 * d + d) + d + 197 * d + 12 * block + 2 * d
    assert sum(p.numel() for p in disc.backbone.parameters()) == backbone == 21_665_664


def test_backbone_state_dict_is_dino_vit_small_format_and_computes_like_timm(disc, backbone_state):
    keys = {"cls_token", "pos_embed", "norm.weight", "norm.bias"}
    keys |= {"patch_embed.proj.weight", "patch_embed.proj.bias"}
    for i in range(12):
        for layer in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            keys |= {f"blocks.{i}.{layer}.weight", f"blocks.{i}.{layer}.bias"}
    assert set(backbone_state) == keys
    # timm's vit_small_patch16_224.dino has this layout; with GigaTok's tanh GELU it must compute the same tokens.
    ref = timm.create_model("vit_small_patch16_224", num_classes=0, act_layer="gelu_tanh").eval()
    ref.load_state_dict(backbone_state)
    x = normalise(images(3, 224))
    with torch.no_grad():
        tokens = ref.patch_embed(x)
        tokens = torch.cat([ref.cls_token.expand(2, -1, -1), tokens], dim=1) + ref.pos_embed
        expected = []
        for block in ref.blocks:
            tokens = block(tokens)
            expected.append((tokens[:, 1:] + tokens[:, :1]).transpose(1, 2))
        got = disc.backbone(x, (2, 5, 8, 11))
    assert len(got) == NUM_READOUTS
    for readout, i in zip(got[1:], (2, 5, 8, 11)):
        torch.testing.assert_close(readout, expected[i], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_dino_format_weights_file_loads_and_reproduces_the_outputs(disc, backbone_state, tmp_path, suffix):
    path = tmp_path / f"dino_deitsmall16_pretrain{suffix}"
    if suffix == ".pth":
        torch.save(backbone_state, path)
    else:
        save_file(backbone_state, str(path))
    torch.manual_seed(123)  # a different random backbone before loading, so the file must be what restores it
    loaded = DinoDiscriminator(weights=str(path)).eval()
    loaded.heads.load_state_dict(disc.heads.state_dict())
    for k, v in loaded.backbone.state_dict().items():
        torch.testing.assert_close(v, backbone_state[k], rtol=0, atol=0)
    x = images(4, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), disc(x), rtol=0, atol=0)


def test_missing_weights_file_is_an_error_naming_the_path(tmp_path):
    path = tmp_path / "no" / "dino_deitsmall16_pretrain.pth"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        DinoDiscriminator(weights=str(path), weights_key="loss.gan.dino_weights")


def test_mismatched_state_dict_is_an_error_listing_the_bad_keys(backbone_state, tmp_path):
    state = dict(backbone_state)
    del state["blocks.3.mlp.fc2.bias"]
    state["head.weight"] = torch.zeros(1000, 384)  # a classifier checkpoint, not DINO's backbone
    state["pos_embed"] = torch.zeros(1, 785, 384)  # ViT-S/8's grid
    path = tmp_path / "wrong.pth"
    torch.save(state, path)
    with pytest.raises(ValueError) as err:
        DinoDiscriminator(weights=str(path))
    message = str(err.value)
    expected = [str(path), "blocks.3.mlp.fc2.bias", "head.weight", "pos_embed (1, 785, 384)", "DINO ViT-S/16"]
    assert all(text in message for text in expected), message


def test_256px_batches_are_either_cropped_at_one_window_or_area_resized(disc):
    # Pixel values encode their coordinates, so a crop's offset can be read back from its corner.
    rows = torch.arange(256.0).view(1, 1, 256, 1).expand(2, 3, 256, 256) / 128 - 1
    cols = torch.arange(256.0).view(1, 1, 1, 256).expand(2, 3, 256, 256) / 128 - 1
    x = torch.cat([rows[:, :1], cols[:, :1], (rows[:, :1] + cols[:, :1]) / 2], dim=1) * 0.9
    seen = set()
    for seed in range(12):
        out = disc.preprocess(x, generator=torch.Generator().manual_seed(seed))
        assert out.shape == (2, 3, 224, 224)
        area = F.interpolate(normalise(x), size=(224, 224), mode="area")
        if torch.allclose(out, area, atol=1e-5):
            seen.add("resize")
            continue
        top = round(((normalise(x)[0, 0, :, 0] - out[0, 0, 0, 0]).abs().argmin()).item())
        left = round(((normalise(x)[0, 1, 0, :] - out[0, 1, 0, 0]).abs().argmin()).item())
        torch.testing.assert_close(out, normalise(x)[..., top : top + 224, left : left + 224])
        seen.add("crop")
    assert seen == {"crop", "resize"}


def test_small_images_are_bicubic_upsampled_to_224_after_normalisation(disc):
    x = images(5, 64)
    expected = F.interpolate(normalise(x), size=(224, 224), mode="bicubic", align_corners=False)
    torch.testing.assert_close(disc.preprocess(x), expected, rtol=1e-5, atol=1e-5)


def test_local_batch_norm_standardises_each_group_of_eight_on_its_own():
    torch.manual_seed(6)
    norm = LocalBatchNorm(4, virtual_batch=8)
    x = torch.randn(16, 4, 10) * 3 + 1
    out = norm(x)
    for group in (out[:8], out[8:]):
        torch.testing.assert_close(group.mean(dim=(0, 2)), torch.zeros(4), atol=1e-5, rtol=0)
        torch.testing.assert_close(group.var(dim=(0, 2), unbiased=False), torch.ones(4), atol=1e-4, rtol=0)
    changed = x.clone()
    changed[0] += 5
    torch.testing.assert_close(norm(changed)[8:], out[8:])  # the second group never sees the first
    # Uneven groups (5 + 4), where GigaTok's reshape fails.
    assert norm(torch.randn(9, 4, 10)).shape == (9, 4, 10)


def test_diff_aug_is_deterministic_for_a_generator_and_keeps_shape_and_gradients():
    x = images(7, 64, batch=4).requires_grad_()
    a = diff_aug(x, generator=torch.Generator().manual_seed(0))
    b = diff_aug(x, generator=torch.Generator().manual_seed(0))
    c = diff_aug(x, generator=torch.Generator().manual_seed(1))
    assert a.shape == x.shape and a.dtype == torch.float32
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)
    a.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("h, w", [(64, 64), (64, 80)])
def test_cutout_zeroes_one_rectangle_per_sample_of_the_reference_size(h, w):
    ratio = 0.2
    size_h, size_w = round(h * ratio), round(w * ratio)  # GigaTok's rule: round(side * cutout)
    x = torch.rand(64, 3, h, w, generator=torch.Generator().manual_seed(8)) * 2 - 1
    out = diff_aug(x, prob=1.0, cutout=ratio, generator=torch.Generator().manual_seed(2))
    # Translation's zero fill is moved off zero by the colour jitter; only cutout leaves exact zeros.
    zero = (out == 0).all(dim=1)  # (B, H, W)
    num_full = 0
    for mask in zero:
        rows, cols = mask.any(dim=1), mask.any(dim=0)
        assert torch.equal(mask, rows[:, None] & cols[None, :])  # one axis-aligned rectangle
        n_rows, n_cols = int(rows.sum()), int(cols.sum())
        # Its centre lies inside the image, so at least the half from the centre on survives the clipping.
        assert size_h - size_h // 2 <= n_rows <= size_h and size_w - size_w // 2 <= n_cols <= size_w
        num_full += (n_rows, n_cols) == (size_h, size_w)
    assert num_full > 0
    full_fraction = size_h * size_w / (h * w)
    assert zero.float().mean() <= full_fraction and zero.float().mean() > 0.5 * full_fraction


def test_zero_prob_is_the_identity_and_negative_prob_turns_cutout_off():
    x = images(9, 32, batch=8)
    torch.testing.assert_close(diff_aug(x, prob=0.0), x, rtol=0, atol=0)
    out = diff_aug(x, prob=-1.0, generator=torch.Generator().manual_seed(3))
    assert not torch.allclose(out, x)
    assert not (out == 0).all(dim=1).any()


def test_translation_shifts_by_whole_pixels_up_to_an_eighth_of_the_side_with_zero_fill():
    x = torch.arange(2 * 1 * 16 * 16.0).view(2, 1, 16, 16) + 1
    # u maps to floor(u * (2*2 + 1)) - 2: u=0 -> shift -2, u=0.99 -> shift +2 (round(16 / 8) = 2)
    out = _translate(x, torch.tensor([0.0, 0.99]), torch.tensor([0.99, 0.5]))
    expected0 = torch.zeros(16, 16)
    expected0[2:, :14] = x[0, 0, :14, 2:]  # out[i, j] = x[i - 2, j + 2]
    expected1 = torch.zeros(16, 16)
    expected1[:14, :] = x[1, 0, 2:, :]  # out[i, j] = x[i + 2, j + 0]
    torch.testing.assert_close(out[0, 0], expected0)
    torch.testing.assert_close(out[1, 0], expected1)
