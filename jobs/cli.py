"""The commands every registered trainer shares: ``train``, ``submit``, ``jobs status``, ``export``, ``publish``;
and ``probe`` (tokscale.jobs.probe_cli), which runs the other commands for several tokenizers.

tokscale train tokenizer tokenizer/demo train.max_steps=300 [--nproc 2]
tokscale submit tokenizer tokenizer/gigatok-1d-S-S data.batch_size=8 --nodes 2 --gpus-per-node 8 -p gpu -t 1440
tokscale submit tokenizer tokenizer/demo --sweep model.preset=2d-tiny --sweep model.preset=1d-tiny
tokscale jobs status runs/demo
tokscale export runs/demo exports/2d-tiny-demo
tokscale publish exports/2d-tiny-demo my-org/tokscale-2d-tiny-demo

TRAINER is a name from the registry (tokscale.registry: pyproject entry points, or TOKSCALE_TRAINERS) or a
``module:Class`` / ``file.py:Class`` spec; ``tokscale train --help`` lists the registered names.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

# (flag, JobConfig field, type, help)
JOB_FLAGS = [
    ("--nodes", "nodes", int, "nodes (default 1)"),
    ("--gpus-per-node", "gpus_per_node", int, "GPUs per node; one task per GPU (default 0: CPU nodes)"),
    ("--tasks-per-node", "tasks_per_node", int, "tasks per node on CPU nodes (default: GPUs per node, or 1)"),
    ("--cpus-per-task", "cpus_per_task", int, "CPUs per task (default: Slurm's)"),
    ("--mem-gb", "mem_gb", float, "memory per node in GB (default: Slurm's)"),
    ("--partition", "partition", str, "partition (default: the cluster's default)"),
    ("--time", "time_min", int, "time limit in minutes (default 60)"),
    ("--account", "account", str, "account to charge"),
    ("--qos", "qos", str, "quality of service"),
    ("--constraint", "constraint", str, "node features, e.g. a100"),
    ("--signal-delay-s", "signal_delay_s", int, "seconds before the time limit to checkpoint and requeue"),
    ("--max-requeues", "max_requeues", int, "requeue at most this many times (default 20)"),
    ("--folder", "folder", str, "submitit folder for pickles and logs (default RUN_DIR/slurm/logs)"),
    ("--job-name", "job_name", str, "Slurm job name"),
]
SHORT = {"--partition": "-p", "--time": "-t", "--nodes": "-N"}


def add_slurm_flags(group) -> None:
    """The Slurm resource flags (JobConfig fields), ``--slurm OPTION=VALUE`` and ``--job-config``: the one set
    every submitting command uses (``submit``, ``eval ... --submit``); read back by :func:`job_config_from_args`."""
    for flag, dest, typ, help_ in JOB_FLAGS:
        names = [flag] + ([SHORT[flag]] if flag in SHORT else [])
        group.add_argument(*names, dest=f"job_{dest}", type=typ, default=None, help=help_)
    group.add_argument(
        "--slurm",
        action="append",
        default=[],
        metavar="OPTION=VALUE",
        help="any other sbatch option, repeatable (e.g. --slurm exclusive=true --slurm mail-type=END)",
    )
    group.add_argument("--job-config", default=None, help="YAML with JobConfig fields; flags override it")


def add_job_flags(parser: argparse.ArgumentParser) -> None:
    """``--nproc N`` and ``--submit`` with the Slurm flags: how a job module (extract, eval, sample) runs.
    Read back by :func:`run_job_module`."""
    parser.add_argument(
        "--nproc", type=int, default=1, help="local processes (one per GPU, or CPU ranks over gloo)"
    )
    slurm = parser.add_argument_group("Slurm (run as a job through tokscale.jobs instead of locally)")
    slurm.add_argument("--submit", action="store_true", help="submit to Slurm and return")
    add_slurm_flags(slurm)


def run_job_module(args: argparse.Namespace, module: str, cfg, config_path: Path, report) -> int:
    """Run a job module (``load_config`` + ``main(cfg, should_stop)``, a tokscale.registry runnable) as the
    flags of :func:`add_job_flags` ask: submitted to Slurm (prints the submitted runs), in ``--nproc`` local
    processes (each runs ``python -m MODULE CONFIG_PATH``), or in this process, where ``report(result)``
    prints main's result and the process group main brought up is torn down again."""
    args.log_dir = str(Path(cfg.run_dir) / "logs")  # where tokscale.errors writes a failure's traceback
    if args.submit:
        from tokscale.jobs.submission import submit

        runs = submit(module, str(config_path), [], job_config_from_args(args))
        print(json.dumps([r.describe() for r in runs], indent=2))
        return 0
    if args.nproc > 1:
        from tokscale.errors import LOG_DIR_ENV
        from tokscale.jobs.local import launch_local

        # The ranks log a failure's traceback in the run's folder, as this process would.
        os.environ[LOG_DIR_ENV] = str(Path(args.log_dir).absolute())
        return launch_local(args.nproc, ["-m", module, str(config_path)])
    import importlib

    import torch.distributed as dist

    try:
        result = importlib.import_module(module).main(cfg)
    finally:
        if dist.is_initialized():  # the world of one that main() set up
            dist.destroy_process_group()
    report(result)
    return 0


def _registered() -> str:
    from tokscale.registry import trainer_specs

    try:
        return ", ".join(sorted(trainer_specs())) or "none"
    except ValueError as err:  # a bad TOKSCALE_TRAINERS entry: say so in --help rather than fail
        return f"({err})"


def _trainer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("trainer", metavar="TRAINER", help=f"registered trainer ({_registered()}) or module:Class")
    p.add_argument("config", help="YAML path or name under conf/ (e.g. tokenizer/demo)")
    p.add_argument(
        "overrides", nargs="*", help="dotlist overrides, e.g. model.preset=1d-S-S train.zero_stage=2"
    )


def add_commands(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser(
        "train",
        help="train a registered trainer through DeepSpeed; rerunning resumes from the newest checkpoint",
        description="tokscale train TRAINER CONFIG [KEY=VALUE ...] [--nproc N], e.g. tokscale train tokenizer "
        "tokenizer/demo train.max_steps=300. The config is validated before any process starts; --nproc ranks "
        "all read one resolved snapshot (RUN_DIR/local/config.yaml).",
    )
    _trainer_args(train)
    train.add_argument(
        "--nproc", type=int, default=1, help="local processes (one per GPU, or CPU ranks over gloo)"
    )
    train.set_defaults(func=train_command)

    submit = sub.add_parser(
        "submit",
        help="submit training to Slurm (through submitit); prints the job id, run directory and logs",
        description=(
            "Validates the training config, checks the request against the cluster (sinfo, sbatch --test-only), "
            "then submits one job (or one job array with --sweep). The job checkpoints and requeues itself on "
            "Slurm's time-limit signal and resumes from the newest checkpoint. Example: tokscale submit "
            "tokenizer tokenizer/gigatok-1d-S-S data.batch_size=8 --nodes 2 --gpus-per-node 8 -p gpu -t 1440"
        ),
    )
    _trainer_args(submit)
    add_slurm_flags(submit.add_argument_group("Slurm resources (kept apart from the training config)"))
    submit.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="OVERRIDES",
        help='one run of a job array, repeatable: --sweep "model.preset=1d-S-S" --sweep "model.preset=1d-S-B"; '
        "each run gets RUN_DIR/<overrides>",
    )
    submit.add_argument(
        "--sweep-file", default=None, help="YAML list of sweep items (strings or key: value maps)"
    )
    submit.add_argument("--json", action="store_true", help="print the submitted runs as JSON")
    submit.set_defaults(func=submit_command)

    jobs = sub.add_parser("jobs", help="inspect submitted runs")
    jobs_sub = jobs.add_subparsers(dest="jobs_command", metavar="ACTION", required=True)
    status = jobs_sub.add_parser(
        "status",
        help="step, last checkpoint and Slurm state of a run",
        description="tokscale jobs status RUN_DIR: reads the run directory and asks squeue/sacct for the state. "
        "Given the base directory of a sweep, reports every run of it.",
    )
    status.add_argument("run_dir")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(func=jobs_status)

    export = sub.add_parser(
        "export",
        help="consolidate a run's newest checkpoint into safetensors + config + model card (any trainer)",
        description="tokscale export RUN_DIR OUT",
    )
    export.add_argument("run_dir")
    export.add_argument("out")
    export.add_argument(
        "--overwrite",
        action="store_true",
        help="write into OUT even when it holds other files (they are kept; only the export's files are replaced)",
    )
    export.add_argument(
        "--weights",
        default="model",
        choices=["model", "ema"],
        help="the weights, or the run's moving average of them (a trainer with an EMA: c2i's ema_decay)",
    )
    export.set_defaults(func=export_command)

    publish = sub.add_parser(
        "publish",
        help="upload an export folder to the Hugging Face Hub (needs credentials)",
        description="tokscale publish OUT REPO_ID [--private]",
    )
    publish.add_argument("folder")
    publish.add_argument("repo_id")
    publish.add_argument("--private", action="store_true")
    publish.set_defaults(func=publish_command)

    from tokscale.jobs.probe_cli import add_command as add_probe

    add_probe(sub)  # tokscale probe: several tokenizers through recon, codes, GPT, gFID, AR probe


def job_config_from_args(args: argparse.Namespace):
    from tokscale.config import load_config
    from tokscale.jobs.config import JobConfig

    dotlist = []
    for _, dest, _, _ in JOB_FLAGS:
        value = getattr(args, f"job_{dest}")
        if value is not None:
            dotlist.append(f"{dest}={value}")
    for item in args.slurm:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--slurm {item!r}: expected OPTION=VALUE, e.g. --slurm mail-type=END")
        dotlist.append(f"extra.{key.lstrip('-')}={value}")
    return load_config(JobConfig, args.job_config, dotlist)


def train_command(args: argparse.Namespace) -> int:
    from tokscale.registry import TrainerRunnable, resolve_runnable, runnable_spec

    runnable = resolve_runnable(args.trainer)
    if not isinstance(runnable, TrainerRunnable):
        raise ValueError(
            f"{args.trainer!r} is not a trainer (a tokscale.trainer.Task); `tokscale train` runs trainers"
        )
    cfg = runnable.load_config(args.config, args.overrides)  # validated before any process starts
    args.log_dir = str(Path(cfg.run_dir) / "logs")  # where tokscale.errors writes a failure's traceback
    if args.nproc > 1:
        from tokscale.config import to_yaml
        from tokscale.jobs.local import launch_local

        snapshot = Path(cfg.run_dir) / "local" / "config.yaml"  # every rank reads this one resolved config
        snapshot.parent.mkdir(parents=True, exist_ok=True)
        snapshot.write_text(to_yaml(cfg))
        return launch_local(args.nproc, ["-m", "tokscale.train", runnable_spec(runnable), str(snapshot)])
    print(json.dumps(runnable.main(cfg)))
    return 0  # tokscale.cli.main ends the process through tokscale.shutdown.finish


def submit_command(args: argparse.Namespace) -> int:
    from tokscale.jobs.submission import read_sweep_file, submit, sweep_items

    job_cfg = job_config_from_args(args)
    items = list(args.sweep) + (read_sweep_file(args.sweep_file) if args.sweep_file else [])
    sweep = sweep_items(items) if items else None
    runs = submit(args.trainer, args.config, args.overrides, job_cfg, sweep=sweep)
    if args.json:
        print(json.dumps([r.describe() for r in runs], indent=2))
        return 0
    for r in runs:
        print(f"job {r.job_id}")
        print(f"  run_dir: {r.run_dir}")
        print(f"  stdout:  {r.stdout}")
        print(f"  stderr:  {r.stderr}")
    return 0


def export_command(args: argparse.Namespace) -> int:
    from tokscale.export import export

    out = export(args.run_dir, args.out, overwrite=args.overwrite, weights=args.weights)
    print(json.dumps({"exported": str(out)}))
    return 0


def publish_command(args: argparse.Namespace) -> int:
    from tokscale.export import publish

    print(json.dumps({"published": publish(args.folder, args.repo_id, args.private)}))
    return 0


def jobs_status(args: argparse.Namespace) -> int:
    from tokscale.jobs.status import format_status, run_status, sweep_runs

    runs = sweep_runs(args.run_dir)  # a sweep's base directory: one report per run
    statuses = [run_status(r) for r in runs] if runs else [run_status(args.run_dir)]
    if args.json:
        print(json.dumps(statuses if runs else statuses[0], indent=2))
    else:
        print("\n\n".join(format_status(s) for s in statuses))
    return 0
