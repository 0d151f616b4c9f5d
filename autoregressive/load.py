"""Loading a GPT from an export (``tokscale convert llamagen|gigatok-gpt`` writes one) or a run directory.

from tokscale.autoregressive.load import load_gpt
model = load_gpt("exports/llamagen-gpt-B-256")      # eval mode, on the CPU
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from tokscale.export import CONFIG, state_dict_from

SCHEMA = "gpt"  # the ``schema:`` key of a converted GPT export's config.yaml
SCHEMAS = (SCHEMA, "c2i", "detailflow")  # and of a `tokscale train c2i|detailflow` run (and its export)


def model_config_from(path: str | Path):
    """The GPTConfig (a DetailFlowGPTConfig for a DetailFlow run) stored in an export's or run directory's
    config.yaml."""
    from tokscale.autoregressive.detailflow import DetailFlowGPTConfig
    from tokscale.autoregressive.gpt import GPTConfig
    from tokscale.config import ConfigError

    cfg_file = Path(path) / CONFIG
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} not found: expected a tokscale GPT export or run directory")
    raw = OmegaConf.load(cfg_file)
    schema = raw.get("schema")
    if schema is not None and schema not in SCHEMAS:
        raise ConfigError(f"{cfg_file}: a {schema!r} model, not a GPT (schema one of {SCHEMAS})")
    if "model" not in raw:
        raise ConfigError(f"{cfg_file} has no 'model' section")
    schema_cls = DetailFlowGPTConfig if schema == "detailflow" else GPTConfig
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema_cls), raw.model))


def load_gpt(path: str | Path, device: str | torch.device = "cpu", verify: bool = True):
    """A ready GPT (eval mode). ``verify``: check an export's files against its SHA256SUMS first."""
    from tokscale.autoregressive.detailflow import DetailFlowGPT, DetailFlowGPTConfig
    from tokscale.autoregressive.gpt import GPT

    cfg = model_config_from(path)
    state = state_dict_from(path, verify_export=verify)
    with torch.device("meta"):
        model = DetailFlowGPT(cfg) if isinstance(cfg, DetailFlowGPTConfig) else GPT(cfg)
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device).eval()
