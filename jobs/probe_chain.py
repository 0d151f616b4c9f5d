"""The probe pipeline as a chain of Slurm jobs per tokenizer (``tokscale probe ... --submit``).

Each tokenizer's first unfinished stage goes out through that command's own ``--submit`` path (resources: the
pipeline's ``job`` merged with ``stage_jobs.<stage>``), followed by a continuation: this module as a runnable (one
CPU task, ``dependency: afterany:<stage job>``) that runs the same step again from ``OUT/probe_config.yaml``. It sees
the stage finished and submits the next one, waits again while the stage's job is still queued or requeued, or
records the failure and stops once ``max_attempts`` submissions of the stage ended without its output::

    tokscale submit tokscale.jobs.probe_chain OUT/<name>/continuations/after-JOB-0/continuation.yaml ...

The stages, the plan, the state file and the results are tokscale.jobs.probe's; this module only decides and submits.
"""

from __future__ import annotations

import json
import logging
import re
import shlex
from dataclasses import dataclass, replace
from pathlib import Path

from tokscale.jobs.config import JobConfig
from tokscale.jobs.probe import (
    CONTINUATION,
    Plan,
    StageFailed,
    TokenizerPlan,
    begin_invocation,
    command_line,
    error_line,
    found_finished,
    load_probe_config,
    make_plan,
    mark_not_applicable,
    now,
    run_logged,
    stage_argv,
    stage_finished,
    state_lock,
    write_results,
    write_state,
)

log = logging.getLogger(__name__)

# Slurm states in which a stage's job may still write its output (it is queued, running or requeued)
ACTIVE_STATES = {
    "PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING", "SUSPENDED",
    "RESIZING", "SIGNALING", "STAGE_OUT", "PREEMPTED",
}  # fmt: skip
MAX_WAITS = 200  # continuations resubmitted while one stage job stays queued (requeues included)


@dataclass
class ContinuationConfig:
    """The continuation job's config: which pipeline, which tokenizer's chain, which stage job it followed."""

    config: str = ""  # OUT/probe_config.yaml
    tokenizer: str = ""
    follows: str = ""  # the Slurm job id this continuation waited for (afterany)
    run_dir: str = ""  # its own folder: config snapshot and Slurm logs

    def __post_init__(self):
        for key in ("config", "tokenizer", "run_dir"):
            if not getattr(self, key):
                raise ValueError(f"{key} is empty")


def load_config(path, overrides=()) -> ContinuationConfig:
    """The runnable interface (tokscale.registry) the continuation job is submitted and run through."""
    from tokscale.config import load_config as load

    return load(ContinuationConfig, path, list(overrides))


def main(cfg: ContinuationConfig, should_stop=None) -> dict:
    """The continuation job: the next step of one tokenizer's chain (see :func:`submit_chain`)."""
    plan = make_plan(load_probe_config(cfg.config), submit=True)
    outcome = submit_chain(
        plan, ["continuation", cfg.tokenizer, cfg.follows], only=cfg.tokenizer, follows=cfg.follows
    )
    return {"status": "finished", **outcome}


def submit_chain(plan: Plan, argv: list[str], only: str | None = None, follows: str | None = None) -> dict:
    """One step of each tokenizer's chain (of ``only``'s when a continuation runs it); returns what happened."""
    mode = CONTINUATION if only else "submit"
    with state_lock(plan.out, wait=True):
        state = begin_invocation(plan, mode, argv)
        outcome = {}
        for tok in plan.tokenizers:
            if only and tok.name != only:
                continue
            rec = state["tokenizers"][tok.name]
            try:
                outcome[tok.name] = _advance(plan, tok, rec, follows if only else None, state)
            finally:
                write_state(plan.out, state)
        write_results(plan)
    failed = {n: o for n, o in outcome.items() if o["action"] == "failed"}
    if failed and not only:
        name, o = next(iter(failed.items()))
        raise StageFailed(
            f"stage {o['stage']!r} of tokenizer {name!r} could not be submitted: {o.get('error')} (log: "
            f"{o.get('log')}); fix it and rerun the same command",
            log_path=o.get("log"),
        )
    return outcome


def _advance(plan: Plan, tok: TokenizerPlan, rec: dict, follows: str | None, state: dict) -> dict:
    """Mark finished stages; then submit the first unfinished one (with its continuation), wait again for it,
    or record that its job ended without its output."""
    from tokscale.jobs.status import slurm_state

    continuation = follows is not None
    for stage in plan.stages:
        s = rec["stages"].setdefault(stage, {})
        if stage in tok.not_applicable:
            mark_not_applicable(tok, stage, s)
            continue
        if stage_finished(plan, tok, stage):
            found_finished(s, submitted_chain=True)
            continue
        job = s.get("job_id") if s.get("status") == "submitted" else None
        # another invocation (the user, a second continuation) submitted it, with its own continuation
        if job and continuation and job != follows:
            return {"action": "superseded", "stage": stage, "job_id": job}
        if job:
            job_state = slurm_state(job)
            if job_state in ACTIVE_STATES:  # queued, running or requeued: wait for it (again)
                cont = s.get("continuation_job_id")
                if not continuation and cont and slurm_state(cont) in ACTIVE_STATES:
                    return {"action": "in flight", "stage": stage, "job_id": job, "continuation_job_id": cont}
                s["waits"] = int(s.get("waits", 0)) + 1
                if s["waits"] > MAX_WAITS:
                    return _chain_failed(
                        rec, s, stage, f"job {job} still {job_state} after {MAX_WAITS} waits"
                    )
                s["continuation_job_id"] = _submit_continuation(plan, tok, job, s["waits"])
                return {"action": "waiting", "stage": stage, "job_id": job, "state": job_state,
                        "continuation_job_id": s["continuation_job_id"]}  # fmt: skip
            why = f"job {job} ended ({job_state}) without its output" + _job_error(s.get("job_stderr"))
            s.update(status="failed", error=why, ended=now(), log=s.get("job_stderr") or s.get("log"))
            if continuation and int(s.get("attempts", 0)) >= plan.cfg.max_attempts:
                return _chain_failed(rec, s, stage, why)
        elif continuation and s.get("status") == "failed":
            return _chain_failed(rec, s, stage, s.get("error") or "failed before")
        return _submit_stage(plan, tok, stage, rec, s)
    rec["status"] = "done"
    return {"action": "done", "stage": None}


def _job_error(stderr_path: str | None) -> str:
    """``: <the exception line>`` of a failed job's rank-0 stderr (a Python traceback's last line), or ""."""
    try:
        lines = Path(stderr_path).read_text(errors="replace").splitlines() if stderr_path else []
    except OSError:
        return ""
    pattern = re.compile(r"^(?:\[rank\d+\]:\s*)?((?:[\w.]+\.)?\w*(?:Error|Exception|Failed)\b.*)$")
    found = [m.group(1) for m in map(pattern.match, lines) if m]
    found += [
        line[len("tokscale: error:") :].strip() for line in lines if line.startswith("tokscale: error:")
    ]
    return f": {found[-1][:500]}" if found else ""


def _chain_failed(rec: dict, s: dict, stage: str, why: str) -> dict:
    s.update(status="failed", error=why)
    rec["status"] = "failed"
    log.error("stage %s stopped: %s (log %s)", stage, why, s.get("log"))
    return {
        "action": "failed",
        "stage": stage,
        "error": why,
        "log": s.get("log"),
        "attempts": s.get("attempts"),
    }


def _submitted(stdout: str) -> dict:
    """The first run a ``--submit`` command printed (the JSON list of tokscale.jobs.submission.SubmittedRun)."""
    start = stdout.find("[")
    runs = json.loads(stdout[start:]) if start >= 0 else []
    if not runs or "job_id" not in runs[0]:
        raise ValueError(f"no submitted job in the command's output: {stdout[-500:]!r}")
    return runs[0]


def _write_job_config(path: Path, job: JobConfig) -> Path:
    from tokscale.config import to_yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_yaml(job))
    return path


def _submit_stage(plan: Plan, tok: TokenizerPlan, stage: str, rec: dict, s: dict) -> dict:
    attempt = int(s.get("attempts", 0)) + 1
    log_path = tok.log_path(stage)
    rec["status"] = "submitted"
    try:
        job_file = _write_job_config(tok.folder / "jobs" / f"{stage}.yaml", plan.cfg.job_for(stage))
        argv = stage_argv(plan, tok, stage, job_config=job_file)  # needs the earlier stages' outputs
    except (OSError, ValueError) as err:
        s.update(log=str(log_path), attempts=attempt)
        return _chain_failed(rec, s, stage, f"{type(err).__name__}: {err}")
    s.update(status="submitting", started=now(), command=shlex.join(command_line(argv)), log=str(log_path))
    s.update(attempts=attempt, ended=None, error=None, waits=0, job_id=None, continuation_job_id=None)
    code, start, stdout = run_logged(argv, log_path, f"{tok.name} {stage} submission {attempt}", capture=True)
    try:
        if code:
            raise ValueError(error_line(log_path, start))
        run = _submitted(stdout)
    except ValueError as err:
        return _chain_failed(rec, s, stage, f"submission failed (exit {code}): {err}")
    s.update(
        status="submitted", job_id=run["job_id"], job_stdout=run.get("stdout"), job_stderr=run.get("stderr")
    )
    s["continuation_job_id"] = _submit_continuation(plan, tok, run["job_id"], 0)
    log.info("%s %s: job %s, continuation %s", tok.name, stage, run["job_id"], s["continuation_job_id"])
    return {"action": "submitted", "stage": stage, "job_id": run["job_id"],
            "continuation_job_id": s["continuation_job_id"], "attempt": attempt}  # fmt: skip


def _submit_continuation(plan: Plan, tok: TokenizerPlan, follows: str, index: int) -> str:
    """This module as a one-task job that starts once job ``follows`` ended, whatever its outcome."""
    from tokscale.config import to_yaml

    # one folder per submission: a queued continuation keeps its own snapshot and logs
    run_dir = tok.folder / "continuations" / f"after-{follows}-{index}"
    run_dir.mkdir(parents=True, exist_ok=True)
    cont = ContinuationConfig(str(plan.config_path), tok.name, str(follows), str(run_dir))
    (run_dir / "continuation.yaml").write_text(to_yaml(cont))
    job = plan.cfg.job_for(CONTINUATION)
    job = replace(job, extra={**job.extra, "dependency": f"afterany:{follows}"})
    job_file = _write_job_config(run_dir / "job.yaml", job)
    argv = ["submit", __name__, str(run_dir / "continuation.yaml"), "--job-config", str(job_file), "--json"]
    log_path = tok.log_path(CONTINUATION)
    code, start, stdout = run_logged(
        argv, log_path, f"{tok.name} continuation after job {follows}", capture=True
    )
    if code:
        raise StageFailed(
            f"the continuation job after job {follows} of tokenizer {tok.name!r} could not be submitted: "
            f"{error_line(log_path, start)} (log: {log_path}); rerun `tokscale probe ... --submit` once it ended",
            log_path=str(log_path),
        )
    return _submitted(stdout)["job_id"]
