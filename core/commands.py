"""Generic commands: ``tokscale config show``."""

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
    show.add_argument("config", help="YAML path or name under conf/ (e.g. tokenizer/demo)")
    show.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. model.decoder.depth=12")
    show.add_argument("--schema", default=None, help="schema name when it cannot be inferred from the path")
    show.set_defaults(func=config_show)


def add_bench_commands(bench_sub: argparse._SubParsersAction) -> None:
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


def bench_zero(args: argparse.Namespace) -> int:
    import json

    from tokscale.zero_bench import bench_zero as run

    print(json.dumps(run(args.preset, args.world_size, args.stages, args.image_size)))
    return 0


def config_show(args: argparse.Namespace) -> int:
    from tokscale.config import infer_schema_name, load_config, resolve_config_path, schema_for, to_yaml

    path = resolve_config_path(args.config)
    name = args.schema or infer_schema_name(path)
    schema = schema_for(name)
    cfg = load_config(schema, path, args.overrides, presets=getattr(schema, "presets", None))
    print(to_yaml(cfg), end="")
    return 0
