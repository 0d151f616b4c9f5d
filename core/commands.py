"""Commands of the base package: ``tokscale config show`` (any registered trainer's config) and
``tokscale bench eval`` (Inception throughput, Fréchet distance cost)."""

from __future__ import annotations

import argparse


def add_commands(sub: argparse._SubParsersAction) -> None:
    cfg = sub.add_parser("config", help="inspect configs")
    cfg_sub = cfg.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = cfg_sub.add_parser(
        "show",
        help="print the resolved YAML of a config and exit",
        description="Merge schema -> preset -> YAML -> overrides and print the result. A bad key exits 2.",
    )
    show.add_argument(
        "config", help="YAML path, name under conf/ (e.g. tokenizer/demo) or a run's config.yaml"
    )
    show.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. model.decoder.depth=12")
    show.add_argument("--schema", default=None, help="schema name when it cannot be inferred from the path")
    show.set_defaults(func=config_show)


def add_bench_commands(bench_sub: argparse._SubParsersAction) -> None:
    b = bench_sub.add_parser(
        "eval",
        help="Inception feature-extraction images/s and seconds per 2048-d Fréchet distance (JSON)",
        description="tokscale bench eval [--inception-weights PTH] [--batch 50] [--resolution 256] [--device auto]",
    )
    b.add_argument("--inception-weights", default=None, help="default: random weights written to a temp file")
    b.add_argument("--batch", type=int, default=50)
    b.add_argument("--resolution", type=int, default=256)
    b.add_argument("--steps", type=int, default=5, help="timed batches after one warmup batch")
    b.add_argument("--device", default="auto", help="auto | cpu | cuda")
    b.set_defaults(func=bench_eval)


def bench_eval(args: argparse.Namespace) -> int:
    import json

    from tokscale.evaluation.bench import run_bench

    print(json.dumps(run_bench(args.inception_weights, args.batch, args.resolution, args.steps, args.device)))
    return 0


def config_show(args: argparse.Namespace) -> int:
    from tokscale.config import infer_schema_name, resolve_config_path, schema_task, to_yaml

    path = resolve_config_path(args.config)
    name = args.schema or infer_schema_name(path)
    cfg = schema_task(name).load_config(path, args.overrides)
    print(to_yaml(cfg), end="")
    return 0
