"""``tokscale bench sample detailflow-*``: DetailFlow's samplers side by side, per token count (JSON).

    tokscale bench sample detailflow-tiny --batch 8 --token-counts 128,256,512
    tokscale bench sample detailflow-L --batch 32 --device cuda --precision bf16 --token-counts 128,256,512

For each token count N it times, on the same random weights and class labels, CFG on:

- ``token_by_token``: a GPT of the same width, depth, heads and vocabulary (LlamaGen's, learned positions) sampling
  one token per forward pass with its static KV cache: N passes, the AR baseline DetailFlow's speed-up is stated
  against;
- ``parallel_no_cache``: the DetailFlow GPT's group-parallel sampler recomputing the whole prefix at every step, as
  DetailFlow's own sampler does (its KV cache is disabled): 1 + 7 + (N/8 - 1) passes;
- ``parallel_kv_cache``: the same sampler with the block KV cache (each pass appends its positions), the same passes.

Forward passes are counted by wrapping the model's trunk, not computed. ``speedup_cache`` is no-cache time over
cached time, ``speedup_vs_token_by_token`` token-by-token time over cached time.
"""

from __future__ import annotations

import argparse
import time

import torch

from tokscale.devices import device_name, half_dtype, resolve_device, synchronize


def _counted(model):
    calls = {"n": 0}
    trunk = model._trunk

    def counted(*args, **kwargs):
        calls["n"] += 1
        return trunk(*args, **kwargs)

    model._trunk = counted
    return calls


def bench_detailflow_sample(args: argparse.Namespace) -> dict:
    from tokscale.autoregressive.detailflow import DetailFlowGPT, detailflow_config, num_forward_passes
    from tokscale.autoregressive.gpt import GPT, GPTConfig, param_counts
    from tokscale.autoregressive.sample import SampleConfig, generate

    counts = [int(n) for n in str(args.token_counts).split(",") if n.strip()]
    device = resolve_device(args.device)
    dtype = half_dtype(args.precision, device)
    scfg = SampleConfig(cfg_scale=args.cfg_scale, top_k=args.top_k)

    def timed(model, labels, use_cache: bool) -> tuple[float, int]:
        calls = _counted(model)
        gen = torch.Generator(device=device).manual_seed(0)
        generate(model, labels[:1], scfg, gen, use_cache=use_cache)  # warm-up
        synchronize(device)
        calls["n"] = 0
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            generate(model, labels, scfg, gen, use_cache=use_cache)
        synchronize(device)
        return (time.perf_counter() - t0) / args.repeats, calls["n"] // args.repeats

    results = []
    params = None
    for n in counts:
        cfg = detailflow_config(args.preset, [f"num_tokens={n}"])
        torch.manual_seed(0)
        df = DetailFlowGPT(cfg).to(device=device, dtype=dtype).eval()
        torch.nn.init.normal_(df.head.weight, std=0.02)  # random weights, not the zero head: real sampling work
        params = param_counts(df)["params"]
        gpt_cfg = GPTConfig(
            width=cfg.width,
            depth=cfg.depth,
            heads=cfg.heads,
            vocab_size=cfg.vocab_size,
            num_tokens=n,
            num_classes=cfg.num_classes,
            position="learned",
        )
        gpt = GPT(gpt_cfg).to(device=device, dtype=dtype).eval()
        torch.nn.init.normal_(gpt.head.weight, std=0.02)
        labels = torch.arange(args.batch, device=device) % cfg.num_classes
        row = {"num_tokens": n, "group_size": cfg.group_size}
        for name, model, cache in (
            ("token_by_token", gpt, True),
            ("parallel_no_cache", df, False),
            ("parallel_kv_cache", df, True),
        ):
            seconds, passes = timed(model, labels, cache)
            row[name] = {
                "forward_passes": passes,
                "seconds_per_batch": seconds,
                "images_per_s": args.batch / seconds,
            }
        assert row["parallel_kv_cache"]["forward_passes"] == num_forward_passes(n, cfg.group_size)
        row["speedup_cache"] = row["parallel_no_cache"]["seconds_per_batch"] / row["parallel_kv_cache"]["seconds_per_batch"]
        row["speedup_vs_token_by_token"] = (
            row["token_by_token"]["seconds_per_batch"] / row["parallel_kv_cache"]["seconds_per_batch"]
        )
        results.append(row)
    return {
        "benchmark": "detailflow_sample",
        "preset": args.preset,
        "device": device_name(device),
        "threads": torch.get_num_threads(),
        "precision": "bf16" if dtype == torch.bfloat16 else "fp32",
        "batch": args.batch,
        "cfg_scale": args.cfg_scale,
        "repeats": args.repeats,
        "params": params,
        "by_num_tokens": results,
    }
