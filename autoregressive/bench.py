"""``tokscale bench sample PRESET``: generation tokens/s and images/s with the static KV cache and without it
(recomputing the prefix every step), side by side in one run, CFG on (JSON).

    tokscale bench sample gpt-tiny --batch 8 --num-tokens 64
    tokscale bench sample gpt-B --batch 64 --device cuda --precision bf16 --compile
"""

from __future__ import annotations

import argparse
import time

import torch

from tokscale.devices import device_name, half_dtype, resolve_device, synchronize


def bench_sample(args: argparse.Namespace) -> dict:
    from tokscale.autoregressive.gpt import GPT, param_counts
    from tokscale.autoregressive.presets import preset_config
    from tokscale.autoregressive.sample import SampleConfig, generate

    overrides = [f"num_tokens={args.num_tokens}"] if args.num_tokens else []
    cfg = preset_config(args.preset, overrides)
    device = resolve_device(args.device)
    dtype = half_dtype(args.precision, device)
    torch.manual_seed(0)
    model = GPT(cfg).to(device=device, dtype=dtype).eval()
    torch.nn.init.normal_(
        model.head.weight, std=0.02
    )  # random weights, not the zero head: real sampling work
    if args.compile:
        model.decode = torch.compile(model.decode, dynamic=False)
    labels = torch.arange(args.batch, device=device) % cfg.num_classes
    scfg = SampleConfig(cfg_scale=args.cfg_scale, top_k=args.top_k)

    def run(use_cache: bool) -> float:
        gen = torch.Generator(device=device).manual_seed(0)
        generate(model, labels[:1], scfg, gen, use_cache=use_cache)  # warm-up (and compilation)
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            generate(model, labels, scfg, gen, use_cache=use_cache)
        synchronize(device)
        return (time.perf_counter() - t0) / args.repeats

    cached, uncached = run(True), run(False)
    tokens = args.batch * cfg.num_tokens
    return {
        "benchmark": "ar_sample",
        "preset": args.preset,
        "device": device_name(device),
        "threads": torch.get_num_threads(),
        "precision": "bf16" if dtype == torch.bfloat16 else "fp32",
        "compile": bool(args.compile),
        "batch": args.batch,
        "num_tokens": cfg.num_tokens,
        "cfg_scale": args.cfg_scale,
        "params": param_counts(model)["params"],
        "tokens_per_s_kv_cache": tokens / cached,
        "tokens_per_s_no_cache": tokens / uncached,
        "images_per_s_kv_cache": args.batch / cached,
        "images_per_s_no_cache": args.batch / uncached,
        "speedup": uncached / cached,
    }
