"""N local training processes, like ``torchrun --standalone --nproc_per_node N``.

    tokscale train tokenizer tokenizer/demo --nproc 2 train.zero_stage=2

Each process gets RANK / LOCAL_RANK / WORLD_SIZE / LOCAL_WORLD_SIZE / MASTER_ADDR / MASTER_PORT, the only
variables training reads. The first process to fail takes the others down (a rank left alone would wait in a
collective until gloo's timeout).

Failures reach the user by the failing rank's own message, once: each rank reports through
tokscale.errors.report, which, seeing ``TOKSCALE_RANK_REPORTS`` (a folder this launcher makes per launch),
writes failed-rank{R}.json there instead of printing; the launcher then raises :class:`RankFailed`
("rank 1 of 2 failed: <its message>", naming the rank's log), which ``tokscale`` prints as its one error line.
The other ranks are stopped with SIGTERM, whose default action ends them without a word.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import runpy
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from tokscale.distributed import free_port
from tokscale.errors import RANK_REPORTS_ENV, ReportedError, failure_record, first_rank_failure

log = logging.getLogger(__name__)

POLL_S = 0.2


class RankFailed(ReportedError):
    """Rank ``rank`` of ``nproc`` failed; ``str()`` is "rank R of N failed: <the rank's own one line>", ``log_path``
    its log (None for a function rank, whose traceback is ``details``), ``exit_code`` its exit code."""

    def __init__(self, rank: int, nproc: int, record: dict):
        self.rank, self.nproc = rank, nproc
        super().__init__(
            f"rank {rank} of {nproc} failed: {record['message']}",
            exit_code=int(record.get("exit_code") or 1),
            log_path=record.get("log"),
            details=record.get("traceback", ""),
            bug=record.get("kind") == "bug",
        )


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
      interpreter teardown); returns 0 when every rank exits 0; raises :class:`RankFailed` with the message of
      the rank that failed first when it reported one (an exception, through tokscale.errors.report), else
      returns the first failing rank's exit code (``sys.exit(7)``, a signal); or
    - a picklable function: each rank calls ``target(*args, **kwargs)`` in a spawned process and ends through
      :func:`tokscale.shutdown.finish`; returns the list of per-rank return values, raises
      :class:`RankFailed` (a RuntimeError) naming the rank when one fails, or RuntimeError when one died
      without a result.
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
    reports = tempfile.mkdtemp(prefix="tokscale-ranks-")  # per launch: no record of an earlier run is read
    try:
        procs = []
        for rank in range(nproc):
            env = {**os.environ, **rank_env(rank, nproc, port), RANK_REPORTS_ENV: reports}
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
        if first is None:
            return 0
        # Every rank that failed on its own left a record; ranks stopped by SIGTERM left none.
        record = first_rank_failure(reports, [r for r, c in enumerate(codes) if c != 0])
        if record is not None:
            log.info(
                "rank %d exited with %d; the other ranks were stopped", record["rank"], codes[record["rank"]]
            )
            raise RankFailed(int(record["rank"]), nproc, record)
        log.error("rank %d exited with %d; the other ranks were stopped", first, codes[first])
        return codes[first]
    finally:
        shutil.rmtree(reports, ignore_errors=True)


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
    except BaseException as err:
        record = failure_record(err)
        _send(results, (rank, "error", record))
        exit_process(record["exit_code"])
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
            raise RankFailed(rank, nproc, value)
        if codes[rank] != 0 or status != "ok":
            raise RuntimeError(f"rank {rank} of {nproc} exited with code {codes[rank]} without a result")
    return [values[r][1] for r in range(nproc)]


def run_argv(argv: list[str]) -> NoReturn:
    """Run ``python ARGV`` (``-m module ...`` or ``script.py ...``) in this process, then leave through
    :func:`tokscale.shutdown.finish` when it exits 0. A non-zero exit keeps its code (and a ``sys.exit``
    message); an exception goes through tokscale.errors.report like any tokscale failure (its one line and log
    reach the launcher), then the rank ends at once with the code report gives."""
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
    except (Exception, KeyboardInterrupt) as err:
        from tokscale.errors import report

        exit_process(report(err))
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
