import os
import signal
from types import SimpleNamespace

import pytest

from tokscale.jobs.training_job import (
    EXIT_STOPPED,
    REQUEUE,
    RETURN_RESULT,
    StopRequest,
    TrainingJob,
    distributed_env,
    master_port,
    next_action,
)
from tokscale.registry import resolve_runnable

TOY = os.path.join(os.path.dirname(__file__), "toy_trainer.py")


def test_distributed_env_rendezvouses_on_the_first_node_with_a_port_from_the_job_id():
    env = SimpleNamespace(
        global_rank=3, num_tasks=4, local_rank=1, num_nodes=2, hostnames=["node7", "node8"], raw_job_id="4242"
    )
    assert distributed_env(env) == {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "node7",
        "MASTER_PORT": str(master_port("4242")),
    }
    assert master_port("4242") != master_port("4243")
    assert all(1024 < master_port(str(j)) < 65536 for j in (0, 1, 19999, 10**9))


def test_usr2_asks_for_a_requeue_and_sigterm_only_for_a_stop():
    old = {s: signal.getsignal(s) for s in (signal.SIGUSR2, signal.SIGTERM)}
    try:
        stop = StopRequest().install()
        assert not stop.is_set()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.is_set() and not stop.wants_requeue
        os.kill(os.getpid(), signal.SIGUSR2)
        assert stop.wants_requeue
        os.kill(os.getpid(), signal.SIGTERM)  # the kill that follows a requeue does not cancel it
        assert stop.wants_requeue
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def test_runnables_load_by_module_name_or_file_and_must_have_load_config_and_main():
    toy = resolve_runnable(TOY)
    assert callable(toy.main) and callable(toy.load_config)
    with pytest.raises(ValueError, match="load_config"):
        resolve_runnable("tokscale.jobs.config")
    with pytest.raises(FileNotFoundError, match="missing.py"):
        resolve_runnable("/nonexistent/missing.py")
    with pytest.raises(ValueError, match="unknown trainer 'nosuch'.*tokenizer"):
        resolve_runnable("nosuch")


def test_checkpoint_resubmits_the_same_job_for_submitits_timeout_path():
    job = TrainingJob("/runs/a/slurm/config.yaml", TOY, max_requeues=5)
    delayed = job.checkpoint()
    again = delayed.function
    assert isinstance(again, TrainingJob) and again is not job
    assert (again.config_path, again.trainer, again.max_requeues) == (job.config_path, TOY, 5)


@pytest.mark.parametrize(
    "status, signal_name, restarts, action",
    [
        ("done", None, 0, RETURN_RESULT),
        ("done", "SIGUSR2", 0, RETURN_RESULT),  # the signal came after the last step
        ("stopped", "SIGUSR2", 0, REQUEUE),
        ("stopped", "SIGUSR2", 2, RETURN_RESULT),  # max_requeues=2 reached: stop for good, say so
        ("stopped", "SIGTERM", 0, EXIT_STOPPED),  # preempted (Slurm requeues) or cancelled (must stay so)
    ],
)
def test_after_training_a_task_requeues_only_when_a_usr2_stop_has_requeues_left(
    status, signal_name, restarts, action
):
    assert next_action({"status": status, "step": 5}, signal_name, restarts, max_requeues=2) == action
