"""Token shards: what code extraction writes and the autoregressive trainers read.

One shard is a tar (so it travels over the same paths, ``pipe:`` commands and URLs as image shards) of five
members covering up to ``samples_per_shard`` samples:

- ``meta.json``: format, tokenizer_id, codebook_size, num_tokens, count, token dtype;
- ``tokens.npy``: (count, num_tokens), uint16 when codebook_size <= 65536 (half the bytes of int32), else int32;
- ``labels.npy``: (count,) int32 class indices;
- ``aug_ids.npy``: (count,) int16: which crop / flip / augmentation of the source image (0..9 for ten-crop);
- ``keys.json``: the source sample keys.

A writer closes with ``manifest-<prefix>.json``; ``merge_manifests(out_dir)`` (rank 0, after every rank
closed) combines them into ``manifest.json``. Readers check every shard's tokenizer_id and codebook_size
against what the caller expects, so codes of one tokenizer never train an AR model meant for another.

    writer = TokenShardWriter(out, "vq2d-SS.in1k", codebook_size=16384, num_tokens=256, prefix=f"r{rank:03d}")
    writer.write(key, codes, label, aug_id); writer.close()
    for tokens, label, aug_id in token_stream(f"{out}/*.tar", tokenizer_id="vq2d-SS.in1k", codebook_size=16384):
        ...
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import random
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from tokscale.data.locations import expand_shards
from tokscale.data.samples import ShardError, open_shard

FORMAT = "tokscale-tokens/1"
MEMBERS = ("meta.json", "tokens.npy", "labels.npy", "aug_ids.npy", "keys.json")


def token_dtype(codebook_size: int) -> np.dtype:
    return np.dtype(np.uint16) if codebook_size <= 65536 else np.dtype(np.int32)


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


class TokenShardWriter:
    def __init__(
        self,
        out_dir: str | os.PathLike,
        tokenizer_id: str,
        codebook_size: int,
        num_tokens: int,
        samples_per_shard: int = 10000,
        prefix: str = "tokens",
    ):
        if not tokenizer_id:
            raise ValueError(
                "tokenizer_id is empty: name the tokenizer the codes come from (e.g. its weights tag)"
            )
        if codebook_size < 1 or num_tokens < 1 or samples_per_shard < 1:
            raise ValueError(
                f"codebook_size={codebook_size}, num_tokens={num_tokens}, samples_per_shard={samples_per_shard}: "
                f"expected positive integers"
            )
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.tokenizer_id, self.codebook_size, self.num_tokens = tokenizer_id, codebook_size, num_tokens
        self.samples_per_shard, self.prefix = samples_per_shard, prefix
        self.dtype = token_dtype(codebook_size)
        self.shards: list[dict] = []
        self._reset()

    def _reset(self) -> None:
        self._tokens: list[np.ndarray] = []
        self._labels: list[int] = []
        self._aug: list[int] = []
        self._keys: list[str] = []

    def write(self, key: str, tokens, label: int, aug_id: int = 0) -> None:
        arr = tokens.detach().cpu().numpy() if isinstance(tokens, torch.Tensor) else np.asarray(tokens)
        arr = arr.reshape(-1)
        if arr.shape[0] != self.num_tokens:
            raise ValueError(f"sample {key!r}: {arr.shape[0]} tokens, expected num_tokens={self.num_tokens}")
        if arr.size and (arr.min() < 0 or arr.max() >= self.codebook_size):
            raise ValueError(
                f"sample {key!r}: token ids span [{arr.min()}, {arr.max()}], outside codebook_size={self.codebook_size}"
            )
        self._tokens.append(arr.astype(self.dtype))
        self._labels.append(int(label))
        self._aug.append(int(aug_id))
        self._keys.append(str(key))
        if len(self._keys) >= self.samples_per_shard:
            self._flush()

    def _flush(self) -> None:
        if not self._keys:
            return
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        meta = {
            "format": FORMAT,
            "tokenizer_id": self.tokenizer_id,
            "codebook_size": self.codebook_size,
            "num_tokens": self.num_tokens,
            "count": len(self._keys),
            "dtype": self.dtype.name,
        }
        members = {
            "meta.json": json.dumps(meta).encode(),
            "tokens.npy": _npy_bytes(np.stack(self._tokens)),
            "labels.npy": _npy_bytes(np.asarray(self._labels, dtype=np.int32)),
            "aug_ids.npy": _npy_bytes(np.asarray(self._aug, dtype=np.int16)),
            "keys.json": json.dumps(self._keys).encode(),
        }
        final = self.out_dir / name
        tmp = self.out_dir / f"{name}.tmp-{os.getpid()}"
        with tarfile.open(tmp, "w") as tar:
            for member, data in members.items():
                info = tarfile.TarInfo(member)
                info.size, info.mode, info.mtime = len(data), 0o444, 0
                tar.addfile(info, io.BytesIO(data))
        sha = hashlib.sha256(tmp.read_bytes()).hexdigest()
        os.replace(tmp, final)
        self.shards.append({"name": name, "count": len(self._keys), "sha256": sha})
        self._reset()

    def close(self) -> dict:
        """Flush the last shard and write ``manifest-<prefix>.json``; returns it."""
        self._flush()
        manifest = {
            "format": FORMAT,
            "tokenizer_id": self.tokenizer_id,
            "codebook_size": self.codebook_size,
            "num_tokens": self.num_tokens,
            "num_samples": sum(s["count"] for s in self.shards),
            "shards": self.shards,
        }
        path = self.out_dir / f"manifest-{self.prefix}.json"
        path.write_text(json.dumps(manifest, indent=1))
        return manifest

    def __enter__(self) -> TokenShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def merge_manifests(out_dir: str | os.PathLike) -> dict:
    """Combine every writer's ``manifest-*.json`` in out_dir into ``manifest.json`` (checks they agree)."""
    parts = [
        json.loads(Path(p).read_text()) for p in sorted(glob.glob(os.path.join(out_dir, "manifest-*.json")))
    ]
    if not parts:
        raise FileNotFoundError(f"{out_dir}: no manifest-*.json; did every TokenShardWriter call close()?")
    ident = {k: parts[0][k] for k in ("tokenizer_id", "codebook_size", "num_tokens")}
    for p in parts[1:]:
        other = {k: p[k] for k in ident}
        if other != ident:
            raise ValueError(f"{out_dir}: token shards from different tokenizers: {ident} vs {other}")
    merged = {"format": FORMAT, **ident, "num_samples": sum(p["num_samples"] for p in parts)}
    merged["shards"] = [s for p in parts for s in p["shards"]]
    Path(out_dir, "manifest.json").write_text(json.dumps(merged, indent=1))
    return merged


class TokenShardReader:
    """One token shard in memory; verifies the tokenizer identity and codebook size when given."""

    def __init__(self, url: str, tokenizer_id: str | None = None, codebook_size: int | None = None):
        self.url = url
        members: dict[str, bytes] = {}
        try:
            with open_shard(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
                for m in tar:
                    if m.isfile() and m.name in MEMBERS:
                        members[m.name] = tar.extractfile(m).read()
        except (tarfile.TarError, OSError, EOFError) as err:
            raise ShardError(
                f"token shard {url}: truncated or corrupt tar ({type(err).__name__}: {err})"
            ) from err
        missing = [m for m in MEMBERS if m not in members]
        if missing:
            raise ShardError(f"token shard {url}: missing members {missing}; is it a token shard?")
        self.meta = json.loads(members["meta.json"])
        if self.meta.get("format") != FORMAT:
            raise ShardError(f"token shard {url}: format {self.meta.get('format')!r}, expected {FORMAT!r}")
        for name, want in (("tokenizer_id", tokenizer_id), ("codebook_size", codebook_size)):
            if want is not None and self.meta[name] != want:
                raise ValueError(f"token shard {url}: {name} is {self.meta[name]!r}, expected {want!r}")
        self.tokens = np.load(io.BytesIO(members["tokens.npy"]), allow_pickle=False)
        self.labels = np.load(io.BytesIO(members["labels.npy"]), allow_pickle=False)
        self.aug_ids = np.load(io.BytesIO(members["aug_ids.npy"]), allow_pickle=False)
        self.keys = json.loads(members["keys.json"])
        n = self.meta["count"]
        shapes = (self.tokens.shape, self.labels.shape, self.aug_ids.shape, len(self.keys))
        if shapes != ((n, self.meta["num_tokens"]), (n,), (n,), n):
            raise ShardError(f"token shard {url}: array shapes {shapes} disagree with count={n}")

    @property
    def codebook_size(self) -> int:
        return int(self.meta["codebook_size"])

    @property
    def tokenizer_id(self) -> str:
        return str(self.meta["tokenizer_id"])

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        return torch.from_numpy(self.tokens[i].astype(np.int64)), int(self.labels[i]), int(self.aug_ids[i])


def token_stream(
    pattern: str,
    *,
    tokenizer_id: str | None = None,
    codebook_size: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    seed: int | None = None,
) -> Iterator[tuple[torch.Tensor, int, int]]:
    """(tokens int64 (num_tokens,), label, aug_id) for this rank: global sample i goes to rank i % world_size.

    ``seed`` shuffles the shard order and the order inside each shard (the same on every rank, so the split
    stays exact); None keeps the written order.
    """
    urls = expand_shards(pattern)
    rng = random.Random(seed) if seed is not None else None
    if rng:
        rng.shuffle(urls)
    i = 0
    for url in urls:
        shard = TokenShardReader(url, tokenizer_id, codebook_size)
        order = list(range(len(shard)))
        if rng:
            rng.shuffle(order)
        for j in order:
            if i % world_size == rank:
                yield shard[j]
            i += 1


def load_tokens(
    pattern: str, *, tokenizer_id: str | None = None, codebook_size: int | None = None
) -> dict[str, torch.Tensor | list[str]]:
    """Every shard in memory: tokens int64 (N, L), labels int64 (N,), aug_ids int64 (N,), keys."""
    shards = [TokenShardReader(u, tokenizer_id, codebook_size) for u in expand_shards(pattern)]
    ids = {(s.tokenizer_id, s.codebook_size) for s in shards}
    if len(ids) > 1:
        raise ValueError(f"{pattern}: token shards from different tokenizers {sorted(ids)}")
    return {
        "tokens": torch.from_numpy(np.concatenate([s.tokens for s in shards]).astype(np.int64)),
        "labels": torch.from_numpy(np.concatenate([s.labels for s in shards]).astype(np.int64)),
        "aug_ids": torch.from_numpy(np.concatenate([s.aug_ids for s in shards]).astype(np.int64)),
        "keys": [k for s in shards for k in s.keys],
    }


class TokenTrainStream:
    """Endless training batches ``(tokens int64 (B, T), labels int64 (B,))`` from token shards, for rank ``rank``.

    Epoch e draws, from a generator seeded with ``(seed, e)``, an order of the source images and one of each
    image's stored augmentations (ten-crop with flips gives ten rows per image, under one key): every epoch sees
    every image once, in one random augmentation. Global batch b of the epoch is the slice [b*B*W, (b+1)*B*W) of
    that order and rank r takes its r-th part, so ranks never overlap. The position is the number of batches
    handed out: ``state_dict`` / ``load_state_dict`` resume exactly. Incomplete last global batches are dropped.
    The shards are held in memory (uint16 codes: 1.28M images x 10 crops x 256 tokens is 6.6 GB).
    """

    def __init__(
        self,
        pattern: str,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        tokenizer_id: str | None = None,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        shards = [TokenShardReader(u, tokenizer_id) for u in expand_shards(pattern)]
        ids = {(s.tokenizer_id, s.codebook_size, int(s.meta["num_tokens"])) for s in shards}
        if len(ids) > 1:
            raise ValueError(f"{pattern}: token shards from different tokenizers {sorted(ids)}")
        self.meta = dict(shards[0].meta)
        self.tokens = np.concatenate([s.tokens for s in shards])
        self.labels = np.concatenate([s.labels for s in shards]).astype(np.int64)
        keys = [k for s in shards for k in s.keys]
        groups: dict[str, list[int]] = {}
        for row, key in enumerate(keys):
            groups.setdefault(key, []).append(row)
        self.images = list(groups.values())  # rows of each source image, in written order
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.batches_per_epoch = len(self.images) // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{pattern}: {len(self.images)} images is less than one global batch "
                f"(data.batch_size={batch_size} x {world_size} ranks)"
            )
        self.batches_consumed = 0
        self._epoch_rows: tuple[int, np.ndarray] | None = None

    def _rows(self, epoch: int) -> np.ndarray:
        if self._epoch_rows is None or self._epoch_rows[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(len(self.images))
            picks = rng.random(len(self.images))
            rows = np.array([self.images[i][int(picks[i] * len(self.images[i]))] for i in order])
            self._epoch_rows = (epoch, rows)
        return self._epoch_rows[1]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            epoch, b = divmod(self.batches_consumed, self.batches_per_epoch)
            start = (b * self.world_size + self.rank) * self.batch_size
            rows = self._rows(epoch)[start : start + self.batch_size]
            self.batches_consumed += 1
            yield (
                torch.from_numpy(self.tokens[rows].astype(np.int64)),
                torch.from_numpy(self.labels[rows]),
            )

    def _layout(self) -> dict:
        return {"batch_size": self.batch_size, "world_size": self.world_size, "seed": self.seed}

    def state_dict(self) -> dict:
        return {"batches_consumed": self.batches_consumed, **self._layout()}

    def load_state_dict(self, state: dict) -> None:
        changed = {k: (state.get(k), v) for k, v in self._layout().items() if state.get(k) != v}
        if changed:
            raise ValueError(
                f"the token stream's saved layout differs {changed} (saved, now): resuming would not continue "
                "the same order; keep data.batch_size, the rank count and data.seed of the run"
            )
        self.batches_consumed = int(state["batches_consumed"])
