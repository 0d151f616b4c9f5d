"""``tokscale sample``: class-conditional images from a GPT (a ``train c2i`` run or an export) through a tokenizer.

    tokscale sample runs/c2i-tiny --tokenizer runs/demo --classes 0,1,2 --num 4 samples/ --cfg-scale 2
    tokscale sample exports/llamagen-gpt-B --tokenizer exports/llamagen-vq --classes all --num 50 out/ \\
        --cfg-scale 1.75 --cfg-schedule step --top-k 0 --temperature 1.0 --seed 0 --batch-size 64

Writes ``OUT/images/{index:06d}_class{label}.png``, ``OUT/grid.png`` (up to 64 samples) and ``OUT/samples.json``
(the settings, the labels, the codes), into a temporary sibling renamed into place at the end. The GPT and the
tokenizer must agree: a codebook larger than the GPT's vocabulary, another token count, or (when the GPT's
training shards recorded it) another tokenizer config hash is refused, naming both.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def add_sample_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sample",
        help="class-conditional images from a GPT through a tokenizer (KV cache, CFG schedules)",
        description="tokscale sample GPT_RUN_OR_EXPORT --tokenizer TOKENIZER --classes 0,1,2 --num N OUT",
    )
    p.add_argument("gpt", help="a `tokscale train c2i` run directory or a GPT export")
    p.add_argument("out", help="output folder")
    p.add_argument("--tokenizer", required=True, help="the tokenizer whose codes the GPT was trained on")
    p.add_argument("--classes", default="0", help="comma-separated class indices, or 'all'")
    p.add_argument("--num", type=int, default=1, help="samples per class")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance (1 = none)")
    p.add_argument("--cfg-schedule", default="constant", help="constant | linear | step (GigaTok)")
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
    p.add_argument("--overwrite", action="store_true", help="replace an existing sample folder")
    p.set_defaults(func=sample_command)


def _trained_tokenizer_hash(gpt_path: Path) -> str | None:
    """The tokenizer config sha256 that the GPT's training token shards recorded, when they can be found."""
    from omegaconf import OmegaConf

    cfg_file = gpt_path / "config.yaml"
    raw = OmegaConf.load(cfg_file)
    tokens = OmegaConf.select(raw, "data.train_tokens", default=None)
    if not tokens:
        return None
    manifest = Path(str(tokens)) / "manifest.json"
    if not manifest.is_file():
        log.warning(
            "the GPT's training shards %s are not here: the tokenizer's config hash is not checked", tokens
        )
        return None
    return json.loads(manifest.read_text()).get("tokenizer_config_sha256")


def check_pair(gpt_cfg, tokenizer, gpt_path: Path, tokenizer_path: str) -> None:
    if tokenizer.codebook_size > gpt_cfg.vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer_path} has codebook_size {tokenizer.codebook_size}; the GPT {gpt_path} has "
            f"vocab_size {gpt_cfg.vocab_size}"
        )
    if tokenizer.num_tokens != gpt_cfg.num_tokens:
        raise ValueError(
            f"tokenizer {tokenizer_path} makes {tokenizer.num_tokens} tokens per image; the GPT {gpt_path} "
            f"generates {gpt_cfg.num_tokens}"
        )
    trained = _trained_tokenizer_hash(gpt_path)
    if trained:
        from tokscale.tokenizers.extract import tokenizer_identity

        _, given = tokenizer_identity(tokenizer_path)
        if given != trained:
            raise ValueError(
                f"the GPT {gpt_path} was trained on codes of a tokenizer with config sha256 {trained[:12]}..., "
                f"but {tokenizer_path} has {given[:12]}..."
            )


def sample_command(args: argparse.Namespace) -> int:
    import shutil

    import torch
    from torchvision.utils import make_grid

    from tokscale.autoregressive.load import load_gpt
    from tokscale.autoregressive.sample import SampleConfig, generate
    from tokscale.images import save_png, to_unit
    from tokscale.tokenizers.load import load_tokenizer

    out = Path(args.out)
    if out.exists() and not (args.overwrite and (out / "samples.json").is_file()):
        raise FileExistsError(
            f"{out} exists; choose a new folder (or --overwrite to replace an earlier tokscale sample folder)"
        )
    if args.num < 1 or args.batch_size < 1:
        raise ValueError(f"--num and --batch-size must be >= 1, got {args.num} and {args.batch_size}")
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    gpt = load_gpt(args.gpt, device)
    tokenizer = load_tokenizer(args.tokenizer, device)
    check_pair(gpt.config, tokenizer, Path(args.gpt), args.tokenizer)
    if args.classes == "all":
        classes = list(range(gpt.config.num_classes))
    else:
        try:
            classes = [int(c) for c in args.classes.split(",") if c.strip()]
        except ValueError:
            raise ValueError(
                f"--classes {args.classes!r}: expected comma-separated integers or 'all'"
            ) from None
    bad = [c for c in classes if not 0 <= c < gpt.config.num_classes]
    if bad or not classes:
        raise ValueError(
            f"--classes {bad or args.classes}: expected indices in 0..{gpt.config.num_classes - 1}"
        )
    cfg = SampleConfig(
        cfg_scale=args.cfg_scale,
        cfg_schedule=args.cfg_schedule,
        cfg_start_ratio=args.cfg_start_ratio,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
    )
    labels = torch.tensor([c for c in classes for _ in range(args.num)])
    gen = torch.Generator(device=device).manual_seed(args.seed)
    tmp = out.with_name(out.name + ".tmp-sample")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    codes, images = [], []
    for part in labels.split(args.batch_size):
        c = generate(gpt, part.to(device), cfg, gen, use_cache=not args.no_cache)
        x = tokenizer.decode(c).clamp(-1, 1).cpu()
        for i in range(len(part)):
            index = len(codes) + i
            save_png(to_unit(x[i]), tmp / "images" / f"{index:06d}_class{int(part[i])}.png")
        codes.extend(c.cpu().tolist())
        images.append(x[: max(0, 64 - sum(len(t) for t in images))])
    save_png(make_grid(to_unit(torch.cat(images)), nrow=8, padding=0), tmp / "grid.png")
    settings = {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}
    record = {
        "gpt": str(Path(args.gpt).resolve()),
        "tokenizer": str(Path(args.tokenizer).resolve()),
        "seed": args.seed,
        "kv_cache": not args.no_cache,
        **settings,
        "labels": labels.tolist(),
        "codes": codes,
    }
    (tmp / "samples.json").write_text(json.dumps(record))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    print(json.dumps({"out": str(out), "samples": len(codes)}))
    return 0
