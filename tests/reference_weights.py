"""Reference state dicts regenerated from a fixture manifest (tests/fixtures/*/*/state_dict_manifest.json).

The formula is the fixtures README's: a floating tensor of n elements holds, for k = 1..n in row-major order,
w_k = m + s*sqrt(12)*(frac(sin(k*12.9898 + seed*78.233)*43758.5453) - 0.5) with seed = crc32(key) % 100000,
computed in float64 and cast to float32; integer buffers marked ``"fill": "zeros"`` are zeros.
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import numpy as np
import torch

FIXTURES = Path(__file__).parent / "fixtures"


def regenerate(manifest: dict) -> dict[str, torch.Tensor]:
    out = {}
    for key, spec in manifest.items():
        if spec.get("fill") == "zeros":
            out[key] = torch.zeros(spec["shape"], dtype=getattr(torch, spec["dtype"]))
            continue
        seed = zlib.crc32(key.encode()) % 100000
        k = np.arange(1, math.prod(spec["shape"]) + 1, dtype=np.float64)
        v = np.sin(k * 12.9898 + seed * 78.233) * 43758.5453
        w = spec["mean"] + spec["std"] * math.sqrt(12) * (v - np.floor(v) - 0.5)
        out[key] = torch.from_numpy(w.astype(np.float32).reshape(spec["shape"]))
    return out


def reference_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """The state dict of the fixture in ``folder`` (holding state_dict_manifest.json)."""
    return regenerate(json.loads((Path(folder) / "state_dict_manifest.json").read_text()))
