"""``tokscale bench tokenizer PRESET``: the tokenizer's training step, timed and taken apart (one JSON object).

    tokscale bench tokenizer 2d-S-S --batch 32                   # recipe tokenizer/gigatok-2d-S-S, GAN on, aux off
    tokscale bench tokenizer 2d-tiny --batch 2 --resolution 64 --at-step 1    # the first steps: auxiliary terms on
    tokscale bench tokenizer 1d-S-S --batch 32 --compile --channels-last --with-data 4 8
    tokscale bench tokenizer 2d-S-B --config my/recipe.yaml loss.gan.kind=dino    # any recipe, any override

It runs what training runs: the recipe's config (``--config``; by default ``tokenizer/gigatok-PRESET`` when
conf/ has it, else the shared ``tokenizer/gigatok`` with the preset), the trainer's own pieces
(``TokenizerTask.build_model`` / ``build_side``, ``train_step``: the generator step with every loss term active
at ``--at-step``, the discriminator step, the optimizer steps), inside a real DeepSpeed engine of world size 1
built as ``tokscale.loop`` builds it, under the recipe's precision and ZeRO stage. Frozen networks (LPIPS's VGG16,
the DINOv2 teacher, the DINO discriminator's backbone) whose weight files are missing get random weights of
their real architecture, written to a temporary folder and loaded through the real loading code: speed does
not depend on the values.

Reported: images/s and seconds per step (after ``--warmup`` steps, over ``--steps``); model FLOPs per image
(``torch.utils.flop_counter`` over one whole step, forward and backward of every network, the frozen teacher
and LPIPS included, activation recomputation excluded); achieved TFLOP/s; MFU against the GPU's dense bf16
peak (:data:`PEAK_BF16_TFLOPS`; null with a reason on a CPU or an unknown GPU); peak memory; the share of the
step in each part (encoder, quantizer, decoder, teacher, lpips, discriminator, optimizer; from
``torch.profiler``, each part's forward range plus the backward nodes its forward ops created); the attention
kernels each part ran; on a GPU the host-device synchronisations in one step. ``--with-data W ...`` adds the
input pipeline's images/s per rank (tokscale.data.bench, the same resolution and batch) at each worker count.
``frozen_bf16`` says whether the teacher and LPIPS's trunk ran under bf16 autocast (``loss.frozen_precision``).

``--find-batch`` (CUDA) reports instead the largest batch whose step fits in GPU memory at the recipe's ZeRO
stage: batches double from ``--batch`` until one fails with an out-of-memory error, then bisection; each try is
a fresh process (one warmup step and one step: the optimizer states exist by then). ``--memory-gb 80`` caps the
process at 80 GB, so that a larger GPU answers for an 80 GB one::

    tokscale bench tokenizer 2d-S-S --find-batch --memory-gb 80                     # the recipe's ZeRO stage
    tokscale bench tokenizer 1d-XL-XXL --find-batch --memory-gb 80 train.zero_stage=3 --grad-checkpointing
"""

from __future__ import annotations

import argparse
import contextlib
import re
import resource
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch.autograd import DeviceType

from tokscale.devices import device_name, half_dtype, resolve_device, synchronize
from tokscale.tokenizers.model import VQTokenizer, param_counts
from tokscale.tokenizers.presets import preset_config

PARTS = ("encoder", "quantizer", "decoder", "teacher", "lpips", "discriminator", "optimizer")

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from NVIDIA's product datasheets (H100: "H100 Tensor Core
# GPU" datasheet, SXM 989.4 / PCIe 756.5 / NVL 835.5; H200: "H200 Tensor Core GPU" datasheet, SXM 989.4 /
# NVL 835.5; GH200 the H100 SXM figure; B200: HGX B200 2.25 PFLOP/s; A100: "A100 Tensor Core GPU" datasheet, 312;
# L40S 362.05 and L40 181.05: their datasheets; L4 121; A10 125). The datasheets print twice these with
# sparsity. First match of the device name wins; a MIG slice has no whole-GPU peak.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    (r"H100.*NVL", 835.5),
    (r"H100.*PCIe", 756.5),
    (r"H100", 989.4),
    (r"H200.*NVL", 835.5),
    (r"H200", 989.4),  # GH200 included
    (r"B200", 2250.0),
    (r"A100", 312.0),
    (r"L40S", 362.05),
    (r"L40\b", 181.05),
    (r"\bL4\b", 121.0),
    (r"\bA10\b", 125.0),
)


def peak_bf16_tflops(device_name: str) -> tuple[float | None, str]:
    """(dense bf16 peak in TFLOP/s, what it is) for a CUDA device name; (None, why) when unknown."""
    if "MIG" in device_name:
        return None, f"{device_name} is a MIG slice: no whole-GPU peak applies"
    for pattern, peak in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_name):
            return peak, f"dense bf16 peak of {pattern.replace(chr(92) + 'b', '')} (NVIDIA datasheet)"
    return None, f"no dense bf16 peak known for {device_name!r} (tokscale.tokenizers.bench.PEAK_BF16_TFLOPS)"


def default_recipe(preset: str) -> str:
    """The preset's own GigaTok recipe when conf/ has one, else the shared GigaTok recipe."""
    from tokscale.config import ConfigError, resolve_config_path

    try:
        resolve_config_path(f"tokenizer/gigatok-{preset}")
        return f"tokenizer/gigatok-{preset}"
    except ConfigError:
        return "tokenizer/gigatok"


def _overrides(args: argparse.Namespace, recipe_is_default: bool) -> list[str]:
    out = [
        f"model.preset={args.preset}",
        f"data.batch_size={args.batch}",
        # placeholders: the bench feeds its own images and never evaluates
        "data.train_shards=unused",
        "data.eval_shards=unused",
        "eval.every_steps=0",
    ]
    if args.resolution:
        out += [f"model.image_size={args.resolution}", f"data.resolution={args.resolution}"]
    if args.precision != "recipe":
        out.append(f"train.precision={args.precision}")
    for flag, key in (
        ("grad_checkpointing", "model.grad_checkpointing"),
        ("compile", "train.compile"),
        ("channels_last", "train.channels_last"),
    ):
        if getattr(args, flag):
            out.append(f"{key}=true")
    if recipe_is_default:
        # the shared recipe's teacher is 768 wide; a preset without its own recipe (the tiny ones) follows it
        out.append("model.semantic_dim=${loss.semantic.teacher_dim}")
    return out + list(args.overrides)


def stand_in_weights(cfg, folder: Path) -> tuple[list[str], dict[str, str]]:
    """Overrides pointing each frozen network whose weights file is missing at random weights of its architecture,
    written into ``folder``; and for each frozen network whether it runs on the ``file`` or ``random`` weights."""
    overrides, source = [], {}
    lc = cfg.loss

    def have(path: str) -> bool:
        return bool(path) and Path(path).expanduser().is_file()

    if lc.perceptual.weight > 0:
        source["lpips"] = "file" if have(lc.perceptual.vgg_weights) else "random"
        if source["lpips"] == "random":
            from torchvision.models.vgg import cfgs, make_layers

            path = folder / "vgg16.pth"  # torchvision's vgg16().features, as its state dict names it
            torch.save({f"features.{k}": v for k, v in make_layers(cfgs["D"]).state_dict().items()}, path)
            overrides.append(f"loss.perceptual.vgg_weights={path}")
    if lc.semantic.weight > 0:
        source["teacher"] = "file" if have(lc.semantic.teacher_weights) else "random"
        if source["teacher"] == "random":
            import timm

            sc = lc.semantic
            path = folder / "teacher.pth"
            model = timm.create_model(sc.teacher_arch, img_size=sc.teacher_size, num_classes=0)
            torch.save(model.state_dict(), path)
            overrides.append(f"loss.semantic.teacher_weights={path}")
    if lc.gan.weight > 0 and lc.gan.kind == "dino":
        source["dino_discriminator"] = "file" if have(lc.gan.dino_weights) else "random"
        if source["dino_discriminator"] == "random":
            from tokscale.tokenizers.dino_disc import DinoViTSmall

            path = folder / "dino_vits16.pth"
            torch.save(DinoViTSmall().state_dict(), path)
            overrides.append(f"loss.gan.dino_weights={path}")
    return overrides, source


def default_at_step(cfg) -> int:
    """The step (as logged, from 1) of most of a run: the GAN on when the recipe has one, the auxiliary terms off."""
    gan = cfg.loss.gan
    return max(1, gan.start_step if gan.weight > 0 else 1, cfg.loss.aux.until_step)


def build_engine(cfg, dist):
    """The trainer's task and its DeepSpeed engine, built as tokscale.loop.train builds them (world size 1)."""
    import logging

    import deepspeed

    from tokscale.loop import _micro_batch_size, deepspeed_config
    from tokscale.tokenizers.train import TokenizerTask
    from tokscale.trainer import adamw, lr_lambda, use_bf16

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    torch.manual_seed(cfg.train.seed)
    task = TokenizerTask(cfg, dist)
    model = task.build_model()
    task.build_side()
    optimizer = adamw(
        task.param_groups(model),
        dist.device,
        lr=cfg.optim.lr,
        betas=tuple(cfg.optim.betas),
        weight_decay=cfg.optim.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.optim, cfg.train.max_steps))
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(cfg, _micro_batch_size(cfg), use_bf16(cfg.train.precision)),
    )
    engine.train()
    return task, engine


def _sdpa_flops(query, key, value, *args, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query, key, value)


def _sdpa_backward_flops(grad_out, query, key, value, *args, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out, query, key, value)


def flop_counter():
    """torch's FlopCounterMode, taught the CPU flash-attention kernels it does not count (its CUDA kernels it does)."""
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    extra = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        extra[aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_flops
        extra[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _sdpa_backward_flops
    return FlopCounterMode(display=False, custom_mapping=extra)


@contextlib.contextmanager
def no_recompute(*modules: torch.nn.Module):
    """Activation checkpointing off while FLOPs are counted: model FLOPs exclude the recomputed forward."""
    saved = [
        (m, m.grad_checkpointing)
        for mod in modules
        for m in mod.modules()
        if hasattr(m, "grad_checkpointing")
    ]
    try:
        for m, _ in saved:
            m.grad_checkpointing = False
        yield
    finally:
        for m, flag in saved:
            m.grad_checkpointing = flag


def count_flops(step, *modules: torch.nn.Module) -> int:
    """FLOPs of one call of ``step`` (matmuls, convolutions, attention; forward and backward), run eagerly."""
    with torch.compiler.set_stance("force_eager"), no_recompute(*modules), flop_counter() as counter:
        step()
    return int(counter.get_total_flops())


def _label(event) -> str | None:
    """The part whose profiler range encloses ``event`` (itself included), or None."""
    while event is not None:
        if event.name in PARTS:
            return event.name
        event = event.cpu_parent
    return None


def _device_time(event) -> float:
    return float(event.device_time_total)


BACKWARD = "autograd::engine::evaluate_function: "
# the kernel scaled_dot_product_attention chose: flash, efficient, cudnn, flash_for_cpu, or attention_math
ATTENTION = re.compile(r"^aten::_scaled_dot_product_\w+$")


def part_times(events, device: bool) -> tuple[dict[str, float], dict[str, dict[str, int]]]:
    """Microseconds per part (CPU time, or with ``device`` kernel time) and the attention ops per part.

    A part's time is its forward range plus every backward node created by a forward op inside that range, found
    by the autograd sequence number the profiler records on both (per forward thread). Ranges never nest; an op
    in none of them (loss arithmetic, AccumulateGrad, DeepSpeed's hooks) counts as "other"."""
    part_of_node: dict[tuple[int, int], str] = {}
    times = dict.fromkeys(PARTS, 0.0)
    attention: dict[str, dict[str, int]] = {}
    # CPU-side events only: the GPU timeline repeats each range (as an annotation) next to the kernels
    events = [e for e in events if e.device_type == DeviceType.CPU]
    for e in events:
        if e.name.startswith(BACKWARD):
            continue
        label = _label(e)
        if label is None:
            continue
        if e.name == label and _label(e.cpu_parent) is None:
            times[label] += _device_time(e) if device else e.cpu_time_total
        if e.sequence_nr >= 0:
            part_of_node[(e.thread, e.sequence_nr)] = label
        if ATTENTION.match(e.name) and not e.name.endswith("_backward"):
            ops = attention.setdefault(label, {})
            ops[e.name] = ops.get(e.name, 0) + 1
    for e in events:
        if e.name.startswith(BACKWARD) and e.sequence_nr >= 0 and _label(e.cpu_parent) is None:
            label = part_of_node.get((e.fwd_thread, e.sequence_nr))
            if label is not None:
                times[label] += _device_time(e) if device else e.cpu_time_total
    return times, attention


def _shares(times: dict[str, float], total_us: float) -> dict[str, float]:
    shares = {k: round(v / total_us, 4) for k, v in times.items()}
    shares["other"] = round(max(0.0, 1.0 - sum(v / total_us for v in times.values())), 4)
    return shares


def profile_step(step, steps: int, device: torch.device, sync) -> dict:
    """Per-part shares of the step's wall time over ``steps`` eager steps under torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.compiler.set_stance("force_eager"), profile(activities=activities) as prof:
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        wall_us = (time.perf_counter() - t0) * 1e6
    events = prof.events()
    cpu, attention = part_times(events, device=False)
    out = {
        "profiled_steps": steps,
        "attention_ops": {k: {n: c // steps for n, c in v.items()} for k, v in attention.items()},
    }
    if device.type == "cuda":
        gpu, _ = part_times(events, device=True)
        # every kernel once, through the CPU op that launched it
        busy = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CPU)
        out.update(
            shares=_shares(gpu, wall_us),
            shares_basis="GPU kernel time of each part / wall time of the step ('other': the rest, idle included)",
            shares_cpu=_shares(cpu, wall_us),
            gpu_busy=round(busy / wall_us, 4),
        )
    else:
        out.update(
            shares=_shares(cpu, wall_us),
            shares_basis="CPU time of each part / wall time of the step ('other': loss arithmetic, framework)",
        )
    return out


def host_syncs(step) -> dict:
    """CUDA only: the synchronising calls one step makes (torch's sync debug mode), by Python source line."""
    sites: dict[str, int] = {}
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for w in caught:
        if "synchronizing" in str(w.message):
            site = f"{w.filename}:{w.lineno}"
            sites[site] = sites.get(site, 0) + 1
    return {"host_syncs_per_step": sum(sites.values()), "host_sync_sites": sites}


def data_side_by_side(
    workers: list[int], num_images: int, resolution: int, batch: int, step_rate: float
) -> dict:
    """The input pipeline's images/s per rank at each worker count, next to what the step consumes."""
    from tokscale.data.bench import run

    res = run(num_images=num_images, resolution=resolution, batch_size=batch, workers=tuple(workers))
    rates = {w: res[f"shards_{w}_worker{'s' if w > 1 else ''}_img_per_s"] for w in workers}
    enough = [w for w in sorted(rates) if rates[w] > step_rate]
    return {
        "loader_img_per_s_per_rank": {str(w): r for w, r in rates.items()},
        "step_img_per_s_per_rank": round(step_rate, 3),
        "workers_that_keep_up": enough[0] if enough else None,
        "pipeline": res["pipeline"],
        "source_images": res["source_images"],
    }


def _check_device(requested: str) -> None:
    cuda = torch.cuda.is_available()
    if requested == "cuda" and not cuda:
        raise ValueError("--device cuda: no CUDA device is visible")
    if requested == "cpu" and cuda:
        raise ValueError(
            "--device cpu: a CUDA device is visible and the step runs where training runs; hide it with "
            "CUDA_VISIBLE_DEVICES= to bench on the CPU"
        )
    if requested not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {requested!r}")


def largest_batch(fits, start: int, limit: int) -> tuple[int, dict[int, bool]]:
    """The largest batch b <= ``limit`` for which ``fits(b)``, taking a batch that fits to mean every smaller one
    fits: doubling from ``start`` until a batch fails (or ``limit``), then bisection between the largest batch
    that fitted and the smallest that failed. Returns it (0 when not even 1 fits) and every batch tried."""
    tried: dict[int, bool] = {}

    def check(b: int) -> bool:
        tried[b] = fits(b)
        return tried[b]

    lo, hi, b = 0, limit + 1, min(start, limit)
    while b < hi:
        if check(b):
            lo, b = b, min(2 * b, limit) if b < limit else hi
        else:
            hi = b
            break
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if check(mid) else (lo, mid)
    return lo, tried


OOM_MARKERS = ("OutOfMemoryError", "CUDA out of memory", "CUBLAS_STATUS_ALLOC_FAILED")


def find_batch(args: argparse.Namespace) -> dict:
    """``--find-batch``: the largest batch whose training step runs on this GPU, each try in its own process (an
    out-of-memory error can leave the engine and the allocator in any state)."""
    import json
    import subprocess
    import sys

    if not torch.cuda.is_available():
        raise ValueError(
            "--find-batch measures GPU memory and needs a CUDA device; none is visible (on a CPU the batch is "
            "bounded by host memory, not by this search)"
        )
    if args.batch < 1 or args.max_batch < args.batch:
        raise ValueError(
            f"--find-batch starts at --batch {args.batch} (>= 1) and stops at --max-batch {args.max_batch}"
        )
    base = [sys.executable, "-m", "tokscale.cli", "bench", "tokenizer", args.preset, *args.overrides]
    for flag in ("config", "at_step", "resolution", "memory_gb"):
        value = getattr(args, flag)
        base += [f"--{flag.replace('_', '-')}", str(value)] if value is not None else []
    base += [
        "--precision",
        args.precision,
        "--device",
        "cuda",
        "--fit-check",
        "--warmup",
        "1",
        "--steps",
        "1",
    ]
    base += [f for f, on in (("--grad-checkpointing", args.grad_checkpointing), ("--compile", args.compile),
                             ("--channels-last", args.channels_last)) if on]  # fmt: skip
    peaks: dict[int, float] = {}
    first: dict = {}

    def fits(batch: int) -> bool:
        res = subprocess.run([*base, "--batch", str(batch)], capture_output=True, text=True)
        if res.returncode == 0:
            out = json.loads(res.stdout.strip().splitlines()[-1])
            peaks[batch] = out["peak_memory_mb"]
            if not first:  # the settings every try shares, from the first that ran
                first.update(out)
            print(f"batch {batch}: fits, peak {out['peak_memory_mb']} MB", file=sys.stderr)
            return True
        if any(m in res.stderr for m in OOM_MARKERS):
            print(f"batch {batch}: out of memory", file=sys.stderr)
            return False
        tail = "\n".join(res.stderr.strip().splitlines()[-5:])
        raise RuntimeError(
            f"bench tokenizer --batch {batch} failed, not for memory (exit {res.returncode}):\n{tail}"
        )

    best, tried = largest_batch(fits, args.batch, args.max_batch)
    return {
        "benchmark": "tokenizer_max_batch",
        "preset": args.preset,
        "config": first.get("config"),
        "device": torch.cuda.get_device_name(0),
        "memory_gb": args.memory_gb,
        "engine": first.get("engine"),
        "precision": first.get("precision"),
        "resolution": first.get("resolution"),
        "grad_checkpointing": args.grad_checkpointing,
        "max_batch": best,
        "peak_memory_mb": peaks.get(best),
        "at_max_batch_limit": best == args.max_batch,
        "tried": {
            str(b): (f"fits, peak {peaks[b]} MB" if ok else "out of memory")
            for b, ok in sorted(tried.items())
        },
    }


def bench(args: argparse.Namespace) -> dict:
    import os

    if args.find_batch:
        return find_batch(args)
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    from tokscale.distributed import init_distributed
    from tokscale.tokenizers.train import load_train_config
    from tokscale.trainer import check_precision

    _check_device(args.device)
    recipe = args.config or default_recipe(args.preset)
    overrides = _overrides(args, recipe_is_default=not args.config and recipe == "tokenizer/gigatok")
    cfg = load_train_config(recipe, overrides)
    check_precision(cfg.train.precision)
    at_step = default_at_step(cfg) if args.at_step is None else args.at_step
    if at_step < 1:
        raise ValueError(f"--at-step counts steps as logged, from 1; got {at_step}")
    for key in ("batch", "steps", "profile_steps"):
        if getattr(args, key) < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    with tempfile.TemporaryDirectory(prefix="tokscale-bench-") as tmp:
        extra, frozen = stand_in_weights(cfg, Path(tmp))
        if extra:
            cfg = load_train_config(recipe, overrides + extra)
        dist = init_distributed()
        if args.memory_gb is not None:
            if dist.device.type != "cuda":
                raise ValueError("--memory-gb caps GPU memory and needs a CUDA device; none is visible")
            total = torch.cuda.get_device_properties(dist.device).total_memory
            if args.memory_gb * 1e9 > total:
                raise ValueError(f"--memory-gb {args.memory_gb}: the GPU has only {total / 1e9:.1f} GB")
            torch.cuda.set_per_process_memory_fraction(args.memory_gb * 1e9 / total, dist.device)
        task, engine = build_engine(cfg, dist)
    device = dist.device  # cuda:N or cpu: where training would run

    res = cfg.model.image_size
    images = torch.rand(args.batch, 3, res, res) * 2 - 1
    labels = torch.zeros(args.batch, dtype=torch.long)
    if device.type == "cuda":
        images, labels = images.pin_memory(), labels.pin_memory()  # as the loader hands them over

    def sync():
        synchronize(device)

    losses = {}

    def step():
        losses.update(task.train_step(engine, (images, labels), at_step - 1))

    for _ in range(args.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    dt = (time.perf_counter() - t0) / args.steps
    peak_memory = (
        {"peak_memory_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1)}
        if device.type == "cuda"
        # Linux reports ru_maxrss in KiB: the whole process's peak, frozen networks and optimizer states included
        else {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    )
    precision = (
        "bf16" if engine.bfloat16_enabled() else "fp16-autocast" if cfg.train.precision == "fp16" else "fp32"
    )
    engine_name = (
        f"DeepSpeed {__import__('deepspeed').__version__}, world size 1, ZeRO stage {cfg.train.zero_stage}"
    )
    if args.fit_check:  # one --find-batch try: the step ran; its memory is all that is asked
        return {"batch": args.batch, "config": recipe, "resolution": res, "precision": precision,
                "engine": engine_name, **peak_memory}  # fmt: skip
    nets = [m for m in (engine.module, task.disc, task.lpips, task.teacher) if m is not None]
    flops = count_flops(step, *nets)
    images_per_s = args.batch / dt
    tflops = flops / dt / 1e12
    gpu_name = device_name(device)
    if device.type == "cuda":
        peak, peak_note = peak_bf16_tflops(gpu_name)
    else:
        peak, peak_note = None, "no MFU on a CPU (MFU is against a GPU's dense bf16 tensor-core peak)"
    trained = sum(p.numel() for p in engine.module.parameters())
    if task.disc_opt is not None:
        trained += sum(p.numel() for g in task.disc_opt.param_groups for p in g["params"])
    result = {
        "benchmark": "tokenizer_train_step",
        "preset": args.preset,
        "config": recipe,
        "at_step": at_step,
        "loss_terms": sorted(k for k in losses if k.startswith("loss_") and k != "loss_total"),
        "device": gpu_name,
        "threads": torch.get_num_threads(),
        "engine": engine_name,
        "precision": precision,
        "batch": args.batch,
        "resolution": res,
        "num_tokens": cfg.model.tokens,
        "grad_checkpointing": cfg.model.grad_checkpointing,
        "compile": cfg.train.compile,
        "channels_last": cfg.train.channels_last,
        "fused_adamw": device.type == "cuda",
        "frozen_bf16": task.frozen_bf16,
        "frozen_weights": frozen,
        "warmup": args.warmup,
        "steps": args.steps,
        "images_per_s": round(images_per_s, 4),
        "s_per_step": round(dt, 4),
        "params": param_counts(engine.module)["params"],
        "params_trained": trained,
        "flops_per_image": flops // args.batch,
        "flops_per_step": flops,
        "tflops_per_s": round(tflops, 4),
        "peak_bf16_tflops": peak,
        "mfu": round(tflops / peak, 4) if peak else None,
        "mfu_note": peak_note,
        **peak_memory,
    }
    result.update(profile_step(step, args.profile_steps, device, sync))
    if args.compile:
        result["shares_note"] = (
            "shares and FLOPs are of the same step run eagerly (compiled code has no ranges)"
        )
    if device.type == "cuda":
        result.update(host_syncs(step))
    else:
        result.update(
            host_syncs_per_step=None, host_sync_sites="counted on CUDA only (torch.cuda sync debug mode)"
        )
    if args.with_data:
        result["data"] = data_side_by_side(args.with_data, args.data_images, res, args.batch, images_per_s)
    return result


def bench_extract(args: argparse.Namespace) -> dict:
    """Encoding images/s of a preset (random weights) batched, side by side with the references' loop that
    encodes one image per forward, on the same images."""
    overrides = [f"image_size={args.resolution}"] if args.resolution else []
    cfg = preset_config(args.preset, overrides)
    device = resolve_device(args.device)
    dtype = half_dtype(args.precision, device)
    torch.manual_seed(0)
    model = VQTokenizer(cfg, with_projector=False).to(device).eval()
    images = torch.rand(args.images, 3, cfg.image_size, cfg.image_size, device=device) * 2 - 1

    def run(batch: int) -> float:
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            model.encode(images[:batch])  # warm-up
            synchronize(device)
            t0 = time.perf_counter()
            for part in images.split(batch):
                model.encode(part)
            synchronize(device)
        return args.images / (time.perf_counter() - t0)

    batched, single = run(args.batch), run(1)
    return {
        "benchmark": "extract_encode",
        "preset": args.preset,
        "device": device_name(device),
        "threads": torch.get_num_threads(),
        "precision": "bf16-autocast" if dtype == torch.bfloat16 else "fp32",
        "resolution": cfg.image_size,
        "images": args.images,
        "batch": args.batch,
        "images_per_s_batched": batched,
        "images_per_s_batch1": single,
        "speedup": batched / single,
    }
