"""LPIPS perceptual loss (VGG16 trunk, v0.1 linear heads) built from local weight files, never downloaded.

The metric is the lpips package's own ``LPIPS(net='vgg', version='0.1')``, so values equal the published
metric for the same weights. Two weight files are involved:

* the five linear heads ship inside the lpips package (``lpips/weights/v0.1/vgg.pth``), nothing to fetch;
* the VGG16 trunk is torchvision's ImageNet classifier, which ``LPIPS(net='vgg')`` would download at
  construction. Here the trunk is built randomly initialised and overwritten from ``vgg_weights``, a local
  torchvision ``vgg16`` state dict. Make that file once, on a machine with internet access::

      python -c "import torch, torchvision; torch.save(torchvision.models.vgg16(weights='IMAGENET1K_V1').state_dict(), 'vgg16.pth')"

  (the same tensors as torchvision's cached ``vgg16-397923af.pth``, which can be used directly).

The frozen networks of the tokenizer losses (this one and the DINOv2 teacher in
:mod:`tokscale.tokenizers.semantic`) share :class:`FrozenModule` and :func:`read_state_dict` from here: they stay
in eval mode with ``requires_grad=False``, compute in float32 whatever the input dtype, and must live outside the
DeepSpeed engine, which would cast them to bf16.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

VGG_WEIGHTS_SOURCE = (
    "torchvision's VGG16 ImageNet weights: on a machine with internet run "
    "`python -c \"import torch, torchvision; torch.save(torchvision.models.vgg16(weights='IMAGENET1K_V1')"
    ".state_dict(), 'vgg16.pth')\"` (or use torchvision's cached vgg16-397923af.pth) and point "
    "vgg_weights at the file"
)


@dataclass
class PerceptualConfig:
    """LPIPS (VGG, v0.1) loss on [-1, 1] images; weight 0 turns it off and needs no weights file."""

    weight: float = 1.0
    # Local torchvision vgg16 state dict (e.g. vgg16-397923af.pth); required when weight > 0.
    # The linear heads come from the lpips package's shipped v0.1 vgg.pth.
    vgg_weights: str = ""

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ValueError(f"perceptual.weight must be >= 0 (0 turns LPIPS off), got {self.weight}")


def read_state_dict(path: str, *, key: str, source: str) -> dict[str, torch.Tensor]:
    """Load a state dict from a local ``.pth``/``.pt``/``.bin`` (torch.load) or ``.safetensors`` file.

    ``key`` names the config entry holding the path and ``source`` says where such weights come from; both go
    into the error raised for an empty or missing path. A checkpoint wrapping its tensors under ``state_dict``
    or ``model`` is unwrapped.
    """
    if not path:
        raise ValueError(
            f"{key} is empty: a local weights file is required ({source}); or set the weight to 0"
        )
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"{key}={path!r}: no such file. Weights are never downloaded; {source}")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(file), device="cpu")
    else:
        state = torch.load(file, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{key}={path!r} is not a state dict of tensors ({source})")
    return state


class FrozenModule(nn.Module):
    """A pretrained network used only as a fixed function: eval mode always, no trainable parameters.

    ``train()`` is a no-op so that a parent's ``.train()`` cannot switch on dropout (the lpips heads carry
    Dropout layers) or batch statistics.
    """

    def freeze(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenModule:
        return self

    def check_fp32(self) -> None:
        # A bf16 copy would silently change the loss; the usual cause is registering the network inside
        # the DeepSpeed engine, which casts every parameter of its module.
        for p in self.parameters():
            if p.dtype != torch.float32:
                raise RuntimeError(
                    f"{type(self).__name__} parameters are {p.dtype}, expected float32: keep frozen loss "
                    "networks outside the DeepSpeed engine and do not cast them"
                )
            return


# The lpips package's epsilon in the feature normalisation (its normalize_tensor).
LPIPS_EPS = 1e-10

# ImageNet statistics: the input normalisation of the frozen ImageNet-trained networks (DINOv2 teacher, DINO
# discriminator).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@contextlib.contextmanager
def _no_random_init():
    """Skip torch.nn.init's random fills while building a network whose weights are all loaded afterwards.

    torchvision's vgg16, which lpips builds and then keeps only the convolutional trunk of, spends about 2.5 s of a
    2-core CPU filling its 102M-parameter classifier with random numbers that nobody reads.
    """
    names = ("kaiming_uniform_", "kaiming_normal_", "normal_", "uniform_", "constant_", "zeros_", "ones_")
    saved = {n: getattr(torch.nn.init, n) for n in names}
    try:
        for n in names:
            setattr(torch.nn.init, n, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for n, fn in saved.items():
            setattr(torch.nn.init, n, fn)


def _vgg_key_map(trunk: nn.Module) -> dict[str, str]:
    """lpips trunk parameter names (``slice2.5.weight``) -> torchvision vgg16 names (``features.5.weight``).

    lpips splits ``vgg16().features`` into five slices but keeps each layer's index in ``features`` as its
    name inside the slice, so the mapping is read off the module rather than hard-coded.
    """
    mapping = {}
    for name, _ in trunk.named_parameters():
        _, index, kind = name.split(".")
        mapping[name] = f"features.{index}.{kind}"
    return mapping


class PerceptualLoss(FrozenModule):
    """LPIPS distance: ``module(x, y)`` with x, y (B, 3, H, W) in [-1, 1] -> (B,) float32.

    Gradients flow to the inputs (the reconstruction); the network's own parameters are frozen.
    """

    def __init__(self, cfg: PerceptualConfig) -> None:
        super().__init__()
        vgg_state = read_state_dict(cfg.vgg_weights, key="perceptual.vgg_weights", source=VGG_WEIGHTS_SOURCE)
        import lpips

        with warnings.catch_warnings():
            # pnet_rand builds the trunk without fetching it; torchvision warns about the old keyword lpips uses.
            warnings.simplefilter("ignore", UserWarning)
            # The heads load from the package's shipped v0.1 file; use_dropout stays at its default because the
            # shipped head keys (lin0.model.1.weight) assume the Dropout layer is present.
            with _no_random_init():  # every parameter kept is loaded below or by lpips from its head file
                self.lpips = lpips.LPIPS(net="vgg", version="0.1", pnet_rand=True, verbose=False)
        mapping = _vgg_key_map(self.lpips.net)
        missing = [src for src in mapping.values() if src not in vgg_state]
        if missing:
            raise ValueError(
                f"perceptual.vgg_weights={cfg.vgg_weights!r} is not a torchvision vgg16 state dict: missing "
                f"{missing[:3]} ({len(missing)} keys); {VGG_WEIGHTS_SOURCE}"
            )
        trunk_state = {}
        for dst, src in mapping.items():
            expected = self.lpips.net.get_parameter(dst).shape
            if vgg_state[src].shape != expected:
                raise ValueError(
                    f"perceptual.vgg_weights={cfg.vgg_weights!r}: {src} has shape {tuple(vgg_state[src].shape)}, "
                    f"expected {tuple(expected)} (VGG16)"
                )
            trunk_state[dst] = vgg_state[src].float()
        self.lpips.net.load_state_dict(trunk_state, strict=True)
        self.freeze()
        logger.info("LPIPS VGG trunk loaded from %s", cfg.vgg_weights)

    def forward(self, x: torch.Tensor, y: torch.Tensor, bf16_trunk: bool = False) -> torch.Tensor:
        """The distance in float32. ``bf16_trunk``: the VGG convolutions under bf16 autocast (the training loss
        under ``loss.frozen_precision``), their features back in float32 before the normalisation, the squared
        differences, the heads and the average; off, everything is float32 as in the lpips package (the metric)."""
        if x.shape != y.shape or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(
                f"LPIPS expects two (B, 3, H, W) images of one shape, got {x.shape} and {y.shape}"
            )
        self.check_fp32()
        # Autocast off and inputs in float32: the distance is a sum of small squared differences of
        # unit-normalised features, which bf16 rounds away.
        with torch.autocast(device_type=x.device.type, enabled=False):
            if bf16_trunk:
                distance = self._distance_bf16_trunk(x.float(), y.float())
            else:
                distance = self.lpips(x.float(), y.float())
        return distance.reshape(x.shape[0])

    def _distance_bf16_trunk(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        net = self.lpips

        def trunk(images):
            with torch.autocast(device_type=images.device.type, dtype=torch.bfloat16):
                return net.net(net.scaling_layer(images))

        feats_x = trunk(x)
        with torch.set_grad_enabled(torch.is_grad_enabled() and y.requires_grad):
            feats_y = trunk(y)  # the target: no graph unless it needs a gradient too
        total = 0.0
        for head, fx, fy in zip(net.lins, feats_x, feats_y):
            fx, fy = fx.float(), fy.float()
            ux = fx / (fx.pow(2).sum(1, keepdim=True).sqrt() + LPIPS_EPS)
            uy = fy / (fy.pow(2).sum(1, keepdim=True).sqrt() + LPIPS_EPS)
            total = total + head((ux - uy).pow(2)).mean((2, 3), keepdim=True)
        return total


def build_lpips(cfg: PerceptualConfig) -> PerceptualLoss | None:
    """The frozen LPIPS network, or None when ``cfg.weight == 0`` (then no weights file is read)."""
    if cfg.weight == 0:
        return None
    return PerceptualLoss(cfg)
