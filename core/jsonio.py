"""Strict JSON for every metrics file: NaN and Infinity are not JSON, and strict parsers (``json.loads(text,
parse_constant=...)`` that refuses them, JavaScript, jq) reject files that hold them.

    text = strict_dumps({"is_mean": float("nan")})   # '{"is_mean": null, "is_mean_undefined": "nan"}'

A non-finite number becomes ``null``, and beside it ``<key>_undefined`` says which value it was (unless the
caller already wrote a reason there); in a list the element becomes ``null`` alone.
"""

from __future__ import annotations

import json
import math
from typing import Any


def strict(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (and its reason beside it in a dict)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        out: dict = {}
        for k, v in value.items():
            out[k] = strict(v)
            if isinstance(v, float) and not math.isfinite(v):
                out.setdefault(f"{k}_undefined", "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf"))
        for k in value:  # a reason the caller wrote wins over ours
            if f"{k}_undefined" in value:
                out[f"{k}_undefined"] = value[f"{k}_undefined"]
        return out
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    return value


def strict_dumps(value: Any, **kwargs) -> str:
    return json.dumps(strict(value), allow_nan=False, **kwargs)
