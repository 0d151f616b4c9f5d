"""``tokscale convert gigatok``: a GigaTok tokenizer checkpoint -> a tokscale export folder.

    tokscale convert gigatok VQ_BL256.pt --config configs/vq/VQ_BL256.yaml exports/gigatok-1d-B-L

GigaTok releases ``torch.save({"model": state_dict})`` (some files also hold ``"ema"``: ``--weights ema``), with
its model config in its own YAML format (``model.model_cls`` + ``model.init_args``). The export holds the same
files as ``tokscale export`` writes (safetensors, config, model card naming the source, SHA256SUMS), so
``tokscale.load_tokenizer``, ``tokscale eval recon`` and ``init_from`` read it.

Two sizes GigaTok's config cannot express are read from the state dict: the CNN base width (128 in every release)
from ``encoder.conv_in.weight`` and the image size from the transformers' position tables (256 released); give
``--cnn-channels`` / ``--image-size`` to check them. Every GigaTok option that tokscale does not implement is
refused by name, as is any key of the state dict the conversion does not place (and any it leaves unfilled).
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from tokscale.export import ConversionError, check_keys_fit
from tokscale.tokenizers.presets import SIZES

log = logging.getLogger(__name__)

# GigaTok's transformer size names -> (width, depth, heads): tokscale's own size table, plus GigaTok's xxxl
GIGATOK_SIZES = {
    **{
        name: SIZES[letter]
        for name, letter in [
            ("tiny", "tiny"),
            ("small", "S"),
            ("base", "B"),
            ("large", "L"),
            ("xl", "XL"),
            ("xxl", "XXL"),
        ]
    },
    "xxxl": (2560, 48, 40),
}
MODEL_CLASSES = {"VQVitModelPlus": "1d", "VQVitModel2DPlus": "2d"}
LAYER_TYPES = {"TransformerLayer": "plain", "TransformerDecoderLayer": "detr"}

# init_args tokscale reads (translated below) and those that only steer GigaTok's training losses
USED = {
    "codebook_size",
    "codebook_embed_dim",
    "codebook_l2_norm",
    "commit_loss_beta",
    "entropy_loss_ratio",
    "encoder_ch_mult",
    "decoder_ch_mult",
    "model_size",
    "encoder_size",
    "decoder_size",
    "num_latent_tokens",
    "z_channels",
    "rot",
    "transformer_layer_type",
    "distill_depth",
    "out_inner_dim",
}
TRAINING_ONLY = {"codebook_show_usage", "fea_rec_loss_type", "fea_rec_loss_weight"}
# GigaTok options with the one value tokscale implements (every released config uses it)
FIXED = {
    "dropout_p": 0.0,
    "multi_level_query_init": True,  # 1D only
    "last_level_2d_query_init": False,
    "multi_level_2d_query_init": False,
    "learnable_2d_query_init": False,
    "learnable_1d_query_init": False,
    "adaptive_gn": True,
    "d2s_up": True,
    "use_attn": False,
    "use_lfq": False,
    "bernoulli_sample": False,
    "eval_deterministic": False,
    "simvq": False,
    "codebook_transform": None,
    "freeze_codebook": False,
    "use_rope": False,
    "use_qk_norm": False,
    "use_flash_attn": False,  # GigaTok's custom attention path; tokscale always uses SDPA
    "rope_1d": False,
    "rope_2d": False,
    "res_up_down_sample": False,
    "downsample_match_channel": False,
    "upsample_match_channel": False,
    "res_codebook_updown_sample": False,
    "downsample_improve": False,
    "stochastic": False,
    "stochastic_temperature": None,
    "encoder_2d_distill": False,
    "with_prior_model": False,
    "prior_model_config": None,
}


def _size(name, which: str, where: str) -> tuple[int, int, int]:
    if name not in GIGATOK_SIZES:
        raise ConversionError(
            f"{where}: model.init_args.{which}={name!r} is not one of {list(GIGATOK_SIZES)}"
        )
    return GIGATOK_SIZES[name]


def model_config(gcfg: dict, state: dict, where: str = "config", cnn_channels=None, image_size=None):
    """The TokenizerConfig of a GigaTok model config (its YAML as a dict) and its state dict."""
    from tokscale.config import load_config
    from tokscale.tokenizers.model import TokenizerConfig

    model = gcfg.get("model") or {}
    cls = model.get("model_cls")
    if cls not in MODEL_CLASSES:
        raise ConversionError(
            f"{where}: model.model_cls={cls!r} is not a GigaTok tokenizer tokscale converts "
            f"(expected one of {list(MODEL_CLASSES)})"
        )
    kind = MODEL_CLASSES[cls]
    args = dict(model.get("init_args") or {})
    for key, value in args.items():
        if key in USED or key in TRAINING_ONLY:
            continue
        if key not in FIXED:
            raise ConversionError(f"{where}: model.init_args.{key} is not a GigaTok option tokscale knows")
        if key == "multi_level_query_init" and kind == "2d":
            continue
        if key == "stochastic_temperature" and not args.get("stochastic"):
            continue
        if value != FIXED[key]:
            raise ConversionError(
                f"{where}: model.init_args.{key}={value!r} is not implemented by tokscale "
                f"(it converts GigaTok's released settings, {key}={FIXED[key]!r})"
            )
    if kind == "1d" and args.get("multi_level_query_init") is not True:
        raise ConversionError(
            f"{where}: model.init_args.multi_level_query_init must be true (GigaTok's released 1D query init); "
            f"got {args.get('multi_level_query_init')!r}"
        )
    causal = ((model.get("causal_settings") or {}).get("causal_type")) or None
    masks = {None: "none", "per-token": "causal"}
    if causal not in masks:
        raise ConversionError(
            f"{where}: model.causal_settings.causal_type={causal!r} is not implemented by tokscale"
        )
    layer_type = ""
    if kind == "2d":
        name = args.get("transformer_layer_type", "TransformerDecoderLayer")
        if name not in LAYER_TYPES:
            raise ConversionError(
                f"{where}: model.init_args.transformer_layer_type={name!r} is not implemented by tokscale "
                f"(expected one of {list(LAYER_TYPES)})"
            )
        layer_type = LAYER_TYPES[name]
    enc_mult = list(args.get("encoder_ch_mult", [1, 1, 2, 2, 4]))
    dec_mult = list(args.get("decoder_ch_mult", [1, 1, 2, 2, 4]))
    if enc_mult != dec_mult:
        raise ConversionError(
            f"{where}: encoder_ch_mult {enc_mult} and decoder_ch_mult {dec_mult} differ; tokscale's CNNs share one"
        )
    default = args.get("model_size", "small")
    enc = _size(args.get("encoder_size") or default, "encoder_size", where)
    dec = _size(args.get("decoder_size") or default, "decoder_size", where)

    # sizes the config does not hold
    stem = state.get("encoder.conv_in.weight")
    if stem is None:
        raise ConversionError(
            f"{where}: the state dict has no encoder.conv_in.weight (not a GigaTok tokenizer?)"
        )
    channels = int(stem.shape[0])
    if cnn_channels is not None and cnn_channels != channels:
        raise ConversionError(f"--cnn-channels {cnn_channels}, but the checkpoint's CNN is {channels} wide")
    prefix = "s2to1encoder" if kind == "1d" else "s2dencoder"
    pos = state.get(f"{prefix}.positional_embedding")
    if pos is None:
        raise ConversionError(f"{where}: the state dict has no {prefix}.positional_embedding")
    grid = math.isqrt(int(pos.shape[0]))
    down = 2 ** (len(enc_mult) - 1)
    size = grid * down
    if image_size is not None and image_size != size:
        raise ConversionError(
            f"--image-size {image_size}, but the checkpoint's position table is {grid}x{grid} tokens ({size} px)"
        )
    res = {int(m.group(1)) for k in state if (m := re.match(r"encoder\.conv_blocks\.0\.res\.(\d+)\.", k))}
    semantic_dim = 0
    head = state.get(("s1to2decoder" if kind == "1d" else "s2ddecoder") + ".distill_mlp.4.weight")
    if head is not None:
        semantic_dim = int(head.shape[0])
    overrides = {
        "kind": kind,
        "image_size": size,
        "num_tokens": int(args.get("num_latent_tokens", 256)) if kind == "1d" else grid * grid,
        "layer_type": layer_type,
        "token_mask": masks[causal],
        "semantic_dim": semantic_dim,
        "cnn": {
            "channels": channels,
            "channel_mults": enc_mult,
            "num_res_blocks": len(res) or 2,
            "z_channels": int(args.get("z_channels", 256)),
        },
        "encoder": dict(zip(("width", "depth", "heads"), enc), mlp_ratio=4.0),
        "decoder": dict(zip(("width", "depth", "heads"), dec), mlp_ratio=4.0),
        "quantizer": {
            "codebook_size": int(args.get("codebook_size", 16384)),
            "code_dim": int(args.get("codebook_embed_dim", 8)),
            "l2_norm": bool(args.get("codebook_l2_norm", True)),
            "beta": float(args.get("commit_loss_beta", 0.25)),
            "entropy_weight": float(args.get("entropy_loss_ratio", 0.0)),
            "rotation_trick": bool(args.get("rot", False)),
        },
    }
    dotlist = [f"{k}={json.dumps(v)}" for k, v in _flatten(overrides).items()]
    return load_config(TokenizerConfig, None, dotlist)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


_LAYER = {
    "self_attn.in_proj_weight": "self_attn.in_proj.weight",
    "self_attn.in_proj_bias": "self_attn.in_proj.bias",
    "self_attn.out_proj.weight": "self_attn.out_proj.weight",
    "self_attn.out_proj.bias": "self_attn.out_proj.bias",
    "multihead_attn.in_proj_weight": "cross_attn.in_proj.weight",
    "multihead_attn.in_proj_bias": "cross_attn.in_proj.bias",
    "multihead_attn.out_proj.weight": "cross_attn.out_proj.weight",
    "multihead_attn.out_proj.bias": "cross_attn.out_proj.bias",
    "linear1.weight": "mlp.fc1.weight",
    "linear1.bias": "mlp.fc1.bias",
    "linear2.weight": "mlp.fc2.weight",
    "linear2.bias": "mlp.fc2.bias",
}
_TRANSFORMER = {
    "positional_embedding": "pos",
    "latent_token_positional_embedding": "token_pos",
    "encoder_embed": "embed",
    "decoder_embed": "embed",
}


def _rename(key: str, kind: str) -> str | None:
    """tokscale's name for one GigaTok key (None: a buffer tokscale does not keep)."""
    enc_t, dec_t = ("s2to1encoder", "s1to2decoder") if kind == "1d" else ("s2dencoder", "s2ddecoder")
    if key == "quantize.codebook_used":
        return None  # GigaTok's usage window (a training statistic)
    fixed = {
        "quantize.embedding.weight": "quantizer.codebook.weight",
        "quant_conv.weight": "to_code.weight",
        "quant_conv.bias": "to_code.bias",
        "post_quant_conv.weight": "from_code.weight",
        "post_quant_conv.bias": "from_code.bias",
    }
    if key in fixed:
        return fixed[key]
    for src, dst in ((enc_t, "encoder"), (dec_t, "decoder")):
        if key.startswith(src + "."):
            rest = key[len(src) + 1 :]
            if m := re.fullmatch(r"transformer\.(\d+)\.(.+)", rest):
                name = _LAYER.get(m.group(2), m.group(2))
                return f"{dst}.layers.{m.group(1)}.{name}"
            if m := re.fullmatch(r"distill_mlp\.(\d+)\.(weight|bias)", rest):
                return f"semantic_projector.layers.{m.group(1)}.{m.group(2)}" if dst == "decoder" else key
            head, _, tail = rest.partition(".")
            if head in _TRANSFORMER:
                return f"{dst}.{_TRANSFORMER[head]}" + (f".{tail}" if tail else "")
            if head == "conv_out" and dst == "encoder":
                return f"encoder.proj_out.{tail}"
            return f"{dst}.{rest}"
    for src, dst in (("encoder", "cnn_encoder"), ("decoder", "cnn_decoder")):
        if key.startswith(src + "."):
            rest = key[len(src) + 1 :]
            if m := re.fullmatch(r"conv_blocks\.(\d+)\.res\.(\d+)\.(.+)", rest):
                name = m.group(3).replace("nin_shortcut", "shortcut")
                return f"{dst}.levels.{m.group(1)}.blocks.{m.group(2)}.{name}"
            if m := re.fullmatch(r"conv_blocks\.(\d+)\.downsample\.conv\.(.+)", rest):
                return f"{dst}.levels.{m.group(1)}.down.conv.{m.group(2)}"
            if m := re.fullmatch(r"conv_blocks\.(\d+)\.upsample\.conv1\.(.+)", rest):
                return f"{dst}.levels.{m.group(1)}.up.conv.{m.group(2)}"
            if m := re.fullmatch(r"adaptive\.(\d+)\.(gamma|beta)\.(.+)", rest):
                part = "to_scale" if m.group(2) == "gamma" else "to_shift"
                return f"{dst}.levels.{m.group(1)}.style_norm.{part}.{m.group(3)}"
            return f"{dst}.{rest}"
    return key


def convert_state_dict(state: dict, cfg, where: str = "checkpoint") -> dict[str, torch.Tensor]:
    """GigaTok's state dict in tokscale's layout (checked against a meta-device model: every key placed, every
    parameter filled, shapes equal)."""
    from tokscale.tokenizers.model import VQTokenizer

    with torch.device("meta"):
        model = VQTokenizer(cfg, with_projector=cfg.semantic_dim > 0)
    expected = model.state_dict()
    out, unknown = {}, []
    for key, value in state.items():
        name = _rename(key, cfg.kind)
        if name is None:
            continue
        if name not in expected:
            unknown.append(key)
            continue
        value = value.detach().float()
        target = expected[name].shape
        if value.shape != target:
            value = value.reshape(target) if value.numel() == math.prod(target) else value
        if value.shape != target:
            raise ConversionError(
                f"{where}: {key} has shape {tuple(state[key].shape)}, the model's {name} needs {tuple(target)}"
            )
        out[name] = value.contiguous()
    missing = [k for k in expected if k not in out]
    check_keys_fit(where, "config", unknown, missing)
    return out


def read_checkpoint(path: Path, weights: str = "model") -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: expected a GigaTok checkpoint (.pt holding {{'model': ...}})"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise ConversionError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict):
        raise ConversionError(
            f"{path}: expected a dict with a '{weights}' state dict, got {type(ckpt).__name__}"
        )
    if weights not in ckpt:
        raise ConversionError(f"{path}: has no '{weights}' entry (it holds {sorted(ckpt)[:8]})")
    state = ckpt[weights]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(f"{path}: '{weights}' is not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def convert_gigatok(
    checkpoint: str | Path,
    config: str | Path,
    out: str | Path,
    weights: str = "model",
    cnn_channels: int | None = None,
    image_size: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the tokscale export of a GigaTok checkpoint to ``out``; returns ``out``."""
    from dataclasses import asdict

    from tokscale.export import sha256, write_export
    from tokscale.outputs import check_target, output_folder

    checkpoint, config, out = Path(checkpoint), Path(config), Path(out)
    check_target(out, "export", overwrite)
    if not config.is_file():
        raise FileNotFoundError(
            f"{config} not found: expected GigaTok's model config (e.g. configs/vq/VQ_SS256.yaml)"
        )
    gcfg = OmegaConf.to_container(OmegaConf.load(config), resolve=True)
    state = read_checkpoint(checkpoint, weights)
    cfg = model_config(gcfg, state, str(config), cnn_channels, image_size)
    converted = convert_state_dict(state, cfg, str(checkpoint))
    params = sum(v.numel() for v in converted.values())
    training = {
        "trainer": "tokenizer",
        "source": "gigatok",
        "source_checkpoint": str(checkpoint.resolve()),
        "source_checkpoint_sha256": sha256(checkpoint),
        "source_config": str(config.resolve()),
        "source_weights": weights,
        "gigatok_model_cls": gcfg["model"]["model_cls"],
        "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    card = _model_card(cfg, training, params)
    with output_folder(out, "export", overwrite) as tmp:
        write_export(tmp, converted, {"model": asdict(cfg)}, "tokenizer", training, {}, card)
    log.info("converted %s (%s, %d parameters) to %s", checkpoint, weights, params, out)
    return out


def _model_card(cfg, training: dict, params: int) -> str:
    return f"""---
library_name: tokscale
tags:
- image-tokenizer
- vector-quantization
- gigatok
---

# GigaTok {cfg.kind.upper()} tokenizer, converted to tokscale

Converted with `tokscale convert gigatok` from GigaTok's checkpoint `{Path(training["source_checkpoint"]).name}`
(sha256 `{training["source_checkpoint_sha256"]}`, its `{training["source_weights"]}` weights) and config
`{Path(training["source_config"]).name}` ({training["gigatok_model_cls"]}). The weights are GigaTok's; tokscale
runs the same network (its tests compare outputs with GigaTok's own code).

- Tokens per image: {cfg.tokens}, image size {cfg.image_size}
- Codebook: {cfg.quantizer.codebook_size} codes of dimension {cfg.quantizer.code_dim}
- Encoder: width {cfg.encoder.width}, depth {cfg.encoder.depth}; decoder: width {cfg.decoder.width}, depth {cfg.decoder.depth}
- Parameters: {params:,}

Source: GigaTok (https://github.com/SilentView/GigaTok); cite its paper when you use these weights.

## Use

```python
import tokscale
tok = tokscale.load_tokenizer("path/to/this/folder")
codes = tok.encode(images)   # images in [-1, 1], (B, 3, H, W)
recon = tok.decode(codes)
```
"""
