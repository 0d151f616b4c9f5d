"""``tokscale submit tokenizer`` and ``tokscale jobs status``.

tokscale submit tokenizer tokenizer/gigatok model.preset=1d-S-S --nodes 2 --gpus-per-node 8 -p gpu -t 1440
tokscale submit tokenizer tokenizer/demo --sweep model.preset=2d-tiny --sweep model.preset=1d-tiny
tokscale jobs status runs/demo
"""

from __future__ import annotations

import argparse
import json

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


def add_commands(sub: argparse._SubParsersAction) -> None:
    submit = sub.add_parser("submit", help="submit training to Slurm (through submitit)")
    submit_sub = submit.add_subparsers(dest="submit_command", metavar="TRAINER", required=True)
    tok = submit_sub.add_parser(
        "tokenizer",
        help="submit tokenizer training; prints the job id, run directory and log paths, and returns",
        description=(
            "Validates the training config, checks the request against the cluster (sinfo, sbatch --test-only), "
            "then submits one job (or one job array with --sweep). The job checkpoints and requeues itself on "
            "Slurm's time-limit signal and resumes from the newest checkpoint. Example: tokscale submit "
            "tokenizer tokenizer/gigatok model.preset=1d-S-S --nodes 2 --gpus-per-node 8 -p gpu -t 1440"
        ),
    )
    tok.add_argument("config", help="YAML path or name under conf/ (e.g. tokenizer/demo)")
    tok.add_argument("overrides", nargs="*", help="training config overrides, e.g. train.zero_stage=2")
    slurm = tok.add_argument_group("Slurm resources (kept apart from the training config)")
    for flag, dest, typ, help_ in JOB_FLAGS:
        names = [flag] + ([SHORT[flag]] if flag in SHORT else [])
        slurm.add_argument(*names, dest=f"job_{dest}", type=typ, default=None, help=help_)
    slurm.add_argument(
        "--slurm",
        action="append",
        default=[],
        metavar="OPTION=VALUE",
        help="any other sbatch option, repeatable (e.g. --slurm exclusive=true --slurm mail-type=END)",
    )
    slurm.add_argument("--job-config", default=None, help="YAML with JobConfig fields; flags override it")
    tok.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="OVERRIDES",
        help='one run of a job array, repeatable: --sweep "model.preset=1d-S-S" --sweep "model.preset=1d-S-B"; '
        "each run gets RUN_DIR/<overrides>",
    )
    tok.add_argument(
        "--sweep-file", default=None, help="YAML list of sweep items (strings or key: value maps)"
    )
    tok.add_argument(
        "--trainer",
        default="tokscale.tokenizers.train",
        help="module (or .py file) providing load_train_config(path, overrides) and main(cfg, should_stop)",
    )
    tok.add_argument("--json", action="store_true", help="print the submitted runs as JSON")
    tok.set_defaults(func=submit_tokenizer)

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


def submit_tokenizer(args: argparse.Namespace) -> int:
    from tokscale.jobs.submission import read_sweep_file, submit, sweep_items

    job_cfg = job_config_from_args(args)
    items = list(args.sweep) + (read_sweep_file(args.sweep_file) if args.sweep_file else [])
    sweep = sweep_items(items) if items else None
    runs = submit(args.config, args.overrides, job_cfg, sweep=sweep, trainer=args.trainer)
    if args.json:
        print(json.dumps([r.describe() for r in runs], indent=2))
        return 0
    for r in runs:
        print(f"job {r.job_id}")
        print(f"  run_dir: {r.run_dir}")
        print(f"  stdout:  {r.stdout}")
        print(f"  stderr:  {r.stderr}")
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
