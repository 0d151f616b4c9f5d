"""One error path for every ``tokscale`` process: one line on the screen, the traceback in a log file.

    tokscale: error: shard /data/train-000003.tar key 's3_0007': image member .png fails to decode (...) \
(traceback: runs/demo/logs/error.log; rerun with --debug to see it here)

:func:`report` is what ``tokscale`` (tokscale.cli), every training rank (tokscale.train) and every
``launch_local`` rank (tokscale.jobs.local) do with an exception that ends them.

Expected failures (exit 2: the user can fix them) print one line and no traceback: ValueError (ConfigError,
ShardError, BadSampleError, ...), OSError (FileNotFoundError, a full disk, a permission), torch's failed file
write (a full disk), torch.distributed's network errors (a port in use), a rank that lost its peers (another
rank failed first), and a :class:`ReportedError` (a failure another process already reported: a rank of
``--nproc``). Ctrl-C exits 130. Anything else is a bug (exit 1): its traceback is printed as well, since it is
not the user's mistake. ``--debug`` (or ``TOKSCALE_DEBUG=1`` in a rank's environment) prints the traceback for
every failure.

The message is the original one: an error raised in a DataLoader worker reaches the main process wrapped by
torch ("Caught ShardError in DataLoader worker process 0. Original Traceback ..."); the wrapper's text is parsed
back to the worker's own sentence. An error raised ``from`` an expected one (``__cause__``) is reported by that
cause; one raised while handling an exception (``__context__``) only by an OSError, a failed torch write or
Ctrl-C found there, since a bug raised while handling a ValueError is still a bug.

Where the traceback goes (appended, each entry led by time, pid, rank, cwd and argv):

1. ``log_dir`` when the caller names one: the run's ``RUN_DIR/logs`` (``tokscale train`` sets ``args.log_dir``,
   which tokscale.cli passes; tokscale.train passes its config's; ``tokscale eval`` its output folder's);
2. else ``$TOKSCALE_LOG_DIR``, or ``~/.cache/tokscale/logs``.

The file is ``error.log`` (``last-error.log`` outside a run), ``error-rank{R}.log`` when WORLD_SIZE > 1.

A rank of a multi-process run prefixes its line with ``rank R:`` and records its failure for the launcher: as
``$TOKSCALE_RANK_REPORTS/failed-rank{R}.json`` when the launcher set that variable (tokscale.jobs.local does,
and then prints the one line itself, so the rank prints nothing), else as ``failed-rank{R}.txt`` next to its
log (torchrun, Slurm). This module imports nothing heavy: it runs before and after torch.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shlex
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

RANK_REPORTS_ENV = "TOKSCALE_RANK_REPORTS"  # a folder the launcher reads failed-rank{R}.json from
LOG_DIR_ENV = "TOKSCALE_LOG_DIR"
DEBUG_ENV = "TOKSCALE_DEBUG"
EXIT_EXPECTED, EXIT_BUG, EXIT_INTERRUPTED = 2, 1, 130
MAX_CHARS = 2000  # a message listing thousands of shards must still fit on a screen
DEBUG_HINT = "rerun with --debug to see it here"


class ReportedError(RuntimeError):
    """A failure another process already phrased and logged (a rank of a local launch).

    ``str()`` is its one line; ``log_path`` the log holding its traceback, ``details`` that traceback (shown
    with --debug, and always when ``bug``), ``exit_code`` what the command exits with.
    """

    def __init__(
        self,
        message: str,
        *,
        exit_code: int = EXIT_EXPECTED,
        log_path: str | None = None,
        details: str = "",
        bug: bool = False,
    ):
        super().__init__(message)
        self.exit_code, self.log_path, self.details, self.bug = exit_code, log_path, details, bug


# -- what to say ----------------------------------------------------------------------------------------------
_WRAPPER = re.compile(
    r"Caught (?P<name>\w+) (?P<where>[^\n]*?)\.\nOriginal Traceback \(most recent call last\):\n"
)
_TRACEBACK = "Traceback (most recent call last):\n"
_QUALNAME = re.compile(r"[A-Za-z_][\w.]*")
# gloo / NCCL when the other end of a collective is gone: the rank that failed first has the real message.
_PEER_LOST = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "remote process exited",
    "NCCL communicator was aborted",
)
_OS_HINTS = {
    errno.ENOSPC: "the disk is full: free space (df -h) or write to another disk (e.g. another run_dir)",
    errno.EDQUOT: "over the disk quota: free space or write somewhere else",
    errno.EACCES: "check the owner and mode of the path (ls -l), or choose a path you may use",
    errno.EPERM: "check the owner and mode of the path (ls -l), or choose a path you may use",
    errno.EROFS: "the file system is read-only: write somewhere else",
    errno.ENOENT: "check the path (a relative one is taken from the current directory)",
    errno.ENOTDIR: "check the path: a part of it is a file, not a directory",
    errno.EISDIR: "check the path: it is a directory, a file was expected",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n) or lower data.num_workers",
    errno.ENFILE: "too many open files on this machine: lower data.num_workers",
    errno.ENOMEM: "out of memory: lower data.batch_size or data.num_workers",
    errno.EPIPE: "the output was closed early (e.g. piped into head)",
    errno.ECONNREFUSED: "nothing listens there: check the address and port, and that the service is up",
    errno.ETIMEDOUT: "the address did not answer: check it and the network",
}


def one_line(text: str) -> str:
    """``text`` on one line (its lines joined by spaces), cut to MAX_CHARS."""
    flat = " ".join(part.strip() for part in str(text).splitlines() if part.strip())
    return flat if len(flat) <= MAX_CHARS else flat[: MAX_CHARS - 3] + "..."


def unwrap_worker_message(text: str) -> tuple[str, str, str] | None:
    """``(where, qualified type name, message)`` of the original exception in the text torch's
    ExceptionWrapper gives the exception it re-raises (DataLoader workers, pin-memory threads); None for other
    text. The original is the last exception of the quoted traceback: with ``raise ... from`` the causes come
    first, and every frame line is indented, so its ``module.Type: message`` is the first unindented line
    after the last traceback header."""
    m = _WRAPPER.match(text)
    if m is None:
        return None
    body = text[m.end() :]
    last = body.rfind(_TRACEBACK)
    if last >= 0:
        body = body[last + len(_TRACEBACK) :]
    lines = body.splitlines()
    start = next((i for i, line in enumerate(lines) if line and not line[0].isspace()), None)
    if start is None:
        return None
    head, rest = lines[start], lines[start + 1 :]
    qual, _, msg = head.partition(": ")
    if not _QUALNAME.fullmatch(qual):
        return m["where"], m["name"], "\n".join([head, *rest])
    return m["where"], qual, "\n".join([msg, *rest])


def _resolve(qual: str) -> type | None:
    """The exception class a qualified name refers to, from modules already imported (never imports)."""
    module, _, name = qual.rpartition(".")
    # Python's traceback leaves the module out for builtins and for classes of the __main__ script.
    for mod in [module] if module else ["builtins", "__main__"]:
        cls = getattr(sys.modules.get(mod), name, None)
        if isinstance(cls, type) and issubclass(cls, BaseException):
            return cls
    return None


def _os_message(err: OSError) -> str:
    if not err.strerror:  # raised by tokscale with its own sentence, e.g. "shard directory X does not exist"
        return one_line(str(err)) or type(err).__name__
    name = errno.errorcode.get(err.errno, str(err.errno)) if err.errno is not None else type(err).__name__
    files = " -> ".join(str(f) for f in (err.filename, err.filename2) if f is not None)
    text = f"{files}: {err.strerror} ({name})" if files else f"{err.strerror} ({name})"
    hint = _OS_HINTS.get(err.errno)
    return one_line(f"{text}; {hint}" if hint else text)


def _world() -> tuple[int, int]:
    try:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    except ValueError:
        return 0, 1


def _classify(exc: BaseException) -> tuple[str, str] | None:
    """``(kind, message)`` of one exception, None for a bug. Kinds: value, os, write (failed torch write),
    peer (lost the other ranks), interrupted, reported."""
    if isinstance(exc, ReportedError):
        return "reported", str(exc)
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted", "interrupted"
    text = str(exc)
    wrapped = unwrap_worker_message(text)
    if wrapped is not None:
        _, qual, msg = wrapped
        # torch rebuilds the original type when it can, else raises RuntimeError carrying the text.
        cls = type(exc) if qual.rpartition(".")[2] == type(exc).__name__ else _resolve(qual)
        if cls is not None and issubclass(cls, OSError):
            return "os", one_line(msg)
        if cls is not None and issubclass(cls, ValueError):
            return "value", one_line(msg)
        return None
    if isinstance(exc, OSError):
        return "os", _os_message(exc)
    if isinstance(exc, ValueError):
        return "value", one_line(text) or type(exc).__name__
    if isinstance(exc, RuntimeError) and "inline_container.cc" in text:
        first = one_line(text.splitlines()[0] if text else "")
        return "write", (
            f"writing a torch file failed ({first}): the disk is probably full or over quota; free space "
            "(df -h) or write to another disk (e.g. another run_dir)"
        )
    if any(c.__name__ == "DistNetworkError" for c in type(exc).__mro__):  # torch.distributed's, not imported
        return "os", (
            f"{one_line(text)}; check MASTER_ADDR and MASTER_PORT (a port in use is held by another process: "
            "rerun, or set MASTER_PORT to a free one)"
        )
    if isinstance(exc, RuntimeError) and _world()[1] > 1 and any(s in text for s in _PEER_LOST):
        first = one_line(text.splitlines()[0]).split(". ")[0]  # gloo goes on with advice and emoji
        return "peer", (
            f"lost contact with the other ranks ({first}); another rank probably failed first, and its own "
            "error says why"
        )
    return None


def _links(exc: BaseException) -> Iterator[tuple[BaseException, bool]]:
    """``exc`` and the exceptions behind it, each with whether an implicit ``__context__`` was crossed."""
    seen: set[int] = set()
    implicit = False
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur, implicit
        if cur.__cause__ is not None:
            cur = cur.__cause__
        elif cur.__context__ is not None and not cur.__suppress_context__:
            cur, implicit = cur.__context__, True
        else:
            cur = None


def describe(exc: BaseException) -> tuple[str, str] | None:
    """``(kind, message)`` of an expected failure, without a rank prefix; None for a bug."""
    for link, implicit in _links(exc):
        found = _classify(link)
        if found is not None and (not implicit or found[0] in ("os", "write", "interrupted")):
            return found
    return None


def user_message(exc: BaseException) -> str | None:
    """The one-line message for an expected failure (``rank R: ...`` when WORLD_SIZE > 1); None for a bug."""
    found = describe(exc)
    if found is None:
        return None
    rank, world = _world()
    return f"rank {rank}: {found[1]}" if world > 1 else found[1]


def bug_message(exc: BaseException) -> str:
    """The one line for a bug: the type and message (a worker's own, when torch wrapped it)."""
    wrapped = unwrap_worker_message(str(exc))
    if wrapped is not None:
        where, qual, msg = wrapped
        return one_line(f"internal error {where}: {qual.rpartition('.')[2]}: {msg}")
    return one_line(f"internal error: {type(exc).__name__}: {exc}")


def failure_record(exc: BaseException) -> dict:
    """What a rank tells its launcher: kind (a :func:`describe` kind, or bug), one-line message (no rank
    prefix), exit code, traceback and time."""
    found = describe(exc)
    if isinstance(exc, ReportedError):
        kind, message, code = ("bug" if exc.bug else "reported"), str(exc), exc.exit_code
    elif found is None:
        kind, message, code = "bug", bug_message(exc), EXIT_BUG
    else:
        kind, message = found
        code = EXIT_INTERRUPTED if kind == "interrupted" else EXIT_EXPECTED
    tb = getattr(exc, "details", "") or "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return {"kind": kind, "message": message, "exit_code": code, "traceback": tb, "time": time.time()}


# -- where the traceback goes -----------------------------------------------------------------------------------
def default_log_dir() -> Path:
    return Path(os.environ.get(LOG_DIR_ENV) or Path.home() / ".cache" / "tokscale" / "logs")


def _log_name(prefix: str) -> str:
    rank, world = _world()
    return f"{prefix}-rank{rank}.log" if world > 1 else f"{prefix}.log"


def default_log_path() -> Path:
    return default_log_dir().absolute() / _log_name("last-error")


def log_path_for(exc: BaseException, log_dir: str | os.PathLike | None = None) -> Path:
    """Where ``exc``'s traceback goes (see the module docstring)."""
    if log_dir:
        return Path(log_dir).absolute() / _log_name("error")
    return default_log_path()


def _append_log(path: Path, text: str) -> None:
    rank, world = _world()
    header = (
        f"===== {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()}"
        + (f" rank {rank} of {world}" if world > 1 else "")
        + f"\ncwd: {os.getcwd()}\nargv: {shlex.join(sys.argv)}\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(header + text + ("" if text.endswith("\n") else "\n"))


def write_log(path: Path, text: str) -> tuple[Path | None, str]:
    """Append ``text`` to ``path``, or to the default log folder when that fails (the run's disk may be the
    full one). Returns the path written (None if neither could be) and why the first choice failed."""
    why = ""
    for candidate in dict.fromkeys([path, default_log_path()]):
        try:
            _append_log(candidate, text)
            return candidate, why
        except OSError as err:
            why = why or _os_message(err)
    return None, why


def _record_for_launcher(rank: int, world: int, record: dict, log_path: Path | None) -> bool:
    """Leave the failure where the launcher looks; True when the launcher will print it (so this rank should
    not). Without a launcher's folder, a rank of several writes failed-rank{R}.txt next to its log."""
    reports = os.environ.get(RANK_REPORTS_ENV)
    if reports:
        target = Path(reports) / f"failed-rank{rank}.json"
        tmp = target.with_suffix(f".tmp{os.getpid()}")
        try:  # written whole, then renamed: a rank killed half-way leaves no half record
            tmp.write_text(json.dumps({**record, "rank": rank, "log": str(log_path) if log_path else None}))
            os.replace(tmp, target)
            return True
        except OSError:
            return False  # say it here instead
    if world > 1 and log_path is not None:
        try:
            (log_path.parent / f"failed-rank{rank}.txt").write_text(f"rank {rank}: {record['message']}\n")
        except OSError:
            pass
    return False


def _debug_default() -> bool:
    return os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes")


def report(
    exc: BaseException,
    log_path: str | os.PathLike | None = None,
    *,
    log_dir: str | os.PathLike | None = None,
    debug: bool | None = None,
) -> int:
    """Log ``exc``'s traceback, print its one line on stderr and return the exit code: 2 for an expected failure,
    1 for a bug (whose traceback is printed too), 130 for Ctrl-C, a ReportedError's own code.

    ``log_path`` defaults to :func:`log_path_for` (``log_dir``, the run's folder, the default folder)."""
    debug = _debug_default() if debug is None else debug
    rank, world = _world()
    record = failure_record(exc)
    bug = record["kind"] == "bug"
    written: Path | None
    if isinstance(exc, ReportedError) and exc.log_path:
        written, why = Path(exc.log_path), ""  # the rank that failed logged it already
    else:
        target = Path(log_path) if log_path is not None else log_path_for(exc, log_dir)
        written, why = write_log(target, record["traceback"])
    if _record_for_launcher(rank, world, record, written):
        return record["exit_code"]
    prefix = f"rank {rank}: " if world > 1 and not isinstance(exc, ReportedError) else ""
    show = bug or debug or written is None
    if written is None:
        where = f"traceback above; it could not be logged: {why}"
    elif bug:
        where = (
            "a bug in tokscale or a plugin, not in your input: please report it with the traceback above, "
            f"also in {written}"
        )
    elif debug:
        where = f"traceback above, also in {written}"
    else:
        where = f"traceback: {written}; {DEBUG_HINT}"
    try:
        if show:
            sys.stderr.write(record["traceback"] + ("" if record["traceback"].endswith("\n") else "\n"))
        sys.stderr.write(f"tokscale: error: {prefix}{record['message']} ({where})\n")
        sys.stderr.flush()
    except OSError:  # a closed stderr: the log and the exit code are all that is left
        pass
    return record["exit_code"]


def first_rank_failure(reports_dir: str | os.PathLike, ranks: list[int]) -> dict | None:
    """The failure record that explains a local launch, among those ``ranks`` left in ``reports_dir``: the
    earliest that is not a rank losing its peers (that one is a consequence), else the earliest."""
    records = []
    for rank in ranks:
        try:
            records.append(json.loads((Path(reports_dir) / f"failed-rank{rank}.json").read_text()))
        except (OSError, ValueError):
            continue
    if not records:
        return None
    return min(records, key=lambda r: (r.get("kind") == "peer", r.get("time", 0.0)))
