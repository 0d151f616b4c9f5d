"""``tokscale bench tokenizer PRESET``: forward+backward throughput, peak memory, parameters (JSON).

tokscale bench tokenizer 2d-tiny --batch 8
tokscale bench tokenizer 1d-S-S --batch 32 --device cuda --precision bf16
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
import torch.nn.functional as F

from tokscale.tokenizers.model import VQTokenizer, param_counts
from tokscale.tokenizers.presets import preset_config


def bench(args: argparse.Namespace) -> dict:
    overrides = [f"image_size={args.resolution}"] if args.resolution else []
    if args.grad_checkpointing:
        overrides.append("grad_checkpointing=true")
    cfg = preset_config(args.preset, overrides)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if args.precision == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.precision]
    torch.manual_seed(0)
    model = VQTokenizer(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.rand(args.batch, 3, cfg.image_size, cfg.image_size, device=device) * 2 - 1

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = model(x, capture_layer=min(3, cfg.decoder.depth))
            loss = F.mse_loss(out["recon"].float(), x) + out["loss_commit"] + out["loss_codebook"]
            if "semantic" in out:
                loss = loss + out["semantic"].float().pow(2).mean() * 0
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    result = {
        "benchmark": "tokenizer_fwd_bwd",
        "preset": args.preset,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "precision": "bf16-autocast" if dtype == torch.bfloat16 else "fp32",
        "batch": args.batch,
        "resolution": cfg.image_size,
        "num_tokens": cfg.tokens,
        "grad_checkpointing": cfg.grad_checkpointing,
        "steps": args.steps,
        "images_per_s": args.batch * args.steps / dt,
        "s_per_step": dt / args.steps,
        "params": param_counts(model)["params"],
    }
    if device.type == "cuda":
        result["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        # Linux reports ru_maxrss in KiB: the whole process's peak, model + optimizer + activations.
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def bench_extract(args: argparse.Namespace) -> dict:
    """Encoding images/s of a preset (random weights) batched, side by side with the references' loop that
    encodes one image per forward, on the same images."""
    overrides = [f"image_size={args.resolution}"] if args.resolution else []
    cfg = preset_config(args.preset, overrides)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    dtype = (
        torch.bfloat16
        if (args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda"))
        else torch.float32
    )
    torch.manual_seed(0)
    model = VQTokenizer(cfg, with_projector=False).to(device).eval()
    images = torch.rand(args.images, 3, cfg.image_size, cfg.image_size, device=device) * 2 - 1

    def run(batch: int) -> float:
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            model.encode(images[:batch])  # warm-up
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for part in images.split(batch):
                model.encode(part)
            if device.type == "cuda":
                torch.cuda.synchronize()
        return args.images / (time.perf_counter() - t0)

    batched, single = run(args.batch), run(1)
    return {
        "benchmark": "extract_encode",
        "preset": args.preset,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "precision": "bf16-autocast" if dtype == torch.bfloat16 else "fp32",
        "resolution": cfg.image_size,
        "images": args.images,
        "batch": args.batch,
        "images_per_s_batched": batched,
        "images_per_s_batch1": single,
        "speedup": batched / single,
    }
