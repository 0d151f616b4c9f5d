"""Code extraction: a tokenizer over image shards -> token shards (tokscale.data.tokens) for the AR trainers.

    tokscale extract runs/tok --data /data/in1k/train OUT --aug tencrop --batch-size 256 --nproc 8
    tokscale extract exports/2d-tiny --data embedded OUT --aug center_flip
    tokscale extract converted/gigatok-SS --data /data/in1k/train OUT --submit --nodes 4 --gpus-per-node 8
    python -m tokscale.tokenizers.extract OUT.extract-job/extract_config.yaml      # what every rank runs

Source shard i goes to rank i % world_size and becomes one token shard ``s{i:06d}-000000.tar`` with its own
``manifest-s{i:06d}.json``, written last (the tar through a temporary name and a rename): a shard with its
manifest is finished. The shards are made in the work folder ``OUT.extract-job/shards/`` (beside the config,
the logs and a Slurm job's files); a rerun (after a crash, a preemption, a requeue) skips finished shards and
redoes the rest, so every image is stored exactly once whatever happened. At the end rank 0 merges the manifests
into ``manifest.json``, which also names the tokenizer (its path and the sha256 of its model config), the
augmentation and the resolution, and moves the folder into ``OUT`` (tokscale.outputs): ``OUT`` appears whole,
a previous extraction there is replaced, and a folder with other files is refused before anything runs
(``overwrite`` writes into it and keeps them).

Augmentations (``aug``): each image is stored once, as the codes of all its crops stacked in this order,
(num_augs, num_tokens) (the shards' ``num_augs``):

- ``center``: the ADM centre crop at the tokenizer's resolution (1 augmentation);
- ``center_flip``: that crop and its horizontal flip (2);
- ``tencrop`` (LlamaGen's and GigaTok's extraction): the ADM centre crop at ``round(1.1 x resolution)``, then the
  centre and the four corner crops at the resolution, then the same five flipped (10). Augmentation 0 is the
  centre.

Images are encoded in batches of ``batch_size`` crops (the references encode one image at a time; ``tokscale
bench extract`` measures the difference).

A DetailFlow tokenizer trained with self-correction (``model.detailflow``) stores three token streams per crop,
in the shard's token axis one after the other (stream-major): tokens.npy is (count, num_augs, 3 x N) and
``tokens.reshape(count, num_augs, 3, N)[:, :, s]`` is stream s of ``streams`` = clean, input, label
(tokscale.tokenizers.detailflow.encode_streams: the clean codes; the AR input with one corrupted span and the tail
re-encoded after it; the AR label, clean up to the span's end, then the re-encoded tail). The shards' num_tokens is
3 x N; ``manifest.json`` adds ``streams`` (the names, in order) and ``stream_tokens`` (N). Each image's span and
corrupted codes are drawn from a generator seeded by its sample key (all its crops share the span), so a rerun or
another batch size stores the same codes. Without correction it stores the clean codes only (``streams`` =
[clean], the usual layout).

A multi-scale tokenizer (``model.quantizer.kind: multiscale``) stores its codes as one flat sequence per crop, the
scales' index maps coarse to fine, each row-major (L = sum of the scales' squares, 680 for VAR's scales);
``manifest.json`` adds ``scales`` and ``scale_boundaries`` ([0, 1, 5, ..., L]: scale k is
``tokens[..., b[k]:b[k + 1]]``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

AUGS = {"center": 1, "center_flip": 2, "tencrop": 10}
CONFIG_NAME = "extract_config.yaml"
JOB_SUFFIX = ".extract-job"
OUTPUT_KIND = "token-shards"
TENCROP_RATIO = 1.1


@dataclass
class ExtractConfig:
    tokenizer: str = ""  # a run directory, an export, or a converted GigaTok checkpoint folder
    data: str = ""  # image shards (a pattern, brace range, folder) or "embedded" (its train split)
    out: str = ""  # the token shards' folder
    aug: str = "tencrop"  # center | center_flip | tencrop
    batch_size: int = 64  # crops per tokenizer forward
    tokenizer_id: str = ""  # the name the shards carry ("" = folder name + config hash)
    split: str = "train"  # which split of "embedded"
    verify_weights: bool = True
    progress: bool = True

    overwrite: bool = False  # write into an `out` that holds other files (they are kept)

    @property
    def job_dir(self) -> Path:  # the config, logs, Slurm files and the shards being made
        return Path(self.out).with_name(Path(self.out).name + JOB_SUFFIX)

    @property
    def work(self) -> Path:  # becomes `out` when every shard is finished
        return self.job_dir / "shards"

    @property
    def run_dir(self) -> str:  # where a submitted job keeps its Slurm logs (tokscale.jobs)
        return str(self.job_dir)

    def __post_init__(self):
        if not self.tokenizer:
            raise ValueError("tokenizer is empty: expected a run directory or an exported tokenizer")
        if not self.data:
            raise ValueError("data is empty: expected image shards (or 'embedded')")
        if not self.out:
            raise ValueError("out is empty: expected the folder for the token shards")
        if self.aug not in AUGS:
            raise ValueError(f"aug={self.aug!r}: expected one of {sorted(AUGS)}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


def load_config(path, overrides=()) -> ExtractConfig:
    from tokscale.config import load_config as load

    return load(ExtractConfig, path, list(overrides))


def write_config(cfg: ExtractConfig) -> Path:
    """Before any process starts: refuse an ``out`` in the way, write the config every rank reads."""
    from tokscale.config import to_yaml
    from tokscale.outputs import check_target

    check_target(Path(cfg.out), OUTPUT_KIND, cfg.overwrite)
    cfg.work.mkdir(parents=True, exist_ok=True)
    path = cfg.job_dir / CONFIG_NAME
    path.write_text(to_yaml(cfg))
    return path


def _publish(cfg: ExtractConfig) -> None:
    """Rank 0, every shard finished: move the shards and manifests into ``out`` whole, drop the work folder
    unless it keeps logs."""
    import os
    import shutil

    from tokscale.outputs import output_folder

    with output_folder(cfg.out, OUTPUT_KIND, cfg.overwrite) as tmp:
        for item in cfg.work.iterdir():
            os.replace(item, tmp / item.name)
        if (cfg.job_dir / CONFIG_NAME).is_file():  # absent when main() was called without write_config()
            shutil.copy2(cfg.job_dir / CONFIG_NAME, tmp / CONFIG_NAME)
    cfg.work.rmdir()
    (cfg.job_dir / CONFIG_NAME).unlink(missing_ok=True)
    try:
        cfg.job_dir.rmdir()  # kept when it holds a Slurm job's logs or a failure's
    except OSError:
        pass


def crops(img, resolution: int, aug: str) -> list[np.ndarray]:
    """uint8 HWC crops of one image, in augmentation order (axis 1 of the stored tokens)."""
    from tokscale.data.transforms import adm_center_crop

    if aug in ("center", "center_flip"):
        base = adm_center_crop(img, resolution)
        return [base] if aug == "center" else [base, base[:, ::-1]]
    big = adm_center_crop(img, round(resolution * TENCROP_RATIO))
    h, w = big.shape[:2]
    r = resolution
    c_top, c_left = (h - r) // 2, (w - r) // 2
    corners = [(c_top, c_left), (0, 0), (0, w - r), (h - r, 0), (h - r, w - r)]
    five = [big[t : t + r, left : left + r] for t, left in corners]
    return five + [c[:, ::-1] for c in five]


def tokenizer_identity(path: str) -> tuple[str, str]:
    """(default tokenizer_id, sha256 of the tokenizer's resolved model config)."""
    from tokscale.config import to_yaml
    from tokscale.tokenizers.load import model_config_from

    digest = hashlib.sha256(to_yaml(model_config_from(path)).encode()).hexdigest()
    return f"{Path(path).resolve().name}-{digest[:8]}", digest


def _done(out: Path, prefix: str) -> bool:
    """Whether the shard is finished: its manifest is there, in the current token format (an older one, e.g.
    tokscale-tokens/1 with one row per augmentation, is extracted again)."""
    from tokscale.data.tokens import FORMAT

    try:
        return json.loads((out / f"manifest-{prefix}.json").read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def _streams(model) -> list[str]:
    """The token streams stored per crop: DetailFlow's three with self-correction, else the codes alone."""
    from tokscale.tokenizers.detailflow import STREAMS

    d = model.config.detailflow
    return list(STREAMS) if d.enabled and d.correction else ["clean"]


def _key_seed(key: str) -> int:
    """A generator seed from a sample key (stable across runs, ranks and batchings)."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:15], 16)


def extract_shard(
    model, url: str, out: Path, prefix: str, cfg: ExtractConfig, ident: str, device, bar=None
) -> int:
    """Encode every image of one source shard into ``out/{prefix}-000000.tar``; returns the image count."""
    import torch

    from tokscale.data.samples import decode_image, iter_raw_samples, sample_label
    from tokscale.data.tokens import TokenShardWriter
    from tokscale.data.transforms import to_tensor
    from tokscale.tokenizers.detailflow import encode_streams

    res, n_aug = model.image_size, AUGS[cfg.aug]
    streams = _streams(model)
    writer = TokenShardWriter(
        out,
        ident,
        model.codebook_size,
        model.num_tokens * len(streams),
        num_augs=n_aug,
        samples_per_shard=1 << 30,
        prefix=prefix,
    )
    pending: list[tuple[str, int, torch.Tensor]] = []  # (key, label, crops (n_aug, 3, H, W))

    def flush():
        if not pending:
            return
        batch = torch.cat([c for _, _, c in pending]).to(device)
        if len(streams) > 1:  # DetailFlow: (crops, 3, N) -> (crops, 3 N), stream-major; one seed per image
            seeds = torch.tensor([_key_seed(key) for key, _, _ in pending]).repeat_interleave(n_aug)
            parts = zip(batch.split(cfg.batch_size), seeds.split(cfg.batch_size))
            codes = torch.cat(
                [encode_streams(model, part, sd.tolist()).flatten(1) for part, sd in parts]
            ).cpu()
        else:
            codes = torch.cat([model.encode(part) for part in batch.split(cfg.batch_size)]).cpu()
        codes = codes.reshape(len(pending), n_aug, -1)  # image i's crops, in augmentation order
        for (key, label, _), image_codes in zip(pending, codes):
            writer.write(key, image_codes, label)
        if bar is not None:
            bar.update(len(pending))
        pending.clear()

    images = 0
    for sample in iter_raw_samples(url):
        img = decode_image(sample)
        tensors = torch.stack([to_tensor(np.ascontiguousarray(c)) for c in crops(img, res, cfg.aug)])
        pending.append((sample.key, sample_label(sample), tensors))
        images += 1
        if len(pending) * n_aug >= cfg.batch_size:
            flush()
    flush()
    writer.close()  # the tar, then its manifest: from here the shard counts as finished
    return images


def main(cfg: ExtractConfig, should_stop=None) -> dict:
    """Run this rank's share; rank 0 merges the manifests when every rank is done."""
    import torch

    from tokscale.data.locations import resolve_shards
    from tokscale.data.tokens import merge_manifests
    from tokscale.distributed import barrier, init_distributed
    from tokscale.tokenizers.load import load_tokenizer

    info = init_distributed()
    out = cfg.work
    out.mkdir(parents=True, exist_ok=True)
    urls = resolve_shards(cfg.data, cfg.split)
    default_id, config_hash = tokenizer_identity(cfg.tokenizer)
    ident = cfg.tokenizer_id or default_id
    mine = [(i, u) for i, u in enumerate(urls) if i % info.world_size == info.rank]
    # a crashed writer's partial tar of one of this rank's shards (never renamed into place)
    for i, _ in mine:
        for stale in out.glob(f"s{i:06d}-*.tar.tmp-*"):
            stale.unlink(missing_ok=True)
    todo = [(i, u) for i, u in mine if not _done(out, f"s{i:06d}")]
    log.info(
        "rank %d: %d of its %d shards to extract (%d finished before)",
        info.rank,
        len(todo),
        len(mine),
        len(mine) - len(todo),
    )
    model = load_tokenizer(cfg.tokenizer, device=info.device, verify=cfg.verify_weights)
    bar = None
    if cfg.progress and info.rank == 0 and todo:
        from tqdm import tqdm

        bar = tqdm(desc="extract", unit="img", dynamic_ncols=True)
    images = 0
    with torch.inference_mode():
        for i, url in todo:
            images += extract_shard(model, url, out, f"s{i:06d}", cfg, ident, info.device, bar)
            if should_stop is not None and should_stop():
                return {"status": "stopped", "images": images}
    if bar is not None:
        bar.close()
    barrier()
    result = {"status": "finished", "images": images}
    if info.rank == 0:
        stray = sorted(p.name for p in out.glob("manifest-s*.json") if int(p.name[10:16]) >= len(urls))
        if stray:
            raise ValueError(
                f"{out}: manifests {stray} belong to source shards this run does not have ({len(urls)} "
                f"shards in {cfg.data}); extract into an empty folder"
            )
        merged = merge_manifests(out)
        merged.update(
            tokenizer=str(Path(cfg.tokenizer).resolve()),
            tokenizer_config_sha256=config_hash,
            augmentation=cfg.aug,  # num_augs (from the shards) is its crop count
            resolution=model.image_size,
            source=cfg.data,
        )
        if model.config.detailflow.enabled:  # the token axis holds these streams one after the other
            merged.update(streams=_streams(model), stream_tokens=model.num_tokens)
        if model.config.quantizer.kind == "multiscale":  # one flat sequence, the scales coarse to fine
            merged.update(scales=list(model.quantizer.scales), scale_boundaries=model.quantizer.scale_boundaries)
        (out / "manifest.json").write_text(json.dumps(merged, indent=1))
        _publish(cfg)
        result.update(num_samples=merged["num_samples"], tokenizer_id=ident, out=cfg.out)
    return result


if __name__ == "__main__":  # python -m tokscale.tokenizers.extract EXTRACT.yaml [OVERRIDES...]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from tokscale.shutdown import finish

    main(load_config(sys.argv[1], sys.argv[2:]))
    finish(0)
