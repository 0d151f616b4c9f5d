"""tokscale: scaling visual tokenizers for autoregressive image generation."""

__version__ = "0.1.0"


def load_tokenizer(path, device="cpu"):
    """A ready tokenizer from a run directory or an exported folder: ``encode(images) -> codes``,
    ``decode(codes) -> images`` (see tokscale.tokenizers.load)."""
    from tokscale.tokenizers.load import load_tokenizer as _load

    return _load(path, device)
