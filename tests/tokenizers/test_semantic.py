"""Semantic regularization: DINOv2 teacher equal to timm for the same weights, projector, loss, offline loading.

The teacher is the real ViT-B/14 architecture with random weights (86M parameters), so the module-scoped
fixtures build it as few times as possible and every forward pass runs at batch 1-2.
"""

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

from tokscale.tokenizers.semantic import (
    DinoTeacher,
    SemanticConfig,
    SemanticProjector,
    build_teacher,
    semantic_loss,
)

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def reference():
    """A random timm DINOv2 ViT-B/14 at 224 px, with layer scales raised so every block changes the tokens."""
    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch14_dinov2", img_size=224, num_classes=0).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("gamma"):
                param.uniform_(0.1, 0.5)
    return model


@pytest.fixture(scope="module")
def teacher_file(reference, tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "dinov2_vitb14.pth"
    torch.save(reference.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def teacher(teacher_file):
    return build_teacher(SemanticConfig(teacher_weights=str(teacher_file)), grid_size=16)


def reference_tokens(model, images):
    """timm forward_features on ImageNet-normalised [0, 1] images, patch tokens only."""
    with torch.no_grad():
        return model.forward_features(((images + 1) / 2 - MEAN) / STD)[:, model.num_prefix_tokens :]


def test_teacher_features_equal_timm_patch_tokens_for_the_same_weights(teacher, reference):
    torch.manual_seed(1)
    images = torch.rand(2, 3, 224, 224) * 2 - 1
    got = teacher(images)
    expected = F.normalize(reference_tokens(reference, images), dim=-1)
    assert got.shape == (2, 256, 768)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(2, 256))


def test_teacher_area_resamples_tokens_to_a_smaller_student_grid(teacher_file, reference):
    teacher8 = DinoTeacher(SemanticConfig(teacher_weights=str(teacher_file)), grid_size=8)
    torch.manual_seed(2)
    images = torch.rand(1, 3, 224, 224) * 2 - 1
    grid = reference_tokens(reference, images).transpose(1, 2).reshape(1, 768, 16, 16)
    expected = F.normalize(F.avg_pool2d(grid, 2).flatten(2).transpose(1, 2), dim=-1)
    torch.testing.assert_close(teacher8(images), expected, rtol=1e-4, atol=1e-5)


def test_teacher_on_bf16_images_of_another_size_computes_in_fp32(teacher):
    torch.manual_seed(3)
    images = (torch.rand(1, 3, 64, 64) * 2 - 1).bfloat16()
    got = teacher(images)
    assert got.shape == (1, 256, 768)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, teacher(images.float()))


def test_teacher_under_bf16_gives_fp32_unit_tokens_close_to_the_fp32_teacher(teacher):
    torch.manual_seed(5)
    images = torch.rand(1, 3, 224, 224) * 2 - 1
    got, want = teacher(images, bf16=True), teacher(images)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert not torch.equal(got, want)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(1, 256))
    assert F.cosine_similarity(got, want, dim=-1).min() > 0.98  # per token


def test_teacher_is_frozen_in_eval_mode_and_returns_no_gradient(teacher):
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.model.training
    images = torch.zeros(1, 3, 28, 28, requires_grad=True)
    assert not teacher(images).requires_grad


def test_meta_format_518px_checkpoint_loads_with_position_embedding_resampled_to_16x16(reference, tmp_path):
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    torch.manual_seed(4)
    state["pos_embed"] = torch.randn(1, 1 + 37 * 37, 768)  # the 518 px release's grid
    state["mask_token"] = torch.zeros(1, 768)  # present in Meta's checkpoints only
    path = tmp_path / "dinov2_vitb14_pretrain.pth"
    torch.save(state, path)
    teacher = DinoTeacher(SemanticConfig(teacher_weights=str(path)), grid_size=16)
    expected = resample_abs_pos_embed(state["pos_embed"], new_size=[16, 16], num_prefix_tokens=1)
    assert teacher.model.pos_embed.shape == (1, 257, 768)
    torch.testing.assert_close(teacher.model.pos_embed, expected)


def test_weight_zero_builds_no_teacher_and_needs_no_file():
    assert (
        build_teacher(SemanticConfig(weight=0.0, teacher_weights="/nowhere/dino.pth"), grid_size=16) is None
    )


def test_missing_teacher_weights_is_an_error_naming_the_path_and_source(tmp_path):
    missing = tmp_path / "dinov2_vitb14.safetensors"
    with pytest.raises(FileNotFoundError, match="dinov2_vitb14.safetensors") as err:
        build_teacher(SemanticConfig(teacher_weights=str(missing)), grid_size=16)
    assert "vit_base_patch14_dinov2" in str(err.value)
    with pytest.raises(ValueError, match="semantic.teacher_weights is empty"):
        build_teacher(SemanticConfig(), grid_size=16)


def test_projector_is_three_silu_linears_with_the_published_parameter_count():
    projector = SemanticProjector(512, 768)
    linears = [m for m in projector.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 2048), (2048, 2048), (2048, 768)]
    assert sum(p.numel() for p in projector.parameters()) == 6_820_608  # "S 6.8M" in GigaTok's configs
    assert projector(torch.zeros(2, 5, 512)).shape == (2, 5, 768)


def test_semantic_loss_is_the_mean_negative_cosine_per_token():
    teacher = F.normalize(torch.randn(2, 4, 8), dim=-1)
    assert semantic_loss(3.0 * teacher, teacher).item() == pytest.approx(-1.0, abs=1e-6)
    assert semantic_loss(-teacher, teacher).item() == pytest.approx(1.0, abs=1e-6)
    student = teacher.clone()
    student[:, :2] = -student[:, :2]  # half the tokens opposite: mean of -1 and +1
    assert semantic_loss(student, teacher).item() == pytest.approx(0.0, abs=1e-6)


def test_semantic_loss_passes_gradients_to_the_student_and_checks_shapes():
    student = torch.randn(1, 4, 8, requires_grad=True)
    semantic_loss(student, torch.randn(1, 4, 8)).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="one shape"):
        semantic_loss(torch.zeros(1, 4, 8), torch.zeros(1, 16, 8))


@pytest.mark.parametrize(
    "kwargs, key",
    [({"weight": -0.5}, "semantic.weight"), ({"decoder_layer": 0}, "semantic.decoder_layer")],
)
def test_invalid_settings_are_rejected_naming_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        SemanticConfig(**kwargs)
