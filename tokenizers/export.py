"""The tokenizer's model card: the ``model_card`` hook of TokenizerTask that ``tokscale export`` calls.

Export, verification and publishing themselves are generic (tokscale.export).
"""

from __future__ import annotations

from tokscale.export import metrics_table


def tokens_per_image(m: dict) -> int:
    """Codes per image of a resolved model config (TokenizerConfig.tokens, from the saved dict): the 1D tokens,
    the 2D grid, or a multi-scale tokenizer's sequence of every scale."""
    q = m["quantizer"]
    if q.get("kind") == "multiscale":
        return sum(p * p for p in q["scales"])
    if m["kind"] == "1d":
        return m["num_tokens"]
    return (m["image_size"] // 2 ** (len(m["cnn"]["channel_mults"]) - 1)) ** 2


def model_card(cfg, training: dict, metrics: dict, params: int) -> str:
    m = cfg["model"]
    metric_block = metrics_table(metrics)
    return f"""---
library_name: tokscale
tags:
- image-tokenizer
- vector-quantization
- autoregressive-image-generation
pipeline_tag: image-to-image
---

# tokscale {m["kind"].upper()} tokenizer{f" ({m['preset']})" if m.get("preset") else ""}

A GigaTok-style hybrid CNN + transformer VQ tokenizer trained with tokscale.

- Tokens per image: {tokens_per_image(m)}, image size {m["image_size"]}
- Codebook: {m["quantizer"]["codebook_size"]} codes of dimension {m["quantizer"]["code_dim"]} (l2-normalised: {m["quantizer"]["l2_norm"]})
- Encoder: width {m["encoder"]["width"]}, depth {m["encoder"]["depth"]}; decoder: width {m["decoder"]["width"]}, depth {m["decoder"]["depth"]}
- Parameters: {params:,}

## Training

- Steps: {training.get("step")}; world size: {training.get("world_size")}; ZeRO stage: {cfg["train"]["zero_stage"]}
- Data: `{cfg["data"]["train_shards"]}` at {cfg["data"]["resolution"]} px
- Code: tokscale commit `{training.get("git_commit")}`

## Evaluation

{metric_block}

## Use

```python
import tokscale
tok = tokscale.load_tokenizer("path/to/this/folder")
codes = tok.encode(images)   # images in [-1, 1], (B, 3, H, W)
recon = tok.decode(codes)
```
"""
