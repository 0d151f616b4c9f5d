import pytest

from tokscale.jobs.cluster import as_flags, check_request, parse_gpus, parse_sinfo, parse_time_min
from tokscale.jobs.config import JobConfig

SINFO = """\
node1|debug*|2|4000|(null)|local|1:00:00
node2|debug*|2|4000|(null)|local|1:00:00
gpu01|gpu|64|512000|gpu:a100:8(S:0-1)|a100,ib|2-00:00:00
gpu02|gpu|64|512000|gpu:a100:8(S:0-1)|a100,ib|2-00:00:00
"""


def test_sinfo_lines_become_partitions_with_node_counts_gpus_features_and_limits():
    parts = parse_sinfo(SINFO)
    assert sorted(parts) == ["debug", "gpu"]
    assert parts["debug"].default and not parts["gpu"].default
    assert len(parts["gpu"].nodes) == 2 and parts["gpu"].gpus == 8 and parts["gpu"].cpus == 64
    assert parts["gpu"].features == {"a100", "ib"}
    assert parts["gpu"].max_time_min == 2880 and parts["debug"].max_time_min == 60


def test_slurm_time_and_gres_strings_parse():
    assert parse_time_min("infinite") is None
    assert (
        parse_time_min("30") == 30 and parse_time_min("45:00") == 45 and parse_time_min("1-02:03:00") == 1563
    )
    assert parse_gpus("gpu:4") == 4 and parse_gpus("gpu:a100:8(S:0-1)") == 8 and parse_gpus("(null)") == 0


@pytest.mark.parametrize(
    "job, message",
    [
        (JobConfig(partition="gpus"), "job.partition='gpus': unknown partition 'gpus'"),
        (JobConfig(nodes=3), "job.nodes=3: partition 'debug' has only 2 node"),
        (JobConfig(gpus_per_node=1), "job.gpus_per_node=1: partition 'debug' has no GPUs"),
        (JobConfig(partition="gpu", gpus_per_node=16), "at most 8 GPU"),
        (JobConfig(tasks_per_node=4), "4 CPUs per node"),
        (JobConfig(mem_gb=8), "job.mem_gb=8"),
        (JobConfig(partition="gpu", constraint="a100&h100"), "feature 'h100'"),
        (JobConfig(time_min=61), "job.time_min=61: partition 'debug' allows at most 60"),
    ],
)
def test_an_impossible_request_is_refused_naming_the_setting(job, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_request(job, parse_sinfo(SINFO))


def test_a_request_that_fits_returns_its_partition():
    assert check_request(JobConfig(nodes=2), parse_sinfo(SINFO)).name == "debug"
    job = JobConfig(partition="gpu", nodes=2, gpus_per_node=8, constraint="a100", time_min=1440)
    assert check_request(job, parse_sinfo(SINFO)).name == "gpu"


def test_sbatch_flags_render_booleans_bare():
    assert as_flags({"nodes": 2, "exclusive": True}) == ["--nodes=2", "--exclusive"]
