"""The ``tokscale`` command.

    tokscale --help
    tokscale config show tokenizer/demo model.decoder.depth=2
    tokscale model info 1d-XL-XXL
    tokscale demo
    tokscale train tokenizer tokenizer/demo train.max_steps=50
    tokscale data shards SRC OUT
    tokscale bench tokenizer 2d-tiny

Each area registers its own subcommands (``add_commands(subparsers)`` in its ``cli`` module) so that this file
stays a table; heavy imports (torch, deepspeed) happen inside the command functions, never at parser build time.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from tokscale.config import ConfigError

# Modules that add top-level command groups: (module, attribute).
COMMAND_MODULES = [
    "tokscale.commands",
    "tokscale.tokenizers.cli",
    "tokscale.data.cli",
    "tokscale.jobs.cli",
    "tokscale.evaluation.cli",
]

# Modules that add `tokscale bench <name>` subcommands.
BENCH_MODULES = [
    "tokscale.commands",
    "tokscale.tokenizers.cli",
    "tokscale.data.cli",
    "tokscale.jobs.cli",
    "tokscale.evaluation.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokscale",
        description="Train, evaluate and publish GigaTok-style visual tokenizers.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    bench = sub.add_parser("bench", help="benchmarks that print JSON")
    bench_sub = bench.add_subparsers(dest="bench_command", metavar="BENCH", required=True)
    for name in COMMAND_MODULES:
        mod = _import_optional(name)
        if mod is not None and hasattr(mod, "add_commands"):
            mod.add_commands(sub)
    for name in BENCH_MODULES:
        mod = _import_optional(name)
        if mod is not None and hasattr(mod, "add_bench_commands"):
            mod.add_bench_commands(bench_sub)
    return parser


def _import_optional(name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name == name:  # the area has no CLI yet
            return None
        raise


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
        from tokscale.jobs.shutdown import finish

        # A command that brought up a process group (train, demo, eval) leaves without interpreter teardown,
        # which gloo's threads can abort with SIGABRT after a finished run (jobs/README.md).
        finish(rc)
    return rc


if __name__ == "__main__":
    sys.exit(main())
