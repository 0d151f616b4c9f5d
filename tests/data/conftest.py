"""Tiny real image folders and tar shards, written into each test's tmp_path."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def encode_image(seed: int, size: tuple[int, int] = (40, 48), fmt: str = "PNG") -> bytes:
    """A random RGB image: every sample differs, so tests can tell samples apart by pixels as well as keys."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def write_image_folder(root: Path, num_classes: int = 3, per_class: int = 8) -> Path:
    for c in range(num_classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (root / f"class{c}" / f"img{i:03d}.png").write_bytes(encode_image(100 * c + i))
    return root


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    """A webdataset tar from (key, {extension: bytes}) pairs, in order."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def labelled_samples(start: int, count: int, num_classes: int = 3) -> list[tuple[str, dict[str, bytes]]]:
    return [
        (f"s{i:05d}", {"png": encode_image(i), "cls": str(i % num_classes).encode()})
        for i in range(start, start + count)
    ]


@pytest.fixture
def shard_dir(tmp_path: Path) -> Path:
    """4 shards x 6 samples = 24 samples, with a manifest, written by the real converter."""
    from tokscale.data.shards import convert

    src = write_image_folder(tmp_path / "src", num_classes=3, per_class=8)
    out = tmp_path / "shards"
    convert(src, out, samples_per_shard=6, jobs=1, progress=False)
    return out


@pytest.fixture
def helpers():
    """The writers above, for tests (test modules cannot import conftest under --import-mode=importlib)."""
    from types import SimpleNamespace

    return SimpleNamespace(
        encode_image=encode_image,
        write_image_folder=write_image_folder,
        write_tar=write_tar,
        labelled_samples=labelled_samples,
    )
