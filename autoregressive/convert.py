"""``tokscale convert llamagen`` / ``tokscale convert gigatok-gpt``: a reference GPT checkpoint -> a tokscale export.

    tokscale convert llamagen c2i_B_256.pt exports/llamagen-gpt-B-256 --num-tokens 256
    tokscale convert gigatok-gpt GigaTok_GPT_B.pt exports/gigatok-gpt-B

LlamaGen (``autoregressive/models/gpt.py``, 2D RoPE) and GigaTok (``gpt_1d.py``, a learned absolute position table)
save ``torch.save({"model": state_dict, ...})``, with ``"ema"`` beside it when trained with EMA (``--weights
ema``); ``"module"`` (DeepSpeed), ``"state_dict"`` and a bare state dict (consolidated FSDP) are read too. The
export holds what ``tokscale export`` writes (safetensors, config.yaml, model card naming the source, SHA256SUMS);
tokscale.autoregressive.load.load_gpt reads it.

Sizes are read from the state dict's shapes: width and vocabulary from the token table, depth from the blocks,
classes from the class table (whose last row is the null class), the SwiGLU width (checked against the hidden-size
rule) and, for GigaTok, the token count from the position table and QK-norm from its weights. Two things the
weights do not hold: the head count (``--heads``; by default the reference preset with that width and depth) and
LlamaGen's token count (``--num-tokens``, required: RoPE tables are not stored; 256 for the 16x16 models, 576 for
the 24x24 ones). Any key the conversion does not place is an error listing it, as is any tokscale weight left
unfilled.
"""

from __future__ import annotations

import logging
import math
import pickle
import re
import time
from pathlib import Path

import torch

from tokscale.autoregressive.presets import SIZES
from tokscale.export import ConversionError, check_keys_fit

log = logging.getLogger(__name__)

SOURCES = {
    "llamagen": ("LlamaGen", "https://github.com/FoundationVision/LlamaGen", "rope2d"),
    "gigatok-gpt": ("GigaTok", "https://github.com/SilentView/GigaTok", "learned"),
}
# state-dict entries that are runtime state, not weights (a cache left from sampling, the RoPE table some forks
# register as a buffer)
RUNTIME_KEYS = re.compile(r"(^|\.)(kv_cache\.[kv]_cache|freqs_cis|causal_mask)$")
WRAPPERS = ("module.", "_orig_mod.")  # DDP and torch.compile prefixes
CONTAINERS = ("model", "ema", "module", "state_dict")

# reference key -> tokscale key, per block (layers.{i}.*)
BLOCK_KEYS = {
    "attention.wqkv.weight": "attn.qkv.weight",
    "attention.wo.weight": "attn.proj.weight",
    "attention.q_norm.weight": "attn.q_norm.weight",  # GigaTok use_qk_norm
    "attention.q_norm.bias": "attn.q_norm.bias",
    "attention.k_norm.weight": "attn.k_norm.weight",
    "attention.k_norm.bias": "attn.k_norm.bias",
    "feed_forward.w1.weight": "ffn.gate.weight",
    "feed_forward.w3.weight": "ffn.up.weight",
    "feed_forward.w2.weight": "ffn.down.weight",
    "attention_norm.weight": "attn_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
}
TOP_KEYS = {
    "tok_embeddings.weight": "token_embed.weight",
    "cls_embedding.embedding_table.weight": "class_embed.weight",
    "positional_embedding": "pos_embed",
    "norm.weight": "norm.weight",
    "output.weight": "head.weight",
}


def rename(key: str) -> str | None:
    """A reference key's tokscale name; None for keys that are not known reference weights."""
    if key in TOP_KEYS:
        return TOP_KEYS[key]
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", key)
    if m and m.group(2) in BLOCK_KEYS:
        return f"blocks.{m.group(1)}.{BLOCK_KEYS[m.group(2)]}"
    return None


def read_state_dict(
    path: Path, weights: str = "model", allow_pickle: bool = False
) -> dict[str, torch.Tensor]:
    """The reference state dict in a checkpoint file, wrapper prefixes and runtime buffers removed."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: expected a LlamaGen/GigaTok GPT checkpoint (.pt)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as e:
        raise ConversionError(
            f"{path}: holds Python objects besides tensors (training scripts save their argparse args), which a "
            "safe load refuses; pass --allow-pickle if you trust the file"
            f" ({str(e).splitlines()[0]})"
        ) from e
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise ConversionError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict):
        raise ConversionError(f"{path}: expected a dict holding a state dict, got {type(ckpt).__name__}")
    if all(isinstance(v, torch.Tensor) for v in ckpt.values()) and weights == "model":
        state = ckpt  # a bare state dict (LlamaGen's --from-fsdp files)
    elif weights in ckpt:
        state = ckpt[weights]
    elif weights == "model" and any(k in ckpt for k in CONTAINERS[2:]):
        state = next(ckpt[k] for k in CONTAINERS[2:] if k in ckpt)
    else:
        raise ConversionError(f"{path}: has no '{weights}' entry (it holds {sorted(map(str, ckpt))[:8]})")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(f"{path}: '{weights}' is not a state dict of tensors")
    out = {}
    for key, value in state.items():
        for prefix in WRAPPERS:
            while key.startswith(prefix):
                key = key[len(prefix) :]
        if not RUNTIME_KEYS.search(key):
            out[key] = value
    return out


def _require(state: dict, key: str, where: str, hint: str = "") -> torch.Tensor:
    if key not in state:
        raise ConversionError(f"{where}: the state dict has no {key}{hint}")
    return state[key]


def default_heads(width: int, depth: int) -> int | None:
    """The head count of the reference preset with this width and depth (None if no preset has them)."""
    for w, d, h in SIZES.values():
        if (w, d) == (width, depth):
            return h
    return None


def model_config(state: dict, source: str, where: str, num_tokens=None, heads=None, num_classes=None):
    """The GPTConfig a reference state dict describes (shapes first, options for what they do not hold)."""
    from tokscale.autoregressive.gpt import GPTConfig

    name, _, position = SOURCES[source]
    adaln = sorted(k for k in state if "adaLN" in k or "ada_gss" in k)
    if adaln:
        raise ConversionError(
            f"{where}: adaLN conditioning is not implemented by tokscale (keys {adaln[:4]})"
        )
    tok = _require(state, "tok_embeddings.weight", where, f" (not a {name} GPT?)")
    vocab, width = (int(n) for n in tok.shape)
    depth = len({int(m.group(1)) for k in state if (m := re.match(r"layers\.(\d+)\.", k))})
    if depth == 0:
        raise ConversionError(f"{where}: the state dict has no layers.N.* blocks")
    rows = int(_require(state, "cls_embedding.embedding_table.weight", where).shape[0])
    if num_classes is not None and rows != num_classes + 1:
        raise ConversionError(
            f"{where}: --num-classes {num_classes}, but the class table has {rows} rows (tokscale needs "
            "num_classes + 1: the last is the null class of CFG, present when trained with class dropout)"
        )
    pos = state.get("positional_embedding")
    if source == "gigatok-gpt":
        if pos is None:
            raise ConversionError(
                f"{where}: no positional_embedding: a GigaTok GPT trained with --rope (1D RoPE) is not implemented "
                "by tokscale; a --gpt-2d model is LlamaGen's network: use `tokscale convert llamagen`"
            )
        tokens = int(pos.shape[0]) - 1
        if num_tokens is not None and num_tokens != tokens:
            raise ConversionError(
                f"{where}: --num-tokens {num_tokens}, but the position table holds {tokens} tokens + the class"
            )
        num_tokens = tokens
    elif pos is not None:
        raise ConversionError(
            f"{where}: the state dict has a positional_embedding: a GigaTok 1D GPT; use `tokscale convert gigatok-gpt`"
        )
    elif num_tokens is None:
        raise ConversionError(
            f"{where}: LlamaGen's weights do not record the token grid (its RoPE table is not stored): pass "
            "--num-tokens (256 for the 16x16 models at 256 px, 576 for the 24x24 ones at 384 px)"
        )
    if heads is None:
        heads = default_heads(width, depth)
        if heads is None:
            raise ConversionError(
                f"{where}: width {width} and depth {depth} match no reference preset, and the weights do not hold "
                "the head count: pass --heads"
            )
    hidden = int(_require(state, "layers.0.feed_forward.w1.weight", where).shape[0])
    qk_norm = "layers.0.attention.q_norm.weight" in state
    try:
        cfg = GPTConfig(
            width=width,
            depth=depth,
            heads=heads,
            vocab_size=vocab,
            num_tokens=num_tokens,
            num_classes=rows - 1,
            position=position,
            qk_norm=qk_norm,
        )
    except ValueError as e:
        raise ConversionError(f"{where}: {e}") from None
    if cfg.ffn_hidden != hidden:
        raise ConversionError(
            f"{where}: the SwiGLU width is {hidden}, the hidden-size rule gives {cfg.ffn_hidden} for width "
            f"{width} (an ffn_dim_multiplier other than none is not converted)"
        )
    return cfg


def convert_state_dict(state: dict, cfg, where: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The reference state dict in tokscale's layout, checked against a meta-device model: every key placed,
    every parameter filled, shapes equal."""
    from tokscale.autoregressive.gpt import GPT

    with torch.device("meta"):
        expected = GPT(cfg).state_dict()
    out, unknown = {}, []
    for key, value in state.items():
        name = rename(key)
        if name is None or name not in expected:
            unknown.append(key)
            continue
        if tuple(value.shape) != tuple(expected[name].shape):
            raise ConversionError(
                f"{where}: {key} has shape {tuple(value.shape)}, the model's {name} needs "
                f"{tuple(expected[name].shape)}"
            )
        out[name] = value.detach().float().contiguous()
    missing = [k for k in expected if k not in out]
    check_keys_fit(where, "shapes", unknown, missing)
    return out


def convert(
    source: str,
    checkpoint: str | Path,
    out: str | Path,
    weights: str = "model",
    num_tokens: int | None = None,
    heads: int | None = None,
    num_classes: int | None = None,
    allow_pickle: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write the tokscale export of a LlamaGen (``source="llamagen"``) or GigaTok (``"gigatok-gpt"``) GPT
    checkpoint to ``out``; returns ``out``."""
    from dataclasses import asdict

    from tokscale.autoregressive.load import SCHEMA
    from tokscale.export import sha256, write_export
    from tokscale.outputs import check_target, output_folder

    if source not in SOURCES:
        raise ValueError(f"unknown GPT source {source!r}; expected one of {list(SOURCES)}")
    checkpoint, out = Path(checkpoint), Path(out)
    check_target(out, "export", overwrite)
    state = read_state_dict(checkpoint, weights, allow_pickle)
    cfg = model_config(state, source, str(checkpoint), num_tokens, heads, num_classes)
    converted = convert_state_dict(state, cfg, str(checkpoint))
    params = sum(v.numel() for v in converted.values())
    training = {
        "trainer": SCHEMA,
        "source": source,
        "source_checkpoint": str(checkpoint.resolve()),
        "source_checkpoint_sha256": sha256(checkpoint),
        "source_weights": weights,
        "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    card = _model_card(source, cfg, training, params)
    with output_folder(out, "export", overwrite) as tmp:
        write_export(tmp, converted, {"model": asdict(cfg)}, SCHEMA, training, {}, card)
    log.info("converted %s (%s, %d parameters) to %s", checkpoint, weights, params, out)
    return out


def _model_card(source: str, cfg, training: dict, params: int) -> str:
    name, url, _ = SOURCES[source]
    pos = "2D RoPE" if cfg.position == "rope2d" else "learned absolute positions (GigaTok 1D)"
    grid = f"{cfg.grid_size}x{cfg.grid_size} grid" if cfg.position == "rope2d" else "1D sequence"
    return f"""---
library_name: tokscale
tags:
- autoregressive
- class-conditional-image-generation
- {source}
---

# {name} class-conditional GPT, converted to tokscale

Converted with `tokscale convert {source}` from {name}'s checkpoint `{Path(training["source_checkpoint"]).name}`
(sha256 `{training["source_checkpoint_sha256"]}`, its `{training["source_weights"]}` weights). The weights are
{name}'s; tokscale runs the same network (its tests compare logits and samples with {name}'s own code).

- Width {cfg.width}, depth {cfg.depth}, {cfg.heads} heads; {pos}{", QK-norm" if cfg.qk_norm else ""}
- Image tokens: {cfg.num_tokens} ({grid}), vocabulary {cfg.vocab_size}, {cfg.num_classes} classes + null class
- Parameters: {params:,} ({math.ceil(params / 1e6):,}M)

Source: {name} ({url}); cite its paper when you use these weights. Sample with the tokenizer whose codes it was
trained on.
"""
