"""Training and evaluation streams over webdataset shards, for any number of ranks and loader workers.

    from tokscale.data.stream import DataConfig, TrainStream, EvalStream
    stream = TrainStream(DataConfig(train_shards="/data/in1k/train-{000000..001023}.tar"), rank, world_size)
    stream.load_state_dict(ckpt["data"])          # on resume, before iterating
    it = iter(stream)
    images, labels = next(it)                     # once per step; ckpt["data"] = stream.state_dict()

Guarantees (tested in tests/data/):

- Training: every rank yields exactly ``batches_per_epoch`` batches per epoch, forever, so no rank runs out
  before its peers. The stream is a pure function of (seed, world_size, num_workers, batch_size,
  batches_per_epoch, shards).
- Resume is exact at batch granularity: after ``load_state_dict(state)`` the stream yields the very batches
  (same images, same crops, same labels) the uninterrupted run would have yielded after the batch counted in
  ``state``, provided world size, num_workers, batch size, batches_per_epoch, seed and shards are unchanged.
  Resuming costs re-reading (not decoding) the current epoch's samples up to the position.
- Resuming with a different layout (world size, workers, batch size) keeps the batch count (so the epoch
  number and anything scheduled on it carry on) and continues with the new layout's deterministic stream from
  that batch; it does not try to avoid samples already seen (training samples shards with replacement anyway).
- Evaluation: each sample exactly once across all ranks and workers, no padding, in a stable order.
- Both refuse a local shard whose size differs from its manifest.json entry, with a ShardError naming the shard
  and both sizes, when the shard is opened (one stat, in the loader worker that opens it; ``ManifestCount``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from tokscale.data.locations import manifest_counts, resolve_shards
from tokscale.data.samples import ShardError, check_policy, iter_raw_samples
from tokscale.data.sampling import EvalRanges, TrainShards, split_range
from tokscale.data.transforms import CROPS, ImageTransform

log = logging.getLogger(__name__)

STATE_VERSION = 1


@dataclass
class DataConfig:
    train_shards: str = ""  # path / dir / brace pattern / glob / pipe: / http URL, '::'-joined; or "embedded"
    eval_shards: str = ""  # same; "embedded" = the embedded dataset's eval split
    resolution: int = 256
    # "random": short side to resolution*crop_ratio, random square | "random_resize": short side uniform in
    # [resolution, resolution*crop_ratio] (GigaTok: ratio 1.25, 256-320 px), random square | "adm_center"
    crop: str = "random"
    crop_ratio: float = 1.1
    hflip: bool = True
    batch_size: int = 32  # per rank
    num_workers: int = 2  # loader processes per rank; 0 decodes in the training process
    shuffle_buffer: int = 1000  # samples per worker
    seed: int = 0
    batches_per_epoch: int = 1000  # per rank, fixed so ranks never run out before peers
    bad_sample_policy: str = "error"  # "error" | "skip" (skips are counted and logged naming shard and key)
    cache_dir: str = ""  # where the embedded dataset is built ("" -> ~/.cache/tokscale)

    def __post_init__(self) -> None:
        if self.crop not in CROPS:
            raise ValueError(f"data.crop={self.crop!r}: expected one of {list(CROPS)}")
        check_policy(self.bad_sample_policy)
        for name in ("resolution", "batch_size", "batches_per_epoch"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name}={getattr(self, name)}: expected a positive integer")
        for name in ("num_workers", "shuffle_buffer", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"data.{name}={getattr(self, name)}: expected >= 0")
        if self.crop_ratio < 1.0:
            raise ValueError(f"data.crop_ratio={self.crop_ratio}: expected >= 1.0")


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank}, world_size={world_size}: expected 0 <= rank < world_size")


def _loader(dataset, num_workers: int) -> DataLoader:
    # batch_size=None: workers assemble whole batches, so a batch never mixes sub-streams.
    return DataLoader(
        dataset, batch_size=None, num_workers=num_workers, prefetch_factor=2 if num_workers else None
    )


class TrainStream:
    """Endless training batches: images float32 (B, 3, H, W) in [-1, 1], labels int64 (B,)."""

    def __init__(self, cfg: DataConfig, rank: int, world_size: int):
        _check_rank(rank, world_size)
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.urls = resolve_shards(cfg.train_shards, "train", cfg.cache_dir)
        self.counts = manifest_counts(self.urls)
        self.transform = ImageTransform(cfg.resolution, cfg.crop, cfg.crop_ratio, cfg.hflip)
        self.num_streams = max(1, cfg.num_workers)
        self.batches_consumed = 0
        self.num_skipped = 0  # bad samples and bad shards skipped under bad_sample_policy=skip
        self.resumed = False  # set by load_state_dict: the global RNG state restored beside it already drew

    @property
    def epoch(self) -> int:
        return self.batches_consumed // self.cfg.batches_per_epoch

    def _layout(self) -> dict:
        return {
            "world_size": self.world_size,
            "num_streams": self.num_streams,
            "batch_size": self.cfg.batch_size,
            "batches_per_epoch": self.cfg.batches_per_epoch,
            "seed": self.cfg.seed,
            "num_shards": len(self.urls),
        }

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "batches_consumed": self.batches_consumed,
            "epoch": self.epoch,
            "num_skipped": self.num_skipped,
            **self._layout(),
        }

    def load_state_dict(self, state: dict) -> None:
        if int(state.get("version", -1)) != STATE_VERSION:
            raise ValueError(
                f"data stream state has version {state.get('version')!r}; expected {STATE_VERSION}"
            )
        if "batches_consumed" not in state:
            raise ValueError("data stream state lacks 'batches_consumed'")
        changed = {k: (state.get(k), v) for k, v in self._layout().items() if state.get(k) != v}
        if changed:
            log.warning(
                "resuming the training stream with a different layout %s (saved, now): the batch count %d "
                "carries over, the data order from here on is the new layout's, not an exact continuation",
                changed,
                state["batches_consumed"],
            )
        self.batches_consumed = int(state["batches_consumed"])
        self.num_skipped = int(state.get("num_skipped", 0))
        self.resumed = True

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        cfg = self.cfg
        dataset = TrainShards(
            self.urls,
            self.counts,
            self.transform,
            batch_size=cfg.batch_size,
            shuffle_buffer=cfg.shuffle_buffer,
            seed=cfg.seed,
            batches_per_epoch=cfg.batches_per_epoch,
            rank=self.rank,
            world_size=self.world_size,
            num_streams=self.num_streams,
            start_batch=self.batches_consumed,
            policy=cfg.bad_sample_policy,
        )
        # A DataLoader iterator draws its base seed from torch's global CPU generator when it starts. A run starts
        # this endless one once, at its first batch, so the RNG state its checkpoints save already includes that
        # draw; a resumed run restores that state, and its iterator must not draw again, or every later draw of
        # the global generator (DetailFlow's prefix plans, DiffAug) would differ from the uninterrupted run's.
        rng = torch.get_rng_state() if self.resumed else None
        batches = iter(_loader(dataset, cfg.num_workers))
        if rng is not None:
            torch.set_rng_state(rng)
        for images, labels, num_skipped in batches:
            # Count before handing the batch out: a state_dict taken after next() includes this batch.
            self.batches_consumed += 1
            self.num_skipped += num_skipped
            yield images, labels


class EvalStream:
    """Each evaluation sample once across ranks and workers: (images ADM-centre-cropped in [-1, 1], labels, keys,
    indices), ``indices`` int64 the samples' positions in the shards' order (the same whatever the rank and
    worker count: what makes the Inception Score's splits depend on the images only)."""

    def __init__(self, cfg: DataConfig, rank: int, world_size: int, max_samples: int | None = None):
        _check_rank(rank, world_size)
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.urls = resolve_shards(cfg.eval_shards, "eval", cfg.cache_dir)
        self.check_counts = manifest_counts(self.urls)
        self._scan_skipped = 0
        self.counts = [
            c if c is not None else self._scan(url) for url, c in zip(self.urls, self.check_counts)
        ]
        total = sum(self.counts)
        if max_samples is not None:
            if max_samples < 0:
                raise ValueError(f"max_samples={max_samples}: expected >= 0 or None")
            total = min(total, max_samples)
        self.total = total
        self.range = split_range(0, total, world_size)[rank]
        self.worker_ranges = split_range(*self.range, max(1, cfg.num_workers))
        self.transform = ImageTransform(cfg.resolution, "adm_center", 1.0, hflip=False)
        self.num_skipped = 0

    def _scan(self, url: str) -> int:
        log.warning(
            "no manifest.json with a count for shard %s: counting its samples by reading it "
            "(write shards with `tokscale data shards` to avoid this)",
            url,
        )
        count = 0
        try:
            for _ in iter_raw_samples(url):
                count += 1
        except ShardError as err:
            if self.cfg.bad_sample_policy == "error":
                raise
            log.warning("bad_sample_policy=skip: only the first %d samples are readable: %s", count, err)
            self._scan_skipped += 1  # the readable head counts; the stream never reads past it
        return count

    def __len__(self) -> int:
        return self.range[1] - self.range[0]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str], torch.Tensor]]:
        dataset = EvalRanges(
            self.urls,
            self.counts,
            self.worker_ranges,
            self.transform,
            batch_size=self.cfg.batch_size,
            policy=self.cfg.bad_sample_policy,
            check_counts=self.check_counts,
        )
        self.num_skipped = self._scan_skipped
        for images, labels, keys, indices, num_skipped in _loader(dataset, self.cfg.num_workers):
            self.num_skipped += num_skipped
            if keys:
                yield images, labels, list(keys), indices
        if self.num_skipped:
            log.warning(
                "evaluation stream on rank %d skipped %d bad samples or shards", self.rank, self.num_skipped
            )
