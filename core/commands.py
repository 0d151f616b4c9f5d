"""Commands of the base package: ``tokscale config show`` (any registered trainer's config), ``tokscale model
info|list`` (presets of every area) and ``tokscale bench eval`` (Inception throughput, Fréchet distance cost); and
the parent commands the areas add to.

The base creates the parents ``bench``, ``model``, ``convert`` and ``eval`` (:func:`add_groups`), so that no two
areas both create one: a command module (entry-point group ``tokscale.commands``) adds its own children through
``add_bench_commands(bench_sub)``, ``add_model_commands(model_sub)``, ``add_convert_commands(convert_sub)`` and
``add_eval_commands(eval_sub)`` (tokenizers: recon, stats, probe; autoregressive: gen, ar-probe).
``model info`` and ``model list`` are the base's: they ask each command module's ``list_model_presets()`` for its
preset names and the owner's ``describe_model(preset, overrides)`` for the JSON (heavy imports inside it).
"""

from __future__ import annotations

import argparse
import importlib

# hook a command module may define -> the parent command whose subcommands it adds
GROUP_HOOKS = {
    "add_bench_commands": "bench",
    "add_model_commands": "model",
    "add_convert_commands": "convert",
    "add_eval_commands": "eval",
}


def add_groups(sub: argparse._SubParsersAction) -> dict[str, argparse._SubParsersAction]:
    """Create the parent commands; returns hook name -> the parent's subparsers."""
    bench = sub.add_parser("bench", help="benchmarks that print JSON")
    bench_sub = bench.add_subparsers(dest="bench_command", metavar="BENCH", required=True)
    model = sub.add_parser("model", help="inspect model presets (tokenizers, AR models)")
    model_sub = model.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    info = model_sub.add_parser(
        "info",
        help="print a preset's parameter counts as JSON (built on the meta device: no weights allocated)",
        description="tokscale model info 1d-XL-XXL | tokscale model info gpt-XXL",
    )
    info.add_argument("preset", help="preset name; `tokscale model list` shows them")
    info.add_argument("overrides", nargs="*", help="model-config overrides, e.g. decoder.depth=12")
    info.set_defaults(func=model_info)
    lst = model_sub.add_parser("list", help="list preset names")
    lst.set_defaults(func=model_list)
    conv = sub.add_parser("convert", help="convert another project's checkpoint into a tokscale export")
    convert_sub = conv.add_subparsers(dest="convert_command", metavar="SOURCE", required=True)
    ev = sub.add_parser(
        "eval",
        help="paper-comparable evaluation: rFID/IS/PSNR/SSIM/LPIPS, gFID, reference stats, probes",
    )
    eval_sub = ev.add_subparsers(dest="eval_command", metavar="ACTION", required=True)
    return {
        "add_bench_commands": bench_sub,
        "add_model_commands": model_sub,
        "add_convert_commands": convert_sub,
        "add_eval_commands": eval_sub,
    }


def _preset_tables() -> list[tuple[object, list[str]]]:
    """(command module, its preset names) for every registered module that has presets."""
    from tokscale.registry import command_modules

    tables = []
    for name in command_modules():
        mod = importlib.import_module(name)
        if hasattr(mod, "list_model_presets"):
            tables.append((mod, list(mod.list_model_presets())))
    return tables


def model_info(args: argparse.Namespace) -> int:
    import json

    tables = _preset_tables()
    for mod, names in tables:
        if args.preset in names:
            print(json.dumps(mod.describe_model(args.preset, args.overrides)))
            return 0
    known = [n for _, names in tables for n in names]
    raise ValueError(f"unknown model preset {args.preset!r}; expected one of {known}")


def model_list(args: argparse.Namespace) -> int:
    print("\n".join(n for _, names in _preset_tables() for n in names))
    return 0


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
