"""``tokscale bench sample var-PRESET``: VAR sampling speed and KV-cache memory for each sampler setting, side by
side in one run on one randomly initialised model (JSON).

    tokscale bench sample var-tiny --batch 8
    tokscale bench sample var-d16 --batch 8 --settings cache,budget_0.1,budget_0.3,budget_1.0,code_6
    tokscale bench sample var-d16 --batch 64 --device cuda --precision bf16
    tokscale bench sample var-d30 --batch 64 --device meta        # exact KV bytes and passes, no compute

Settings (``--settings``, comma-separated; default all of them):

- ``no_cache``: every scale recomputes the whole prefix under the block-causal mask;
- ``cache``: one forward per scale against the appended KV cache;
- ``budget_F``: the cache with the KV budget at fraction F (tokscale.autoregressive.var_sample.BudgetCache; the
  first ``--kv-keep-scales`` scales kept whole); ``budget_1.0`` runs the budget code path without evicting;
- ``code_K``: collaborative decoding, the preset for scales 0..K-1 and ``--small`` (default: the next smaller
  preset, var-d16 -> var-d12, var-tiny -> var-tiny-small) for the rest.

Each reports images/s (batch / seconds per generation, after one warm-up generation of one image unless
``--no-warmup``), the peak bytes held in KV caches, the forward passes of each model and the sequence positions run
(CFG rows included). ``--device meta`` is a dry run on shapes alone: the KV bytes, passes and positions are exact
(they depend on shapes only) and cost nothing, images/s is null; how var-d30 at batch 64 would fit, in seconds. The tokenizer side is
a randomly initialised MultiScaleQuantizer with the model's scales, vocabulary and code width: its per-scale work
(one lookup, one upsampling, one area-downsampling) is part of each timing, as in real sampling.
"""

from __future__ import annotations

import argparse
import time

import torch

from tokscale.devices import device_name, half_dtype, resolve_device, synchronize

SMALLER = {
    "var-d30": "var-d16",
    "var-d24": "var-d16",
    "var-d20": "var-d12",
    "var-d16": "var-d12",
    "var-d12": "var-tiny",
    "var-tiny": "var-tiny-small",
}
DEFAULT_SETTINGS = "no_cache,cache,budget_0.1,budget_0.3,budget_1.0,code_6"


def parse_settings(text: str) -> list[tuple[str, float | int | None]]:
    out = []
    for item in (s.strip() for s in text.split(",") if s.strip()):
        name, _, value = item.partition("_")
        if item in ("no_cache", "cache"):
            out.append((item, None))
        elif name == "budget" and value:
            out.append((name, float(value)))
        elif name == "code" and value.isdigit():
            out.append((name, int(value)))
        else:
            raise ValueError(
                f"--settings: unknown setting {item!r}; expected no_cache, cache, budget_F (0 < F <= 1) or code_K"
            )
    return out


def build(preset: str, device, dtype, seed: int):
    from tokscale.autoregressive.presets import var_preset_config
    from tokscale.autoregressive.var import VAR

    torch.manual_seed(seed)
    with torch.device("meta" if device.type == "meta" else "cpu"):
        model = VAR(var_preset_config(preset))
    model = model.to(device=device, dtype=dtype).eval()
    torch.nn.init.normal_(model.head.weight, std=0.02)  # not VAR's shrunken head: real sampling work
    return model


def bench_var_sample(args: argparse.Namespace) -> dict:
    from tokscale.autoregressive.var import var_param_counts
    from tokscale.autoregressive.var_sample import VARSampleConfig, generate_var
    from tokscale.tokenizers.multiscale import MultiScaleQuantizer
    from tokscale.tokenizers.quantizer import QuantizerConfig

    settings = parse_settings(args.settings or DEFAULT_SETTINGS)
    device = resolve_device(args.device, also=("meta",))
    dry = device.type == "meta"  # shapes only: exact KV bytes, passes and positions, no timing
    dtype = half_dtype(args.precision, device)
    model = build(args.preset, device, dtype, 0)
    mcfg = model.config
    small_name = args.small or SMALLER.get(args.preset)
    small = None
    if any(name == "code" for name, _ in settings):
        if small_name is None:
            raise ValueError(f"--small: no smaller preset known for {args.preset!r}; name one")
        small = build(small_name, device, dtype, 1)
    torch.manual_seed(2)
    qcfg = QuantizerConfig(
        kind="multiscale", scales=list(mcfg.scales), codebook_size=mcfg.vocab_size, code_dim=mcfg.code_dim
    )
    with torch.device("meta" if dry else "cpu"):
        quantizer = MultiScaleQuantizer(qcfg)
    quantizer = quantizer.to(device).eval()
    labels = torch.arange(args.batch) % mcfg.num_classes  # generate_var moves them to the model's device

    def run(name: str, value) -> dict:
        kw = dict(cfg_scale=args.cfg_scale, top_k=args.top_k, kv_keep_scales=args.kv_keep_scales)
        if name == "budget":
            kw["kv_budget"] = value
        if name == "code":
            kw["code_handoff"] = value
        scfg = VARSampleConfig(**kw)
        use_cache = name != "no_cache"

        def once(lab):
            gen = None if dry else torch.Generator(device=device).manual_seed(0)
            return generate_var(
                model, quantizer, lab, scfg, gen, use_cache=use_cache, small_model=small, return_stats=True
            )

        if dry:
            return {"images_per_s": None, "seconds": None, **once(labels)[1]}
        if args.warmup:
            once(labels[:1])
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            _, stats = once(labels)
        synchronize(device)
        seconds = (time.perf_counter() - t0) / args.repeats
        return {"images_per_s": args.batch / seconds, "seconds": seconds, **stats}

    results = {}
    for name, value in settings:
        key = name if value is None else f"{name}_{value}"
        results[key] = run(name, value)
    out = {
        "benchmark": "var_sample",
        "preset": args.preset,
        "device": device_name(device),
        "threads": torch.get_num_threads(),
        "precision": "bf16" if dtype == torch.bfloat16 else "fp32",
        "batch": args.batch,
        "num_tokens": mcfg.num_tokens,
        "scales": list(mcfg.scales),
        "cfg_scale": args.cfg_scale,
        "kv_keep_scales": args.kv_keep_scales,
        "params": var_param_counts(model)["params"],
        "settings": results,
    }
    if small is not None:
        out["small"] = {"preset": small_name, "params": var_param_counts(small)["params"]}
    return out
