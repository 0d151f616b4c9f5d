"""LPIPS loss: same values as the lpips package for the same weights, offline, frozen, fp32."""

import warnings
from pathlib import Path

import lpips
import pytest
import torch
import torch.nn.functional as F
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


def test_lpips_with_a_bf16_trunk_is_close_to_fp32_passes_gradients_and_leaves_the_metric_fp32(ours):
    torch.manual_seed(4)
    x = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_()
    y = (x.detach() + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    got = ours(x, y, bf16_trunk=True)
    want = ours(x, y)
    assert got.dtype == torch.float32 and got.shape == (2,)
    assert not torch.equal(got, want)  # the convolutions did run in bf16 ...
    torch.testing.assert_close(got, want, rtol=3e-2, atol=0)  # ... to within bf16's rounding of the features
    (grad_bf16,) = torch.autograd.grad(got.sum(), x)
    (grad_fp32,) = torch.autograd.grad(want.sum(), x)
    cos = F.cosine_similarity(grad_bf16.flatten(), grad_fp32.flatten(), dim=0)
    assert cos > 0.99
    with torch.no_grad():
        torch.testing.assert_close(ours(x, y), want.detach(), rtol=0, atol=0)  # the default stays fp32


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


def test_the_frozen_networks_run_in_bf16_only_when_asked_or_when_the_generator_does():
    from tokscale.config import ConfigError
    from tokscale.tokenizers.train import TokenizerTask, frozen_in_bf16

    assert frozen_in_bf16("auto", "bf16") and not frozen_in_bf16("auto", "fp32")
    assert frozen_in_bf16("bf16", "fp32") and not frozen_in_bf16("fp32", "bf16")
    assert frozen_in_bf16("auto", "auto") == (torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    with pytest.raises(
        ConfigError, match=r"loss.frozen_precision='half'.*expected one of \('auto', 'fp32', 'bf16'\)"
    ):
        TokenizerTask.load_config("tokenizer/demo", ["loss.frozen_precision=half"])
