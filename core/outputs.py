"""Output folders that commands write whole or not at all, and that never delete what tokscale did not write.

    with output_folder(out, kind="export", overwrite=args.overwrite) as tmp:
        (tmp / "model.safetensors").write_bytes(...)      # everything goes into a temporary sibling
    # here `out` holds the new files; a crash before this point left `out` as it was

Every folder written this way holds a marker, ``.tokscale-output`` (JSON: kind and the files written), so a later
run can tell a previous tokscale output of the same kind (replaced whole) from a folder with the user's files in
it (refused, naming what is there; ``overwrite=True`` writes the new files into it and keeps the others). A file
in the way is an error too.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

MARKER = ".tokscale-output"


def read_marker(folder: Path) -> dict | None:
    try:
        return json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _entries(folder: Path) -> list[str]:
    """Every file below ``folder``, relative, folders ending in '/' when empty."""
    found = []
    for p in sorted(folder.rglob("*")):
        if p.is_file() or p.is_symlink():
            found.append(str(p.relative_to(folder)))
        elif p.is_dir() and not any(p.iterdir()):
            found.append(str(p.relative_to(folder)) + "/")
    return found


def foreign_entries(folder: Path, kind: str) -> list[str]:
    """What in ``folder`` a previous tokscale output of this kind did not write (all of it when it has no marker
    or another kind's)."""
    marker = read_marker(folder)
    ours = set(marker.get("files", [])) | {MARKER} if marker and marker.get("kind") == kind else set()
    return [e for e in _entries(folder) if e not in ours]


def check_target(out: Path, kind: str, overwrite: bool = False) -> None:
    """Refuse, before any work, a target that is a file or a folder holding files tokscale did not write."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(
            f"{out} is a file, not a folder: give the {kind} a folder path that does not exist yet"
        )
    if out.is_dir() and not overwrite:
        foreign = foreign_entries(out, kind)
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise ValueError(
                f"{out} already holds files that are not a previous tokscale {kind} ({shown}); nothing was written. "
                f"Choose another folder, or pass --overwrite to write the {kind}'s files into it (files it did not "
                "write are kept)"
            )


@contextmanager
def output_folder(out: str | Path, kind: str, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``out`` to write into; on success put its files in place of ``out``."""
    out = Path(out)
    check_target(out, kind, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        files = _entries(tmp)
        (tmp / MARKER).write_text(json.dumps({"kind": kind, "files": files}, indent=1) + "\n")
        if not out.exists():
            os.replace(tmp, out)
        elif not foreign_entries(out, kind):  # empty, or a previous output of this kind: swap it whole
            old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:  # --overwrite into a folder with the user's files: replace ours file by file, keep theirs
            previous = read_marker(out) or {}
            for name in [*files, MARKER]:
                (out / name).parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp / name, out / name)
            stale = set(previous.get("files", [])) - set(files) if previous.get("kind") == kind else set()
            for name in stale:  # files the previous output of this kind wrote and this one does not
                (out / name).unlink(missing_ok=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish_folder(
    work: str | Path,
    out: str | Path,
    kind: str,
    overwrite: bool = False,
    keep: tuple[str, ...] = ("logs", "slurm"),
    copy: tuple[str, ...] = (),
) -> None:
    """A job's finished results into ``out`` whole: everything in the work folder ``work`` moves (``copy``:
    copied, e.g. the config a requeued job would read), except ``keep`` (a failure's traceback, a Slurm job's
    files), which stays; the work folder goes when nothing is left in it."""
    work = Path(work)
    with output_folder(out, kind, overwrite) as tmp:
        for item in work.iterdir():
            if item.name in keep:
                continue
            if item.name in copy:
                shutil.copy2(item, tmp / item.name)
            else:
                os.replace(item, tmp / item.name)
    for name in copy:
        (work / name).unlink(missing_ok=True)
    try:
        work.rmdir()
    except OSError:
        pass
