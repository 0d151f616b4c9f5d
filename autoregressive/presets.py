"""GPT presets by name: ``gpt-{size}`` (LlamaGen's class-conditional GPTs, 2D RoPE) and ``gpt-{size}-1d``
(GigaTok's ``gpt_1d``: the same blocks with a learned absolute position table, the variant of every released
GigaTok AR model).

Counts are for vocab 16384, 256 tokens and 1000 classes (+1 null row) and equal the reference models built with
their own code (``PARAMS``, checked by the tests); ``tokscale model info gpt-XXL`` prints them. A 1D preset adds
(1 + 256) x width position rows. ``gpt-tiny`` keeps the architecture at a size for tests and demos.
"""

from __future__ import annotations

import copy

from tokscale.tokenizers.presets import SIZES as TOKENIZER_SIZES

# (width, depth, heads): the letters shared with the tokenizers, plus LlamaGen's 3B (head width 100) and the
# XXXL it defines but never released
SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": TOKENIZER_SIZES["tiny"],
    **{letter: TOKENIZER_SIZES[letter] for letter in ("B", "L", "XL", "XXL")},
    "XXXL": (2560, 48, 40),
    "3B": (3200, 24, 32),
}


def _preset(size: str, position: str = "rope2d") -> dict:
    width, depth, heads = SIZES[size]
    out = {"width": width, "depth": depth, "heads": heads, "position": position}
    if size == "tiny":
        out["vocab_size"] = 4096  # the tiny tokenizers' codebook
    return out


PRESETS: dict[str, dict] = {}
for _size in SIZES:
    PRESETS[f"gpt-{_size}"] = _preset(_size)
    PRESETS[f"gpt-{_size}-1d"] = _preset(_size, "learned")

# Reference parameter counts (vocab 16384, 256 tokens, 1000 classes), measured with LlamaGen's gpt.py and
# GigaTok's gpt_1d.py; the presets equal them exactly (tests/autoregressive/test_gpt.py).
PARAMS: dict[str, int] = {
    "gpt-B": 110_888_448,  # LlamaGen "111M"
    "gpt-L": 342_910_976,  # "343M"
    "gpt-XL": 774_699_520,  # "775M"
    "gpt-XXL": 1_410_972_672,  # "1.4B"
    "gpt-XXXL": 3_893_027_840,  # defined in LlamaGen, not released
    "gpt-3B": 3_096_659_200,  # LlamaGen-3B "3.1B" (24 x 3200)
    "gpt-B-1d": 111_085_824,  # GigaTok GPT-B "111M"
    "gpt-L-1d": 343_174_144,
    "gpt-XL-1d": 775_028_480,  # GigaTok "775M"
    "gpt-XXL-1d": 1_411_367_424,  # GigaTok "1.4B"
    "gpt-3B-1d": 3_097_481_600,
    "gpt-XXXL-1d": 3_893_685_760,  # the 2D count + 257 x 2560 (no GigaTok measurement)
    "gpt-tiny": 5_763_584,  # vocab 4096
    "gpt-tiny-1d": 5_829_376,
}


def list_presets() -> list[str]:
    return list(PRESETS)


def get_preset(name: str) -> dict:
    """The model-config dict a preset name stands for (a copy)."""
    if name not in PRESETS:
        raise ValueError(f"unknown GPT preset {name!r}; expected one of {list_presets()}")
    return copy.deepcopy(PRESETS[name])


def preset_config(name: str, overrides=()):
    """The GPTConfig of a preset with model-config overrides (``depth=2``, ``num_tokens=576``), validated."""
    from tokscale.autoregressive.gpt import GPTConfig
    from tokscale.config import load_config

    return load_config(
        GPTConfig, None, [f"preset={name}", *overrides], presets=get_preset, preset_key="preset"
    )


# VAR next-scale transformers (tokscale.autoregressive.var): depth d, width 64 d, d heads, stochastic depth
# 0.1 d / 24, on VAR's tokenizer (vocab 4096, 32-d codes, 10 scales / 680 tokens) and 1000 classes. var-d12 is
# the small model of collaborative decoding for var-d16; var-tiny / var-tiny-small sit on the tiny multi-scale
# tokenizer (4096 codes of 8 dims, scales 1..8 on its 8 x 8 grid at 128 px) for tests and CPU runs.
def _var(depth: int) -> dict:
    return {"width": 64 * depth, "depth": depth, "heads": depth, "drop_path": 0.1 * depth / 24}


_VAR_TINY = {"vocab_size": 4096, "code_dim": 8, "scales": [1, 2, 3, 4, 5, 6, 8], "drop_path": 0.0}
VAR_PRESETS: dict[str, dict] = {
    **{f"var-d{d}": _var(d) for d in (12, 16, 20, 24, 30)},
    "var-tiny": {**_VAR_TINY, "width": 128, "depth": 2, "heads": 2},
    "var-tiny-small": {**_VAR_TINY, "width": 64, "depth": 1, "heads": 1},
}

# Parameter counts of the presets; the VAR rows equal VAR's own constructor (models/var.py + basic_var.py,
# shared_aln=False, attn_l2_norm=True, V=4096, Cvae=32, 10 scales, 1000 classes): 18 C^2 + 14 C + H per block, and
# outside them C (Cvae + 1) input, 1001 C classes, C start, 680 C positions, 10 C levels, 2 C^2 + 2 C head AdaLN,
# (C + 1) V head (tests/autoregressive/test_var.py checks the formula too).
VAR_PARAMS: dict[str, int] = {
    "var-d12": 133_186_960,
    "var-d16": 310_283_520,  # VAR "310M"
    "var-d20": 600_917_136,  # "600M"
    "var-d24": 1_033_399_360,  # "1.0B"
    "var-d30": 2_010_020_356,  # "2.0B"
    "var-tiny": 1_304_964,
    "var-tiny-small": 424_257,
}


def get_var_preset(name: str) -> dict:
    """The VARConfig dict a preset name stands for (a copy)."""
    if name not in VAR_PRESETS:
        raise ValueError(f"unknown VAR preset {name!r}; expected one of {list(VAR_PRESETS)}")
    return copy.deepcopy(VAR_PRESETS[name])


def var_preset_config(name: str, overrides=()):
    """The VARConfig of a preset with model-config overrides (``depth=2``, ``scales=[1,2,4]``), validated."""
    from tokscale.autoregressive.var import VARConfig
    from tokscale.config import load_config

    return load_config(
        VARConfig, None, [f"preset={name}", *overrides], presets=get_var_preset, preset_key="preset"
    )
