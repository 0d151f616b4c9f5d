"""Check image shards against the manifest.json beside them: file size, sha256 and sample count.

    tokscale data verify /data/in1k/train                                  # a folder: every *.tar in it
    tokscale data verify '/data/in1k/train/train-{000000..001280}.tar' --workers 16 --json

SHARDS takes the locations the streams take (path, folder, brace pattern, glob, ``::``-joined; ``embedded`` is
both splits of the embedded dataset). Every local shard is compared with its entry in the ``manifest.json``
that ``tokscale data shards`` wrote next to it:

- ``size``: one stat; a shard of another size is not read further (its sha256 cannot match);
- ``sha256``: of the whole file;
- ``count``: distinct sample keys (member name up to the first dot of its base name) that have an image member
  (an extension in ``samples.IMAGE_EXTS``), which is what the converter counts: it writes every sample as one
  image member plus its ``.cls``.

The hash and the count come from one sequential read of each shard (the tar is parsed from the bytes being
hashed), so a 140 GB set is read once. Shards named by the location but absent, shards absent from their
manifest, and shards without a manifest are reported as bad; a folder or glob also reports the manifest's
shards that it should have matched but are missing. Remote shards (``pipe:``, URLs) are listed as not checked
and do not fail the run.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import logging
import os
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from braceexpand import braceexpand

from tokscale.data.locations import MANIFEST_NAME, expand_shards, is_remote, read_manifest
from tokscale.data.samples import IMAGE_EXTS, split_member
from tokscale.data.shards import MANIFEST_FORMAT

log = logging.getLogger(__name__)

# Large reads: one sha256 update and one tar buffer refill per MiB instead of per 10 KiB tar record.
READ_BLOCK = 1 << 20


@dataclass
class VerifyConfig:
    workers: int = 0  # parallel shard checks; 0 -> min(8, CPU count)
    progress: bool = True  # tqdm bar on stderr
    cache_dir: str = ""  # where the embedded dataset lives, for SHARDS = "embedded" ("" -> ~/.cache/tokscale)

    def __post_init__(self) -> None:
        if self.workers < 0:
            raise ValueError(f"workers={self.workers}: expected a positive number of workers (or 0 for auto)")

    def num_workers(self) -> int:
        return self.workers or min(8, os.cpu_count() or 1)


@dataclass(frozen=True)
class ShardProblem:
    shard: str
    problem: str

    def line(self) -> str:
        return f"{self.shard}: {self.problem}"


@dataclass
class VerifyReport:
    shards: int
    ok: int
    bad: list[ShardProblem] = field(default_factory=list)
    not_checked: list[ShardProblem] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {
            "shards": self.shards,
            "ok": self.ok,
            "bad": [{"shard": p.shard, "problem": p.problem} for p in self.bad],
            "not_checked": [{"shard": p.shard, "problem": p.problem} for p in self.not_checked],
            "seconds": self.seconds,
        }

    def error_message(self) -> str:
        return (
            f"{len(self.bad)} of {self.shards} shards do not match their {MANIFEST_NAME}; first: "
            f"{self.bad[0].line()} (every bad shard is listed in the JSON on stdout); re-create them with "
            f"`tokscale data shards` or copy them again"
        )


@dataclass(frozen=True)
class _Manifest:
    """The manifest of one folder as the checks need it: entries by shard name, or why there are none."""

    path: str
    entries: dict[str, dict] | None  # None: no manifest, or an unreadable one (problem says which)
    counts_images: bool = True  # image-shard manifest: its counts are samples with an image member
    problem: str = ""


def verify_shards(spec: str, cfg: VerifyConfig | None = None) -> VerifyReport:
    """``tokscale data verify SHARDS``: every shard SHARDS names, checked against its manifest, in parallel."""
    cfg = cfg or VerifyConfig()
    start = time.time()
    shards = verify_targets(spec, cfg.cache_dir)
    local = [s for s in shards if not is_remote(s)]
    manifests = {d: _load_manifest(d) for d in {_folder(s) for s in local}}
    problems: dict[str, list[str]] = {}
    if local:
        from tqdm import tqdm

        # Threads, not processes: reading and sha256 release the GIL, and the tar headers parsed in Python
        # are a few hundred bytes per sample, so threads keep the disks busy without pickling anything.
        workers = max(1, min(cfg.num_workers(), len(local)))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="verify") as pool:
            futures = {pool.submit(check_shard, s, manifests[_folder(s)]): s for s in local}
            bar = tqdm(total=len(local), desc="verify shards", unit="shard", disable=not cfg.progress)
            for fut in as_completed(futures):
                problems[futures[fut]] = fut.result()
                bar.update()
            bar.close()
    # Report in shard order, not completion order, so "first bad shard" is the same on every run.
    bad = [ShardProblem(s, "; ".join(problems[s])) for s in local if problems[s]]
    remote = [ShardProblem(s, "not checked (remote)") for s in shards if is_remote(s)]
    return VerifyReport(
        shards=len(shards),
        ok=len(local) - len(bad),
        bad=bad,
        not_checked=remote,
        seconds=round(time.time() - start, 3),
    )


def verify_targets(spec: str, cache_dir: str = "") -> list[str]:
    """The shards SHARDS names, including absent ones that should be there (so they can be reported missing).

    The streams' ``expand_shards`` refuses a pattern with missing shards outright; verification wants each of
    them named instead. A location that names nothing at all (typo, no folder) still raises its error.
    """
    if spec.strip() == "embedded":
        from tokscale.data.embedded import embedded_shards

        spec = "::".join(embedded_shards(cache_dir or None, split) for split in ("train", "eval"))
    if not spec or not spec.strip():
        expand_shards(spec)  # raises the streams' "no shard location given"
    shards: list[str] = []
    for part in spec.split("::"):
        part = part.strip()
        if not part:
            continue
        if is_remote(part):
            shards.extend(braceexpand(part))
            continue
        if part.startswith("file:"):
            part = part[len("file:") :]
        shards.extend(_local_targets(part))
    return list(dict.fromkeys(shards))  # a shard named twice is checked once


def _local_targets(part: str) -> list[str]:
    expanded = os.path.expanduser(part)
    if "{" in part and "}" in part:
        paths = [os.path.expanduser(p) for p in braceexpand(part)]
        listed: dict[str, set[str]] = {}  # folder -> manifest names, read once per folder

        def known(path: str) -> bool:
            folder = _folder(path)
            if folder not in listed:
                listed[folder] = set(_manifest_names(folder))
            return os.path.isfile(path) or os.path.basename(path) in listed[folder]

        if any(known(p) for p in paths):
            return paths
    elif any(c in part for c in "*?["):
        matches = [p for p in glob.glob(expanded) if os.path.isfile(p)]
        folder, pattern = os.path.split(expanded)
        if not any(c in folder for c in "*?["):
            names = _manifest_names(folder or ".")
            matches += [os.path.join(folder, n) for n in names if fnmatch.fnmatchcase(n, pattern)]
        if matches:
            return sorted(set(matches))
    elif os.path.isdir(expanded):
        tars = {str(p) for p in Path(expanded).glob("*.tar")}
        tars |= {os.path.join(expanded, n) for n in _manifest_names(expanded)}
        if tars:
            return sorted(tars)
    elif os.path.isfile(expanded) or os.path.basename(expanded) in _manifest_names(_folder(expanded)):
        return [expanded]
    return expand_shards(part)  # names nothing: raise the streams' error for it (missing folder, no match)


def _folder(shard: str) -> str:
    return os.path.dirname(os.path.abspath(shard))


def _manifest_names(folder: str) -> list[str]:
    try:
        manifest = read_manifest(folder)
    except ValueError:  # unreadable manifest: reported per shard by check_shard
        return []
    return [s["name"] for s in manifest.get("shards", []) if "name" in s] if manifest else []


def _load_manifest(folder: str) -> _Manifest:
    path = os.path.join(folder, MANIFEST_NAME)
    try:
        manifest = read_manifest(folder)
    except ValueError as err:
        return _Manifest(path, None, problem=f"{err}; re-create it with `tokscale data shards`")
    if manifest is None:
        return _Manifest(path, None, problem=f"shard has no {MANIFEST_NAME} beside it")
    entries = {s["name"]: s for s in manifest.get("shards", []) if "name" in s}
    # Token shards (tokscale-tokens/*) record tokens per shard, not image samples: only their bytes are checked.
    counts_images = manifest.get("format", MANIFEST_FORMAT) == MANIFEST_FORMAT
    return _Manifest(path, entries, counts_images)


def check_shard(shard: str, manifest: _Manifest) -> list[str]:
    """What differs between one local shard and its manifest entry; empty when it matches."""
    name = os.path.basename(shard)
    listed = manifest.entries is not None and name in manifest.entries
    try:
        size = os.stat(shard).st_size
    except FileNotFoundError:
        return [f"missing (listed in {MANIFEST_NAME})" if listed else "missing"]
    except OSError as err:
        return [f"cannot stat ({err})"]
    if manifest.entries is None:
        return [manifest.problem]
    if not listed:
        return [f"not listed in {MANIFEST_NAME}"]
    entry = manifest.entries[name]
    if entry.get("size") is not None and size != int(entry["size"]):
        return [f"size {size} bytes, {MANIFEST_NAME} says {int(entry['size'])}"]
    try:
        sha256, count, tar_error = scan_shard(shard)
    except OSError as err:
        return [f"cannot read ({err})"]
    problems = []
    if entry.get("sha256") and sha256 != entry["sha256"]:
        problems.append(f"sha256 differs from {MANIFEST_NAME} (expected {entry['sha256']}, found {sha256})")
    if tar_error:
        problems.append(tar_error)  # the count of a tar that fails midway means nothing
    elif manifest.counts_images and entry.get("count") is not None and count != int(entry["count"]):
        problems.append(f"{count} samples with an image member, {MANIFEST_NAME} says {int(entry['count'])}")
    return problems


class _HashingReader:
    """A read-only file wrapper that hashes every byte tarfile reads through it."""

    def __init__(self, raw):
        self.raw, self.sha = raw, hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.sha.update(data)
        return data


def scan_shard(path: str) -> tuple[str, int, str]:
    """(sha256 of the whole file, distinct keys with an image member, tar error or ""), in one read."""
    keys: set[str] = set()
    tar_error = ""
    with open(path, "rb") as raw:
        reader = _HashingReader(raw)
        try:
            # Stream mode: member data is read through (and hashed), never extracted or kept.
            with tarfile.open(fileobj=reader, mode="r|*", bufsize=READ_BLOCK) as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    parts = split_member(member.name)
                    if parts is not None and parts[1].lower() in IMAGE_EXTS:
                        keys.add(parts[0])
        except (tarfile.TarError, EOFError) as err:
            tar_error = f"unreadable tar ({type(err).__name__}: {err})"
        while reader.read(READ_BLOCK):  # the end-of-archive blocks and padding after the last member
            pass
    return reader.sha.hexdigest(), len(keys), tar_error
