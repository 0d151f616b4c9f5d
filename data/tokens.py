"""Token shards: what code extraction writes and the autoregressive trainers read.

Format ``tokscale-tokens/2`` stores each source image once, as all its augmentations' codes plus its label. One
shard is a tar (so it travels over the same paths, ``pipe:`` commands and URLs as image shards) of four members
covering up to ``samples_per_shard`` images:

- ``meta.json``: format, tokenizer_id, codebook_size, num_tokens, num_augs, count (images), token dtype;
- ``tokens.npy``: (count, num_augs, num_tokens), uint16 when codebook_size <= 65536 (half the bytes of int32),
  else int32; position a on axis 1 is augmentation a of the image (0 is the centre crop, see
  tokscale.tokenizers.extract);
- ``labels.npy``: (count,) int32 class indices;
- ``keys.json``: the source sample keys, one per image.

A writer closes with ``manifest-<prefix>.json``; ``merge_manifests(out_dir)`` (rank 0, after every rank
closed) combines them into ``manifest.json``. Readers check every shard's tokenizer_id and codebook_size
against what the caller expects, so codes of one tokenizer never train an AR model meant for another. Shards of
format ``tokscale-tokens/1`` (one row per augmentation) are refused: re-run ``tokscale extract``.

    writer = TokenShardWriter(out, "vq2d-SS.in1k", codebook_size=16384, num_tokens=256, num_augs=10,
                              prefix=f"r{rank:03d}")
    writer.write(key, codes, label)  # codes (10, 256): the image's ten crops; writer.close()
    for tokens, label in token_stream(f"{out}/*.tar", tokenizer_id="vq2d-SS.in1k", codebook_size=16384):
        ...  # tokens int64 (10, 256)
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

FORMAT = "tokscale-tokens/2"
OLD_FORMATS = ("tokscale-tokens/1",)  # one row per augmentation, with aug_ids.npy
MEMBERS = ("meta.json", "tokens.npy", "labels.npy", "keys.json")


def token_dtype(codebook_size: int) -> np.dtype:
    return np.dtype(np.uint16) if codebook_size <= 65536 else np.dtype(np.int32)


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _format_problem(where: str, fmt) -> str | None:
    """Why a shard or manifest of format ``fmt`` cannot be read (None when it can)."""
    if fmt == FORMAT:
        return None
    if fmt in OLD_FORMATS:
        return (
            f"{where}: format {fmt!r} (one row per augmentation) is no longer read; re-run `tokscale extract` "
            f"to write {FORMAT!r} (each image once, all its augmentations)"
        )
    return f"{where}: format {fmt!r}, expected {FORMAT!r}"


class TokenShardWriter:
    def __init__(
        self,
        out_dir: str | os.PathLike,
        tokenizer_id: str,
        codebook_size: int,
        num_tokens: int,
        num_augs: int = 1,
        samples_per_shard: int = 10000,
        prefix: str = "tokens",
    ):
        if not tokenizer_id:
            raise ValueError(
                "tokenizer_id is empty: name the tokenizer the codes come from (e.g. its weights tag)"
            )
        if codebook_size < 1 or num_tokens < 1 or num_augs < 1 or samples_per_shard < 1:
            raise ValueError(
                f"codebook_size={codebook_size}, num_tokens={num_tokens}, num_augs={num_augs}, "
                f"samples_per_shard={samples_per_shard}: expected positive integers"
            )
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.tokenizer_id, self.codebook_size, self.num_tokens = tokenizer_id, codebook_size, num_tokens
        self.num_augs, self.samples_per_shard, self.prefix = num_augs, samples_per_shard, prefix
        self.dtype = token_dtype(codebook_size)
        self.shards: list[dict] = []
        self._reset()

    def _reset(self) -> None:
        self._tokens: list[np.ndarray] = []
        self._labels: list[int] = []
        self._keys: list[str] = []

    def write(self, key: str, codes, label: int) -> None:
        """One image: ``codes`` (num_augs, num_tokens), augmentation a in row a; (num_tokens,) when num_augs is 1."""
        arr = codes.detach().cpu().numpy() if isinstance(codes, torch.Tensor) else np.asarray(codes)
        got, want = tuple(arr.shape), (self.num_augs, self.num_tokens)
        if arr.ndim == 1 and self.num_augs == 1:
            arr = arr[None]
        if arr.shape != want:
            raise ValueError(
                f"sample {key!r}: codes of shape {got}, expected (num_augs, num_tokens) = {want}"
            )
        if arr.size and (arr.min() < 0 or arr.max() >= self.codebook_size):
            raise ValueError(
                f"sample {key!r}: token ids span [{arr.min()}, {arr.max()}], outside codebook_size={self.codebook_size}"
            )
        self._tokens.append(arr.astype(self.dtype))
        self._labels.append(int(label))
        self._keys.append(str(key))
        if len(self._keys) >= self.samples_per_shard:
            self._flush()

    def _identity(self) -> dict:
        return {
            "format": FORMAT,
            "tokenizer_id": self.tokenizer_id,
            "codebook_size": self.codebook_size,
            "num_tokens": self.num_tokens,
            "num_augs": self.num_augs,
        }

    def _flush(self) -> None:
        if not self._keys:
            return
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        meta = {**self._identity(), "count": len(self._keys), "dtype": self.dtype.name}
        members = {
            "meta.json": json.dumps(meta).encode(),
            "tokens.npy": _npy_bytes(np.stack(self._tokens)),
            "labels.npy": _npy_bytes(np.asarray(self._labels, dtype=np.int32)),
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
            **self._identity(),
            "num_samples": sum(s["count"] for s in self.shards),  # images
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
    paths = sorted(glob.glob(os.path.join(out_dir, "manifest-*.json")))
    parts = {Path(p).name: json.loads(Path(p).read_text()) for p in paths}
    if not parts:
        raise FileNotFoundError(f"{out_dir}: no manifest-*.json; did every TokenShardWriter call close()?")
    for name, p in parts.items():
        problem = _format_problem(os.path.join(out_dir, name), p.get("format"))
        if problem:
            raise ValueError(problem)
    first = next(iter(parts.values()))
    ident = {k: first[k] for k in ("tokenizer_id", "codebook_size", "num_tokens")}
    for p in parts.values():
        other = {k: p[k] for k in ident}
        if other != ident:
            raise ValueError(f"{out_dir}: token shards from different tokenizers: {ident} vs {other}")
    augs = {name: p["num_augs"] for name, p in parts.items()}
    if len(set(augs.values())) > 1:
        raise ValueError(f"{out_dir}: token shards with different num_augs (augmentations per image): {augs}")
    merged = {"format": FORMAT, **ident, "num_augs": first["num_augs"]}
    merged["num_samples"] = sum(p["num_samples"] for p in parts.values())
    merged["shards"] = [s for p in parts.values() for s in p["shards"]]
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
        if "meta.json" in members:
            self.meta = json.loads(members["meta.json"])
            problem = _format_problem(f"token shard {url}", self.meta.get("format"))
            if problem:
                raise ShardError(problem)
        missing = [m for m in MEMBERS if m not in members]
        if missing:
            raise ShardError(f"token shard {url}: missing members {missing}; is it a token shard?")
        for name, want in (("tokenizer_id", tokenizer_id), ("codebook_size", codebook_size)):
            if want is not None and self.meta[name] != want:
                raise ValueError(f"token shard {url}: {name} is {self.meta[name]!r}, expected {want!r}")
        self.tokens = np.load(io.BytesIO(members["tokens.npy"]), allow_pickle=False)
        self.labels = np.load(io.BytesIO(members["labels.npy"]), allow_pickle=False)
        self.keys = json.loads(members["keys.json"])
        n = self.meta["count"]
        shapes = (self.tokens.shape, self.labels.shape, len(self.keys))
        if shapes != ((n, self.num_augs, self.meta["num_tokens"]), (n,), n):
            raise ShardError(
                f"token shard {url}: array shapes {shapes} disagree with count={n}, "
                f"num_augs={self.num_augs}, num_tokens={self.meta['num_tokens']}"
            )

    @property
    def codebook_size(self) -> int:
        return int(self.meta["codebook_size"])

    @property
    def tokenizer_id(self) -> str:
        return str(self.meta["tokenizer_id"])

    @property
    def num_augs(self) -> int:
        return int(self.meta["num_augs"])

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(self.tokens[i].astype(np.int64)), int(self.labels[i])


def _read_alike(
    pattern: str, tokenizer_id: str | None, codebook_size: int | None = None
) -> list[TokenShardReader]:
    """Every shard of ``pattern``, refusing a set that mixes tokenizers or augmentation counts."""
    shards = [TokenShardReader(u, tokenizer_id, codebook_size) for u in expand_shards(pattern)]
    ids = {(s.tokenizer_id, s.codebook_size, int(s.meta["num_tokens"])) for s in shards}
    if len(ids) > 1:
        raise ValueError(f"{pattern}: token shards from different tokenizers {sorted(ids)}")
    augs = {s.num_augs for s in shards}
    if len(augs) > 1:
        named = {s.url: s.num_augs for s in shards}
        raise ValueError(
            f"{pattern}: token shards with different num_augs (augmentations per image): {named}"
        )
    return shards


def token_stream(
    pattern: str,
    *,
    tokenizer_id: str | None = None,
    codebook_size: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    seed: int | None = None,
) -> Iterator[tuple[torch.Tensor, int]]:
    """(tokens int64 (num_augs, num_tokens), label) for this rank: global image i goes to rank i % world_size.

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
    """Every shard in memory: tokens int64 (N, num_augs, num_tokens), labels int64 (N,), keys (N images)."""
    shards = _read_alike(pattern, tokenizer_id, codebook_size)
    return {
        "tokens": torch.from_numpy(np.concatenate([s.tokens for s in shards]).astype(np.int64)),
        "labels": torch.from_numpy(np.concatenate([s.labels for s in shards]).astype(np.int64)),
        "keys": [k for s in shards for k in s.keys],
    }


class TokenTrainStream:
    """Endless training batches ``(tokens int64 (B, T), labels int64 (B,))`` from token shards, for rank ``rank``.

    Epoch e draws, from a generator seeded with ``(seed, e)``, an order of the source images and one of each
    image's stored augmentations (ten-crop with flips stores ten per image): every epoch sees every image once,
    in one random augmentation. Global batch b of the epoch is the slice [b*B*W, (b+1)*B*W) of that order and
    rank r takes its r-th part, so ranks never overlap and the choice does not depend on the rank count. The
    position is the number of batches handed out: ``state_dict`` / ``load_state_dict`` resume exactly.
    Incomplete last global batches are dropped. The shards are held in memory (uint16 codes: 1.28M images x 10
    crops x 256 tokens is 6.6 GB).
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
        shards = _read_alike(pattern, tokenizer_id)
        self.meta = dict(shards[0].meta)
        self.tokens = np.concatenate([s.tokens for s in shards])  # (images, num_augs, T)
        self.labels = np.concatenate([s.labels for s in shards]).astype(np.int64)
        self.num_images, self.num_augs = self.tokens.shape[0], self.tokens.shape[1]
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.batches_per_epoch = self.num_images // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{pattern}: {self.num_images} images is less than one global batch "
                f"(data.batch_size={batch_size} x {world_size} ranks)"
            )
        self.batches_consumed = 0
        self._epoch_cache: tuple[int, np.ndarray, np.ndarray] | None = None

    def epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(images, augmentations), each (num_images,): position p of the epoch is augmentation augs[p] of image
        images[p]."""
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            images = rng.permutation(self.num_images)
            augs = rng.integers(self.num_augs, size=self.num_images)  # per image, indexed by image
            self._epoch_cache = (epoch, images, augs[images])
        return self._epoch_cache[1], self._epoch_cache[2]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            epoch, b = divmod(self.batches_consumed, self.batches_per_epoch)
            start = (b * self.world_size + self.rank) * self.batch_size
            images, augs = self.epoch_order(epoch)
            images, augs = images[start : start + self.batch_size], augs[start : start + self.batch_size]
            self.batches_consumed += 1
            yield (
                torch.from_numpy(self.tokens[images, augs].astype(np.int64)),
                torch.from_numpy(self.labels[images]),
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
