"""Run the ``tokscale`` command (or ``python -m tokscale.train``) in a subprocess, with the toy task registered:
the one helper the tests in tests/core start real processes through."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tokscale.registry import TRAINERS_ENV

TOY = Path(__file__).with_name("toy_task.py")
TOY_SPEC = f"toy={TOY}:ToyTask"
# Left in os.environ by a launcher or an in-process run of another test; a child must start its own world.
DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env[TRAINERS_ENV] = TOY_SPEC
    env.update(extra)
    return env


def tokscale(
    *args: str, module: str = "tokscale.cli", timeout: int = 300, **env: str
) -> subprocess.CompletedProcess:
    """``python -m MODULE ARGS`` with the toy registered; ``env`` adds variables (TOKSCALE_FAULT=..., ...)."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        env=child_env(**env),
        timeout=timeout,
    )
