"""The process entry of every trainer: what torchrun, ``tokscale train --nproc`` ranks and scripts run.

    python -m tokscale.train tokenizer tokenizer/demo train.max_steps=50
    torchrun --nproc_per_node 8 -m tokscale.train tokenizer tokenizer/gigatok-1d-B-L train.zero_stage=3

NAME is a registered trainer (tokscale.registry) or ``module:Class`` / ``file.py:Class``. Each rank reads RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; rank 0 prints the result as JSON. The process ends through
tokscale.shutdown.finish (barrier, flush, os._exit), which skips the interpreter teardown that races gloo's
threads.

A rank that fails reports through tokscale.errors.report: one line ``tokscale: error: rank R: ...`` (its own
message, a DataLoader worker's unwrapped), the traceback in RUN_DIR/logs/error-rank{R}.log (error.log for a
single process), and a record of the failure for the launcher (failed-rank{R}.json in the folder a
``--nproc`` parent gave, which then prints the line itself; else RUN_DIR/logs/failed-rank{R}.txt). It then
exits 2 (1 for a bug) at once, without a barrier: the other ranks may be gone or stuck in a collective.
"""

from __future__ import annotations

import json
import logging
import os
import sys


def run(name: str, config, overrides=(), should_stop=None) -> dict:
    """Load NAME's config (schema -> preset -> YAML -> overrides) and train it in this process."""
    runnable, cfg = load(name, config, overrides)
    return runnable.main(cfg, should_stop=should_stop)


def load(name: str, config, overrides=()):
    from tokscale.registry import resolve_runnable

    runnable = resolve_runnable(name)
    return runnable, runnable.load_config(config, list(overrides))


def cli_main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2:
        print(__doc__)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log_dir = None  # the run's logs/ once its config loaded; before that, the default log folder
    try:
        import torch

        os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
        runnable, cfg = load(argv[0], argv[1], argv[2:])
        if getattr(cfg, "run_dir", ""):
            log_dir = os.path.join(cfg.run_dir, "logs")
        result = runnable.main(cfg)
    except (Exception, KeyboardInterrupt) as err:
        from tokscale.errors import report
        from tokscale.shutdown import exit_process

        exit_process(report(err, log_dir=log_dir))
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    from tokscale.shutdown import finish

    finish(cli_main())
