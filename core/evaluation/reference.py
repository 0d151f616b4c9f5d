"""Inception pool3 activations of an ADM reference batch's images, computed once and cached beside it.

An ADM reference batch (e.g. VIRTUAL_imagenet256_labeled.npz) stores ``mu``/``sigma`` for FID, but precision and
recall need the activations of its ``arr_0`` images (uint8 (N, H, W, 3)); the ADM evaluator recomputes them on
every run. Here they are computed with tokscale's Inception (the uint8 images go in unchanged: the network does
the TF-style resize to 299 and the (x - 128) / 128 scaling) and saved as float32 (N, 2048)
``<npz stem>.pool3-<key>.npy`` next to the npz, where ``key`` hashes the npz's sha256, the Inception weights'
sha256 and the feature extractor's name: another reference file or other weights get another cache file, so a
stale cache is never read. A cache that does not load as (N, 2048) finite float32 is reported and recomputed.
When the npz's folder is not writable the cache goes to ``$XDG_CACHE_HOME/tokscale`` (default
``~/.cache/tokscale``), and both places are looked in. Files are written under a temporary name and renamed.

Run it on one rank: the computation is not split across ranks (10,000 images: ~5 s at the 2,064 img/s `tokscale bench eval` measured on an H100).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from tokscale.evaluation.inception import FEATURE_DIM, FEATURE_EXTRACTOR

log = logging.getLogger(__name__)

IMAGES_KEY = "arr_0"
CACHE_VERSION = 1  # bump when the cached content changes meaning


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file, read in 1 MiB chunks (reference batches hold GBs of images)."""
    from tokscale.export import sha256

    return sha256(Path(path))


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/tokscale`` or ``~/.cache/tokscale``: where caches go when a data folder is read-only."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tokscale"


@contextmanager
def _images_member(path: Path):
    """(open stream positioned at the array data, shape, dtype, fortran_order) of the npz's ``arr_0``."""
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise ValueError(f"reference batch {str(path)!r} is not a readable npz file: {err}") from None
    with zf:
        names = [n[: -len(".npy")] if n.endswith(".npy") else n for n in zf.namelist()]
        if IMAGES_KEY not in names:
            raise ValueError(
                f"reference batch {str(path)!r} has no {IMAGES_KEY} (it holds {sorted(names)}): precision/recall "
                f"needs the reference images {IMAGES_KEY}, uint8 (N, H, W, 3), as in the ADM reference batches"
            )
        with zf.open(f"{IMAGES_KEY}.npy") as f:
            major, _ = np.lib.format.read_magic(f)
            read_header = (
                np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            )
            shape, fortran_order, dtype = read_header(f)
            if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3 or shape[0] < 1:
                raise ValueError(
                    f"reference batch {str(path)!r}: {IMAGES_KEY} must hold uint8 images (N, H, W, 3), got "
                    f"{dtype} {tuple(shape)}"
                )
            yield f, tuple(int(s) for s in shape), fortran_order


def reference_images_shape(path: str | Path) -> tuple[int, int, int, int]:
    """(N, H, W, 3) of the npz's ``arr_0`` from its header; ValueError naming the file when it is missing or is
    not uint8 images."""
    with _images_member(Path(path).expanduser()) as (_, shape, _):
        return shape


def _iter_image_batches(path: Path, batch_size: int):
    """uint8 (B, H, W, 3) batches of ``arr_0`` read from the zip member, never the whole array at once."""
    with _images_member(path) as (f, shape, fortran_order):
        if fortran_order:  # not what np.savez writes for image batches; read it whole
            images = np.load(path, allow_pickle=False)[IMAGES_KEY]
            for i in range(0, shape[0], batch_size):
                yield np.ascontiguousarray(images[i : i + batch_size])
            return
        per_image = shape[1] * shape[2] * shape[3]
        for i in range(0, shape[0], batch_size):
            n = min(batch_size, shape[0] - i)
            buf = bytearray(n * per_image)
            view = memoryview(buf)
            got = 0
            while got < len(buf):  # zip streams may return short reads
                m = f.readinto(view[got:])
                if not m:
                    raise ValueError(
                        f"reference batch {str(path)!r}: {IMAGES_KEY} ends after {i + got // per_image} of "
                        f"{shape[0]} images (truncated file)"
                    )
                got += m
            yield np.frombuffer(buf, dtype=np.uint8).reshape(n, *shape[1:])


def inception_identity(inception) -> str:
    """sha256 of the weights file the Inception was loaded from (``InceptionFeatures.weights_path``)."""
    weights = getattr(inception, "weights_path", None)
    if not weights:
        raise ValueError(
            "reference_activations keys its cache by the Inception weights, but this network has no "
            "weights_path: pass the module load_inception returns"
        )
    return file_sha256(weights)


def cache_name(npz_path: str | Path, reference_sha256: str, inception_sha256: str) -> str:
    key = json.dumps(
        {
            "version": CACHE_VERSION,
            "reference_sha256": reference_sha256,
            "inception_sha256": inception_sha256,
            "feature_extractor": FEATURE_EXTRACTOR,
        },
        sort_keys=True,
    )
    return f"{Path(npz_path).stem}.pool3-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npy"


def _read_cache(path: Path, num_images: int) -> np.ndarray | None:
    """The cached activations, or None (with a warning naming the file) when they are unusable."""
    try:
        acts = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        problem = f"unreadable ({err})"
    else:
        if acts.dtype != np.float32 or acts.shape != (num_images, FEATURE_DIM):
            problem = f"{acts.dtype} {acts.shape}, expected float32 {(num_images, FEATURE_DIM)}"
        elif not np.isfinite(acts).all():
            problem = "holds non-finite values"
        else:
            return acts
    log.warning("cached reference activations %s are corrupt: %s; recomputing them", path, problem)
    return None


def _save_atomic(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # per process: concurrent writers never collide
    try:
        with open(tmp, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@torch.no_grad()
def compute_activations(
    npz_path: str | Path, inception, device: str | torch.device, batch_size: int = 100, progress: bool = False
) -> np.ndarray:
    """float32 (N, 2048) pool3 activations of the npz's ``arr_0`` images, in file order (no cache)."""
    path = Path(npz_path).expanduser()
    num_images = reference_images_shape(path)[0]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc="reference activations", unit="img", total=num_images)
    out = np.empty((num_images, FEATURE_DIM), dtype=np.float32)
    done = 0
    for batch in _iter_image_batches(path, batch_size):
        # NHWC uint8 -> NCHW uint8, the layout of the evaluation stream's crops
        images = torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous().to(device)
        pool, _ = inception(images)
        out[done : done + len(batch)] = pool.float().cpu().numpy()
        done += len(batch)
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    return out


def reference_activations(
    npz_path: str | Path,
    inception,
    device: str | torch.device,
    batch_size: int = 100,
    progress: bool = False,
    cache_dir: str | Path | None = None,
) -> np.ndarray:
    """float32 (N, 2048) pool3 activations of an ADM reference batch's ``arr_0`` images, from the cache when one
    was made from the same file with the same Inception weights, else computed and cached.

    ``cache_dir``: where to read and write the cache; by default beside the npz, falling back to
    :func:`user_cache_dir` when that folder is not writable."""
    path = Path(npz_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"reference batch {str(path)!r} not found: expected an ADM-format npz with the reference images "
            f"{IMAGES_KEY} (e.g. VIRTUAL_imagenet256_labeled.npz)"
        )
    num_images = reference_images_shape(path)[0]
    name = cache_name(path, file_sha256(path), inception_identity(inception))
    places = [Path(cache_dir).expanduser()] if cache_dir is not None else [path.parent, user_cache_dir()]
    for folder in places:
        cached = folder / name
        if cached.is_file():
            acts = _read_cache(cached, num_images)
            if acts is not None:
                log.info("reference activations of %s read from %s", path, cached)
                return acts

    acts = compute_activations(path, inception, device, batch_size=batch_size, progress=progress)
    for i, folder in enumerate(places):
        target = folder / name
        try:
            _save_atomic(target, acts)
        except OSError as err:
            log.warning("cannot write reference activations to %s (%s)", target, err)
            continue
        if i == 0:
            log.info("reference activations of %s cached in %s", path, target)
        else:
            log.warning(
                "%s is not writable: reference activations of %s cached in %s", places[0], path, target
            )
        break
    else:
        log.warning("reference activations of %s were not cached; the next run computes them again", path)
    return acts
