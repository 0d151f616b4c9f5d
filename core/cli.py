"""The ``tokscale`` command.

    tokscale --help
    tokscale config show tokenizer/demo model.decoder.depth=2
    tokscale model info 1d-XL-XXL
    tokscale demo
    tokscale train tokenizer tokenizer/demo train.max_steps=50
    tokscale data shards SRC OUT
    tokscale bench tokenizer 2d-tiny

Each area registers its own subcommands (``add_commands(subparsers)`` / ``add_bench_commands(bench_sub)`` in a
module named in the ``tokscale.commands`` entry-point group of pyproject.toml), so this file, in the base package,
imports no trainer and no launcher; heavy imports (torch, deepspeed) happen inside the command functions, never at
parser build time.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from tokscale.config import ConfigError
from tokscale.registry import command_modules

BASE_COMMANDS = "tokscale.commands"  # config show, bench eval


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokscale",
        description="Train, evaluate and publish GigaTok-style visual tokenizers.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    bench = sub.add_parser("bench", help="benchmarks that print JSON")
    bench_sub = bench.add_subparsers(dest="bench_command", metavar="BENCH", required=True)
    modules = [importlib.import_module(name) for name in [BASE_COMMANDS, *command_modules()]]
    for mod in modules:
        if hasattr(mod, "add_commands"):
            mod.add_commands(sub)
    for mod in modules:
        if hasattr(mod, "add_bench_commands"):
            mod.add_bench_commands(bench_sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        rc = args.func(args)
    except ConfigError as err:
        print(f"tokscale: error: {err}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as err:
        if args.verbose:
            raise
        print(f"tokscale: error: {err}", file=sys.stderr)
        return 2
    rc = int(rc or 0)
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        from tokscale.shutdown import finish

        # A command that brought up a process group (train, demo, eval) leaves without interpreter teardown,
        # which gloo's threads can abort with SIGABRT after a finished run (tokscale.shutdown).
        finish(rc)
    return rc


if __name__ == "__main__":
    sys.exit(main())
