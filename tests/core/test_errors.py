"""One error path (tokscale.errors): an expected failure is one line naming what to fix, its traceback is in a log;
errors from DataLoader workers and from other ranks reach the user by their own message."""

from __future__ import annotations

import errno
import io
import re
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest
from torch.utils.data import DataLoader, IterableDataset

sys.path.insert(0, str(Path(__file__).parent))
from cli_run import tokscale as run_cli  # noqa: E402

from tokscale.data.samples import ShardError  # noqa: E402
from tokscale.errors import report, unwrap_worker_message, user_message
from tokscale.jobs.local import RankFailed, launch_local

SENTENCE = "shard /x/a.tar: truncated at key k3"
LINE = "tokscale: error:"


class TwoArgError(ValueError):
    """torch cannot rebuild it from the wrapper's text alone, so the main process gets a RuntimeError."""

    def __init__(self, shard: str, what: str):
        super().__init__(f"{shard}: {what}")


class Failing(IterableDataset):
    def __init__(self, kind: str):
        self.kind = kind

    def __iter__(self):
        try:
            raise OSError(errno.EIO, "Input/output error", "/x/a.tar")
        except OSError as err:  # the cause comes first in the quoted traceback; the sentence is the last one
            if self.kind == "shard":
                raise ShardError(SENTENCE) from err
            if self.kind == "two-args":
                raise TwoArgError("shard /x/a.tar", "truncated at key k3") from err
            raise KeyError("k3") from err


def _from_worker(kind: str) -> BaseException:
    with pytest.raises(Exception) as info:
        next(iter(DataLoader(Failing(kind), num_workers=1, batch_size=None)))
    return info.value


def test_a_data_loader_worker_error_reaches_the_user_as_its_own_sentence():
    err = _from_worker("shard")
    assert str(err).startswith("Caught ShardError in DataLoader worker process 0.")  # torch's wrapper
    assert user_message(err) == SENTENCE
    rebuilt = _from_worker("two-args")
    assert type(rebuilt) is RuntimeError and user_message(rebuilt) == SENTENCE
    assert user_message(_from_worker("key")) is None  # a KeyError in a worker is a bug, not bad input


def test_the_wrapper_text_is_parsed_to_the_last_exception_with_all_its_lines():
    text = (
        "Caught BadSampleError in DataLoader worker process 3.\nOriginal Traceback (most recent call last):\n"
        '  File "a.py", line 1, in f\n    g()\nOSError: cause\n\nThe above exception was the direct cause of '
        'the following exception:\n\nTraceback (most recent call last):\n  File "b.py", line 2, in g\n'
        "    raise X\n    ^^^^^^^\ntokscale.data.samples.BadSampleError: shard s key 'k'\nsecond line\n"
    )
    assert unwrap_worker_message(text) == (
        "in DataLoader worker process 3",
        "tokscale.data.samples.BadSampleError",
        "shard s key 'k'\nsecond line",
    )
    assert unwrap_worker_message("no wrapper here") is None


def test_expected_failures_and_bugs_are_told_apart(monkeypatch, tmp_path):
    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "ckpt.pt"))
    assert user_message(full).startswith(
        f"{tmp_path / 'ckpt.pt'}: No space left on device (ENOSPC); the disk"
    )
    # torch's zip writer after a failed write: a RuntimeError raised while handling the OSError
    try:
        try:
            raise full
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0") from None
    except RuntimeError as err:
        assert "disk is probably full" in user_message(err)
    try:
        try:
            int("x")
        except ValueError:
            {}["missing"]  # a bug while handling a ValueError stays a bug
    except KeyError as err:
        assert user_message(err) is None
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert user_message(ShardError(SENTENCE)) == f"rank 1: {SENTENCE}"


def test_a_bug_prints_its_traceback_and_exits_1(tmp_path, capsys):
    try:
        raise ZeroDivisionError("division by zero")
    except ZeroDivisionError as err:
        code = report(err, tmp_path / "error.log")
    err_text = capsys.readouterr().err
    assert code == 1 and "Traceback" in err_text
    assert err_text.splitlines()[-1].startswith(f"{LINE} internal error: ZeroDivisionError: division by zero")
    assert "ZeroDivisionError" in (tmp_path / "error.log").read_text()


def tokscale(*args: str, log_dir: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return run_cli(
        *args, timeout=timeout, TOKSCALE_LOG_DIR=str(log_dir)
    )  # the fallback log: not the home dir


def error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith(LINE)]
    assert len(lines) == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


def logged_at(line: str) -> Path:
    return Path(re.search(r"\(traceback: (.+?); rerun with --debug", line).group(1))


def test_a_bad_config_key_is_one_line_and_debug_shows_the_traceback(tmp_path):
    out = tokscale("config", "show", "tokenizer/demo", "model.nope=1", log_dir=tmp_path)
    assert out.returncode == 2 and out.stdout == ""
    line = error_line(out.stderr)
    assert "model.nope" in line and logged_at(line) == tmp_path / "last-error.log"
    assert "Traceback" in logged_at(line).read_text() and "argv:" in logged_at(line).read_text()
    debug = tokscale("config", "show", "tokenizer/demo", "model.nope=1", "--debug", log_dir=tmp_path)
    assert debug.returncode == 2 and "Traceback (most recent call last)" in debug.stderr
    assert debug.stderr.splitlines()[-1].startswith(LINE)


def write_corrupt_shard(path: Path) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in (("k3.png", b"not a png"), ("k3.cls", b"1")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def train_args(tmp_path: Path, run_dir: Path) -> list[str]:
    shard = write_corrupt_shard(tmp_path / "bad.tar")
    return [
        "train",
        "tokenizer",
        "tokenizer/demo",
        f"run_dir={run_dir}",
        f"data.train_shards={shard}",
        f"data.eval_shards={shard}",
        "model.image_size=32",
        "data.batch_size=4",
        "data.num_workers=1",  # the error is raised in a DataLoader worker
        "train.max_steps=2",
        "eval.every_steps=0",
        "train.progress=false",
    ]


@pytest.mark.parametrize("nproc", [1, 2])
def test_training_on_a_corrupt_shard_names_shard_key_and_rank_in_one_line(tmp_path, nproc):
    run_dir = tmp_path / "run"
    out = tokscale(*train_args(tmp_path, run_dir), "--nproc", str(nproc), log_dir=tmp_path / "logs")
    assert out.returncode == 2, out.stderr[-3000:]
    line = error_line(out.stderr)
    assert f"shard {tmp_path / 'bad.tar'} key 'k3'" in line and "fails to decode" in line
    if nproc == 1:
        assert logged_at(line) == run_dir / "logs" / "error.log"
    else:
        assert re.match(rf"{LINE} rank [01] of 2 failed: shard ", line)
        assert logged_at(line).parent == run_dir / "logs" and logged_at(line).name.startswith("error-rank")
    log = logged_at(line).read_text()
    assert "Traceback" in log and "BadSampleError" in log


PEER_FAILS = textwrap.dedent(
    f"""
    import time, torch, torch.distributed as dist
    dist.init_process_group("gloo")
    if dist.get_rank() == 1:
        time.sleep(1)
        raise ValueError({SENTENCE!r})
    dist.all_reduce(torch.ones(1))  # rank 0 waits here and loses its peer
    """
)


def test_the_rank_that_failed_first_is_reported_not_the_one_that_lost_it(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("TOKSCALE_LOG_DIR", str(tmp_path))
    script = tmp_path / "peer.py"
    script.write_text(PEER_FAILS)
    with pytest.raises(RankFailed) as info:
        launch_local(2, [str(script)])
    err = info.value
    assert (err.rank, err.exit_code, str(err)) == (1, 2, f"rank 1 of 2 failed: {SENTENCE}")
    assert Path(err.log_path) == tmp_path / "last-error-rank1.log" and "ValueError" in err.details
    # neither rank printed its error or a traceback (rank 0 lost its peer, or was stopped): the launcher speaks
    printed = capfd.readouterr().err
    assert LINE not in printed and "Traceback" not in printed, printed


def _png(seed: int) -> bytes:
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_shard(path: Path, kind: str) -> Path:
    """One shard of each corrupt kind met in training: cut inside a member, zero bytes, a member that is not an
    image, an empty image member."""
    members = []
    for i in range(4):
        image = _png(i)
        if i == 2 and kind == "non-image":
            image = b"<html>not an image</html>"
        if i == 2 and kind == "empty-member":
            image = b""
        members += [(f"k{i}.png", image), (f"k{i}.cls", b"1")]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    if kind == "truncated":
        data = data[: len(data) // 2 + 100]
    if kind == "zero-bytes":
        data = b""
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("kind", ["truncated", "zero-bytes", "non-image", "empty-member"])
def test_each_corrupt_shard_kind_ends_training_with_one_line_naming_the_shard(tmp_path, kind):
    shard = write_shard(tmp_path / f"{kind}.tar", kind)
    args = [a for a in train_args(tmp_path, tmp_path / "run") if not a.startswith("data.")]
    args += [
        f"data.train_shards={shard}",
        f"data.eval_shards={shard}",
        "data.batch_size=4",
        "data.num_workers=1",
    ]
    args += ["data.shuffle_buffer=1"]  # in order: the bad member is met in the first batch
    out = tokscale(*args, log_dir=tmp_path / "logs")
    assert out.returncode == 2, out.stderr[-3000:]
    line = error_line(out.stderr)  # exactly one error line, no traceback on the screen
    assert str(shard) in line, line
    if kind in ("non-image", "empty-member"):
        assert "'k2'" in line, line
