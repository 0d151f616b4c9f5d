import pytest

from tokscale.config import ConfigError, load_config
from tokscale.jobs.config import JobConfig


def test_tasks_default_to_one_per_gpu_or_one_on_cpu_nodes():
    assert JobConfig(gpus_per_node=8).ntasks_per_node == 8
    assert JobConfig().ntasks_per_node == 1
    assert JobConfig(nodes=2, tasks_per_node=3).world_size == 6


def test_a_bad_resource_value_is_an_error_naming_the_key():
    with pytest.raises(ValueError, match="job.nodes"):
        JobConfig(nodes=0)
    with pytest.raises(ValueError, match="job.signal_delay_s"):
        JobConfig(time_min=1, signal_delay_s=60)
    with pytest.raises(ValueError, match="job.tasks_per_node"):
        JobConfig(gpus_per_node=8, tasks_per_node=2)


def test_an_unknown_job_key_from_yaml_or_flags_is_a_config_error():
    with pytest.raises(ConfigError, match="gpu_per_node"):
        load_config(JobConfig, None, ["gpu_per_node=2"])


def test_sbatch_options_and_submitit_parameters_carry_every_requested_resource():
    job = JobConfig(
        nodes=2,
        gpus_per_node=4,
        cpus_per_task=8,
        mem_gb=64,
        partition="gpu",
        time_min=90,
        account="lab",
        qos="high",
        constraint="a100",
        extra={"exclusive": True},
    )
    opts = job.sbatch_options()
    assert opts == {
        "nodes": 2,
        "ntasks-per-node": 4,
        "time": 90,
        "gpus-per-node": 4,
        "cpus-per-task": 8,
        "mem": "65536M",
        "partition": "gpu",
        "account": "lab",
        "qos": "high",
        "constraint": "a100",
        "exclusive": True,
    }
    params = job.submitit_parameters()
    assert params["ntasks_per_node"] == 4 and params["gpus_per_node"] == 4 and params["mem"] == "65536MB"
    assert params["signal_delay_s"] == 120 and params["additional_parameters"] == {
        "requeue": True,
        "exclusive": True,
    }
    # submitit accepts them: it renders the sbatch file without complaint.
    from submitit.slurm.slurm import _make_sbatch_string

    text = _make_sbatch_string(command="true", folder="/tmp/x", **params)
    assert "#SBATCH --gpus-per-node=4" in text and "#SBATCH --signal=USR2@120" in text
    assert "#SBATCH --exclusive" in text and "#SBATCH --requeue" in text
