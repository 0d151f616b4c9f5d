"""Tokenizer commands: ``convert gigatok``, ``extract``, ``bench tokenizer``, ``bench zero``, and the tokenizer presets
that the base's ``model info|list`` show (tokscale.commands). ``demo`` runs the tokenizer stage
(tokscale.tokenizers.demo) and then AR stages, so tokscale.autoregressive.cli registers it.

Training, submission and export are generic over registered trainers (tokscale.jobs.cli); the tokenizer
registers itself as the trainer ``tokenizer`` in pyproject.toml. Evaluation commands: tokscale.tokenizers.eval_cli.
"""

from __future__ import annotations

import argparse
import json


def list_model_presets() -> list[str]:
    from tokscale.tokenizers.presets import list_presets

    return list_presets()


def describe_model(preset: str, overrides: list[str]) -> dict:
    """``tokscale model info`` of a tokenizer preset: parameter counts by part and the sizes, built on meta."""
    import torch

    from tokscale.tokenizers.model import VQTokenizer, param_counts
    from tokscale.tokenizers.presets import preset_config

    cfg = preset_config(preset, overrides)
    with torch.device("meta"):
        model = VQTokenizer(cfg)
    out = {"preset": preset, "kind": cfg.kind, **param_counts(model)}
    out.update(
        num_tokens=cfg.tokens,
        codebook_size=cfg.quantizer.codebook_size,
        code_dim=cfg.quantizer.code_dim,
        image_size=cfg.image_size,
        encoder={"width": cfg.encoder.width, "depth": cfg.encoder.depth, "heads": cfg.encoder.heads},
        decoder={"width": cfg.decoder.width, "depth": cfg.decoder.depth, "heads": cfg.decoder.heads},
    )
    return out


def add_convert_commands(csub: argparse._SubParsersAction) -> None:
    g = csub.add_parser(
        "gigatok",
        help="a GigaTok tokenizer checkpoint ({'model': ...} or {'ema': ...}) -> a tokscale export folder",
        description="tokscale convert gigatok CHECKPOINT.pt --config GIGATOK_CONFIG.yaml OUT",
    )
    g.add_argument("checkpoint", help="GigaTok's .pt file")
    g.add_argument("out", help="export folder to write")
    g.add_argument(
        "--config", required=True, help="GigaTok's model config YAML (e.g. configs/vq/VQ_SS256.yaml)"
    )
    g.add_argument(
        "--weights", default="model", choices=["model", "ema"], help="which state dict of the file"
    )
    g.add_argument(
        "--cnn-channels", type=int, default=None, help="check the CNN base width (read from weights)"
    )
    g.add_argument("--image-size", type=int, default=None, help="check the image size (read from weights)")
    g.add_argument("--overwrite", action="store_true", help="write into a folder that holds other files")
    g.set_defaults(func=convert_gigatok)


def add_commands(sub: argparse._SubParsersAction) -> None:
    ex = sub.add_parser(
        "extract",
        help="encode image shards into token shards for the AR trainers (resumable, across ranks or on Slurm)",
        description="tokscale extract TOKENIZER --data SHARDS OUT [--aug tencrop|center_flip|center] "
        "[--nproc N | --submit ...]",
    )
    ex.add_argument("tokenizer", help="a tokscale run directory, an export or a converted GigaTok checkpoint")
    ex.add_argument("--data", required=True, help="image shards (pattern, brace range, folder) or 'embedded'")
    ex.add_argument("out", help="folder for the token shards (a rerun resumes, skipping finished shards)")
    ex.add_argument("--aug", default="tencrop", help="tencrop (10 per image, default) | center_flip | center")
    ex.add_argument("--batch-size", type=int, default=64, help="crops per tokenizer forward")
    ex.add_argument(
        "--tokenizer-id", default="", help="name stored in the shards (default: folder + config hash)"
    )
    ex.add_argument("--split", default="train", help="split of the embedded dataset (train | eval)")
    ex.add_argument("--no-verify", action="store_true", help="skip checking an export against its SHA256SUMS")
    ex.add_argument(
        "--overwrite", action="store_true", help="write into an OUT holding other files (they are kept)"
    )
    from tokscale.jobs.cli import add_job_flags

    add_job_flags(ex)
    ex.set_defaults(func=extract)


def add_bench_commands(bench_sub: argparse._SubParsersAction) -> None:
    b = bench_sub.add_parser(
        "tokenizer",
        help="the training step of a preset's recipe: images/s, FLOPs, MFU, peak memory, per-part shares (JSON)",
        description="tokscale bench tokenizer 2d-S-S --batch 32 [--config tokenizer/gigatok-2d-S-S] "
        "[--at-step N] [--compile] [--channels-last] [--with-data 4 8] [key=value ...]",
    )
    b.add_argument("preset")
    b.add_argument(
        "overrides", nargs="*", help="recipe overrides, key=value (loss.gan.kind=dino, train.zero_stage=0)"
    )
    b.add_argument(
        "--config",
        default=None,
        help="the recipe (default: tokenizer/gigatok-PRESET when conf/ has it, else tokenizer/gigatok)",
    )
    b.add_argument(
        "--at-step",
        type=int,
        default=None,
        help="the step (from 1) whose loss terms run: GAN from loss.gan.start_step, auxiliary terms below "
        "loss.aux.until_step (default: the GAN on, the auxiliary terms off)",
    )
    b.add_argument("--batch", type=int, default=8, help="images per step (data.batch_size)")
    b.add_argument("--resolution", type=int, default=None, help="default: the recipe's image size")
    b.add_argument("--steps", type=int, default=5, help="timed iterations after warmup")
    b.add_argument("--warmup", type=int, default=2)
    b.add_argument("--profile-steps", type=int, default=2, help="steps profiled for the per-part shares")
    b.add_argument("--device", default="auto", help="auto | cpu | cuda (the step runs where training would)")
    b.add_argument(
        "--precision", default="recipe", help="recipe | auto | bf16 | fp16 | fp32 (train.precision)"
    )
    b.add_argument("--grad-checkpointing", action="store_true", help="model.grad_checkpointing=true")
    b.add_argument("--compile", action="store_true", help="train.compile=true")
    b.add_argument("--channels-last", action="store_true", help="train.channels_last=true")
    b.add_argument(
        "--with-data",
        type=int,
        nargs="+",
        default=None,
        metavar="WORKERS",
        help="also time the input pipeline (tokscale bench data) at these worker counts",
    )
    b.add_argument("--data-images", type=int, default=256, help="images of the --with-data measurement")
    b.add_argument(
        "--find-batch",
        action="store_true",
        help="CUDA: the largest batch whose step fits in GPU memory (doubling from --batch, then bisection; each "
        "try a fresh process), at the recipe's ZeRO stage (train.zero_stage=N to change it)",
    )
    b.add_argument(
        "--memory-gb",
        type=float,
        default=None,
        help="CUDA: cap this process's GPU memory at this many GB (e.g. 80 on a larger GPU)",
    )
    b.add_argument("--max-batch", type=int, default=4096, help="--find-batch: the largest batch tried")
    b.add_argument("--fit-check", action="store_true", help=argparse.SUPPRESS)  # one --find-batch try
    b.set_defaults(func=bench_tokenizer)

    e = bench_sub.add_parser(
        "extract",
        help="encoding images/s batched vs one image per forward (the references' extraction loop) (JSON)",
        description="tokscale bench extract 2d-tiny --images 64 --batch 32 --resolution 64",
    )
    e.add_argument("preset")
    e.add_argument("--images", type=int, default=64, help="images encoded in each of the two measurements")
    e.add_argument("--batch", type=int, default=32)
    e.add_argument("--resolution", type=int, default=None, help="default: the preset's image size")
    e.add_argument("--device", default="auto", help="auto | cpu | cuda")
    e.add_argument("--precision", default="auto", help="auto | bf16 | fp32")
    e.set_defaults(func=bench_extract)

    z = bench_sub.add_parser(
        "zero",
        help="measured per-rank model-state memory at ZeRO stages 0-3 next to the paper's prediction (JSON)",
        description="tokscale bench zero [--preset 2d-tiny] [--world-size 2] [--stages 0 1 2 3]",
    )
    z.add_argument("--preset", default="2d-tiny")
    z.add_argument("--world-size", type=int, default=2)
    z.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    z.add_argument("--image-size", type=int, default=32, help="input size of the one measured step")
    z.set_defaults(func=bench_zero)

    q = bench_sub.add_parser(
        "quantizer",
        help="ms of the nearest-code search, the quantizer and the quantizer with its entropy loss, fwd+bwd (JSON)",
        description="tokscale bench quantizer [--n 512 65536] [--codebook 16384] [--dim 8] [--device auto] "
        "[--repeats R] [--compare-reference]",
    )
    q.add_argument("--n", type=int, nargs="+", default=[512, 65536], help="rows (image tokens) per batch")
    q.add_argument("--codebook", type=int, default=16384, help="codes K")
    q.add_argument("--dim", type=int, default=8, help="code dimension d")
    q.add_argument(
        "--chunk", type=int, default=16384, help="quantizer.search_chunk (rows per distance slice)"
    )
    q.add_argument("--device", default="auto", help="auto | cpu | cuda")
    q.add_argument("--repeats", type=int, default=5, help="timed calls of every variant (round-robin)")
    q.add_argument("--warmup", type=int, default=1)
    q.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    q.add_argument(
        "--compare-reference", action="store_true", help="also time the replaced implementation (*_reference)"
    )
    q.add_argument(
        "--reference-max-n",
        type=int,
        default=None,
        help="time the reference only up to this N (it holds N x K floats several times over)",
    )
    q.set_defaults(func=bench_quantizer)


def convert_gigatok(args: argparse.Namespace) -> int:
    from tokscale.tokenizers.convert import convert_gigatok as run

    out = run(
        args.checkpoint,
        args.config,
        args.out,
        args.weights,
        args.cnn_channels,
        args.image_size,
        args.overwrite,
    )
    print(json.dumps({"export": str(out)}))
    return 0


def bench_extract(args: argparse.Namespace) -> int:
    from tokscale.tokenizers.bench import bench_extract as run

    print(json.dumps(run(args)))
    return 0


def bench_tokenizer(args: argparse.Namespace) -> int:
    import contextlib
    import sys

    from tokscale.jsonio import strict_dumps
    from tokscale.tokenizers.bench import bench

    # stdout carries the one JSON object: what libraries print on the way (DeepSpeed's op builds) goes to stderr
    with contextlib.redirect_stdout(sys.stderr):
        result = bench(args)
    print(strict_dumps(result))
    return 0


def bench_quantizer(args: argparse.Namespace) -> int:
    from tokscale.jsonio import strict_dumps
    from tokscale.tokenizers.quantizer_bench import bench_quantizer as run

    print(strict_dumps(run(args)))
    return 0


def bench_zero(args: argparse.Namespace) -> int:
    from tokscale.tokenizers.zero_bench import bench_zero as run

    print(json.dumps(run(args.preset, args.world_size, args.stages, args.image_size)))
    return 0


def extract(args: argparse.Namespace) -> int:
    from tokscale.config import load_config
    from tokscale.tokenizers.extract import ExtractConfig, write_config

    cfg = load_config(
        ExtractConfig,
        None,
        [
            f"tokenizer={args.tokenizer}",
            f"data={args.data}",
            f"out={args.out}",
            f"aug={args.aug}",
            f"batch_size={args.batch_size}",
            f"split={args.split}",
            f"verify_weights={not args.no_verify}",
            f"overwrite={args.overwrite}",
        ]
        + ([f"tokenizer_id={args.tokenizer_id}"] if args.tokenizer_id else []),
    )
    from tokscale.jobs.cli import run_job_module

    return run_job_module(
        args, "tokscale.tokenizers.extract", cfg, write_config(cfg), lambda out: print(json.dumps(out))
    )
