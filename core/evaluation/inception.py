"""The Inception network behind FID and IS: torch-fidelity's port of the TF 2015-12-05 graph.

The ADM evaluator (and so every published rFID/gFID) runs the TensorFlow Inception graph; torch-fidelity's port
matches it to ~1e-6 relative FID, including the TF-style bilinear resize to 299 and the (x - 128) / 128 input
scaling. Its weights are read from a local file, never downloaded: ``EvalConfig.inception_weights``.

Inputs are uint8 images (B, 3, H, W), exactly what the published protocol feeds it: reconstructions in [-1, 1]
become ``clamp(127.5 * x + 128, 0, 255)`` truncated to uint8 (:func:`quantize_uint8`).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
# Written into reference statistics so that files made with another network are refused.
FEATURE_EXTRACTOR = "torch-fidelity inception-v3-compat (TF 2015-12-05), pool3 2048"
FEATURE_DIM = 2048
NUM_LOGITS = 1008
_EXTRACTOR_NAME = "inception-v3-compat"
_FEATURES = ["2048", "logits_unbiased"]


def quantize_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images -> uint8 as the ADM/LlamaGen evaluation scripts do: clamp(127.5 x + 128) truncated.

    The +128 (not +127.5) with truncation rounds to nearest, and maps an image that came from uint8 pixels
    (u / 127.5 - 1) back to exactly the same pixels."""
    return torch.clamp(127.5 * images.float() + 128.0, 0, 255).to(torch.uint8)


def check_weights_path(path: str | Path) -> Path:
    if not str(path):
        raise ValueError(
            "eval.inception_weights is empty: rFID and IS need torch-fidelity's Inception weights "
            f"({INCEPTION_FILE}). Download it once from {INCEPTION_URL} and set eval.inception_weights=PATH "
            "(or --inception-weights PATH); evaluation never downloads weights"
        )
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(
            f"Inception weights {str(p)!r} not found: expected torch-fidelity's converted TF Inception "
            f"({INCEPTION_FILE}, 95 MB), downloadable from {INCEPTION_URL}; evaluation never downloads weights"
        )
    return p


@contextlib.contextmanager
def full_precision_matmuls():
    """TF32 convolutions/matmuls (PyTorch's cuDNN default, and what trainers switch on) move Inception features
    by 5e-4 relative (measured on an H100; true fp32 on the GPU agrees with the CPU to 4e-7), so FID switches
    them off here to stay comparable."""
    cudnn_tf32 = torch.backends.cudnn.allow_tf32
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = cudnn_tf32
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32


class InceptionFeatures(nn.Module):
    """uint8 images -> (pool3 features (B, 2048), unbiased logits (B, 1008)), both float32.

    The logits without the final bias are what torch-fidelity's Inception Score uses."""

    def __init__(self, weights_path: str | Path):
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        p = check_weights_path(weights_path)
        try:
            self.net = FeatureExtractorInceptionV3(
                _EXTRACTOR_NAME, _FEATURES, feature_extractor_weights_path=str(p)
            )
        except (
            RuntimeError,
            KeyError,
            EOFError,
        ) as err:  # a state dict of another network, or a truncated file
            raise ValueError(
                f"Inception weights {str(p)!r} could not be loaded ({str(err).splitlines()[0]}); expected "
                f"torch-fidelity's {INCEPTION_FILE}"
            ) from None
        self.weights_path = str(p)

    @torch.no_grad()
    def forward(self, images_uint8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if images_uint8.dtype != torch.uint8:
            raise ValueError(f"InceptionFeatures expects uint8 images, got {images_uint8.dtype}")
        with full_precision_matmuls():
            pool, logits = self.net(images_uint8)
        return pool, logits


def load_inception(weights_path: str | Path, device: str | torch.device = "cpu") -> InceptionFeatures:
    """The frozen Inception on ``device``, from a local weights file (a clear error when it is missing)."""
    return InceptionFeatures(weights_path).to(device).eval()


def write_random_inception_weights(path: str | Path, seed: int = 0) -> Path:
    """A randomly initialised Inception state dict in torch-fidelity's format, for tests and benchmarks.

    torch-fidelity's own initialisation leaves biases and BatchNorm statistics at zero/one, which makes many
    features identical across images (FID = 0); every tensor is re-drawn here so features differ per image."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # keep the fresh parameters
            return None

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({}, path)  # the constructor reads a file before load_state_dict
    net = _Unloaded(_EXTRACTOR_NAME, _FEATURES, feature_extractor_weights_path=str(path))
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, t in net.state_dict().items():
        t = t.clone()
        if name.endswith("num_batches_tracked"):
            state[name] = t
            continue
        if t.dim() == 4:  # conv kernels: He init keeps activation scale through the ReLUs
            fan_in = t[0].numel()
            t.normal_(0.0, (2.0 / fan_in) ** 0.5, generator=gen)
        elif name.endswith("running_var"):
            t.uniform_(0.8, 1.2, generator=gen)
        elif name.endswith("running_mean") or name.endswith("bias"):
            t.normal_(0.0, 0.1, generator=gen)
        elif name == "fc.weight":
            t.normal_(0.0, 0.05, generator=gen)
        else:  # BatchNorm scales
            t.uniform_(0.8, 1.2, generator=gen)
        state[name] = t
    torch.save(state, path)
    return path
