"""AR-model commands: ``convert llamagen``, ``convert gigatok-gpt``, ``sample``, ``demo`` (the tokenizer stage, then
the AR stages: tokscale.autoregressive.demo), and the GPT presets that the base's ``model info|list`` show
(tokscale.commands).

    tokscale model info gpt-XXL
    tokscale model info gpt-B-1d num_tokens=576
    tokscale convert llamagen c2i_L_384.pt exports/llamagen-gpt-L-384 --num-tokens 576
    tokscale convert gigatok-gpt GigaTok_GPT_XXL.pt exports/gigatok-gpt-XXL --weights model
    tokscale demo [--run-dir runs/demo] [--skip-ar | --ar-only] [--inception-weights PTH] [OVERRIDES...]
"""

from __future__ import annotations

import argparse
import json


def list_model_presets() -> list[str]:
    from tokscale.autoregressive.detailflow import list_presets as detailflow_presets
    from tokscale.autoregressive.presets import VAR_PRESETS, list_presets

    return list_presets() + detailflow_presets() + list(VAR_PRESETS)


def describe_model(preset: str, overrides: list[str]) -> dict:
    """``tokscale model info`` of a GPT, DetailFlow or VAR preset: parameter counts and sizes, built on the meta
    device."""
    if preset.startswith("var-"):
        return describe_var(preset, overrides)
    if preset.startswith("detailflow-"):
        return describe_detailflow(preset, overrides)

    from tokscale.autoregressive.gpt import GPT, param_counts
    from tokscale.autoregressive.presets import preset_config

    cfg = preset_config(preset, overrides)
    keys = ("width", "depth", "heads", "head_dim", "ffn_hidden", "vocab_size", "num_tokens", "num_classes")
    return _describe(preset, "gpt", GPT, param_counts, cfg, (*keys, "position", "qk_norm"))


def describe_detailflow(preset: str, overrides: list[str]) -> dict:
    from tokscale.autoregressive.detailflow import DetailFlowGPT, detailflow_config, num_forward_passes
    from tokscale.autoregressive.gpt import param_counts

    cfg = detailflow_config(preset, overrides)
    keys = ("width", "depth", "heads", "head_dim", "ffn_hidden", "vocab_size", "num_tokens", "num_classes")
    out = _describe(preset, "detailflow", DetailFlowGPT, param_counts, cfg, (*keys, "group_size", "rope_offset"))
    out["sampling_forward_passes"] = num_forward_passes(cfg.num_tokens, cfg.group_size)
    return out


def describe_var(preset: str, overrides: list[str]) -> dict:
    from tokscale.autoregressive.presets import var_preset_config
    from tokscale.autoregressive.var import VAR, var_param_counts

    cfg = var_preset_config(preset, overrides)
    keys = ("width", "depth", "heads", "head_dim", "ffn_hidden", "vocab_size", "code_dim", "scales")
    out = _describe(preset, "var", VAR, var_param_counts, cfg, (*keys, "num_tokens", "num_classes", "drop_path"))
    out["scales"] = list(cfg.scales)
    return out


def _describe(preset: str, kind: str, model_cls, counts, cfg, keys) -> dict:
    """``model info``'s JSON: the model built on the meta device, its parameter counts and config fields."""
    import torch

    with torch.device("meta"):
        model = model_cls(cfg)
    return {"preset": preset, "kind": kind, **counts(model), **{k: getattr(cfg, k) for k in keys}}


def add_commands(sub: argparse._SubParsersAction) -> None:
    from tokscale.autoregressive.sample_cli import add_sample_command

    add_sample_command(sub)
    add_demo_command(sub)


def add_demo_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="the embedded demo: train 2d-tiny (PSNR/SSIM/usage before and after), extract its codes, train a "
        "tiny GPT, sample a grid per class, gFID and AR probe, all into RUN/demo_metrics.json",
        description="tokscale demo [--run-dir runs/demo] [--skip-ar | --ar-only] [--inception-weights PTH] "
        "[OVERRIDES...]",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        help="dotlist overrides: KEY=VALUE of conf/tokenizer/demo.yaml, c2i.KEY=VALUE of conf/c2i/demo.yaml, "
        "ar.KEY=VALUE of the AR stages (tokscale.autoregressive.demo.ArDemoConfig, e.g. ar.gen_samples=200)",
    )
    p.add_argument("--run-dir", default="runs/demo", help="where the runs, PNGs and demo_metrics.json go")
    only = p.add_mutually_exclusive_group()
    only.add_argument("--skip-ar", action="store_true", help="the tokenizer stage alone")
    only.add_argument(
        "--ar-only", action="store_true", help="the AR stages alone, on the tokenizer already in --run-dir"
    )
    p.add_argument(
        "--inception-weights",
        default="",
        help="torch-fidelity's Inception weights for gFID (default: $TOKSCALE_INCEPTION_WEIGHTS, else randomly "
        "initialised weights, which demo_metrics.json then names: a number for comparing demo runs only)",
    )
    p.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from tokscale.autoregressive.demo import run

    report = run(
        args.run_dir,
        args.overrides,
        skip_ar=args.skip_ar,
        ar_only=args.ar_only,
        inception_weights=args.inception_weights,
    )
    print(json.dumps(report, indent=2))
    return 0


def add_eval_commands(esub: argparse._SubParsersAction) -> None:
    """``tokscale eval gen`` (gFID, IS, precision/recall of sampled images) and ``eval ar-probe``."""
    # one add_command(esub) line per module: gen_cli (eval gen), ar_probe_cli (eval ar-probe)
    from tokscale.autoregressive.gen_cli import add_command as add_gen

    add_gen(esub)
    from tokscale.autoregressive.ar_probe_cli import add_command as add_ar_probe

    add_ar_probe(esub)


def add_bench_commands(bench_sub: argparse._SubParsersAction) -> None:
    b = bench_sub.add_parser(
        "sample",
        help="AR generation tokens/s and images/s with and without the KV cache, CFG on (JSON)",
        description="tokscale bench sample gpt-tiny --batch 8 --num-tokens 64 [--compile]",
    )
    b.add_argument("preset")
    b.add_argument("--batch", type=int, default=8, help="images generated together (x2 rows under CFG)")
    b.add_argument("--num-tokens", type=int, default=None, help="default: the preset's (256)")
    b.add_argument("--cfg-scale", type=float, default=2.0)
    b.add_argument("--top-k", type=int, default=0)
    b.add_argument("--repeats", type=int, default=1, help="timed generations per mode")
    b.add_argument("--device", default="auto", help="auto | cpu | cuda (var-*: also meta, a dry run of shapes)")
    b.add_argument("--precision", default="auto", help="auto (bf16 on GPU) | bf16 | fp32")
    b.add_argument("--compile", action="store_true", help="torch.compile the cached decode step")
    var = b.add_argument_group("var-* presets (tokscale.autoregressive.var_bench)")
    var.add_argument(
        "--settings",
        default="",
        help="comma-separated: no_cache, cache, budget_F, code_K (default: no_cache,cache,budget_0.1,budget_0.3,"
        "budget_1.0,code_6)",
    )
    var.add_argument("--small", default="", help="CoDe's small model (default: the next smaller var preset)")
    var.add_argument("--kv-keep-scales", type=int, default=4, help="scales the KV budget never evicts")
    var.add_argument(
        "--no-warmup", dest="warmup", action="store_false", help="time without a warm-up generation first"
    )
    detail = b.add_argument_group("detailflow-* presets (tokscale.autoregressive.detailflow_bench)")
    detail.add_argument(
        "--token-counts", default="128,256,512", help="comma-separated token counts, timed one after the other"
    )
    b.set_defaults(func=bench_sample)


def bench_sample(args: argparse.Namespace) -> int:
    if args.preset.startswith("detailflow-"):
        from tokscale.autoregressive.detailflow_bench import bench_detailflow_sample as run
    elif args.preset.startswith("var-"):
        from tokscale.autoregressive.var_bench import bench_var_sample as run
    else:
        from tokscale.autoregressive.bench import bench_sample as run

    print(json.dumps(run(args)))
    return 0


def add_convert_commands(csub: argparse._SubParsersAction) -> None:
    for source, name, tokens_help in (
        (
            "llamagen",
            "LlamaGen",
            "image tokens (required: LlamaGen's weights do not store the RoPE grid; 256 = 16x16, 576 = 24x24)",
        ),
        ("gigatok-gpt", "GigaTok", "check the token count (read from the position table)"),
    ):
        p = csub.add_parser(
            source,
            help=f"a {name} class-conditional GPT checkpoint ({{'model': ...}} / {{'ema': ...}}) -> a tokscale export",
            description=f"tokscale convert {source} CHECKPOINT.pt OUT"
            + (" --num-tokens 256" if source == "llamagen" else ""),
        )
        p.add_argument("checkpoint", help=f"{name}'s .pt file")
        p.add_argument("out", help="export folder to write")
        p.add_argument(
            "--weights", default="model", choices=["model", "ema"], help="which state dict of the file"
        )
        p.add_argument("--num-tokens", type=int, default=None, help=tokens_help)
        p.add_argument(
            "--heads",
            type=int,
            default=None,
            help="attention heads (default: the reference preset's for the width)",
        )
        p.add_argument(
            "--num-classes", type=int, default=None, help="check the class count (read from the weights)"
        )
        p.add_argument(
            "--allow-pickle",
            action="store_true",
            help="load a checkpoint that holds Python objects (a training script's args); only for files you trust",
        )
        p.add_argument("--overwrite", action="store_true", help="write into a folder that holds other files")
        p.set_defaults(func=convert_gpt, source=source)


def convert_gpt(args: argparse.Namespace) -> int:
    from tokscale.autoregressive.convert import convert

    out = convert(
        args.source,
        args.checkpoint,
        args.out,
        weights=args.weights,
        num_tokens=args.num_tokens,
        heads=args.heads,
        num_classes=args.num_classes,
        allow_pickle=args.allow_pickle,
        overwrite=args.overwrite,
    )
    print(json.dumps({"export": str(out)}))
    return 0
