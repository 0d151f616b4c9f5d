"""Shared pytest setup: CPU, deterministic, offline; and the real two-node Slurm cluster.

The ``slurm_cluster`` fixture (tests marked ``slurm``, in tests/jobs and tests/evaluation) starts a cluster once per
session and stops it after: as root, ``jobs/local_cluster.sh start`` installs Debian's slurmctld/slurmd/munge when
missing and starts two slurmd daemons acting as node1 and node2. Without root the Slurm tests skip with a message
saying how to run them, except under CI=true, where they fail instead: CI must never pass by skipping them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

# helpers shared by several test folders (reference_weights.py) import as plain modules
sys.path.insert(0, str(Path(__file__).resolve().parent))

# Never reach a hub at test time: weights come from local files the tests write.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tracebacks of failures that have no run directory go here (tokscale.errors), not into the user's home.
os.environ.setdefault("TOKSCALE_LOG_DIR", tempfile.mkdtemp(prefix="tokscale-test-logs-"))

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "jobs" / "local_cluster.sh"
TOY_TRAINER = Path(__file__).resolve().parent / "jobs" / "toy_trainer.py"
HOW_TO = (
    "the Slurm tests need root to start a local cluster: run them as root (`sudo make test`), or start one "
    "yourself with `sudo jobs/local_cluster.sh start` and `export SLURM_CONF=/tmp/tokscale-slurm/slurm.conf`"
)


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _unavailable(reason: str):
    if in_ci():
        pytest.fail(f"CI=true but the Slurm cluster is unavailable: {reason}", pytrace=False)
    pytest.skip(f"{reason}; {HOW_TO}")


def _cluster_dir() -> Path:
    return Path(os.environ.get("TOKSCALE_SLURM_DIR", "/tmp/tokscale-slurm"))


def _running(d: Path) -> bool:
    pid_file = d / "slurmctld.pid"
    if not pid_file.is_file():
        return False
    try:
        os.kill(int(pid_file.read_text()), 0)
        return True
    except (OSError, ValueError):
        return False


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running two-node cluster (SLURM_CONF set) as a :class:`Cluster`; stopped at the end if this session
    started it."""
    d = _cluster_dir()
    conf = d / "slurm.conf"
    started = False
    if not _running(d):
        if os.geteuid() != 0:
            _unavailable("not running as root")
        out = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            _unavailable(f"`{SCRIPT} start` failed: {out.stderr.strip()[-2000:]}")
        started = True
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)
    try:
        yield Cluster(str(conf))
    finally:
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old
        if started:
            subprocess.run(["bash", str(SCRIPT), "stop"], capture_output=True, text=True, timeout=120)


class Cluster:
    """The running cluster plus the waiting helpers the Slurm tests share."""

    toy_trainer = str(TOY_TRAINER)

    def __init__(self, conf: str):
        self.conf = conf

    def squeue_state(self, job_id: str) -> str:
        out = subprocess.run(
            ["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T"], capture_output=True, text=True
        )
        return out.stdout.strip().split("\n")[0] if out.stdout.strip() else ""

    def wait_for(self, job, timeout_s: float = 240):
        """job.results(), but failing with the job's logs when Slurm ends it without results (no sacct here)."""
        deadline = time.monotonic() + timeout_s
        ended_since = None
        # Result files only: job.done() would also ask sacct, which this cluster does not have.
        tasks = getattr(job, "_sub_jobs", None) or [job]
        while not all(t.paths.result_pickle.exists() for t in tasks):
            state = self.squeue_state(job.job_id)
            if state in (
                "FAILED",
                "CANCELLED",
                "TIMEOUT",
                "NODE_FAIL",
                "OUT_OF_MEMORY",
                "BOOT_FAIL",
                "COMPLETED",
                "",
            ):
                ended_since = ended_since or time.monotonic()
                if time.monotonic() - ended_since > 10:  # result files are written before the state changes
                    pytest.fail(
                        f"job {job.job_id} ended {state or '(gone)'} without results:\n{self.job_logs(job)}"
                    )
            if time.monotonic() > deadline:
                pytest.fail(
                    f"job {job.job_id} not done after {timeout_s} s (state {state}):\n{self.job_logs(job)}"
                )
            time.sleep(0.5)
        return job.results()

    def final_state(self, job_id: str, timeout_s: float = 30) -> str:
        """The state once the job left RUNNING/COMPLETING (result files appear just before)."""
        deadline = time.monotonic() + timeout_s
        while (state := self.squeue_state(job_id)) in ("RUNNING", "COMPLETING", "PENDING", "REQUEUED"):
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        return state

    def job_logs(self, job) -> str:
        texts = []
        for sub in getattr(job, "_sub_jobs", None) or [job]:
            for path in (sub.paths.stdout, sub.paths.stderr):
                if Path(path).is_file():
                    texts.append(f"--- {path}\n" + Path(path).read_text()[-3000:])
        return "\n".join(texts) or "(no logs)"

    def metrics(self, run_dir: Path) -> list[dict]:
        path = Path(run_dir) / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


_EXIT_STATUS: list[int] = []


def pytest_sessionfinish(session, exitstatus):
    _EXIT_STATUS.append(int(exitstatus))


def pytest_unconfigure(config):
    """In-process trainer tests leave a gloo process group in this process; its threads can abort interpreter
    teardown (SIGABRT) after every test passed. Leave the way tokscale's entry points do (tokscale.shutdown), with
    pytest's own exit status, after pytest printed its summary."""
    import sys

    dist = sys.modules.get("torch.distributed")
    if _EXIT_STATUS and dist is not None and dist.is_available() and dist.is_initialized():
        from tokscale.shutdown import exit_process

        exit_process(_EXIT_STATUS[-1])
