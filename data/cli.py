"""``tokscale data ...`` and ``tokscale bench data``.

tokscale data shards /data/imagenet/train /data/in1k/train --samples-per-shard 1000
tokscale data shards val_list.txt /data/in1k/val --prefix val
tokscale data verify /data/in1k/train --workers 8
tokscale data info /data/in1k/train
tokscale data embedded
tokscale bench data --num-images 384
"""

from __future__ import annotations

import argparse
import json
import logging

log = logging.getLogger(__name__)


def add_commands(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="datasets: image shards, the embedded dataset")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    shards = data_sub.add_parser(
        "shards",
        help="convert an image folder or file list into webdataset tar shards",
        description=(
            "Convert SRC into webdataset tar shards under OUT with a manifest.json (classes, count and sha256 "
            "per shard). SRC is a folder with one sub-folder per class (ImageNet layout; class index = sorted "
            "folder order) or a text file of 'PATH LABEL' lines (LABEL an index or a class name; relative paths "
            "are relative to the file). Images are stored as their original bytes. A rerun skips complete shards."
        ),
    )
    shards.add_argument("src", help="folder of class folders, or a file list")
    shards.add_argument("out", help="output folder for the shards and manifest.json")
    shards.add_argument("--samples-per-shard", type=int, default=1000, help="samples per tar (default 1000)")
    shards.add_argument("--prefix", default=None, help="shard name prefix (default: SRC's name)")
    shards.add_argument(
        "--jobs", type=int, default=None, help="parallel writer processes (default: CPU count)"
    )
    shards.add_argument(
        "--order",
        choices=("shuffle", "sorted"),
        default="shuffle",
        help="sample order across shards: seeded shuffle (mixes classes per shard; default) or sorted",
    )
    shards.add_argument("--seed", type=int, default=0, help="seed of the shuffled order (default 0)")
    shards.add_argument(
        "--max-bad-fraction",
        type=float,
        default=0.001,
        help="fail when more than this fraction of files are unreadable or not images (default 0.001)",
    )
    shards.add_argument(
        "--verify",
        choices=("full", "header"),
        default="full",
        help="check each image by decoding it fully (default) or by its header only (faster)",
    )
    shards.set_defaults(func=shards_command)

    verify = data_sub.add_parser(
        "verify",
        help="check shards against their manifest.json: size, sha256 and sample count (JSON)",
        description=(
            "Check every shard SHARDS names (a path, folder, brace pattern, glob or '::'-joined list, as the "
            "streams take) against the manifest.json that `tokscale data shards` wrote beside it: file size, "
            "sha256 and the number of samples with an image member. Missing shards, shards the manifest does "
            "not list and shards without a manifest are bad; remote shards (pipe:, URLs) are not checked. "
            "Prints one JSON object; exits 2 naming the first bad shard when any is bad."
        ),
    )
    verify.add_argument("shards", metavar="SHARDS", help="shard location, or 'embedded'")
    verify.add_argument(
        "--workers", type=int, default=None, help="shards checked in parallel (default: min(8, CPU count))"
    )
    verify.add_argument(
        "--json",
        action="store_true",
        help="machine mode: only the JSON object (no progress bar, no per-shard log lines on stderr)",
    )
    verify.set_defaults(func=verify_command)

    info = data_sub.add_parser(
        "info",
        help="print shard count, sample count and classes of a shard location as JSON",
        description="LOCATION is a folder, brace pattern, glob, pipe: command or URL (see data/README.md).",
    )
    info.add_argument("location", help="shard location, or 'embedded'")
    info.set_defaults(func=info_command)

    embedded = data_sub.add_parser(
        "embedded",
        help="build (once) the embedded default dataset and print where its shards are",
        description="Crops of scikit-image's bundled photographs, 10 classes, 1000 train and 200 eval images.",
    )
    embedded.add_argument("--cache-dir", default=None, help="default ~/.cache/tokscale")
    embedded.set_defaults(func=embedded_command)


def add_bench_commands(bench_sub: argparse._SubParsersAction) -> None:
    bench = bench_sub.add_parser(
        "data",
        help="images/s of the shard pipeline vs a one-file-per-image folder loader (JSON)",
        description=(
            "Decode + random crop + batch throughput from shards with 1 and 2 loader workers, and the same "
            "images through a plain folder loader with the same decode, printed as one JSON object."
        ),
    )
    bench.add_argument("--num-images", type=int, default=384, help="images per timed pass (default 384)")
    bench.add_argument("--resolution", type=int, default=256, help="crop size in pixels (default 256)")
    bench.add_argument("--batch-size", type=int, default=32, help="batch size (default 32)")
    bench.set_defaults(func=bench_command)


def shards_command(args: argparse.Namespace) -> int:
    from tokscale.data.shards import convert

    manifest = convert(
        args.src,
        args.out,
        samples_per_shard=args.samples_per_shard,
        prefix=args.prefix,
        jobs=args.jobs,
        shuffle=args.order == "shuffle",
        seed=args.seed,
        max_bad_fraction=args.max_bad_fraction,
        verify=args.verify,
    )
    print(
        json.dumps(
            {
                "out": args.out,
                "pattern": manifest["pattern"],
                "num_shards": len(manifest["shards"]),
                "num_samples": manifest["num_samples"],
                "num_classes": manifest["num_classes"],
                "num_bad_files": manifest["num_bad_files"],
            }
        )
    )
    return 0


def verify_command(args: argparse.Namespace) -> int:
    from tokscale.data.verify import VerifyConfig, verify_shards

    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers {args.workers}: expected at least 1")
    report = verify_shards(args.shards, VerifyConfig(workers=args.workers or 0, progress=not args.json))
    if not args.json:
        for item in report.bad:
            log.warning("bad shard %s", item.line())
    print(json.dumps(report.to_dict()), flush=True)
    if report.bad:
        # After the JSON, so scripts get the full list; the central handler prints this line and exits 2.
        raise ValueError(report.error_message())
    return 0


def info_command(args: argparse.Namespace) -> int:
    from tokscale.data.locations import manifest_classes, manifest_counts, resolve_shards

    urls = resolve_shards(args.location, "train")
    counts = manifest_counts(urls)
    classes = manifest_classes(urls)
    known = [c for c in counts if c is not None]
    print(
        json.dumps(
            {
                "num_shards": len(urls),
                "first_shard": urls[0],
                "num_samples": sum(known) if len(known) == len(counts) else None,
                "shards_without_manifest_count": len(counts) - len(known),
                "num_classes": len(classes) if classes is not None else None,
            }
        )
    )
    return 0


def embedded_command(args: argparse.Namespace) -> int:
    from tokscale.data.embedded import embedded_shards

    print(json.dumps({split: embedded_shards(args.cache_dir, split) for split in ("train", "eval")}))
    return 0


def bench_command(args: argparse.Namespace) -> int:
    from tokscale.data.bench import run

    print(json.dumps(run(args.num_images, args.resolution, args.batch_size)))
    return 0
