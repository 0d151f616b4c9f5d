"""Reading samples out of webdataset tar shards, and the errors that name what went wrong.

A sample is the group of consecutive tar members sharing a key: ``n01440764/img_10026.jpg`` and
``n01440764/img_10026.cls`` form the sample with key ``n01440764/img_10026``. The key is everything before the
first dot of the member's base name (the webdataset convention), so shards written by other webdataset tools
read here too.

Reading is split from decoding on purpose: the training stream fast-forwards through raw samples on resume
without paying for JPEG decoding.
"""

from __future__ import annotations

import io
import logging
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field

from PIL import Image

from tokscale.data.locations import ManifestCount, is_remote

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "pbm", "pnm")
LABEL_EXTS = ("cls", "cls.txt", "class", "label")
BAD_SAMPLE_POLICIES = ("error", "skip")


class ShardError(ValueError):
    """A shard that cannot be read to its end: truncated, corrupt, missing, or a failing pipe/URL."""


class BadSampleError(ValueError):
    """A sample without an image or label, or whose image fails to decode; the message names shard and key."""


@dataclass
class RawSample:
    shard: str
    key: str
    members: dict[str, bytes] = field(default_factory=dict)

    def where(self) -> str:
        return f"shard {self.shard} key {self.key!r}"


def split_member(name: str) -> tuple[str, str] | None:
    """``dir/stem.ext.more`` -> (``dir/stem``, ``ext.more``); None for names without an extension."""
    directory, base = os.path.split(name)
    if "." not in base or base.startswith("."):
        return None
    stem, ext = base.split(".", 1)
    return (f"{directory}/{stem}" if directory else stem), ext


def open_shard(url: str):
    if is_remote(url):
        from webdataset.gopen import gopen

        return gopen(url, "rb")
    return open(url, "rb")


def iter_raw_samples(url: str, expected_count: int | None = None) -> Iterator[RawSample]:
    """Every sample of one shard, in tar order, as raw bytes.

    Raises ShardError naming the shard (and the last good key) for a missing, truncated or corrupt tar, and
    when the shard ends before the count its manifest records: Python's tarfile treats a garbage header in the
    middle of a stream as the end of the archive, so without that check a damaged shard would end silently.
    When ``expected_count`` comes from ``locations.manifest_counts`` (a ``ManifestCount``) it also carries the
    byte size the manifest records, and a local shard of another size is refused as soon as it is opened.
    """
    last_key = None
    count = 0
    try:
        stream = open_shard(url)
    except OSError as err:
        raise ShardError(f"shard {url}: cannot open ({err})") from err
    if isinstance(expected_count, ManifestCount) and expected_count.size is not None and not is_remote(url):
        check_shard_size(url, stream, expected_count)
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            current: RawSample | None = None
            for member in tar:
                if not member.isfile():
                    continue
                parts = split_member(member.name)
                if parts is None:
                    continue
                key, ext = parts
                fobj = tar.extractfile(member)
                data = fobj.read() if fobj is not None else b""
                if len(data) != member.size:
                    raise tarfile.ReadError(f"member {member.name} truncated")
                if current is not None and key != current.key:
                    last_key = current.key
                    count += 1
                    yield current
                    current = None
                if current is None:
                    current = RawSample(url, key)
                current.members[ext.lower()] = data
            if current is not None:
                count += 1
                yield current
                last_key = current.key
    except (tarfile.TarError, EOFError, OSError) as err:
        try:
            stream.close()
        except Exception as close_err:  # the real cause: a pipe: command or download that failed
            raise ShardError(f"shard {url}: reading failed ({close_err})") from err
        after = f"after key {last_key!r}" if last_key is not None else "before the first sample"
        raise ShardError(
            f"shard {url}: truncated or corrupt tar {after} ({type(err).__name__}: {err})"
        ) from err
    except GeneratorExit:  # the reader stopped early (evaluation range, end of epoch): not an error
        _close_quietly(stream)
        raise
    try:
        stream.close()
    except Exception as err:  # a pipe: command exiting non-zero surfaces here
        raise ShardError(f"shard {url}: reading failed ({err})") from err
    if expected_count is not None and count != expected_count:
        raise ShardError(
            f"shard {url}: read {count} samples but its manifest records {expected_count}: the tar is truncated "
            f"or corrupt (last key {last_key!r})"
        )


def check_shard_size(url: str, stream, expected: ManifestCount) -> None:
    """Refuse a local shard whose size differs from its manifest entry (one fstat, no hashing); closes it then.

    A shard truncated by a failed copy can still end at a member boundary and read as a shorter valid tar; the
    count check would only notice at its end, after the samples before the cut were trained on.
    """
    found = os.fstat(stream.fileno()).st_size
    if found == expected.size:
        return
    _close_quietly(stream)
    raise ShardError(
        f"shard {url}: {found} bytes, but {expected.manifest} records {expected.size} bytes for it: the file "
        f"changed after `tokscale data shards` wrote it (truncated, partly copied or replaced). Check the set "
        f"with `tokscale data verify {os.path.dirname(url) or '.'}` and re-create the shards with "
        f"`tokscale data shards` (or copy them again)"
    )


def _close_quietly(stream) -> None:
    try:
        stream.close()
    except Exception:  # a pipe killed by SIGPIPE because we stopped reading early
        pass


def image_member(sample: RawSample) -> tuple[str, bytes]:
    for ext in IMAGE_EXTS:
        if ext in sample.members:
            return ext, sample.members[ext]
    raise BadSampleError(
        f"{sample.where()}: no image member (has {sorted(sample.members) or 'nothing'}; "
        f"expected one of {list(IMAGE_EXTS)})"
    )


def sample_label(sample: RawSample) -> int:
    for ext in LABEL_EXTS:
        if ext in sample.members:
            text = sample.members[ext].decode("utf-8", "replace").strip()
            try:
                return int(text)
            except ValueError:
                raise BadSampleError(
                    f"{sample.where()}: class label {text[:40]!r} is not an integer"
                ) from None
    raise BadSampleError(f"{sample.where()}: no class label member (expected one of {list(LABEL_EXTS)})")


def decode_image(sample: RawSample) -> Image.Image:
    """The sample's image as RGB; PIL raises on truncated data, so a broken file never becomes a blank image."""
    ext, data = image_member(sample)
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        return img.convert("RGB")
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBomb...)
        raise BadSampleError(
            f"{sample.where()}: image member .{ext} fails to decode ({type(err).__name__}: {err})"
        ) from err


def check_policy(policy: str) -> str:
    if policy not in BAD_SAMPLE_POLICIES:
        raise ValueError(f"bad_sample_policy={policy!r}: expected one of {list(BAD_SAMPLE_POLICIES)}")
    return policy
