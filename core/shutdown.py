"""Leaving a training process without the interpreter teardown.

Why: with ZeRO-3 over gloo, 10-20% of runs that finished correctly (final checkpoint written, process group
destroyed) were seen to abort at interpreter exit with "terminate called without an active exception"
(SIGABRT), and Slurm then shows the job FAILED although the run is complete. The likely mechanism, described
upstream in pytorch/pytorch PR 179291 (abandoned, so not fixed in torch): gloo's C++ worker threads still hold
finished AsyncWork objects whose tensors carry Python references; ZeRO-3's prefetching all-gathers and
reduce-scatters are exactly such async work. When the interpreter finalises, a worker thread releasing them
tries to take the GIL of a dying interpreter and the process aborts. The race depends on thread timing, so a
retry would only hide it. It is not specific to ZeRO-3: in CI a plain two-process gloo worker (all_gather_object,
then destroy_process_group) aborted the same way once in a few hundred process exits.

What: every process that brought up a process group ends through :func:`finish`: Slurm tasks, ``launch_local``
workers, ``python -m tokscale.train`` under torchrun, every ``tokscale`` command (tokscale.cli.main),
``bench zero`` workers, the tests' worker scripts and the pytest process itself (tests/conftest.py). Once training
has returned on every rank, a barrier makes sure no rank is still talking to the
others, logs and std streams are flushed, and ``os._exit`` ends the process at once. Nothing useful happens in
the teardown it skips: the trainer has written its checkpoints and metrics before it returns, and ``os._exit``
only drops user-space buffers, which are flushed first.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn

log = logging.getLogger(__name__)


def flush_all() -> None:
    """Flush every logging handler and the std streams (os._exit would drop their buffers)."""
    for ref in list(getattr(logging, "_handlerList", [])):
        handler = ref() if callable(ref) else ref
        if handler is None:
            continue
        try:
            handler.flush()
        except Exception:  # a closed stream must not stop the exit
            pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass


def exit_process(code: int = 0) -> NoReturn:
    """Flush logs and streams, then end the process with ``code`` without running interpreter teardown."""
    flush_all()
    os._exit(code)


def barrier_if_distributed() -> None:
    """Wait for every rank when a process group is up (no-op otherwise, and without importing torch)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def finish(code: int = 0) -> NoReturn:
    """End a training process after a successful run: barrier across ranks, flush, ``os._exit(code)``.

    Meant for a rank whose training returned normally. With a non-zero ``code`` there is no barrier (the other
    ranks may be gone); an exception is better left to propagate, so that its traceback is printed.
    """
    if code == 0:
        barrier_if_distributed()
    exit_process(code)
