"""``tokscale sample``: class-conditional images from a GPT (a ``train c2i`` run or an export) through a tokenizer.

    tokscale sample runs/c2i-tiny --tokenizer runs/demo --classes 0,1,2 --num 4 samples/ --cfg-scale 2
    tokscale sample exports/llamagen-gpt-B --tokenizer exports/llamagen-vq --classes all --num 50 out/ \\
        --cfg-scale 1.75 --cfg-schedule step --top-k 0 --temperature 1.0 --seed 0 --batch-size 64

    tokscale sample runs/c2i --tokenizer runs/tok --classes all --num 50 out/ --nproc 4     # 4 local ranks
    tokscale sample runs/c2i --tokenizer runs/tok --classes all --num 50 out/ --submit --gpus-per-node 8

Writes ``OUT/images/{index:06d}_class{label}.png``, ``OUT/grid.png`` (up to 64 samples) and ``OUT/samples.json``
(the settings, the labels, the codes), built in ``OUT.sample-job/staging`` and renamed into place at the end. The images depend
on the seed, the settings and ``--batch-size``, not on the rank count; a killed run, rerun with the same
settings, resumes from the finished batches (tokscale.autoregressive.sample_job). The GPT and the tokenizer must
agree: a codebook larger than the GPT's vocabulary, another token count, or (when the GPT's training shards
recorded it) another tokenizer config hash is refused, naming both, before anything starts.

A VAR run or export (``tokscale train var``) samples through its multi-scale tokenizer with the same flags,
converted explicitly (tokscale.autoregressive.var_sample.var_sample_config: ``--cfg-scale s`` is VAR's t = s - 1,
``--cfg-schedule linear`` VAR's ramp over scales, ``step`` refused), plus its own ``--kv-budget``,
``--kv-keep-scales`` and CoDe's ``--code-handoff K --small-model SMALL_VAR``:

    tokscale sample runs/var-tiny --tokenizer runs/ms-tiny --classes all --num 10 out/ --cfg-scale 2.5 \\
        --cfg-schedule linear --top-k 900 --top-p 0.96 --kv-budget 0.3
"""

from __future__ import annotations

import argparse
import json


def add_sampler_flags(p: argparse.ArgumentParser) -> None:
    """The sampler's flags (SampleConfig, seed, batch, device, KV cache), shared by ``sample`` and ``eval gen``."""
    p.add_argument(
        "--cfg-scale",
        type=float,
        default=1.0,
        help="classifier-free guidance (1 = none; a VAR's t is this - 1)",
    )
    p.add_argument(
        "--cfg-schedule", default="constant", help="constant | linear | step (GigaTok; a VAR: not step)"
    )
    p.add_argument(
        "--cfg-start-ratio", type=float, default=0.18, help="step schedule: guided from this fraction"
    )
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32, help="samples per generation batch")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--no-cache", action="store_true", help="recompute the prefix every step (a check; slow)")
    # a VAR's own (tokscale.autoregressive.var_sample.VAROptions); refused for other models
    p.add_argument("--kv-budget", type=float, default=1.0, help="VAR: fraction of the fine scales' KV kept")
    p.add_argument(
        "--kv-keep-scales", type=int, default=4, help="VAR: coarse scales the KV budget never evicts"
    )
    p.add_argument(
        "--code-handoff", type=int, default=0, help="VAR, CoDe: the small model draws from this scale"
    )
    p.add_argument("--small-model", default="", help="VAR, CoDe: the small VAR (run or export)")


def sampler_dotlist(args: argparse.Namespace) -> list[str]:
    """:func:`add_sampler_flags`' values as config overrides (a job config with ``sample: SampleConfig``)."""
    return [
        f"seed={args.seed}",
        f"batch_size={args.batch_size}",
        f"device={args.device}",
        f"use_cache={not args.no_cache}",
        f"sample.cfg_scale={args.cfg_scale}",
        f"sample.cfg_schedule={args.cfg_schedule}",
        f"sample.cfg_start_ratio={args.cfg_start_ratio}",
        f"sample.temperature={args.temperature}",
        f"sample.top_k={args.top_k}",
        f"sample.top_p={args.top_p}",
        f"var.kv_budget={args.kv_budget}",
        f"var.kv_keep_scales={args.kv_keep_scales}",
        f"var.code_handoff={args.code_handoff}",
        *([f"var.small_model={args.small_model}"] if args.small_model else []),  # "" would read as null
    ]


def add_sample_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sample",
        help="class-conditional images from a GPT through a tokenizer (KV cache, CFG schedules)",
        description="tokscale sample GPT_RUN_OR_EXPORT --tokenizer TOKENIZER --classes 0,1,2 --num N OUT",
    )
    p.add_argument("gpt", help="a `tokscale train c2i|detailflow|var` run directory or a GPT or VAR export")
    p.add_argument("out", help="output folder")
    p.add_argument("--tokenizer", required=True, help="the tokenizer whose codes the GPT was trained on")
    p.add_argument("--classes", default="0", help="comma-separated class indices, or 'all'")
    p.add_argument("--num", type=int, default=1, help="samples per class")
    add_sampler_flags(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing sample folder")
    from tokscale.jobs.cli import add_job_flags

    add_job_flags(p)
    p.set_defaults(func=sample_command)


def sample_command(args: argparse.Namespace) -> int:
    from tokscale.autoregressive.sample_job import SampleJobConfig, load_config, prepare
    from tokscale.config import load_config as load

    dotlist = [
        f"gpt={args.gpt}",
        f"tokenizer={args.tokenizer}",
        f"out={args.out}",
        f"classes={args.classes}",
        f"num={args.num}",
        f"overwrite={args.overwrite}",
        *sampler_dotlist(args),
    ]
    cfg = load(SampleJobConfig, None, dotlist)
    path = prepare(cfg)  # checked before any process starts or any job is submitted
    from tokscale.jobs.cli import run_job_module

    return run_job_module(
        args,
        "tokscale.autoregressive.sample_job",
        load_config(path),
        path,
        lambda out: print(json.dumps(out)),
    )
