"""Loading tokenizer weights from a run directory (newest complete checkpoint, any ZeRO stage) or an export.

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

from tokscale.checkpoint import latest_checkpoint

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"


def is_export(path: Path) -> bool:
    return (path / WEIGHTS).is_file() and (path / CONFIG).is_file()


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


def consolidated_state_dict(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """fp32 model weights from one checkpoint directory, whatever the ZeRO stage and world size it was saved at."""
    engine_dir = ckpt_dir / "engine"
    if any(engine_dir.glob("*optim_states.pt")) and any(engine_dir.glob("zero_pp_rank_*")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag="engine")
    else:  # plain data parallel (stage 0): the module states hold the weights
        files = sorted(engine_dir.glob("mp_rank_*_model_states.pt"))
        if not files:
            raise FileNotFoundError(f"{engine_dir}: no DeepSpeed model states found")
        state = torch.load(files[0], map_location="cpu", weights_only=False)["module"]
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def state_dict_from(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if is_export(path):
        from safetensors.torch import load_file

        return load_file(str(path / WEIGHTS))
    found = latest_checkpoint(path)
    if found is None:
        raise FileNotFoundError(
            f"{path}: neither an exported tokenizer ({WEIGHTS} + {CONFIG}) nor a run directory with a complete "
            "checkpoint under ckpt/"
        )
    return consolidated_state_dict(found[1])


def load_weights(model: torch.nn.Module, path: str | Path) -> None:
    """init_from: weights only (no optimizer, step or data position). The semantic projector may be absent."""
    state = state_dict_from(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    bad_missing = [k for k in missing if not k.startswith("semantic_projector.")]
    bad_unexpected = [k for k in unexpected if not k.startswith("semantic_projector.")]
    if bad_missing or bad_unexpected:
        raise ValueError(
            f"{path}: weights do not fit this model (missing {bad_missing[:5]}, unexpected {bad_unexpected[:5]})"
        )
    log.info("initialised weights from %s", path)


def load_tokenizer(path: str | Path, device: str | torch.device = "cpu"):
    """A ready VQTokenizer (eval mode) from a run directory or an exported tokenizer folder."""
    from tokscale.tokenizers.model import VQTokenizer

    cfg = model_config_from(path)
    state = state_dict_from(path)
    with_projector = any(k.startswith("semantic_projector.") for k in state)
    model = VQTokenizer(cfg, with_projector=with_projector)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()
