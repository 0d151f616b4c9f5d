"""Rank-0 metric logger: TensorBoard scalars and images plus metrics.jsonl in the run directory."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from tokscale.jsonio import strict_dumps

log = logging.getLogger(__name__)


class MetricLogger:
    """Only rank 0 writes; other ranks get a logger whose methods do nothing, so call sites need no checks."""

    def __init__(self, run_dir: str | Path, enabled: bool):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self._tb = None
        self._jsonl = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tb"))
            self._jsonl = open(self.run_dir / "metrics.jsonl", "a")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        for k, v in values.items():
            self._tb.add_scalar(k, v, step)
        self._jsonl.write(strict_dumps({"step": step, **values}) + "\n")
        self._jsonl.flush()

    def image(self, step: int, tag: str, grid_CHW: torch.Tensor) -> None:
        """grid in [0, 1], (3, H, W)."""
        if self.enabled:
            self._tb.add_image(tag, grid_CHW.clamp(0, 1), step)

    def close(self) -> None:
        if self.enabled:
            self._tb.flush()
            self._tb.close()
            self._jsonl.close()
