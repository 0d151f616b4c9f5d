"""The embedded default dataset: labelled crops of the real photographs that ship inside scikit-image.

scikit-image bundles a few photographs in its wheel (no download: ``skimage/data/*.png|jpg``). Each of ten of
them is a class; the samples are square crops at varied scales and positions, resized to 160 px and stored as
JPEG, drawn with a fixed seed: 100 per class for ``train`` (1000 images) and 20 per class for ``eval`` (200),
from separate seeds. Small enough to build in seconds and to train a tiny tokenizer on a laptop CPU, real
enough that reconstructions and FID-like numbers mean something.

``embedded_shards()`` builds it once under ``cache_dir`` (default ``~/.cache/tokscale``) and returns the brace
pattern of the requested split; later calls reuse it. Concurrent callers (every rank of a job) are safe: the
build holds a file lock and happens in a temporary folder renamed into place when complete.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import logging
import os
import random
import shutil
from pathlib import Path

from PIL import Image

log = logging.getLogger(__name__)

VERSION = "v1"
PHOTOS = (
    "astronaut.png",
    "camera.png",
    "chelsea.png",
    "coffee.png",
    "coins.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "motorcycle_left.png",
    "retina.jpg",
    "rocket.jpg",
)
SPLITS = {"train": 100, "eval": 20}  # crops per class
IMAGE_SIZE = 160
SAMPLES_PER_SHARD = 125


def photo_dir() -> Path:
    spec = importlib.util.find_spec("skimage")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the embedded dataset is built from the photographs bundled with scikit-image, which is not "
            "installed: pip install scikit-image (or point data.train_shards at your own shards)"
        )
    directory = Path(spec.origin).parent / "data"
    missing = [p for p in PHOTOS if not (directory / p).is_file()]
    if missing:
        raise FileNotFoundError(f"scikit-image at {directory} lacks the bundled photos {missing}")
    return directory


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tokscale"


def _crops(photo: Image.Image, count: int, rng: random.Random):
    w, h = photo.size
    short = min(w, h)
    for _ in range(count):
        side = int(short * rng.uniform(0.3, 1.0))
        left = rng.randint(0, w - side)
        top = rng.randint(0, h - side)
        yield photo.crop((left, top, left + side, top + side)).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)


def _build(root: Path) -> None:
    from tokscale.data.shards import convert

    source = photo_dir()
    for split_index, (split, per_class) in enumerate(SPLITS.items()):
        src = root / "_src" / split
        for class_index, name in enumerate(PHOTOS):
            folder = src / Path(name).stem
            folder.mkdir(parents=True, exist_ok=True)
            photo = Image.open(source / name).convert("RGB")
            rng = random.Random(1000 * split_index + class_index)
            for i, crop in enumerate(_crops(photo, per_class, rng)):
                crop.save(folder / f"{Path(name).stem}_{split}_{i:04d}.jpg", quality=90)
        convert(src, root / split, samples_per_shard=SAMPLES_PER_SHARD, prefix=split, jobs=1, progress=False)
        shutil.rmtree(root / split / ".progress")
    shutil.rmtree(root / "_src")
    (root / "README.txt").write_text(
        "tokscale embedded dataset "
        + VERSION
        + ": crops of scikit-image's bundled photographs, label = photo.\n"
    )


def embedded_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder of the built dataset, building it first if needed."""
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    root = cache / f"embedded-{VERSION}"
    if (root / "eval" / "manifest.json").is_file():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f"embedded-{VERSION}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # other local ranks wait here, then find it built
        if (root / "eval" / "manifest.json").is_file():
            return root
        tmp = cache / f"embedded-{VERSION}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        log.info("building the embedded dataset under %s (once)", root)
        _build(tmp)
        try:
            os.rename(tmp, root)
        except OSError:  # another node on a shared filesystem (where flock may not hold) finished first
            if not (root / "eval" / "manifest.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def embedded_shards(cache_dir: str | None = None, split: str = "train") -> str:
    """Brace pattern of the embedded dataset's ``train`` or ``eval`` shards (absolute paths)."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: expected one of {list(SPLITS)}")
    root = embedded_root(cache_dir)
    manifest = json.loads((root / split / "manifest.json").read_text())
    return str(root / split / manifest["pattern"])
