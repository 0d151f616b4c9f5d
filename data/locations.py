"""Shard locations: local paths, directories, brace patterns, globs, ``pipe:`` commands and URLs.

A location string names one or more tar shards:

- ``/data/in1k/train/train-{000000..001023}.tar``: a brace pattern, expanded like the shell does;
- ``/data/in1k/train``: a directory, meaning every ``*.tar`` in it, sorted;
- ``/data/in1k/train/train-*.tar``: a glob;
- ``pipe:aws s3 cp s3://bucket/train-{000000..001023}.tar -``: a command whose stdout is the tar;
- ``https://host/train-{000000..001023}.tar``: a URL (streamed with curl by webdataset's ``gopen``);
- several of those joined with ``::``.

Local locations are checked up front so that a typo fails before any worker starts; remote ones are opened
lazily by the reading process. A manifest.json next to local shards (written by ``tokscale data shards``) gives
per-shard sample counts, which the evaluation split and the truncation check use, and per-shard byte sizes,
which the readers compare with the file when they open it (``ManifestCount``).
"""

from __future__ import annotations

import glob
import json
import logging
import os
from pathlib import Path

from braceexpand import braceexpand

log = logging.getLogger(__name__)

REMOTE_PREFIXES = ("pipe:", "http://", "https://", "gs://", "s3://", "ais://", "hf://", "htgs://")
MANIFEST_NAME = "manifest.json"


def is_remote(url: str) -> bool:
    return url.startswith(REMOTE_PREFIXES)


def resolve_shards(spec: str, split: str, cache_dir: str = "") -> list[str]:
    """The shard list of a location string; ``embedded`` builds (once) and names the embedded dataset."""
    if spec.strip() == "embedded":
        from tokscale.data.embedded import embedded_shards

        spec = embedded_shards(cache_dir or None, split=split)
    return expand_shards(spec)


def expand_shards(spec: str) -> list[str]:
    """The shard list a location string names, in a stable order; raises for local shards that are missing."""
    if not spec or not spec.strip():
        raise ValueError(
            "no shard location given: expected a path, a directory, a brace pattern such as "
            "'train-{000000..001023}.tar', a pipe: command, an http(s) URL or 'embedded'"
        )
    urls: list[str] = []
    for part in spec.split("::"):
        part = part.strip()
        if not part:
            continue
        if is_remote(part):
            urls.extend(braceexpand(part))
        elif part.startswith("file:"):
            urls.extend(_expand_local(part[len("file:") :]))
        else:
            urls.extend(_expand_local(part))
    if not urls:
        raise FileNotFoundError(f"shard location {spec!r} names no shard")
    return urls


def _expand_local(part: str) -> list[str]:
    path = Path(os.path.expanduser(part))
    if "{" in part and "}" in part:
        expanded = [os.path.expanduser(p) for p in braceexpand(part)]
        missing = [p for p in expanded if not os.path.isfile(p)]
        if len(missing) == len(expanded):
            raise FileNotFoundError(
                f"shard pattern {part!r} matches no shard: none of its {len(expanded)} paths exist "
                f"(first: {expanded[0]}); check the directory and the index range"
            )
        if missing:
            raise FileNotFoundError(
                f"shard pattern {part!r}: {len(missing)} of {len(expanded)} shards are missing, "
                f"e.g. {missing[0]}"
            )
        return expanded
    if any(c in part for c in "*?["):
        matches = sorted(p for p in glob.glob(os.path.expanduser(part)) if os.path.isfile(p))
        if not matches:
            raise FileNotFoundError(f"shard pattern {part!r} matches no shard")
        return matches
    if path.is_dir():
        tars = sorted(str(p) for p in path.glob("*.tar"))
        if not tars:
            raise FileNotFoundError(f"shard directory {path} holds no *.tar shards")
        return tars
    if path.is_file():
        return [str(path)]
    if not path.parent.exists():
        raise FileNotFoundError(f"shard directory {path.parent} does not exist (location {part!r})")
    raise FileNotFoundError(f"shard {path} does not exist")


def read_manifest(directory: str | Path) -> dict | None:
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"manifest {path} is not valid JSON: {err}") from err


class ManifestCount(int):
    """A shard's sample count from its manifest.json, carrying the byte size the manifest records with it.

    An int, so everything that adds, compares or splits counts (the evaluation ranges, ``tokscale data info``)
    works unchanged, while the reader that opens the shard (``samples.iter_raw_samples``, in whichever loader
    worker that happens) can compare the file's size with ``size`` at one stat per shard. ``size`` is None for
    manifests that do not record it (token shards).
    """

    size: int | None
    manifest: str

    def __new__(cls, count: int, size: int | None, manifest: str) -> ManifestCount:
        self = super().__new__(cls, count)
        self.size, self.manifest = size, manifest
        return self

    def __reduce__(self):
        # Loader workers started with spawn/forkserver receive the counts pickled: keep size and manifest.
        return (ManifestCount, (int(self), self.size, self.manifest))


def manifest_counts(urls: list[str]) -> list[int | None]:
    """Per-shard sample counts (``ManifestCount``) from the manifest.json next to each local shard (None where unknown)."""
    cache: dict[str, dict[str, ManifestCount]] = {}
    counts: list[int | None] = []
    for url in urls:
        if is_remote(url):
            counts.append(None)
            continue
        directory = os.path.dirname(os.path.abspath(url))
        if directory not in cache:
            manifest = read_manifest(directory)
            path = os.path.join(directory, MANIFEST_NAME)
            cache[directory] = (
                {
                    s["name"]: ManifestCount(
                        int(s["count"]), int(s["size"]) if s.get("size") is not None else None, path
                    )
                    for s in manifest.get("shards", [])
                }
                if manifest
                else {}
            )
        counts.append(cache[directory].get(os.path.basename(url)))
    return counts


def manifest_classes(urls: list[str]) -> list[str] | None:
    """The class names recorded in the manifest of the first local shard, if any."""
    for url in urls:
        if not is_remote(url):
            manifest = read_manifest(os.path.dirname(os.path.abspath(url)))
            return list(manifest["classes"]) if manifest and "classes" in manifest else None
    return None
