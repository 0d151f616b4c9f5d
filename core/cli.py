"""The ``tokscale`` command.

    tokscale --help
    tokscale config show tokenizer/demo model.decoder.depth=2
    tokscale model info 1d-XL-XXL
    tokscale demo
    tokscale train tokenizer tokenizer/demo train.max_steps=50
    tokscale data shards SRC OUT
    tokscale bench tokenizer 2d-tiny

Every failure goes through tokscale.errors.report: an expected one (bad data, config, weights, a missing file,
a full disk, a failed rank) prints one line ``tokscale: error: ...`` and exits 2, a bug prints its traceback too
and exits 1; the traceback always goes to a log file the line names (a command can choose the folder by setting
``args.log_dir``; training logs into RUN_DIR/logs). ``--debug``, accepted before or after the subcommand, prints
every traceback on the screen; ``-v`` is debug logging.

Each area registers its own subcommands (``add_commands(subparsers)``, and children of the base's parent commands
through ``add_bench_commands(bench_sub)`` / ``add_model_commands(model_sub)`` / ``add_convert_commands(convert_sub)``
and its presets through ``list_model_presets()`` / ``describe_model(preset, overrides)``, in a module named in the
``tokscale.commands`` entry-point group of pyproject.toml; see tokscale.commands), so this file, in the base
package, imports no trainer and no launcher; heavy imports (torch, deepspeed) happen inside the command functions,
never at parser build time.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from tokscale.errors import report
from tokscale.registry import command_modules

BASE_COMMANDS = "tokscale.commands"  # config show, model info|list, bench eval; the parent commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokscale",
        description="Train, evaluate and publish GigaTok-style visual tokenizers.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="on a failure, print the traceback here too (it is always logged)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    base = importlib.import_module(BASE_COMMANDS)
    groups = base.add_groups(sub)  # bench, model, convert: the parents areas add to
    modules = [base, *(importlib.import_module(name) for name in command_modules())]
    for mod in modules:
        if hasattr(mod, "add_commands"):
            mod.add_commands(sub)
    for hook, group_sub in groups.items():
        for mod in modules:
            if hasattr(mod, hook):
                getattr(mod, hook)(group_sub)
    _accept_debug_anywhere(parser)
    return parser


def _accept_debug_anywhere(parser: argparse.ArgumentParser) -> None:
    """Add ``--debug`` to every subcommand too: the error line says "rerun with --debug", and the natural way
    to do that is to append it. SUPPRESS keeps a subcommand from resetting a ``--debug`` given before it."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                if "--debug" not in sub._option_string_actions:
                    sub.add_argument(
                        "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
                    )
                _accept_debug_anywhere(sub)


def _process_group_up() -> bool:
    dist = sys.modules.get("torch.distributed")
    return bool(dist is not None and dist.is_available() and dist.is_initialized())


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # Dotlist overrides after an option (`train c2i c2i/tiny --nproc 8 train.zero_stage=2`): argparse stops
        # collecting positionals at the first option, so take KEY=VALUE leftovers as overrides of the command.
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*(args.overrides or []), *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    group_was_up = _process_group_up()
    try:
        rc = args.func(args)
    except (Exception, KeyboardInterrupt) as err:
        code = report(err, log_dir=getattr(args, "log_dir", None), debug=args.debug)
        if not group_was_up and _process_group_up():
            from tokscale.shutdown import exit_process

            # This command brought up a process group (an in-process training run): leave without the
            # interpreter teardown that gloo's threads can abort (tokscale.shutdown), and without a barrier,
            # since the failure may have happened anywhere. A caller that already had a group (a test) gets
            # the code back.
            exit_process(code)
        return code
    rc = int(rc or 0)
    if not group_was_up and _process_group_up():
        from tokscale.shutdown import finish

        # A command that brought up a process group (train, demo, eval) leaves without interpreter teardown,
        # which gloo's threads can abort with SIGABRT after a finished run (tokscale.shutdown).
        finish(rc)
    return rc


if __name__ == "__main__":
    sys.exit(main())
