"""Tokenizer presets by name: ``{kind}-{encoder size}-{decoder size}``.

The ``1d-*`` and ``2d-*`` presets are GigaTok's released networks: their parameter counts (CNN encoder and decoder,
transformers, codebook and the semantic-regularization projector; ``tokscale model info PRESET`` prints the
breakdown) equal those of GigaTok's released configs exactly (``RELEASED_PARAMS``, checked by the tests). The
tiny presets keep the architecture at a size for tests and the demo.
"""

from __future__ import annotations

import copy

# Transformer sizes shared with the AR models' letters: (width, depth, heads), MLP ratio 4.
SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (256, 4, 4),
    "S": (512, 6, 8),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1280, 36, 20),
    "XXL": (1536, 48, 24),
}

# GigaTok's CNN: 128 channels, mults [1,1,2,2,4] (16x), no attention.
CNN = {"channels": 128, "channel_mults": [1, 1, 2, 2, 4], "num_res_blocks": 2, "z_channels": 256}
TINY_CNN = {"channels": 32, "channel_mults": [1, 1, 2, 2, 4], "num_res_blocks": 1, "z_channels": 64}


def _size(letter: str, depth: int | None = None) -> dict:
    width, d, heads = SIZES[letter]
    return {"width": width, "depth": depth or d, "heads": heads, "mlp_ratio": 4.0}


def _preset(kind: str, enc: str, dec: str, **extra) -> dict:
    tiny = enc == "tiny"
    out = {
        "kind": kind,
        "image_size": 256,
        "num_tokens": 256,
        "cnn": dict(TINY_CNN if tiny else CNN),
        "encoder": _size(enc, extra.pop("enc_depth", None)),
        "decoder": _size(dec, extra.pop("dec_depth", None)),
        "quantizer": {"codebook_size": 4096 if tiny else 16384, "code_dim": 8},
    }
    out.update(extra)
    return out


PRESETS: dict[str, dict] = {
    "1d-tiny": _preset("1d", "tiny", "tiny", semantic_dim=256),  # ~5M, for tests and the demo
    "2d-tiny": _preset("2d", "tiny", "tiny", semantic_dim=256),  # ~4M, for tests and the demo
    "1d-S-S": _preset("1d", "S", "S"),  # GigaTok 136M
    "1d-S-B": _preset("1d", "S", "B"),  # GigaTok 232M
    "1d-B-L": _preset("1d", "B", "L"),  # GigaTok 622M
    # Billion scale: entropy loss 0.005 keeps the codebook in use (REFERENCE: XL-XXL)
    "1d-XL-XXL": _preset(
        "1d", "XL", "XXL", quantizer={"codebook_size": 16384, "code_dim": 8, "entropy_weight": 0.005}
    ),  # 2.89B
    # GigaTok's released 2D S-S: six S layers a side of DETR decoder type (self-attention plus a second
    # attention over the layer's own input), which is why it totals 135.5M
    "2d-S-S": _preset("2d", "S", "S", layer_type="detr"),  # GigaTok 136M
    "2d-S-B": _preset("2d", "S", "B"),  # GigaTok 197M
    "2d-B-L": _preset(
        "2d", "B", "L", quantizer={"codebook_size": 16384, "code_dim": 8, "entropy_weight": 0.005}
    ),  # GigaTok 491M (its released config trains with the entropy loss too)
}

# Parameter counts of GigaTok's released configs (VQ_SS256.yaml etc., counted with GigaTok's own model code),
# which the presets equal exactly (tests/tokenizers/test_model.py).
RELEASED_PARAMS: dict[str, int] = {
    "1d-S-S": 136_073_227,
    "1d-S-B": 232_399_627,
    "1d-B-L": 621_637_131,
    "1d-XL-XXL": 2_893_970_443,
    "2d-S-S": 135_548_427,
    "2d-S-B": 197_132_555,
    "2d-B-L": 491_410_187,
}


def list_presets() -> list[str]:
    return list(PRESETS)


def get_preset(name: str) -> dict:
    """The nested model-config dict a preset name stands for (a copy)."""
    if name not in PRESETS:
        raise ValueError(f"unknown tokenizer preset {name!r}; expected one of {list_presets()}")
    return copy.deepcopy(PRESETS[name])


def preset_config(name: str, overrides=()):
    """The TokenizerConfig of a preset with model-config overrides (``decoder.depth=12``), validated."""
    from tokscale.config import load_config
    from tokscale.tokenizers.model import TokenizerConfig

    return load_config(
        TokenizerConfig, None, [f"preset={name}", *overrides], presets=get_preset, preset_key="preset"
    )
