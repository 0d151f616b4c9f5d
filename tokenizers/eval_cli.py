"""``tokscale eval recon|stats|probe|prefixes``: the tokenizer's evaluation jobs, here, on ``--nproc`` ranks or on Slurm.

    tokscale eval recon runs/tok --data /data/in1k/val --inception-weights pt_inception.pth --vgg-weights vgg16.pth
    tokscale eval recon exports/2d-tiny --data embedded --inception-weights pt_inception.pth --no-lpips --nproc 2
    tokscale eval recon runs/tok --data /data/in1k/val ... --submit --gpus-per-node 8 -p gpu -t 60
    tokscale eval stats --data /data/in1k/val --inception-weights pt_inception.pth --resolution 256 val256.npz
    tokscale eval probe runs/tok --train-data /data/in1k/train --eval-data /data/in1k/val --epochs 90
    tokscale eval prefixes runs/detailflow-tiny --data embedded --lengths 1,2,4,8,16,32 --out eval/prefixes

Every command builds one :class:`tokscale.tokenizers.eval_runner.EvalJobConfig` from its flags (plus dotlist
overrides such as ``eval.is_splits=10`` or ``data.num_workers=4``) and runs it in this process, in ``--nproc``
local processes, or as a Slurm job (``--submit`` with the Slurm flags of ``tokscale submit``).
"""

from __future__ import annotations

import argparse
import json


def _common(p: argparse.ArgumentParser, tokenizer: bool) -> None:
    if tokenizer:
        p.add_argument(
            "tokenizer", help="a tokscale run directory (newest checkpoint) or an exported tokenizer"
        )
    p.add_argument("--inception-weights", default=None, help="torch-fidelity's Inception .pth (local file)")
    p.add_argument("--num-samples", type=int, default=None, help="evaluation images (default 50000)")
    p.add_argument("--batch-size", type=int, default=None, help="images per rank per step (default 50)")
    p.add_argument(
        "--resolution", type=int, default=None, help="crop size (default: the tokenizer's, or 256)"
    )
    p.add_argument("--workers", type=int, default=None, help="data loader processes per rank")
    p.add_argument("--out", default=None, help="output folder (default: eval/<command>)")
    p.add_argument(
        "--overwrite", action="store_true", help="write into an --out holding other files (they are kept)"
    )
    if tokenizer:
        p.add_argument(
            "--no-verify", action="store_true", help="skip checking an export's files against its SHA256SUMS"
        )
    p.add_argument(
        "overrides", nargs="*", help="dotlist overrides, e.g. eval.is_splits=10 data.num_workers=4"
    )
    from tokscale.jobs.cli import add_job_flags

    add_job_flags(p)


def add_eval_commands(esub: argparse._SubParsersAction) -> None:

    recon = esub.add_parser(
        "recon",
        help="reconstruct an evaluation set across ranks; rFID, IS, PSNR, SSIM, LPIPS, codebook usage",
        description=(
            "tokscale eval recon RUN_OR_EXPORT --data SHARDS --inception-weights PTH --vgg-weights PTH. Writes "
            "metrics.json, TensorBoard scalars and grid.png into --out. rFID compares against the same evaluation "
            "crops unless --reference names an ADM-format npz."
        ),
    )
    recon.add_argument("--data", required=True, help="evaluation shards (path, pattern, or 'embedded')")
    recon.add_argument(
        "--reference", default=None, help="ADM-format npz to compare against (default: same crops)"
    )
    recon.add_argument(
        "--vgg-weights", default=None, help="torchvision vgg16 state dict for LPIPS (local file)"
    )
    recon.add_argument("--no-lpips", action="store_true", help="skip LPIPS (no VGG weights needed)")
    recon.add_argument("--no-fid", action="store_true", help="skip rFID and IS (no Inception weights needed)")
    recon.add_argument("--force", action="store_true", help="compare against a reference of another protocol")
    _common(recon, tokenizer=True)
    recon.set_defaults(func=eval_recon)

    stats = esub.add_parser(
        "stats",
        help="write Inception reference statistics (ADM npz: mu, sigma + protocol) of evaluation crops",
        description="tokscale eval stats --data SHARDS --inception-weights PTH --resolution 256 OUT.npz",
    )
    stats.add_argument("stats_out", metavar="OUT.npz")
    stats.add_argument("--data", required=True, help="shards whose ADM centre crops the statistics describe")
    _common(stats, tokenizer=False)
    stats.set_defaults(func=eval_stats)

    probe = esub.add_parser(
        "probe",
        help="linear probe (MAE protocol: BN + Linear, LARS) and a quick logistic probe on encoder features",
        description="tokscale eval probe RUN_OR_EXPORT --train-data SHARDS --eval-data SHARDS [--epochs 90]",
    )
    probe.add_argument("--train-data", required=True, help="shards the probe trains on")
    probe.add_argument("--eval-data", required=True, help="shards the probe is tested on")
    probe.add_argument("--epochs", type=int, default=None, help="LARS probe epochs (default 90)")
    probe.add_argument("--warmup-epochs", type=int, default=None, help="warmup epochs (default 10)")
    probe.add_argument("--method", choices=("lars", "logistic", "both"), default=None, help="default both")
    probe.add_argument("--save-features", action="store_true", help="also write OUT/features.pt for reuse")
    _common(probe, tokenizer=True)
    probe.set_defaults(func=eval_probe)

    prefixes = esub.add_parser(
        "prefixes",
        help="PSNR, SSIM (and rFID) of a 1D tokenizer's first t tokens for each t: DetailFlow's coarse-to-fine curve",
        description=(
            "tokscale eval prefixes RUN_OR_EXPORT --data SHARDS [--lengths 8,16,32,64,128] [--inception-weights "
            "PTH]. Writes metrics.json (a row per prefix length), prefixes.csv, curve.png and grid.png into --out "
            "(tokscale.tokenizers.prefix_eval)."
        ),
    )
    prefixes.add_argument("--data", required=True, help="evaluation shards (path, pattern, or 'embedded')")
    prefixes.add_argument(
        "--lengths",
        default=None,
        help="comma-separated prefix lengths (default: the admissible powers of two and the token count)",
    )
    prefixes.add_argument(
        "--reference", default=None, help="ADM-format npz for rFID (default: the same crops)"
    )
    _common(prefixes, tokenizer=True)
    prefixes.set_defaults(func=eval_prefixes)


def _job_config(args: argparse.Namespace, task: str, extra: list[str]):
    from tokscale.config import load_config
    from tokscale.tokenizers.eval_runner import EvalJobConfig

    out = args.out or f"eval/{task}"
    if task == "stats":  # the output is the npz; run_dir only holds the config and the logs
        dot = [f"task={task}", f"run_dir={out}"] + extra
    else:  # the results appear in `out` whole at the end; the work folder beside it holds config and logs
        from tokscale.tokenizers.eval_runner import WORK_SUFFIX

        dot = [
            f"task={task}",
            f"out={out}",
            f"run_dir={out}{WORK_SUFFIX}",
            f"overwrite={args.overwrite}",
        ] + extra
    flag_map = {
        "inception_weights": "eval.inception_weights",
        "num_samples": "eval.num_samples",
        "batch_size": "eval.batch_size",
        "workers": "data.num_workers",
    }
    for attr, key in flag_map.items():
        value = getattr(args, attr, None)
        if value is not None:
            dot.append(f"{key}={value}")
    tokenizer = getattr(args, "tokenizer", None)
    resolution = args.resolution
    if tokenizer:
        dot.append(f"tokenizer={tokenizer}")
        if args.no_verify:
            dot.append("verify_weights=false")
        if resolution is None:  # the tokenizer's own resolution
            from tokscale.tokenizers.load import model_config_from

            resolution = model_config_from(tokenizer).image_size
    if resolution is not None:
        dot.append(f"data.resolution={resolution}")
    return load_config(EvalJobConfig, None, dot + list(args.overrides))


def _dispatch(args: argparse.Namespace, cfg) -> int:
    from tokscale.jobs.cli import run_job_module
    from tokscale.tokenizers.eval_runner import check_out, write_config

    check_out(cfg)  # before any process starts or any job is submitted

    return run_job_module(
        args,
        "tokscale.tokenizers.eval_runner",
        cfg,
        write_config(cfg),
        lambda out: print(json.dumps(out["result"], indent=2)),
    )


def eval_recon(args: argparse.Namespace) -> int:
    extra = [f"data.eval_shards={args.data}"]
    if args.reference:
        extra.append(f"eval.reference_stats={args.reference}")
    if args.vgg_weights:
        extra.append(f"eval.lpips_vgg_weights={args.vgg_weights}")
    if args.no_lpips:
        extra.append("eval.compute_lpips=false")
    if args.no_fid:
        extra.append("eval.compute_fid=false")
    if args.force:
        extra.append("eval.force=true")
    return _dispatch(args, _job_config(args, "recon", extra))


def eval_stats(args: argparse.Namespace) -> int:
    extra = [f"data.eval_shards={args.data}", f"stats_out={args.stats_out}"]
    return _dispatch(args, _job_config(args, "stats", extra))


def eval_probe(args: argparse.Namespace) -> int:
    extra = [f"data.eval_shards={args.eval_data}", f"probe_train_shards={args.train_data}"]
    if args.epochs is not None:
        extra.append(f"probe.epochs={args.epochs}")
    if args.warmup_epochs is not None:
        extra.append(f"probe.warmup_epochs={args.warmup_epochs}")
    if args.method:
        extra.append(f"probe_method={args.method}")
    if args.save_features:
        extra.append("save_features=true")
    return _dispatch(args, _job_config(args, "probe", extra))


def parse_lengths(text: str) -> list[int]:
    """``--lengths 8,16,32`` -> [8, 16, 32]; anything else is a ValueError naming the flag."""
    try:
        lengths = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        lengths = []
    if not lengths or min(lengths) < 1:
        raise ValueError(f"--lengths {text!r}: expected comma-separated positive integers, e.g. 8,16,32")
    return lengths


def eval_prefixes(args: argparse.Namespace) -> int:
    extra = [f"data.eval_shards={args.data}", "eval.compute_lpips=false"]
    if not args.inception_weights:  # rFID only when the Inception weights are given
        extra.append("eval.compute_fid=false")
    if args.reference:
        if not args.inception_weights:
            raise ValueError("--reference compares Inception statistics: give --inception-weights PTH too")
        extra.append(f"eval.reference_stats={args.reference}")
    lengths = parse_lengths(args.lengths) if args.lengths else []
    if lengths:
        extra.append(f"prefix_lengths=[{','.join(map(str, lengths))}]")
    from tokscale.tokenizers.load import model_config_from
    from tokscale.tokenizers.prefix_eval import prefix_lengths

    prefix_lengths(model_config_from(args.tokenizer), lengths)  # a bad length fails before anything starts
    return _dispatch(args, _job_config(args, "prefixes", extra))
