import subprocess
import sys
import textwrap

from tokscale.jobs.local import launch_local

EXIT_SCRIPT = textwrap.dedent(
    """
    import atexit, logging, sys
    from tokscale.shutdown import exit_process
    logging.basicConfig(stream=sys.stderr, level=logging.INFO)
    atexit.register(lambda: print("interpreter teardown ran", flush=True))
    sys.stdout.write("buffered line without newline")  # a pipe is block-buffered: lost by a bare os._exit
    logging.getLogger("t").info("a log line")
    exit_process(3)
    """
)


def test_exit_process_flushes_output_and_skips_interpreter_teardown():
    out = subprocess.run([sys.executable, "-c", EXIT_SCRIPT], capture_output=True, text=True, timeout=60)
    assert out.returncode == 3
    assert out.stdout == "buffered line without newline"
    assert "a log line" in out.stderr
    assert "teardown" not in out.stdout


FINISH_SCRIPT = textwrap.dedent(
    """
    import atexit, os, sys, time, torch.distributed as dist
    from tokscale.shutdown import finish
    dist.init_process_group("gloo")
    atexit.register(lambda: open(os.path.join(sys.argv[1], "teardown" + os.environ["RANK"]), "w").close())
    if dist.get_rank() == 1:
        time.sleep(1.0)
        open(os.path.join(sys.argv[1], "rank1_done"), "w").close()
    finish(0)
    """
)


def test_finish_waits_for_every_rank_then_exits_zero_without_teardown(tmp_path):
    script = tmp_path / "finish.py"
    script.write_text(FINISH_SCRIPT)
    assert launch_local(2, [str(script), str(tmp_path)]) == 0
    assert (tmp_path / "rank1_done").exists()
    assert not list(tmp_path.glob("teardown*"))
