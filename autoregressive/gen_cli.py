"""``tokscale eval gen``: gFID, IS, precision and recall of a GPT's samples against an ADM reference.

    tokscale eval gen runs/c2i --tokenizer runs/tok --reference VIRTUAL_imagenet256_labeled.npz \\
        --inception-weights pt_inception-2015-12-05-6726825d.pth --out eval/gen-B --nproc 8
    tokscale eval gen exports/gigatok-gpt-B --tokenizer exports/gigatok-1d-XL-XXL --reference REF.npz \\
        --inception-weights PTH --cfg-scale 1.75 --cfg-schedule step --cfg-start-ratio 0.18 --out eval/gt
    tokscale eval gen runs/c2i ... --cfg-search greedy --cfg-scale 1.75 --search-samples 10000 --submit -p gpu

Writes OUT/results.json (FID, IS, precision, recall and every setting behind them), OUT/samples.npz (ADM format,
for the ADM TensorFlow evaluator) and OUT/grid.png. A killed run, rerun with the same flags, resumes from the
samples it had written (tokscale.autoregressive.gen_eval). A VAR run or export takes the same flags (converted:
see tokscale.autoregressive.sample_cli) and its own ``--kv-budget``, ``--kv-keep-scales``, ``--code-handoff K
--small-model SMALL_VAR``; results.json records them and the VAR sampler settings they became.
"""

from __future__ import annotations

import argparse
import json


def add_command(esub: argparse._SubParsersAction) -> None:
    p = esub.add_parser(
        "gen",
        help="gFID, IS, precision/recall (k=3) of sampled images against an ADM-format reference",
        description=(
            "tokscale eval gen GPT_RUN_OR_EXPORT --tokenizer TOK --reference REF.npz --inception-weights PTH "
            "--out DIR [--num-samples 50000] [--class-rule uniform|balanced] [--cfg-search greedy|grid:a,b]"
        ),
    )
    p.add_argument("gpt", help="a `tokscale train c2i|detailflow|var` run directory or a GPT or VAR export")
    p.add_argument("--tokenizer", required=True, help="the tokenizer whose codes the GPT was trained on")
    p.add_argument(
        "--reference",
        required=True,
        help="ADM-format npz (VIRTUAL_imagenet256_labeled.npz, `eval stats` output)",
    )
    p.add_argument("--inception-weights", required=True, help="torch-fidelity's Inception state dict (local)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--num-samples", type=int, default=50_000, help="samples scored (default 50000)")
    p.add_argument(
        "--class-rule",
        choices=("uniform", "balanced"),
        default="uniform",
        help="uniform random labels (LlamaGen, GigaTok, DetailFlow) or N/num_classes per class (VAR, ADM)",
    )
    from tokscale.autoregressive.sample_cli import add_sampler_flags

    add_sampler_flags(p)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="sampling and decoding")
    p.add_argument(
        "--image-size-eval", type=int, default=0, help="resize (bicubic) to this; default: the reference's"
    )
    p.add_argument(
        "--cfg-search",
        default="",
        help="'greedy' (GigaTok: 0.25 steps from --cfg-scale to a local FID minimum) or 'grid:1.5,1.75,2'",
    )
    p.add_argument("--search-samples", type=int, default=10_000, help="samples per search point")
    p.add_argument("--no-verify", action="store_true", help="skip the exports' SHA256SUMS check")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier result or unfinished run")
    p.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. is_splits=10 sample.cfg_interval=-1")
    from tokscale.jobs.cli import add_job_flags

    add_job_flags(p)
    p.set_defaults(func=gen_command)


def gen_command(args: argparse.Namespace) -> int:
    from tokscale.autoregressive.gen_eval import GenEvalConfig, load_config, prepare
    from tokscale.autoregressive.sample_cli import sampler_dotlist
    from tokscale.config import load_config as load
    from tokscale.jobs.cli import run_job_module

    dotlist = [
        f"gpt={args.gpt}",
        f"tokenizer={args.tokenizer}",
        f"reference={args.reference}",
        f"inception_weights={args.inception_weights}",
        f"out={args.out}",
        f"num_samples={args.num_samples}",
        f"class_rule={args.class_rule}",
        f"precision={args.precision}",
        f"image_size_eval={args.image_size_eval}",
        f"search_samples={args.search_samples}",
        f"verify_weights={not args.no_verify}",
        f"overwrite={args.overwrite}",
        *sampler_dotlist(args),
    ]
    if args.cfg_search:  # an empty dotlist value would read as null
        dotlist.append(f"cfg_search={args.cfg_search}")
    cfg = load(GenEvalConfig, None, dotlist + list(args.overrides))
    path = prepare(cfg)  # checked before any process starts or any job is submitted
    return run_job_module(args, "tokscale.autoregressive.gen_eval", load_config(path), path, _report)


def _report(result: dict) -> None:
    print(json.dumps(result, indent=2))
