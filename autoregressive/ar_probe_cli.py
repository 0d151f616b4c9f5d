"""``tokscale eval ar-probe``: GigaTok's linear probe on a frozen GPT's mid-depth features, here, on ``--nproc``
ranks or on Slurm.

    tokscale eval ar-probe runs/c2i --tokenizer runs/tok --train-data /data/in1k/train --eval-data /data/in1k/val \\
        --out eval/ar-probe --nproc 8                    # 90 epochs, batch 128 per rank, online augmentation
    tokscale eval ar-probe exports/gigatok-gpt-B --tokenizer exports/gigatok-tok --train-data ... --eval-data ... \\
        --out eval/ar-probe-B --submit --gpus-per-node 8 -p gpu -t 1440 --precision fp16
    tokscale eval ar-probe runs/c2i-tiny --tokenizer runs/tok --train-data embedded --eval-data embedded \\
        --epochs 5 --warmup-epochs 1 --batch-size 64 --out eval/ar-probe-tiny          # a CPU check

The flags build one :class:`tokscale.autoregressive.ar_probe.ArProbeConfig` (plus dotlist overrides such as
``data.num_workers=8`` or ``probe.seed=1``), written to ``OUT/ar_probe_config.yaml`` and run by every rank
(tokscale.autoregressive.ar_probe, where the protocol and its choices are described). The GPT and the tokenizer
must agree (codebook within the vocabulary, same token count, the tokenizer config hash the GPT's training shards
recorded), checked before anything starts; a VAR run or export is refused (it predicts whole scales, so it has no
next-token features to probe).
"""

from __future__ import annotations

import argparse
import json

GPT_MODE_HELP = (
    "run the GPT in train mode (dropout 0.1 on) while computing the training features, as GigaTok's script "
    "does (it never calls gpt.eval() during probe training); default: eval mode, deterministic features. "
    "Validation features are always computed in eval mode"
)


def add_command(esub: argparse._SubParsersAction) -> None:
    p = esub.add_parser(
        "ar-probe",
        help="GigaTok's AR linear probe: BN + Linear with LARS on a frozen GPT's block depth/2 features "
        "(null class, mean over positions), augmented training images, top-1 on the validation set",
        description=(
            "tokscale eval ar-probe GPT_RUN_OR_EXPORT --tokenizer TOK --train-data SHARDS --eval-data SHARDS "
            "--out DIR [--epochs 90]. Writes DIR/metrics.json, DIR/probe.pt and DIR/ar_probe_config.yaml. "
            "Training features are recomputed every epoch from random crops (ADM random_crop_arr: short side "
            "256-320 px for 256) and flips unless --views K precomputes K views; the GPT runs in eval mode unless "
            "--gpt-train-mode. The probe depends on the global batch (--batch-size x ranks), not on how it is "
            "split. A rerun with the same settings resumes after the last finished epoch."
        ),
    )
    p.add_argument(
        "gpt", help="a `tokscale train c2i|detailflow` run directory or a GPT export (a VAR is refused)"
    )
    p.add_argument("--tokenizer", required=True, help="the tokenizer whose codes the GPT was trained on")
    p.add_argument(
        "--train-data", required=True, help="shards the probe trains on (path, pattern, 'embedded')"
    )
    p.add_argument("--eval-data", required=True, help="shards the probe is tested on (ADM centre crops)")
    p.add_argument("--out", default="eval/ar-probe", help="output folder (default eval/ar-probe)")
    p.add_argument("--epochs", type=int, default=None, help="probe epochs (default 90)")
    p.add_argument("--warmup-epochs", type=int, default=None, help="linear warmup epochs (default 10)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="probe batch per rank (default 128; lr = 0.1 x global / 256)",
    )
    p.add_argument("--base-lr", type=float, default=None, help="base learning rate (default 0.1)")
    p.add_argument(
        "--forward-batch",
        type=int,
        default=None,
        help="images per rank per tokenizer + GPT forward (default 128)",
    )
    p.add_argument(
        "--layer", type=int, default=None, help="read the output of this block, 1-based (default depth/2)"
    )
    p.add_argument(
        "--views",
        type=int,
        default=None,
        help="0 (default): fresh augmented features every epoch (the protocol); K: K augmented views computed "
        "once and cycled (cheaper, not the protocol)",
    )
    p.add_argument(
        "--no-augment",
        action="store_true",
        help="train on centre crops without flips (features computed once)",
    )
    p.add_argument("--gpt-train-mode", action="store_true", help=GPT_MODE_HELP)
    p.add_argument(
        "--num-train", type=int, default=None, help="use the first N training images (default all)"
    )
    p.add_argument(
        "--num-val", type=int, default=None, help="use the first N validation images (default all)"
    )
    p.add_argument("--num-classes", type=int, default=None, help="probe classes (default: largest label + 1)")
    p.add_argument(
        "--precision",
        choices=("fp32", "bf16", "fp16"),
        default=None,
        help="tokenizer + GPT forward (default fp32)",
    )
    p.add_argument("--resolution", type=int, default=None, help="crop size (default: the tokenizer's)")
    p.add_argument("--workers", type=int, default=None, help="data loader processes per rank")
    p.add_argument("--seed", type=int, default=None, help="probe initialisation and order seed (default 0)")
    p.add_argument("--device", default=None, help="auto (default) | cpu | cuda")
    p.add_argument("--no-verify", action="store_true", help="skip checking exports against their SHA256SUMS")
    p.add_argument(
        "--overwrite", action="store_true", help="replace the results (or unfinished state) in --out"
    )
    p.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. data.num_workers=8 probe.seed=1")
    from tokscale.jobs.cli import add_job_flags

    add_job_flags(p)
    p.set_defaults(func=ar_probe_command)


def _config(args: argparse.Namespace):
    from tokscale.autoregressive.ar_probe import WORK_SUFFIX, ArProbeConfig
    from tokscale.config import load_config
    from tokscale.tokenizers.load import model_config_from

    dot = [
        f"gpt={args.gpt}",
        f"tokenizer={args.tokenizer}",
        f"out={args.out}",
        f"run_dir={args.out}{WORK_SUFFIX}",  # config, resume state, logs; the results move into --out at the end
        f"data.train_shards={args.train_data}",
        f"data.eval_shards={args.eval_data}",
        f"data.resolution={args.resolution or model_config_from(args.tokenizer).image_size}",
    ]
    flag_map = {
        "epochs": "probe.epochs",
        "warmup_epochs": "probe.warmup_epochs",
        "batch_size": "probe.batch_size",
        "base_lr": "probe.base_lr",
        "seed": "probe.seed",
        "forward_batch": "data.batch_size",
        "workers": "data.num_workers",
        "layer": "layer",
        "views": "views",
        "num_train": "num_train",
        "num_val": "num_val",
        "num_classes": "num_classes",
        "precision": "precision",
        "device": "device",
    }
    for attr, key in flag_map.items():
        value = getattr(args, attr)
        if value is not None:
            dot.append(f"{key}={value}")
    if args.no_augment:
        dot += ["data.crop=adm_center", "data.hflip=false"]
    if args.gpt_train_mode:
        dot.append("gpt_train_mode=true")
    if args.no_verify:
        dot.append("verify_weights=false")
    if args.overwrite:
        dot.append("overwrite=true")
    return load_config(ArProbeConfig, None, dot + list(args.overrides))


def ar_probe_command(args: argparse.Namespace) -> int:
    from tokscale.autoregressive.ar_probe import load_config, prepare
    from tokscale.jobs.cli import run_job_module

    cfg = _config(args)
    path = prepare(cfg)  # checked before any process starts or any job is submitted
    return run_job_module(
        args,
        "tokscale.autoregressive.ar_probe",
        load_config(path),
        path,
        lambda out: print(json.dumps(out.get("result", out), indent=2)),
    )
