"""tokscale: scaling visual tokenizers for autoregressive image generation."""

__version__ = "0.1.0"
