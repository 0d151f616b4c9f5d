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


def config_show(args: argparse.Namespace) -> int:
    from tokscale.config import infer_schema_name, load_config, resolve_config_path, schema_for, to_yaml

    path = resolve_config_path(args.config)
    name = args.schema or infer_schema_name(path)
    schema = schema_for(name)
    cfg = load_config(schema, path, args.overrides, presets=getattr(schema, "presets", None))
    print(to_yaml(cfg), end="")
    return 0
