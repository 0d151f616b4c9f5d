import operator
import os
import sys
import textwrap

import pytest

from tokscale.jobs.local import launch_local


def test_function_ranks_see_their_own_torch_distributed_environment():
    ranks = launch_local(2, os.getenv, "RANK")
    assert ranks == ["0", "1"]
    ports = launch_local(2, os.getenv, "MASTER_PORT")
    assert ports[0] == ports[1] and int(ports[0]) > 0


def test_a_failing_function_rank_is_reported_with_its_traceback():
    # Both ranks fail alike; which one the launcher sees exit first depends on scheduling.
    with pytest.raises(RuntimeError, match="(?s)rank [01] of 2 failed:.*ZeroDivisionError") as info:
        launch_local(2, operator.truediv, 1, 0)
    assert "Traceback" in info.value.details and "ZeroDivisionError" in info.value.details


ALL_REDUCE = textwrap.dedent(
    """
    import os, sys, torch, torch.distributed as dist
    dist.init_process_group("gloo")
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    with open(os.path.join(sys.argv[1], f"rank{dist.get_rank()}.txt"), "w") as f:
        f.write(f"{dist.get_world_size()} {t.item()}")
    dist.destroy_process_group()
    """
)


def test_argv_ranks_form_one_gloo_group(tmp_path):
    script = tmp_path / "allreduce.py"
    script.write_text(ALL_REDUCE)
    assert launch_local(2, [str(script), str(tmp_path)]) == 0
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)] == ["2 3.0", "2 3.0"]


def test_one_failing_rank_stops_the_others_and_returns_its_exit_code(tmp_path):
    # Rank 1 exits 7 at once; rank 0 would wait forever in a collective with the absent rank.
    script = tmp_path / "fail.py"
    script.write_text("import os, sys, time\nif os.environ['RANK'] == '1': sys.exit(7)\ntime.sleep(600)\n")
    assert launch_local(2, [str(script)]) == 7


def test_nproc_must_be_positive():
    with pytest.raises(ValueError, match="--nproc"):
        launch_local(0, [sys.executable])


def test_argv_ranks_that_finish_skip_the_interpreter_teardown(tmp_path):
    # The teardown is where ZeRO-3 over gloo sometimes aborts; argv workers end through finish().
    script = tmp_path / "ends.py"
    script.write_text(
        "import atexit, os, sys\n"
        "atexit.register(lambda: open(os.path.join(sys.argv[1], 'teardown' + os.environ['RANK']), 'w').close())\n"
        "open(os.path.join(sys.argv[1], 'ran' + os.environ['RANK']), 'w').close()\n"
    )
    assert launch_local(2, [str(script), str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "ends.py") == ["ran0", "ran1"]


def test_argv_exit_codes_and_messages_pass_through(tmp_path):
    script = tmp_path / "exits.py"
    script.write_text("import sys\nsys.exit(int(sys.argv[1]))\n")
    assert launch_local(1, [str(script), "5"]) == 5
    assert launch_local(1, [str(script), "0"]) == 0
    assert launch_local(1, ["-m", "json.tool", "--help"]) == 0
