"""The callable that submitit runs on every Slurm task: distributed environment, stop signals, requeue.

Per task (one per GPU, or ``tasks_per_node`` on CPU nodes), :class:`TrainingJob`

1. exports RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT from Slurm's variables (rendezvous on the
   first node of the allocation, port derived from the job id so all tasks agree without talking);
2. installs :class:`StopRequest`: SIGUSR2 (sent ``signal_delay_s`` before the time limit, or by
   ``scancel --signal=USR2 JOBID``) and SIGTERM (preemption, scancel) only set a flag;
3. resolves the runnable lazily (a registered trainer, whose ``main`` is the shared loop tokscale.loop, or any
   module with ``load_config`` and ``main``; tokscale.registry) and calls ``main(cfg, should_stop=stop.is_set)``;
   the loop polls the flag every step, agrees across ranks and returns ``{"status": "stopped"}`` after saving; a
   failure prints tokscale's one ``tokscale: error:`` line into the task's stderr log (traceback in
   ``RUN_DIR/logs``, tokscale.errors) before submitit records it;
4. on "stopped" after SIGUSR2, global rank 0 runs ``scontrol requeue`` (same job id, same run directory) and the
   requeued job resumes from the newest complete checkpoint; after SIGTERM it only exits (Slurm requeues
   preempted jobs itself, and a cancelled job must stay cancelled);
5. leaves through :func:`tokscale.shutdown.finish` (barrier, flush, ``os._exit``), after writing submitit's
   result file itself when training finished, so ``job.result()`` works and no teardown abort marks it FAILED.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from typing import Any

log = logging.getLogger(__name__)

PORT_BASE, PORT_SPAN = 20000, 20000


class StopRequest:
    """Signal handlers that only record the request; the training loop decides when to act on it."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signal_name: str | None = None

    def install(self, signals=(signal.SIGUSR2, signal.SIGTERM)) -> StopRequest:
        for sig in signals:
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        # SIGUSR2 (checkpoint and requeue) wins over a SIGTERM that arrives with or after it.
        if self.signal_name != "SIGUSR2":
            self.signal_name = name
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    @property
    def wants_requeue(self) -> bool:
        return self.signal_name == "SIGUSR2"


def master_port(job_id: str) -> int:
    """A port every task of a job derives alike: from the numeric Slurm job id (array tasks have their own)."""
    return PORT_BASE + int(job_id) % PORT_SPAN


def distributed_env(job_env) -> dict[str, str]:
    """torch.distributed variables from a ``submitit.JobEnvironment`` (or any object with its attributes)."""
    return {
        "RANK": str(job_env.global_rank),
        "WORLD_SIZE": str(job_env.num_tasks),
        "LOCAL_RANK": str(job_env.local_rank),
        "LOCAL_WORLD_SIZE": str(job_env.num_tasks // max(job_env.num_nodes, 1)),
        "MASTER_ADDR": job_env.hostnames[0],
        "MASTER_PORT": str(master_port(job_env.raw_job_id)),
    }


def restart_count() -> int:
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)


def requeue(job_id: str) -> None:
    """``scontrol requeue``: Slurm stops this run and queues the same job id again (it waits ``cred_expire``)."""
    out = subprocess.run(["scontrol", "requeue", job_id], timeout=60, capture_output=True, text=True)
    if out.returncode != 0:
        # The checkpoint is saved: resubmitting the same command resumes from it.
        raise RuntimeError(f"scontrol requeue {job_id} failed: {out.stderr.strip()}; the checkpoint is saved")
    log.info("requeued job %s", job_id)


REQUEUE, EXIT_STOPPED, RETURN_RESULT = "requeue", "exit stopped", "return result"
STOPPED_EXIT_CODE = 128 + signal.SIGTERM  # what an uncaught SIGTERM would have given


def next_action(result: dict, signal_name: str | None, restarts: int, max_requeues: int) -> str:
    """What a task does once ``main`` returned.

    - stopped after SIGUSR2 (time limit ahead, or ``scancel --signal=USR2``): requeue, unless the job already
      restarted ``max_requeues`` times;
    - stopped after SIGTERM (preemption, which Slurm requeues itself; or cancellation): exit without a result;
    - finished (or out of requeues): write the result and exit 0.
    """
    if result.get("status") != "stopped":
        return RETURN_RESULT
    if signal_name == "SIGUSR2":
        if restarts < max_requeues:
            return REQUEUE
        log.warning("not requeueing: restart %d reached job.max_requeues=%d", restarts, max_requeues)
        return RETURN_RESULT
    if signal_name == "SIGTERM":
        return EXIT_STOPPED
    return RETURN_RESULT


class TrainingJob:
    """What ``tokscale submit`` hands to submitit: a runnable's spec, a resolved config file and the requeue policy.

    Only strings and ints are pickled; the runnable is imported on the node (tokscale.registry.resolve_runnable).
    """

    def __init__(self, config_path: str, trainer: str, max_requeues: int = 20) -> None:
        self.config_path = str(config_path)
        self.trainer = trainer
        self.max_requeues = max_requeues

    def __call__(self) -> dict:
        import submitit

        job_env = submitit.JobEnvironment()
        _log_to_stderr(job_env.global_rank)
        os.environ.update(distributed_env(job_env))
        stop = StopRequest().install()  # replaces submitit's handlers for the rest of the run
        log.info(
            "%s: rank %s of %s, restart %d",
            job_env,
            os.environ["RANK"],
            os.environ["WORLD_SIZE"],
            restart_count(),
        )
        os.environ.setdefault("DS_ACCELERATOR", "cpu" if job_env_has_no_gpu() else "cuda")

        from tokscale.registry import resolve_runnable

        cfg = None
        try:
            runnable = resolve_runnable(self.trainer)
            cfg = runnable.load_config(self.config_path, [])
            result = runnable.main(cfg, should_stop=stop.is_set)
        except BaseException as exc:
            _report_failure(exc, cfg)
            raise  # submitit records it: the job ends FAILED and job.result() raises
        return self._after_training(result, stop, job_env)

    def _after_training(self, result: dict, stop: StopRequest, job_env) -> dict:
        from tokscale.shutdown import barrier_if_distributed, finish

        action = next_action(result, stop.signal_name, restart_count(), self.max_requeues)
        log.info("training returned %s at step %s: %s", result.get("status"), result.get("step"), action)
        if action == REQUEUE:
            barrier_if_distributed()  # every rank's part of the checkpoint is on disk
            if job_env.global_rank == 0:
                requeue(job_env.job_id)
            # No result file: the submitter's job.result() waits for the requeued run.
            finish(0)
        if action == EXIT_STOPPED:
            # Preempted (Slurm requeues the job itself) or cancelled: no result, and not "COMPLETED".
            finish(STOPPED_EXIT_CODE)
        write_result(job_env, result)
        finish(0)

    def checkpoint(self, *args: Any, **kwargs: Any):
        """submitit's own timeout/preemption path (a signal before ``__call__`` took over the handlers):
        requeue the same job; the trainer resumes from the newest complete checkpoint in the run directory."""
        import submitit

        return submitit.helpers.DelayedSubmission(
            TrainingJob(self.config_path, self.trainer, self.max_requeues), *args, **kwargs
        )


def _report_failure(exc: BaseException, cfg) -> None:
    """What a local run prints, in the task's Slurm stderr log: one ``tokscale: error: rank R: ...`` line naming
    the file, key or value, with the traceback in ``RUN_DIR/logs/error-rank{R}.log`` (tokscale.errors)."""
    from tokscale.errors import report

    run_dir = getattr(cfg, "run_dir", None) if cfg is not None else None
    try:
        report(exc, log_dir=os.path.join(str(run_dir), "logs") if run_dir else None)
    except Exception:  # reporting must never hide the failure itself
        log.exception("could not report the failure")


def _log_to_stderr(rank: int) -> None:
    """INFO lines of tokscale's loggers (trainer included) into the task's stderr log, tagged with the rank.
    Only tokscale's logger: submitit's own logger already prints, and would print twice through the root."""
    logger = logging.getLogger("tokscale")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def job_env_has_no_gpu() -> bool:
    return not os.environ.get("CUDA_VISIBLE_DEVICES") and not os.environ.get("SLURM_JOB_GPUS")


def write_result(job_env, result: Any) -> None:
    """Write this task's submitit result file, as submitit does after ``__call__`` returns; we leave through
    ``os._exit`` instead of returning, so the file is written here."""
    from submitit.core import utils

    path = job_env.paths.result_pickle
    with utils.temporary_save_path(path) as tmp:
        utils.cloudpickle_dump(("success", result), tmp)
