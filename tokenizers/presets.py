"""Tokenizer presets by name: ``{kind}-{encoder size}-{decoder size}``.

Counts are totals as GigaTok counts them: CNN encoder + decoder, transformers, codebook and the
semantic-regularization projector (``tokscale model info PRESET`` prints the breakdown). The published totals
they match (within 3%) are in the comments.
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
    # GigaTok's released 2D S-S totals 135.5M; six S layers a side total 122M, so this preset matches the
    # released count with eight S layers a side (width, heads and MLP as in S).
    "2d-S-S": _preset("2d", "S", "S", enc_depth=8, dec_depth=8),  # GigaTok 136M
    "2d-S-B": _preset("2d", "S", "B"),  # GigaTok 197M
    "2d-B-L": _preset("2d", "B", "L"),  # GigaTok 491M
}

# Published totals (params) the presets are checked against in the tests.
PUBLISHED_PARAMS: dict[str, int] = {
    "1d-S-S": 136_000_000,
    "1d-S-B": 232_000_000,
    "1d-B-L": 622_000_000,
    "1d-XL-XXL": 2_890_000_000,
    "2d-S-S": 136_000_000,
    "2d-S-B": 197_000_000,
    "2d-B-L": 491_000_000,
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
