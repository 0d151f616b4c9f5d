"""Loading a tokenizer from a run directory (newest complete checkpoint, any ZeRO stage) or an export; the weights
and files themselves are read by the generic tokscale.export.

import tokscale
tok = tokscale.load_tokenizer("exports/2d-tiny-demo")   # or a run dir
codes = tok.encode(images)          # (B, 3, H, W) in [-1, 1] -> (B, num_tokens) int64
images = tok.decode(codes)
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import OmegaConf

from tokscale.export import CONFIG, state_dict_from

log = logging.getLogger(__name__)


def model_config_from(path: str | Path):
    """The TokenizerConfig stored in a run dir's or export's config.yaml."""
    from tokscale.tokenizers.model import TokenizerConfig

    cfg_file = Path(path) / CONFIG
    if not cfg_file.is_file():
        raise FileNotFoundError(
            f"{cfg_file} not found: expected a tokscale run directory or exported tokenizer"
        )
    raw = OmegaConf.load(cfg_file)
    if "model" not in raw:
        raise ValueError(f"{cfg_file} has no 'model' section")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TokenizerConfig), raw.model))


def load_weights(model: torch.nn.Module, path: str | Path) -> None:
    """init_from: weights only (no optimizer, step or data position). The semantic projector may be absent.
    An export is checked against its SHA256SUMS first."""
    state = state_dict_from(path, verify_export=True)
    missing, unexpected = model.load_state_dict(state, strict=False)
    bad_missing = [k for k in missing if not k.startswith("semantic_projector.")]
    bad_unexpected = [k for k in unexpected if not k.startswith("semantic_projector.")]
    if bad_missing or bad_unexpected:
        raise ValueError(
            f"{path}: weights do not fit this model (missing {bad_missing[:5]}, unexpected {bad_unexpected[:5]})"
        )
    log.info("initialised weights from %s", path)


def load_tokenizer(path: str | Path, device: str | torch.device = "cpu", verify: bool = True):
    """A ready VQTokenizer (eval mode) from a run directory or an exported tokenizer folder. ``verify``: check an
    export's files against its SHA256SUMS first (a changed or corrupt file is an error naming it)."""
    from tokscale.tokenizers.model import VQTokenizer

    cfg = model_config_from(path)
    state = state_dict_from(path, verify_export=verify)
    with_projector = any(k.startswith("semantic_projector.") for k in state)
    model = VQTokenizer(cfg, with_projector=with_projector)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()
