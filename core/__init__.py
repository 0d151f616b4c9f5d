"""tokscale: scaling visual tokenizers for autoregressive image generation.

    import tokscale
    tok = tokscale.load_tokenizer("exports/2d-tiny-demo")   # resolved on first use (tokscale.tokenizers.load)

The base package imports no trainer: the convenience names below resolve lazily, by module name.
"""

import importlib

__version__ = "0.1.0"

_LAZY = {"load_tokenizer": "tokscale.tokenizers.load"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tokscale' has no attribute {name!r}")
