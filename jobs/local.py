"""N local training processes, like ``torchrun --standalone --nproc_per_node N``.

    tokscale train tokenizer tokenizer/demo --nproc 2 train.zero_stage=2

Each process gets RANK / LOCAL_RANK / WORLD_SIZE / LOCAL_WORLD_SIZE / MASTER_ADDR / MASTER_PORT, the only
variables training reads. The first process to fail takes the others down (a rank left alone would wait in a
collective until gloo's timeout).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import runpy
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from tokscale.distributed import free_port

log = logging.getLogger(__name__)

POLL_S = 0.2


def rank_env(rank: int, nproc: int, port: int) -> dict[str, str]:
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(nproc),
        "LOCAL_WORLD_SIZE": str(nproc),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }


def launch_local(nproc: int, target: Sequence[str] | Callable, *args: Any, **kwargs: Any) -> Any:
    """Run ``target`` in ``nproc`` local processes with the torch.distributed environment set.

    ``target`` is either
    - a Python argv (``["-m", "tokscale.tokenizers.train", CONFIG, *OVERRIDES]`` or ``["script.py", ...]``):
      each rank runs it like ``python *argv`` (through :func:`run_argv`, so a rank that exits 0 skips the
      interpreter teardown); returns 0 when every rank exits 0, else the first failing rank's exit code; or
    - a picklable function: each rank calls ``target(*args, **kwargs)`` in a spawned process and ends through
      :func:`tokscale.shutdown.finish`; returns the list of per-rank return values, raises RuntimeError
      naming the rank when one fails.
    """
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    port = free_port()
    if callable(target):
        return _launch_function(nproc, port, target, args, kwargs)
    if args or kwargs:
        raise TypeError("extra arguments are only passed to a function target; put them in the argv")
    return _launch_argv(nproc, port, list(target))


def _launch_argv(nproc: int, port: int, argv: list[str]) -> int:
    procs = []
    for rank in range(nproc):
        env = {**os.environ, **rank_env(rank, nproc, port)}
        # Through run_argv, so that a rank that finishes ends with finish() (see tokscale.shutdown).
        procs.append(subprocess.Popen([sys.executable, "-m", "tokscale.jobs.local", *argv], env=env))
    try:
        codes, first = _wait_all(
            procs, lambda p: p.poll(), lambda p: p.send_signal(signal.SIGTERM), lambda p: p.kill()
        )
    except KeyboardInterrupt:
        for p in procs:
            p.kill()
        raise
    if first is not None:
        log.error("rank %d exited with %d; the other ranks were stopped", first, codes[first])
        return codes[first]
    return 0


def _wait_all(procs, poll, terminate, kill, tick=lambda: None) -> tuple[list[int], int | None]:
    """Wait for every process; when one exits non-zero, stop the rest (SIGTERM, then SIGKILL after 10 s).
    Returns the exit codes and the index of the first process that failed (None if none did)."""
    codes: list[int | None] = [None] * len(procs)
    first = None
    deadline = None
    while any(c is None for c in codes):
        tick()
        for i, p in enumerate(procs):
            if codes[i] is None:
                codes[i] = poll(p)
                if codes[i] not in (None, 0) and first is None:
                    first = i
        if deadline is None and first is not None:
            deadline = time.monotonic() + 10
            for i, p in enumerate(procs):
                if codes[i] is None:
                    terminate(p)
        if deadline is not None and time.monotonic() > deadline:
            for i, p in enumerate(procs):
                if codes[i] is None:
                    kill(p)
        time.sleep(POLL_S)
    return [int(c) for c in codes], first


def _worker(rank: int, nproc: int, port: int, fn: Callable, args: tuple, kwargs: dict, results) -> None:
    from tokscale.shutdown import exit_process, finish

    os.environ.update(rank_env(rank, nproc, port))
    try:
        value = fn(*args, **kwargs)
    except BaseException:
        _send(results, (rank, "error", traceback.format_exc()))
        exit_process(1)
    _send(results, (rank, "ok", value))
    finish(0)


def _send(results, item) -> None:
    results.put(item)
    results.close()
    results.join_thread()  # the item must reach the parent before os._exit


def _launch_function(nproc: int, port: int, fn: Callable, args: tuple, kwargs: dict) -> list[Any]:
    ctx = mp.get_context("spawn")  # fork after torch threads exist can deadlock
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(rank, nproc, port, fn, args, kwargs, results), daemon=False)
        for rank in range(nproc)
    ]
    for p in procs:
        p.start()
    values: dict[int, tuple[str, Any]] = {}

    def drain():  # read while waiting: a child blocks on exit until its value left the pipe
        while True:
            try:
                rank, status, value = results.get_nowait()
            except queue.Empty:
                return
            values[rank] = (status, value)

    codes, first = _wait_all(procs, lambda p: p.exitcode, lambda p: p.terminate(), lambda p: p.kill(), drain)
    drain()
    order = ([first] if first is not None else []) + list(range(nproc))
    for rank in order:
        status, value = values.get(rank, ("missing", None))
        if status == "error":
            raise RuntimeError(f"rank {rank} of {nproc} failed:\n{value}")
        if codes[rank] != 0 or status != "ok":
            raise RuntimeError(f"rank {rank} of {nproc} exited with code {codes[rank]} without a result")
    return [values[r][1] for r in range(nproc)]


def run_argv(argv: list[str]) -> NoReturn:
    """Run ``python ARGV`` (``-m module ...`` or ``script.py ...``) in this process, then leave through
    :func:`tokscale.shutdown.finish` when it exits 0. An exception or a non-zero exit keeps Python's own
    behaviour (traceback, exit code), so failures look exactly as without this wrapper."""
    from tokscale.shutdown import exit_process, finish

    if not argv:
        raise SystemExit("usage: python -m tokscale.jobs.local (-m MODULE | SCRIPT) [ARGS...]")
    try:
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            runpy.run_path(argv[0], run_name="__main__")
        code = 0
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            code = stop.code or 0
        else:  # sys.exit("message"): Python prints it and exits 1
            print(stop.code, file=sys.stderr)
            code = 1
    if code == 0:
        finish(0)
    exit_process(code)


if __name__ == "__main__":
    run_argv(sys.argv[1:])
