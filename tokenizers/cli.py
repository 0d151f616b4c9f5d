"""Tokenizer commands: ``model info``, ``train tokenizer``, ``demo``, ``bench tokenizer``, ``export``."""

from __future__ import annotations

import argparse
import json


def add_commands(sub: argparse._SubParsersAction) -> None:
    model = sub.add_parser("model", help="inspect tokenizer presets")
    msub = model.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    info = msub.add_parser(
        "info",
        help="print a preset's parameter counts as JSON (built on the meta device: no weights allocated)",
        description="tokscale model info 1d-XL-XXL",
    )
    info.add_argument("preset", help="preset name; `tokscale model list` shows them")
    info.add_argument("overrides", nargs="*", help="model-config overrides, e.g. decoder.depth=12")
    info.set_defaults(func=model_info)
    lst = msub.add_parser("list", help="list preset names")
    lst.set_defaults(func=model_list)

    train = sub.add_parser("train", help="train a model")
    tsub = train.add_subparsers(dest="train_command", metavar="MODEL", required=True)
    tok = tsub.add_parser(
        "tokenizer",
        help="train a tokenizer through DeepSpeed; rerunning resumes from the newest checkpoint",
        description="tokscale train tokenizer tokenizer/demo train.max_steps=300 [--nproc 2]",
    )
    tok.add_argument("config", help="YAML path or name under conf/ (e.g. tokenizer/demo)")
    tok.add_argument(
        "overrides", nargs="*", help="dotlist overrides, e.g. model.preset=1d-S-S train.zero_stage=2"
    )
    tok.add_argument(
        "--nproc", type=int, default=1, help="local processes (one per GPU, or CPU ranks over gloo)"
    )
    tok.set_defaults(func=train_tokenizer)

    demo = sub.add_parser(
        "demo",
        help="train 2d-tiny on the embedded dataset and report PSNR/SSIM/usage before and after",
        description="tokscale demo [--run-dir runs/demo] [OVERRIDES...]",
    )
    demo.add_argument("overrides", nargs="*", help="dotlist overrides of conf/tokenizer/demo.yaml")
    demo.add_argument("--run-dir", default="runs/demo", help="where the run, grid PNG and metrics JSON go")
    demo.set_defaults(func=run_demo)

    export = sub.add_parser(
        "export",
        help="consolidate a run's newest checkpoint into safetensors + config + model card",
        description="tokscale export RUN_DIR OUT",
    )
    export.add_argument("run_dir")
    export.add_argument("out")
    export.set_defaults(func=export_run)

    publish = sub.add_parser(
        "publish",
        help="upload an export folder to the Hugging Face Hub (needs credentials)",
        description="tokscale publish OUT REPO_ID [--private]",
    )
    publish.add_argument("folder")
    publish.add_argument("repo_id")
    publish.add_argument("--private", action="store_true")
    publish.set_defaults(func=publish_export)


def add_bench_commands(bench_sub: argparse._SubParsersAction) -> None:
    b = bench_sub.add_parser(
        "tokenizer",
        help="forward+backward images/s, peak memory and parameters of a preset (JSON)",
        description="tokscale bench tokenizer 2d-tiny --batch 8 --resolution 256",
    )
    b.add_argument("preset")
    b.add_argument("--batch", type=int, default=8)
    b.add_argument("--resolution", type=int, default=None, help="default: the preset's image size")
    b.add_argument("--steps", type=int, default=5, help="timed iterations after warmup")
    b.add_argument("--warmup", type=int, default=2)
    b.add_argument("--device", default="auto", help="auto | cpu | cuda")
    b.add_argument("--precision", default="auto", help="auto | bf16 | fp32")
    b.add_argument("--grad-checkpointing", action="store_true")
    b.set_defaults(func=bench_tokenizer)


def _model_config(preset: str, overrides: list[str]):
    from tokscale.config import load_config
    from tokscale.tokenizers.model import TokenizerConfig
    from tokscale.tokenizers.presets import get_preset

    return load_config(
        TokenizerConfig, None, [f"preset={preset}", *overrides], presets=get_preset, preset_key="preset"
    )


def model_info(args: argparse.Namespace) -> int:
    import torch

    from tokscale.tokenizers.model import VQTokenizer, param_counts

    cfg = _model_config(args.preset, args.overrides)
    with torch.device("meta"):
        model = VQTokenizer(cfg)
    out = {"preset": args.preset, "kind": cfg.kind, **param_counts(model)}
    out.update(
        num_tokens=cfg.tokens,
        codebook_size=cfg.quantizer.codebook_size,
        code_dim=cfg.quantizer.code_dim,
        image_size=cfg.image_size,
        encoder={"width": cfg.encoder.width, "depth": cfg.encoder.depth, "heads": cfg.encoder.heads},
        decoder={"width": cfg.decoder.width, "depth": cfg.decoder.depth, "heads": cfg.decoder.heads},
    )
    print(json.dumps(out))
    return 0


def model_list(args: argparse.Namespace) -> int:
    from tokscale.tokenizers.presets import list_presets

    print("\n".join(list_presets()))
    return 0


def train_tokenizer(args: argparse.Namespace) -> int:
    from tokscale.tokenizers.train import load_train_config

    cfg = load_train_config(args.config, args.overrides)  # validate before any process starts
    if args.nproc > 1:
        from tokscale.jobs.local import launch_local

        return launch_local(args.nproc, ["-m", "tokscale.tokenizers.train", args.config, *args.overrides])
    from tokscale.tokenizers.train import main

    print(json.dumps(main(cfg)))
    return 0  # tokscale.cli.main ends the process through jobs.shutdown.finish


def run_demo(args: argparse.Namespace) -> int:
    from tokscale.tokenizers.demo import demo

    print(json.dumps(demo(args.run_dir, args.overrides), indent=2))
    return 0


def export_run(args: argparse.Namespace) -> int:
    from tokscale.tokenizers.export import export

    out = export(args.run_dir, args.out)
    print(json.dumps({"exported": str(out)}))
    return 0


def publish_export(args: argparse.Namespace) -> int:
    from tokscale.tokenizers.export import publish

    print(json.dumps({"published": publish(args.folder, args.repo_id, args.private)}))
    return 0


def bench_tokenizer(args: argparse.Namespace) -> int:
    from tokscale.tokenizers.bench import bench

    print(json.dumps(bench(args)))
    return 0
