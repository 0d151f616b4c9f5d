"""A few-step training run of the tiny preset, shared by the in-process tests and the multi-rank worker.

As a script (one process per rank, through tokscale.jobs.local.launch_local):
    python tiny_run.py RUN_DIR SHARDS STOP_AFTER [OVERRIDES...]     (STOP_AFTER 0: run to the end)
"""

import json
import sys
from pathlib import Path

from tokscale.tokenizers.train import load_train_config, main


def tiny_cfg(run_dir, shards: str, *extra: str):
    return load_train_config(
        "tokenizer/demo",
        [
            f"run_dir={run_dir}",
            f"data.train_shards={shards}",
            f"data.eval_shards={shards}",
            "model.image_size=32",
            "data.batch_size=4",
            "data.num_workers=0",
            "data.shuffle_buffer=8",
            "data.batches_per_epoch=4",
            "train.max_steps=6",
            "train.log_every=1",
            "train.ckpt_every=2",
            "train.image_every=3",
            "train.keep_last=2",
            "train.progress=false",
            "optim.warmup_steps=2",
            "eval.every_steps=0",
            *extra,
        ],
    )


class StopAfter:
    """should_stop() that turns True after n polls (the trainer polls once per step)."""

    def __init__(self, n: int):
        self.n, self.calls = n, 0

    def __call__(self) -> bool:
        self.calls += 1
        return self.calls > self.n


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss_total"] for r in rows if "train/loss_total" in r}


if __name__ == "__main__":
    run_dir, shards, stop_after, *overrides = sys.argv[1:]
    stop = StopAfter(int(stop_after)) if int(stop_after) else None
    print(json.dumps(main(tiny_cfg(run_dir, shards, *overrides), should_stop=stop)))
