"""LPIPS loss: same values as the lpips package for the same weights, offline, frozen, fp32."""

import warnings
from pathlib import Path

import lpips
import pytest
import torch
import torchvision

from tokscale.tokenizers.perceptual import PerceptualConfig, PerceptualLoss, build_lpips


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory) -> Path:
    """A random torchvision vgg16 state dict on disk, standing in for the ImageNet weights."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "vgg16.pth"
    # Only the trunk matters to LPIPS; dropping the 120M-parameter classifier keeps the file small.
    features = torchvision.models.vgg16().features
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    return path


@pytest.fixture(scope="module")
def ours(vgg_file) -> PerceptualLoss:
    return build_lpips(PerceptualConfig(weight=1.0, vgg_weights=str(vgg_file)))


def test_lpips_equals_the_lpips_package_for_the_same_weights(ours, vgg_file):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        reference = lpips.LPIPS(net="vgg", version="0.1", pnet_rand=True, verbose=False)
    features = torch.load(vgg_file, weights_only=True)
    for name, param in reference.net.named_parameters():
        _, index, kind = name.split(".")
        param.data.copy_(features[f"features.{index}.{kind}"])
    torch.manual_seed(1)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    with torch.no_grad():
        expected = reference(x, y).flatten()
        got = ours(x, y)
    assert got.shape == (2,)
    assert got.dtype == torch.float32
    assert torch.all(got > 0)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_lpips_uses_the_shipped_linear_heads(ours):
    shipped = Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth"
    heads = torch.load(shipped, map_location="cpu", weights_only=True)
    torch.testing.assert_close(ours.lpips.lin0.model[1].weight, heads["lin0.model.1.weight"])
    torch.testing.assert_close(ours.lpips.lin4.model[1].weight, heads["lin4.model.1.weight"])


def test_lpips_is_frozen_stays_in_eval_mode_and_passes_gradients_to_the_input(ours):
    assert not any(p.requires_grad for p in ours.parameters())
    ours.train()
    assert not ours.training and not ours.lpips.lin0.model[0].training  # dropout stays off
    x = torch.zeros(1, 3, 32, 32, requires_grad=True)
    y = torch.rand(1, 3, 32, 32) * 2 - 1
    ours(x, y).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_lpips_on_bf16_inputs_computes_in_fp32(ours):
    torch.manual_seed(2)
    x = (torch.rand(1, 3, 32, 32) * 2 - 1).bfloat16()
    y = (torch.rand(1, 3, 32, 32) * 2 - 1).bfloat16()
    with torch.no_grad():
        got = ours(x, y)
        expected = ours(x.float(), y.float())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected)


def test_lpips_refuses_to_run_after_being_cast_to_bf16(vgg_file):
    loss = build_lpips(PerceptualConfig(vgg_weights=str(vgg_file))).to(torch.bfloat16)
    x = torch.zeros(1, 3, 32, 32)
    with pytest.raises(RuntimeError, match="outside the DeepSpeed engine"):
        loss(x, x)


def test_weight_zero_builds_nothing_and_needs_no_file():
    assert build_lpips(PerceptualConfig(weight=0.0, vgg_weights="/nowhere/vgg16.pth")) is None
    assert build_lpips(PerceptualConfig(weight=0.0)) is None


def test_missing_vgg_weights_file_is_an_error_naming_the_path_and_source(tmp_path):
    missing = tmp_path / "vgg16-397923af.pth"
    with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth") as err:
        build_lpips(PerceptualConfig(vgg_weights=str(missing)))
    assert "torchvision" in str(err.value)
    with pytest.raises(ValueError, match="perceptual.vgg_weights is empty"):
        build_lpips(PerceptualConfig(vgg_weights=""))


def test_a_file_that_is_not_vgg16_is_an_error_naming_the_missing_keys(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="features.0.weight"):
        build_lpips(PerceptualConfig(vgg_weights=str(path)))


def test_negative_weight_is_rejected_naming_the_key():
    with pytest.raises(ValueError, match="perceptual.weight"):
        PerceptualConfig(weight=-1.0)
