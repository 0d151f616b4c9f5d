import io
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# tiny_run.py (shared by tests and multi-rank workers) imports as a plain module
sys.path.insert(0, str(Path(__file__).parent))


def write_image_shards(
    out: Path, num_shards: int = 2, per_shard: int = 16, size: int = 40, seed: int = 0
) -> str:
    """Real webdataset tar shards of smooth random-colour PNGs with class labels; returns a brace pattern."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for s in range(num_shards):
        with tarfile.open(out / f"train-{s:06d}.tar", "w") as tar:
            for i in range(per_shard):
                label = int(rng.integers(0, 4))
                a, b, c = rng.uniform(0, 1, size=(3, 3))
                img = np.stack([a[k] * xx + b[k] * yy + c[k] * 0.5 for k in range(3)], -1)
                buf = io.BytesIO()
                Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(buf, format="PNG")
                key = f"s{s}_{i:04d}"
                for name, data in ((f"{key}.png", buf.getvalue()), (f"{key}.cls", str(label).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    last = f"{num_shards - 1:06d}"
    return str(out / ("train-{000000.." + last + "}.tar"))


@pytest.fixture(scope="session")
def image_shards(tmp_path_factory) -> str:
    return write_image_shards(tmp_path_factory.mktemp("shards"))
