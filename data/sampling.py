"""What each loader worker does: which shards it reads, in which order, and how it cuts batches.

Training (``TrainShards``). Every rank runs ``S = max(1, num_workers)`` sub-streams; batch ``g`` of a rank
(counted from the start of training) comes from sub-stream ``g % S``. The global sub-stream id is
``q = rank * S + s`` out of ``Q = world_size * S``. In epoch ``e`` sub-stream ``q`` reads shards
``order[q], order[q + Q], order[q + 2Q], ...`` where ``order`` is the concatenation of seeded permutations of
all shards (one per pass), so within a pass the sub-streams read different shards and every shard is read
before any is read twice; a stream never runs dry (the order is endless), so every rank has the same
``batches_per_epoch`` batches and no collective waits on a rank that ran out. Samples go through a seeded
shuffle buffer; the crop and flip of a sample are seeded by its ordinal in the epoch's sub-stream. Everything
restarts from fresh seeds at each epoch, so resuming at batch ``g`` only replays the current epoch, and the
replay reads raw bytes without decoding.

Evaluation (``EvalRanges``). Global sample indices (shard order, then tar order) are cut into one contiguous
range per rank and, inside a rank, per worker: each sample belongs to exactly one range, nothing is padded,
and a worker with an empty range (more workers than samples or shards) yields nothing instead of failing.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from tokscale.data.samples import (
    BadSampleError,
    RawSample,
    ShardError,
    decode_image,
    iter_raw_samples,
    sample_label,
)
from tokscale.data.transforms import ImageTransform

log = logging.getLogger(__name__)

# Distinct seed streams for the three random choices, so changing one never shifts another.
_SHARD_ORDER, _SHUFFLE, _AUGMENT = 1, 2, 3


def derive_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0])


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def split_range(lo: int, hi: int, parts: int) -> list[tuple[int, int]]:
    """[lo, hi) cut into ``parts`` contiguous pieces whose sizes differ by at most one."""
    n = hi - lo
    return [(lo + n * i // parts, lo + n * (i + 1) // parts) for i in range(parts)]


def stack_batch(images: list[torch.Tensor], labels: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64)


class TrainShards(IterableDataset):
    """Endless batches for one rank's loader worker, starting at the rank's batch ``start_batch``."""

    def __init__(
        self,
        urls: list[str],
        counts: list[int | None],
        transform: ImageTransform,
        *,
        batch_size: int,
        shuffle_buffer: int,
        seed: int,
        batches_per_epoch: int,
        rank: int,
        world_size: int,
        num_streams: int,
        start_batch: int,
        policy: str,
    ):
        self.urls, self.counts, self.transform = urls, counts, transform
        self.batch_size, self.shuffle_buffer, self.seed = batch_size, shuffle_buffer, seed
        self.batches_per_epoch, self.rank, self.world_size = batches_per_epoch, rank, world_size
        self.num_streams, self.start_batch, self.policy = num_streams, start_batch, policy

    # -- the order of shards and samples ------------------------------------------------------------------
    def shard_order(self, epoch: int, stream: int) -> Iterator[int]:
        n = len(self.urls)
        q = self.rank * self.num_streams + stream
        total = self.world_size * self.num_streams
        perm_round, perm = -1, []
        i = q
        while True:
            if i // n != perm_round:
                perm_round = i // n
                perm = list(range(n))
                random.Random(derive_seed(self.seed, _SHARD_ORDER, epoch, perm_round)).shuffle(perm)
            yield perm[i % n]
            i += total

    def raw_samples(self, epoch: int, stream: int) -> Iterator[RawSample]:
        empty_in_a_row = 0
        for idx in self.shard_order(epoch, stream):
            got = 0
            try:
                for raw in iter_raw_samples(self.urls[idx], self.counts[idx]):
                    got += 1
                    yield raw
            except ShardError as err:
                if self.policy == "error":
                    raise
                log.warning("bad_sample_policy=skip: skipping the rest of a shard: %s", err)
                self._skipped += 1
            empty_in_a_row = 0 if got else empty_in_a_row + 1
            if empty_in_a_row >= len(self.urls):
                raise ShardError(
                    f"{len(self.urls)} shards in a row yielded no sample (first shard {self.urls[0]}): "
                    f"every shard is empty or unreadable"
                )

    def shuffled(self, epoch: int, stream: int) -> Iterator[RawSample]:
        source = self.raw_samples(epoch, stream)
        if self.shuffle_buffer <= 1:
            yield from source
            return
        rng = random.Random(
            derive_seed(self.seed, _SHUFFLE, epoch, self.rank, stream, self.world_size, self.num_streams)
        )
        buffer: list[RawSample] = []
        for raw in source:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(raw)
                continue
            i = rng.randrange(len(buffer))
            buffer[i], raw = raw, buffer[i]
            yield raw

    def first_batch_of_stream(self, epoch: int, stream: int) -> int:
        """The first batch index of ``epoch`` that sub-stream ``stream`` produces."""
        start = epoch * self.batches_per_epoch
        return start + (stream - start) % self.num_streams

    # -- batches -------------------------------------------------------------------------------------------
    def decode(self, raw: RawSample, epoch: int, stream: int, ordinal: int) -> tuple[torch.Tensor, int]:
        rng = random.Random(
            derive_seed(
                self.seed, _AUGMENT, epoch, self.rank, stream, self.world_size, self.num_streams, ordinal
            )
        )
        label = sample_label(raw)
        return self.transform(decode_image(raw), rng), label

    def make_batch(self, raws: list[RawSample], epoch: int, stream: int, first_ordinal: int):
        images: list[torch.Tensor | None] = []
        labels: list[int | None] = []
        num_bad, self._skipped = self._skipped, 0
        for i, raw in enumerate(raws):
            try:
                image, label = self.decode(raw, epoch, stream, first_ordinal + i)
            except BadSampleError as err:
                if self.policy == "error":
                    raise
                log.warning("bad_sample_policy=skip: skipping %s", err)
                num_bad += 1
                image, label = None, None
            images.append(image)
            labels.append(label)
        if any(im is None for im in images):
            good = [i for i, im in enumerate(images) if im is not None]
            if not good:
                raise BadSampleError(
                    f"every sample of a batch is bad (first: shard {raws[0].shard} key {raws[0].key!r})"
                )
            # A skipped sample's slot takes a good sample of the same batch: the batch keeps its size and the
            # position in the raw stream stays a pure function of the batch index, so resume stays exact.
            for i in range(len(images)):
                if images[i] is None:
                    src = good[i % len(good)]
                    images[i], labels[i] = images[src], labels[src]
        return (*stack_batch(images, labels), num_bad)

    def __iter__(self):
        worker_id, num_workers = _worker()
        assert num_workers == self.num_streams or self.num_streams == 1, (num_workers, self.num_streams)
        # The DataLoader asks its workers round-robin starting from worker 0, but the rank's next batch may
        # belong to any sub-stream: worker w produces batches start + w, start + w + S, ...
        g = self.start_batch + worker_id
        stream = g % self.num_streams
        epoch, samples, consumed = -1, None, 0
        self._skipped = 0  # skip events (bad samples and bad shards) not yet reported with a batch
        while True:
            e = g // self.batches_per_epoch
            if e != epoch:
                epoch, samples, consumed = e, self.shuffled(e, stream), 0
            j = (g - self.first_batch_of_stream(e, stream)) // self.num_streams
            for _ in range(j * self.batch_size - consumed):  # resume: replay raw samples, no decoding
                next(samples)
            consumed = j * self.batch_size
            raws = [next(samples) for _ in range(self.batch_size)]
            batch = self.make_batch(raws, e, stream, consumed)
            consumed += self.batch_size
            yield batch
            g += self.num_streams


class EvalRanges(IterableDataset):
    """One rank's evaluation samples: worker w reads global indices ``ranges[w]`` and yields them in order,
    in batches ``(images, labels, keys, global indices int64, skipped)``."""

    def __init__(
        self,
        urls: list[str],
        counts: list[int],
        ranges: list[tuple[int, int]],
        transform: ImageTransform,
        *,
        batch_size: int,
        policy: str,
        check_counts: list[int | None],
    ):
        self.urls, self.counts, self.ranges, self.transform = urls, counts, ranges, transform
        self.batch_size, self.policy, self.check_counts = batch_size, policy, check_counts

    def samples(self, lo: int, hi: int) -> Iterator[tuple[int, RawSample]]:
        offset = 0
        for url, count, check in zip(self.urls, self.counts, self.check_counts):
            if offset >= hi:
                return
            if offset + count > lo:
                try:
                    for i, raw in enumerate(iter_raw_samples(url, check)):
                        if offset + i >= hi or i >= count:  # beyond count: the unreadable tail a scan found
                            break
                        if offset + i >= lo:
                            yield offset + i, raw
                except ShardError as err:
                    if self.policy == "error":
                        raise
                    log.warning("bad_sample_policy=skip: skipping the rest of a shard: %s", err)
                    self._skipped += 1
            offset += count

    def __iter__(self):
        worker_id, num_workers = _worker()
        assert num_workers == len(self.ranges), (num_workers, len(self.ranges))
        lo, hi = self.ranges[worker_id]
        if lo >= hi:
            return
        images, labels, keys, indices, self._skipped = [], [], [], [], 0
        for index, raw in self.samples(lo, hi):
            try:
                label = sample_label(raw)
                image = self.transform(decode_image(raw))
            except BadSampleError as err:
                if self.policy == "error":
                    raise
                log.warning("bad_sample_policy=skip: skipping %s", err)
                self._skipped += 1
                continue
            images.append(image)
            labels.append(label)
            keys.append(raw.key)
            indices.append(index)
            if len(images) == self.batch_size:
                yield (*stack_batch(images, labels), keys, torch.tensor(indices), self._skipped)
                images, labels, keys, indices, self._skipped = [], [], [], [], 0
        if images:
            yield (*stack_batch(images, labels), keys, torch.tensor(indices), self._skipped)
        elif self._skipped:  # only skips left to report: an empty batch the stream drops after counting
            yield (torch.empty(0), torch.empty(0, dtype=torch.int64), [], self._skipped)
