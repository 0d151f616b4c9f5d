"""Image folder (or file list) -> webdataset tar shards with a manifest.

    tokscale data shards /data/imagenet/train /data/in1k-shards/train --samples-per-shard 1000

Each sample is the original encoded file (``KEY.jpg``/``KEY.png``/...: no re-encoding) plus its class index
(``KEY.cls``, ASCII). The key is the file's path relative to the source without its extension, dots replaced
by underscores (``n01440764/n01440764_10026``): stable across runs and machines.

Shard ``i`` holds samples ``[i * n, (i + 1) * n)`` of the sample list in a fixed order (seeded shuffle by
default, so that a shard mixes classes and a training shuffle buffer sees many classes). Each shard is written
under a temporary name and renamed once complete, together with a small record in ``OUT/.progress/``; a rerun
skips shards whose record and file match. Files that cannot be read or are not images are reported by path,
skipped and counted in the manifest; more than ``max_bad_fraction`` of them fails the run (no manifest).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "tokscale-image-shards/1"
# PIL format -> member extension the readers recognise (tokscale.data.samples.IMAGE_EXTS).
FORMAT_EXTS = {
    "JPEG": "jpg",
    "MPO": "jpg",
    "PNG": "png",
    "WEBP": "webp",
    "BMP": "bmp",
    "GIF": "gif",
    "TIFF": "tif",
}
FORMAT_EXTS |= {"PPM": "ppm"}


@dataclass(frozen=True)
class SourceFile:
    path: str
    label: int  # -1: not in a class folder (reported as bad)
    key: str


def make_key(relpath: str) -> str:
    stem = os.path.splitext(relpath)[0].replace(os.sep, "/")
    return "/".join(part.replace(".", "_") for part in stem.split("/"))


def list_image_folder(src: Path) -> tuple[list[SourceFile], list[str]]:
    """ImageNet layout: one sub-folder per class (class index = sorted folder order), files below it."""
    classes = sorted(p.name for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"{src}: expected one sub-folder per class (ImageNet layout); found none")
    files: list[SourceFile] = []
    for p in sorted(q for q in src.iterdir() if q.is_file()):
        files.append(SourceFile(str(p), -1, make_key(p.name)))
    for index, name in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(src / name):
            dirnames.sort()
            for fname in sorted(filenames):
                path = os.path.join(dirpath, fname)
                files.append(SourceFile(path, index, make_key(os.path.relpath(path, src))))
    return files, classes


def read_file_list(list_path: Path) -> tuple[list[SourceFile], list[str]]:
    """Lines ``PATH LABEL`` (whitespace or comma); LABEL an integer index or a class name; ``#`` comments.

    Relative paths are relative to the list's folder. Integer labels keep their values (classes "0".."max");
    names get indices in sorted order.
    """
    rows: list[tuple[str, str]] = []
    for lineno, line in enumerate(list_path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.replace(",", " ").rsplit(None, 1)
        if len(parts) != 2:
            raise ValueError(f"{list_path}:{lineno}: expected 'PATH LABEL', got {line!r}")
        rows.append((parts[0], parts[1]))
    if not rows:
        raise ValueError(f"{list_path}: the file list names no files")
    base = list_path.parent
    if all(label.lstrip("-").isdigit() for _, label in rows):
        indices = [int(label) for _, label in rows]
        if min(indices) < 0:
            raise ValueError(f"{list_path}: negative class index {min(indices)}")
        classes = [str(i) for i in range(max(indices) + 1)]
    else:
        classes = sorted({label for _, label in rows})
        lookup = {name: i for i, name in enumerate(classes)}
        indices = [lookup[label] for _, label in rows]
    files = []
    for (path, _), index in zip(rows, indices):
        full = path if os.path.isabs(path) else str(base / path)
        rel = os.path.relpath(full, base) if not os.path.isabs(path) else path.lstrip("/")
        files.append(SourceFile(full, index, make_key(rel)))
    return files, classes


def _check_unique_keys(files: list[SourceFile]) -> None:
    seen: dict[str, str] = {}
    for f in files:
        if f.key in seen:
            raise ValueError(f"files {seen[f.key]} and {f.path} map to the same sample key {f.key!r}")
        seen[f.key] = f.path


def _fingerprint(files: list[SourceFile]) -> str:
    h = hashlib.sha1()
    for f in files:
        h.update(f"{f.path}\0{f.label}\0{f.key}\n".encode())
    return h.hexdigest()


def _check_file(f: SourceFile, verify: str) -> tuple[bytes, str]:
    """(bytes, member extension) or raises ValueError with the reason."""
    if f.label < 0:
        raise ValueError("not inside a class folder")
    try:
        data = Path(f.path).read_bytes()
    except OSError as err:
        raise ValueError(f"unreadable ({err.strerror or err})") from err
    try:
        img = Image.open(io.BytesIO(data))
        fmt = img.format
        if verify == "full":
            img.load()
        else:
            img.verify()
    except Exception as err:
        raise ValueError(f"not a decodable image ({type(err).__name__}: {err})") from err
    if fmt not in FORMAT_EXTS:
        raise ValueError(f"image format {fmt} is not one the readers accept ({sorted(FORMAT_EXTS)})")
    return data, FORMAT_EXTS[fmt]


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o444
    info.mtime = 0  # fixed metadata: the same input gives byte-identical shards and the same sha256
    tar.addfile(info, io.BytesIO(data))


def write_shard(out_dir: str, name: str, files: list[SourceFile], verify: str) -> dict:
    """Write one shard (temp name, then rename) and its progress record; returns the record."""
    final = os.path.join(out_dir, name)
    tmp = f"{final}.tmp-{os.getpid()}"
    bad: list[list[str]] = []
    count = 0
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for f in files:
            try:
                data, ext = _check_file(f, verify)
            except ValueError as err:
                bad.append([f.path, str(err)])
                continue
            _add_member(tar, f"{f.key}.{ext}", data)
            _add_member(tar, f"{f.key}.cls", str(f.label).encode())
            count += 1
    sha = hashlib.sha256()
    with open(tmp, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            sha.update(block)
    record = {
        "name": name,
        "count": count,
        "sha256": sha.hexdigest(),
        "size": os.path.getsize(tmp),
        "fingerprint": _fingerprint(files),
        "bad": bad,
    }
    os.replace(tmp, final)
    progress = os.path.join(out_dir, ".progress", name + ".json")
    with open(progress + ".tmp", "w") as fh:
        json.dump(record, fh)
    os.replace(progress + ".tmp", progress)
    return record


def _complete_record(out_dir: str, name: str, files: list[SourceFile]) -> dict | None:
    progress = os.path.join(out_dir, ".progress", name + ".json")
    final = os.path.join(out_dir, name)
    try:
        record = json.loads(Path(progress).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not os.path.isfile(final) or os.path.getsize(final) != record.get("size"):
        return None
    return record if record.get("fingerprint") == _fingerprint(files) else None


def brace_pattern(prefix: str, num_shards: int) -> str:
    last = num_shards - 1
    return f"{prefix}-{0:06d}.tar" if num_shards == 1 else f"{prefix}-{{{0:06d}..{last:06d}}}.tar"


def convert(
    src: str | Path,
    out: str | Path,
    *,
    samples_per_shard: int = 1000,
    prefix: str | None = None,
    jobs: int | None = None,
    shuffle: bool = True,
    seed: int = 0,
    max_bad_fraction: float = 0.001,
    verify: str = "full",
    progress: bool = True,
) -> dict:
    """Convert SRC (class folders, or a file list) into shards under OUT; returns the manifest."""
    src, out = Path(src).expanduser(), Path(out).expanduser()
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard={samples_per_shard}: expected a positive integer")
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise ValueError(f"max_bad_fraction={max_bad_fraction}: expected a fraction in [0, 1]")
    if verify not in ("full", "header"):
        raise ValueError(f"verify={verify!r}: expected 'full' or 'header'")
    if src.is_dir():
        files, classes = list_image_folder(src)
    elif src.is_file():
        files, classes = read_file_list(src)
    else:
        raise FileNotFoundError(
            f"source {src} does not exist: expected a folder of class folders or a file list"
        )
    if not files:
        raise ValueError(f"{src}: no files found")
    _check_unique_keys(files)
    if shuffle:
        random.Random(seed).shuffle(files)
    prefix = prefix or (src.stem if src.is_file() else src.name) or "shard"
    chunks = [files[i : i + samples_per_shard] for i in range(0, len(files), samples_per_shard)]
    names = [f"{prefix}-{i:06d}.tar" for i in range(len(chunks))]
    (out / ".progress").mkdir(parents=True, exist_ok=True)

    records: dict[str, dict] = {}
    todo = []
    for name, chunk in zip(names, chunks):
        record = _complete_record(str(out), name, chunk)
        if record is not None:
            records[name] = record
        else:
            todo.append((name, chunk))
    if records:
        log.info(
            "%d of %d shards already complete in %s; writing %d", len(records), len(names), out, len(todo)
        )
    start = time.time()
    if todo:
        from tqdm import tqdm

        jobs = max(1, min(jobs or os.cpu_count() or 1, len(todo)))
        bar = tqdm(total=len(todo), desc=f"shards -> {out}", unit="shard", disable=not progress)
        if jobs == 1:
            for name, chunk in todo:
                records[name] = write_shard(str(out), name, chunk, verify)
                bar.update()
        else:
            with ProcessPoolExecutor(max_workers=jobs) as pool:
                futures = [pool.submit(write_shard, str(out), name, chunk, verify) for name, chunk in todo]
                for fut in as_completed(futures):
                    rec = fut.result()
                    records[rec["name"]] = rec
                    bar.update()
        bar.close()

    bad = [{"path": p, "reason": r} for name in names for p, r in records[name]["bad"]]
    for item in bad:
        log.warning("skipped %s: %s", item["path"], item["reason"])
    fraction = len(bad) / len(files)
    if fraction > max_bad_fraction:
        report = out / "bad_files.txt"
        report.write_text("".join(f"{b['path']}\t{b['reason']}\n" for b in bad))
        raise ValueError(
            f"{len(bad)} of {len(files)} files ({fraction:.2%}) are unreadable or not images, more than "
            f"max_bad_fraction={max_bad_fraction}; first: {bad[0]['path']} ({bad[0]['reason']}); all listed in "
            f"{report}; no manifest written"
        )
    manifest = {
        "format": MANIFEST_FORMAT,
        "source": str(src),
        "classes": classes,
        "num_classes": len(classes),
        "num_samples": sum(records[n]["count"] for n in names),
        "samples_per_shard": samples_per_shard,
        "order": f"shuffled(seed={seed})" if shuffle else "sorted",
        "pattern": brace_pattern(prefix, len(names)),
        "shards": [{k: records[n][k] for k in ("name", "count", "sha256", "size")} for n in names],
        "num_bad_files": len(bad),
        "bad_files": bad,
        "seconds": round(time.time() - start, 3),
    }
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / "manifest.json")
    return manifest
