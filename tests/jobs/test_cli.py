import pytest

from tokscale.cli import build_parser, main
from tokscale.jobs.cli import job_config_from_args


def parse(*argv):
    return build_parser().parse_args(["submit", "tokenizer", "tokenizer/demo", *argv])


def test_slurm_flags_fill_a_job_config_apart_from_training_overrides():
    args = parse(
        "train.max_steps=4",
        "-N",
        "2",
        "--gpus-per-node",
        "8",
        "-p",
        "gpu",
        "-t",
        "90",
        "--slurm",
        "exclusive=true",
    )
    assert args.overrides == ["train.max_steps=4"]
    job = job_config_from_args(args)
    assert (job.nodes, job.gpus_per_node, job.partition, job.time_min) == (2, 8, "gpu", 90)
    assert job.extra == {"exclusive": True} and job.world_size == 16


def test_flags_override_a_job_config_file(tmp_path):
    f = tmp_path / "job.yaml"
    f.write_text("nodes: 4\npartition: big\naccount: lab\n")
    job = job_config_from_args(parse("--job-config", str(f), "--nodes", "2"))
    assert (job.nodes, job.partition, job.account) == (2, "big", "lab")


def test_bad_slurm_flags_exit_2_naming_the_problem(capsys):
    assert main(["submit", "tokenizer", "tokenizer/demo", "--slurm", "exclusive"]) == 2
    assert "--slurm 'exclusive': expected OPTION=VALUE" in capsys.readouterr().err
    assert main(["submit", "tokenizer", "tokenizer/demo", "--nodes", "0"]) == 2
    assert "job.nodes must be >= 1" in capsys.readouterr().err


def test_every_jobs_command_has_help(capsys):
    for argv in (["submit", "tokenizer", "--help"], ["jobs", "status", "--help"]):
        with pytest.raises(SystemExit) as stop:
            main(argv)
        assert stop.value.code == 0
    assert "RUN_DIR" in capsys.readouterr().out
